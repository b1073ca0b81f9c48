"""Does the shipped mini base follow prompts? 64 fixed prompts x fixed seeds, 20 steps, CFG 4.0.

    python benchmarks/mini_base_quality.py [sample_data/mini-sd] [--threads 1]

Prints BENCH base_colour_accuracy (both colours right), base_shape_accuracy and
base_seconds_per_image. Targets (issue 3): >= 0.85, >= 0.70, < 2 s.
"""

import argparse
import time

import torch


def main() -> None:
    from diffusers import StableDiffusionPipeline

    from studio.shapes.evaluate import evaluate_pipeline

    p = argparse.ArgumentParser()
    p.add_argument("base", nargs="?", default="sample_data/mini-sd")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.base)
    pipe.set_progress_bar_config(disable=True)
    t = time.time()
    scores, _, _ = evaluate_pipeline(pipe, n=64, steps=20, guidance=4.0)
    seconds = (time.time() - t) / 64
    print(f"scores {scores}")
    print(f"BENCH base_colour_accuracy {scores['both_colours']:.3f}")
    print(f"BENCH base_shape_accuracy {scores['shape']:.3f}")
    print(f"BENCH base_seconds_per_image {seconds:.3f}")


if __name__ == "__main__":
    main()
