"""Character training with a trigger word, with and without prior preservation, on the mini base.

Trains ``sample_data/characters/kbot`` (captions "a kbot robot on a <colour> background") twice
with the character recipe below (``--defaults``: the trainer's style defaults): once plain,
once with ``--reg-data sample_data/regularization/shapes``
(plain shapes-world images with their captions, i.e. the base's own classes). Then, for the
base model alone and for each adapter at weight 1.0, it renders

- N prompts with the trigger ("a kbot robot on a red background", seeds 0..N-1) and counts how
  often the kbot detector fires (two eyes inside a lighter body): does the character appear?
- N base-world prompts without the trigger ("a red circle on a blue background") and reads them
  with the evaluator (colour, background and shape must all match the prompt): does the base
  still render its own classes? The kbot detector's rate on these is the character's leakage.

Prints a Markdown table for the README and BENCH lines. Run: python benchmarks/character.py [--n 64]
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

RECIPE = ["--targets", "unet-transformer,te-attn", "--rank", "16"]
"""The usual character recipe (kohya practice): text encoder trained too, so the trigger gets a
meaning of its own, and twice the style rank. On kbot, 1200 steps, 64 prompts: 0.58 of the
triggered images show the robot's two eyes with it, 0.34 with the style defaults at 900 steps."""
RUNS = {"plain": [], "prior": ["--reg-data", "sample_data/regularization/shapes"]}


def measure(base, adapter: Path | None, n: int) -> dict[str, float]:
    from studio import formats
    from studio.pipeline import Settings, generate
    from studio.shapes import evaluate, styles
    from studio.shapes.world import COLOURS

    if adapter is not None:
        formats.attach_file(formats.read(adapter), base.components, "character", 1.0)
    backgrounds = list(COLOURS)
    trigger_prompts = [f"a kbot robot on a {backgrounds[i % len(backgrounds)]} background" for i in range(n)]
    base_prompts = evaluate.eval_prompts(n, seed=321)
    with_trigger = generate(base.pipe, [Settings(prompt=p, seed=i, steps=20, cfg=4.0)
                                        for i, p in enumerate(trigger_prompts)])
    without = generate(base.pipe, [Settings(prompt=p, seed=i, steps=20, cfg=4.0) for i, p in enumerate(base_prompts)])
    if adapter is not None:
        formats.detach_file(base.components, "character")
    return {"kbot_with_trigger": styles.detection_rate("kbot", with_trigger),
            "base_accuracy": evaluate.score(without, base_prompts)["all"],
            "kbot_leak": styles.detection_rate("kbot", without)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--out", default="/tmp/studio-character")
    parser.add_argument("--defaults", action="store_true", help="the trainer's style defaults instead of RECIPE")
    parser.add_argument("--reuse", action="store_true", help="score the runs already in --out")
    args = parser.parse_args()
    from studio.models import load_diffusion_base

    adapters = {}
    for label, extra in RUNS.items():
        out = Path(args.out) / label
        if not args.reuse:
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            recipe = [] if args.defaults else RECIPE
            subprocess.run([sys.executable, "-m", "studio", "train", "sample_data/characters/kbot", "--out", str(out),
                            "--sample-every", "0", *recipe, *extra], cwd=ROOT, check=True, capture_output=True)
            print(f"trained {label} in {time.perf_counter() - start:.0f} s", flush=True)
        adapters[label] = out / "kbot.safetensors"
    base = load_diffusion_base()
    base.pipe.set_progress_bar_config(disable=True)
    rows = {"base model, no adapter": measure(base, None, args.n)}
    rows["kbot adapter"] = measure(base, adapters["plain"], args.n)
    rows["kbot adapter + prior preservation"] = measure(base, adapters["prior"], args.n)
    for label, key in (("plain", "kbot adapter"), ("prior", "kbot adapter + prior preservation")):
        for metric, value in rows[key].items():
            bench(f"character_{label}_{metric}", value)
    print(f"\n| model | kbot detected, prompts with the trigger | base prompts rendered correctly "
          f"| kbot detected on base prompts |\n|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['kbot_with_trigger']:.2f} | {r['base_accuracy']:.2f} | {r['kbot_leak']:.2f} |")


if __name__ == "__main__":
    main()
