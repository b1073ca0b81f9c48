"""The README's main job, measured: train a style on the mini base with defaults, then score it.

Runs ``studio train sample_data/styles/<style>`` exactly as a newcomer would (defaults), times
it, then renders N base-world prompts with the style's trigger word at seeds 0..N-1, with the
adapter at weight 1.0 and without it, and counts how often the style detector fires.

Prints BENCH demo_minutes, demo_style_score_with, demo_style_score_without, and
demo_style_score_ceiling: the rate of perfect style drawings of the same prompts after the VAE.
Run: python benchmarks/style_demo.py [--style stripes] [--method lora] [--n 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench  # noqa: E402


def score(adapter: Path, style: str, n: int, weight: float = 1.0, baseline: bool = True,
          base_model: str | None = None) -> tuple[float, float]:
    """Detector rates (with the adapter at ``weight``, without it; NaN when not ``baseline``)."""
    from studio import formats
    from studio.models import load_diffusion_base
    from studio.pipeline import Settings, generate
    from studio.shapes import evaluate, styles

    base = load_diffusion_base(base_model)
    base.pipe.set_progress_bar_config(disable=True)
    trigger = styles.STYLE_TRIGGERS.get(style) or styles.CHARACTER_TRIGGERS.get(style)
    prompts = [f"{p}, {trigger} style" for p in evaluate.eval_prompts(n, seed=123)]
    settings = [Settings(prompt=p, seed=i, steps=20, cfg=4.0) for i, p in enumerate(prompts)]
    without = styles.detection_rate(style, generate(base.pipe, settings)) if baseline else float("nan")
    formats.attach_file(formats.read(adapter), base.components, "style", weight)
    with_adapter = styles.detection_rate(style, generate(base.pipe, settings))
    return with_adapter, without


def ceiling(style: str, n: int) -> float:
    """The detector's rate on the same prompts drawn *perfectly* in the style, through the base's VAE:
    the most any adapter of the UNet / text encoder can reach (small figures lose their stripes)."""
    import numpy as np

    from studio.models import load_diffusion_base
    from studio.shapes import evaluate, styles, world

    rng = np.random.default_rng(0)
    images = []
    for prompt in evaluate.eval_prompts(n, seed=123):
        colour, shape, background = world.parse_caption(prompt)
        images.append(styles.render_style(world.random_scene(rng, shape, colour, background), style))
    return styles.detection_rate(style, styles.vae_round_trip(load_diffusion_base().pipe.vae, images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", default="stripes")
    parser.add_argument("--method", default=None, help="default: the trainer's default")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--out", default="/tmp/studio-style-demo")
    parser.add_argument("--reuse", action="store_true", help="score an existing run in --out")
    args = parser.parse_args()
    out = Path(args.out)
    minutes = float("nan")
    if not args.reuse:
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "studio", "train", f"sample_data/styles/{args.style}", "--out", str(out)]
        command += ["--method", args.method] if args.method else []
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True)
        minutes = (time.perf_counter() - start) / 60
        bench("demo_minutes", minutes, "<= 10")
    adapter = out / f"{args.style}.safetensors"
    with_adapter, without = score(adapter, args.style, args.n)
    bench("demo_style_score_with", with_adapter, ">= 0.8")
    bench("demo_style_score_without", without, "<= 0.1")
    from studio.shapes.styles import STYLE_TRIGGERS

    if args.style in STYLE_TRIGGERS:  # the character has no style drawing to compare with
        bench("demo_style_score_ceiling", ceiling(args.style, args.n))


if __name__ == "__main__":
    main()
