"""Optimizers side by side on one style: each trains the stripes style as a user's default run does.

For each optimizer of trainers/optimizers.py: one ``studio train sample_data/styles/<style>
--optimizer NAME`` with every other default (LoRA r8 on kohya's transformer set, min-SNR gamma 1,
the method's learning rate, 1200 steps, the mini base; Prodigy with lr 1.0 and the settings
trainers/optimizers.py gives it), then style_demo.py's ``score``: the style detector on N
generations with the adapter at weight 1.0. AdamW is the reference and always runs first.

``--sample-every 0`` skips the intermediate sample grids (the final one still renders). It should
not change the adapter: the trainer reseeds torch every step, the data order and noise have their
own generator, the grid its own seeds, and schedule-free's evaluation weights are restored bit for
bit (AdamW's 0.84 here is style_demo.py's default-run rate; not compared bit for bit).

Seconds per step: the elapsed time on the trainer's progress bar at its next-to-last step over
that step count (includes the checkpoints every 100 steps; not loading, caching, the final sample
grid or the export; 1-second resolution). On a shared CPU it follows the load beside the run more
than the optimizer: ``--time-only`` trains them back to back (no scores) for comparable numbers.

Prints BENCH optimizer_score_<name>, optimizer_score_gap_<name> (score - AdamW's; goal >= -0.1)
and optimizer_step_seconds_<name>, then a Markdown table for the README.
Run: python benchmarks/optimizers.py [--optimizers adamw,prodigy,...] [--steps N] [--n 64] [--out DIR] [--reuse | --resume | --time-only]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from style_demo import score  # noqa: E402
from timing import bench  # noqa: E402

REFERENCE = "adamw"
ORDER = ("adamw", "prodigy", "adafactor", "schedulefree", "adamw8bit")
"""The issue's three first, 8-bit AdamW last (its value is memory, not quality)."""


def train(style: str, optimizer: str, out: Path, steps: int | None) -> float:
    """One default ``studio train`` run with ``--optimizer``; returns its wall seconds (log in OUT/train.log)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "studio", "train", f"sample_data/styles/{style}", "--out", str(out),
               "--optimizer", optimizer, "--sample-every", "0", *(["--steps", str(steps)] if steps else [])]
    start = time.perf_counter()
    with open(out / "train.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"studio train --optimizer {optimizer} failed; see {out / 'train.log'}")
    return time.perf_counter() - start


def seconds_per_step(log: Path) -> tuple[float, int]:
    """Seconds per training step and the steps, from the trainer's progress bar in its log: the
    elapsed time at the last step before the final one, over that step count (so loading, caching
    and the final sample grid and export are left out; the checkpoints every 100 steps are in)."""
    marks = re.findall(r"(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<", log.read_text(errors="replace"))
    before_last = [m for m in marks if 0 < int(m[0]) < int(m[1])]
    if not before_last:
        raise SystemExit(f"no progress bar with two steps or more in {log}")
    done, total, hours, minutes, seconds = before_last[-1]
    return (int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)) / int(done), int(total)


def run(args, name: str, out: Path) -> tuple[float, float, int, float]:
    """(score, s/step, steps, wall seconds) of one optimizer: trained and scored, or with --resume
    taken from OUT/result.json where an earlier invocation finished this run with the same n."""
    saved = out / "result.json"
    if args.resume and saved.is_file():
        r = json.loads(saved.read_text())
        if r["n"] == args.n and (args.steps is None or r["steps"] == args.steps):
            return r["score"], r["step_s"], r["steps"], r["wall_s"]
    wall = float("nan") if args.reuse else train(args.style, name, out, args.steps)
    per_step, steps = seconds_per_step(out / "train.log")
    rate = score(out / f"{args.style}.safetensors", args.style, args.n, baseline=False)[0]
    saved.write_text(json.dumps({"score": rate, "step_s": per_step, "steps": steps, "wall_s": wall, "n": args.n}))
    return rate, per_step, steps, wall


def main() -> None:
    from trainers.optimizers import OPTIMIZERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", default="stripes")
    parser.add_argument("--optimizers", default=",".join(ORDER), help=f"comma-separated, of {', '.join(OPTIMIZERS)}")
    parser.add_argument("--steps", type=int, default=None, help="default: the trainer's (1200)")
    parser.add_argument("--n", type=int, default=64, help="generations scored per optimizer")
    parser.add_argument("--out", default="/tmp/studio-optimizers")
    parser.add_argument("--reuse", action="store_true", help="score the existing runs in --out")
    parser.add_argument("--resume", action="store_true", help="keep the runs an earlier invocation finished in --out")
    parser.add_argument("--time-only", action="store_true", help="train each back to back for s/step; no scores")
    args = parser.parse_args()
    names = [n for n in args.optimizers.split(",") if n]
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown:
        raise SystemExit(f"unknown optimizers {unknown}: choose from {', '.join(OPTIMIZERS)}")
    names = [REFERENCE] + [n for n in names if n != REFERENCE]  # every gap is to AdamW's score of this run
    if args.time_only:  # back to back, so they share one stretch of the machine's load
        for name in names:
            train(args.style, name, Path(args.out) / name, args.steps)
            bench(f"optimizer_step_seconds_{name}", seconds_per_step(Path(args.out) / name / "train.log")[0])
        return
    rows = []
    for name in names:
        out = Path(args.out) / name
        rate, per_step, steps, wall = run(args, name, out)
        gap = rate - rows[0][1] if rows else 0.0
        bench(f"optimizer_score_{name}", rate)
        if name != REFERENCE:
            bench(f"optimizer_score_gap_{name}", gap, ">= -0.1")
        bench(f"optimizer_step_seconds_{name}", per_step)
        rows.append((name, rate, gap, per_step, steps, wall))
    print(f"\n| optimizer | {args.style} detector ({args.n} prompts) | gap to AdamW | s/step | steps | "
          f"whole command s |\n|---|---|---|---|---|---|")
    for name, rate, gap, per_step, steps, wall in rows:
        print(f"| {OPTIMIZERS[name].label} | {rate:.2f} | {gap:+.2f} | {per_step:.3f} | {steps} | {wall:.0f} |")


if __name__ == "__main__":
    main()
