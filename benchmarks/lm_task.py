"""The sample LM task (pirate answers) with vs without an adapter, for LoRA, PiSSA, MiLoRA and SVF.

Each method trains with ``studio train --task lm``'s own function on ``sample_data/text/pirate-train.jsonl``
(the pirate answers for 3/4 of the things of the text world) on the embedded mini LM, then answers
the 26 held-out questions (``pirate-eval.jsonl``: things whose pirate answers it never saw) greedily.
The metric (``studio.text_world.judge_answer``): *format* = the answer starts ``Arr!`` and ends
``, matey.``; *fact* = it names the right colour / place and no other; *both* = the two at once.
The base without adapter is the first row.

Prints a Markdown table (the README's) and ``BENCH lm_task_both_<method>`` lines.
Run: python benchmarks/lm_task.py [--steps 200] [--methods lora,pissa,milora,svf]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--methods", default="lora,pissa,milora,svf")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from studio import text_world
    from studio.models import load_causal_lm
    from studio.text import load_with_adapters, pirate_metric
    from trainers.language import train
    from trainers.language_config import DEFAULT_DATA, LMTrainConfig

    base, tokenizer = load_causal_lm(None)
    rows = [("base (no adapter)", "-", pirate_metric(base.eval(), tokenizer), 0.0)]
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            cfg = LMTrainConfig(data=str(DEFAULT_DATA), out=f"{tmp}/{method}", method=method, rank=args.rank,
                                steps=args.steps, save_every=10 ** 9)
            began = time.perf_counter()
            path = train(cfg, say=lambda *_: None)
            seconds = time.perf_counter() - began
            model, tokenizer = load_with_adapters(None, [(str(path), 1.0)])
            rows.append((method, f"{cfg.learning_rate:g}", pirate_metric(model, tokenizer), seconds))
    print(f"\n{args.steps} steps, batch 8, rank {args.rank} (SVF: one gain per singular value), lm-attn + lm-mlp, "
          f"{2 * len(text_world.PIRATE_EVAL)} held-out questions\n")
    print("| adapter | lr | format | fact | both | train s |")
    print("|---|---|---|---|---|---|")
    for name, lr, score, seconds in rows:
        print(f"| {name} | {lr} | {score['format']:.2f} | {score['fact']:.2f} | {score['both']:.2f} | "
              f"{seconds:.0f} |")
    print()
    for name, _, score, _ in rows:
        bench(f"lm_task_both_{name.split()[0]}", score["both"])


if __name__ == "__main__":
    main()
