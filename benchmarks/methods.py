"""Adapter methods (any of the registry) side by side on one style set and one step budget.

For each method: one `studio train sample_data/styles/<style> --method M --steps MAX` run with
the defaults otherwise, writing the adapter every few steps (``--save-adapter-every``); then
trainable parameters, adapter file size, seconds, and the style detector's rate on N
generations with the adapter at each step count (without it the rate is 0.00, see
style_demo.py). Prints a Markdown table for the README and one BENCH line per method and count.

Run: python benchmarks/methods.py [--style stripes] [--steps 100,300,600] [--n 32]
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from style_demo import score  # noqa: E402
from timing import bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", default="stripes")
    parser.add_argument("--steps", default="100,300,600", help="step counts to score, comma-separated")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--methods", default="lora,pissa,milora,svf")
    parser.add_argument("--out", default="/tmp/studio-methods")
    parser.add_argument("--extra", default="", help="more `studio train` flags for every run")
    args = parser.parse_args()
    from studio import formats
    from studio.adapters import registry

    counts = sorted(int(c) for c in args.steps.split(","))
    every = math.gcd(*counts)
    rows = []
    for method in args.methods.split(","):
        out = Path(args.out) / method
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "studio", "train", f"sample_data/styles/{args.style}", "--out", str(out),
                        "--method", method, "--steps", str(counts[-1]), "--sample-every", "0",
                        "--save-adapter-every", str(every), *args.extra.split()],
                       cwd=ROOT, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        adapter = out / f"{args.style}.safetensors"
        af = formats.read(adapter)
        trained = sum(v.numel() for part in af.parts.values() for k, v in part.tensors.items()
                      if k.rsplit(".", 1)[-1] in registry.get(part.method).TRAINABLE)
        rates = []
        for count in counts:
            at = adapter if count == counts[-1] else out / f"{args.style}-step{count:07d}.safetensors"
            rates.append(score(at, args.style, args.n, baseline=False)[0])
            bench(f"method_style_score_{method}_{count}", rates[-1])
        rows.append((method, trained, adapter.stat().st_size / 1e6, seconds, rates))
    print(f"\n| method | trained values | native file MB | seconds ({counts[-1]} steps + save) | "
          + " | ".join(f"{args.style} detector, {c} steps" for c in counts)
          + " |\n|---|---|---|---|" + "---|" * len(counts))
    for method, trained, mb, seconds, rates in rows:
        print(f"| {method} | {trained:,} | {mb:.2f} | {seconds:.0f} | " + " | ".join(f"{r:.2f}" for r in rates) + " |")


if __name__ == "__main__":
    main()
