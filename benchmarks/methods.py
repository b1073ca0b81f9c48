"""LoRA, PiSSA, MiLoRA and SVF side by side on one style set and one step budget.

For each method: `studio train sample_data/styles/<style> --method M --steps N` with the
defaults otherwise, then trainable parameters, adapter file size, seconds, and the style
detector's rate on N_PROMPTS generations with the adapter (without it the rate is 0.00,
see style_demo.py). Prints a Markdown table for the README and one BENCH line per method.

Run: python benchmarks/methods.py [--style stripes] [--steps 300] [--n 16]
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
from style_demo import score  # noqa: E402
from timing import bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", default="stripes")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--methods", default="lora,pissa,milora,svf")
    parser.add_argument("--out", default="/tmp/studio-methods")
    args = parser.parse_args()
    from studio import formats

    rows = []
    for method in args.methods.split(","):
        out = Path(args.out) / method
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "studio", "train", f"sample_data/styles/{args.style}", "--out", str(out),
                        "--method", method, "--steps", str(args.steps), "--sample-every", "0"],
                       cwd=ROOT, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        adapter = out / f"{args.style}.safetensors"
        af = formats.read(adapter)
        trained = sum(v.numel() for part in af.parts.values() for k, v in part.tensors.items()
                      if k.rsplit(".", 1)[-1] in ("A", "B", "z"))
        with_adapter, _ = score(adapter, args.style, args.n)
        rows.append((method, trained, adapter.stat().st_size / 1e6, seconds, with_adapter))
        bench(f"method_style_score_{method}", with_adapter)
    print(f"\n| method | trained values | native file MB | seconds (train + save) | {args.style} detector, "
          f"{args.steps} steps |\n|---|---|---|---|---|")
    for method, trained, mb, seconds, rate in rows:
        print(f"| {method} | {trained:,} | {mb:.2f} | {seconds:.0f} | {rate:.2f} |")


if __name__ == "__main__":
    main()
