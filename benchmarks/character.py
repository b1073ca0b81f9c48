"""The kbot character on the mini base: LoRA alone, textual inversion alone, and both (pivotal tuning).

Each recipe trains ``sample_data/characters/kbot`` (captions "a kbot robot on a <colour> background")
with prior preservation (``--reg-data sample_data/regularization/shapes``: plain shapes-world images
with their captions, the base's own classes), once per seed. Then, with the run's files in the mix
exactly as ``studio generate`` and the UI load them (``studio.mixing.MixSession``: a bundled
embedding installs its token), it renders

- N prompts with the trigger ("<kbot>, a kbot robot on a red background", seeds 0..N-1; the recipe's
  own caption form) and counts how often the kbot detector fires (two eyes inside a lighter body);
- N base-world prompts without the trigger ("a red circle on a blue background"), read by the
  evaluator (colour, background and shape must all match the prompt): does the base still render
  its own classes? The kbot detector's rate on these is the character's leakage.

The ceiling is the detector's rate on perfect kbot drawings passed through the base's VAE (what
any UNet / text-encoder adapter could reach at best).

Prints a Markdown table for the README and BENCH kbot_ceiling, kbot_rate, kbot_base_prompts_right
(the default recipe, mean over the seeds) and one BENCH line per recipe and seed.
Run: OMP_NUM_THREADS=1 python benchmarks/character.py [--n 64] [--seeds 0,1] [--recipes lora,ti,both] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench  # noqa: E402

TOKEN = "<kbot>"
PRIOR = ["--reg-data", "sample_data/regularization/shapes", "--prior-loss-weight", "2"]
"""Prior preservation at twice the data's weight: at 1 the base prompts kept 0.97 / 0.91 (two seeds; small
stars drawn as circles), at 2 0.97 / 0.94 with the character at 0.91 / 0.75 instead of 0.92 / 0.86."""
LAYERS = ["--targets", "unet-full,te-attn", "--rank", "16", "--conv-rank", "16", "--min-snr-gamma", "5"]
"""The layers of the character recipe. The eyes are a few pixels: kohya's LoCon set (ResNet and
sampler convolutions too) and min-SNR gamma 5 (more weight on the low-noise steps, where such
detail is drawn; the style default 1 favours layout) took LoRA from 0.45 (transformer set, gamma 1)
to 0.92 of triggered images. The text encoder trains too, so the trigger gets a meaning of its own."""
TI = ["--init-word", "robot", "--vectors", "2"]
RECIPES = {
    "lora": (LAYERS + ["--trigger", "kbot"], ""),
    "ti": (["--method", "ti", "--token", TOKEN] + TI, TOKEN),
    "both": (LAYERS + ["--with-ti", TOKEN] + TI, TOKEN),
}
"""name -> (train flags besides the data and the prior, the prompts' trigger prefix). 'both' is
pivotal tuning (diffusers' advanced script, --train_text_encoder_ti): the LoRA recipe plus the
new token's rows."""
DEFAULT = "lora"
RESULTS = ROOT / "benchmarks" / "results" / "character.json"


def ceiling(base, n: int) -> float:
    import numpy as np

    from studio.shapes import styles
    from studio.shapes.world import COLOURS

    rng, backgrounds = np.random.default_rng(0), list(COLOURS)
    images = [styles.render_kbot(rng, backgrounds[i % len(backgrounds)]) for i in range(n)]
    return styles.detection_rate("kbot", styles.vae_round_trip(base.pipe.vae, images))


def adapter_file(out: Path) -> Path:
    """What a user loads: the kohya file (with the bundled token) or, for TI alone, the embedding."""
    kohya = out / "kbot.kohya.safetensors"
    return kohya if kohya.exists() else out / "kbot.safetensors"


def measure(base, adapter: Path | None, prefix: str, n: int) -> dict[str, float]:
    from studio.mixing import MixEntry, MixSession
    from studio.pipeline import Settings
    from studio.shapes import evaluate, styles
    from studio.shapes.world import COLOURS

    session = MixSession(base)
    session.sync([MixEntry(str(adapter), 1.0)] if adapter else [])
    backgrounds = list(COLOURS)
    trigger = [f"{prefix + ', ' if prefix else ''}a kbot robot on a {backgrounds[i % len(backgrounds)]} background"
               for i in range(n)]
    plain = evaluate.eval_prompts(n, seed=321)
    with_trigger = session.render([Settings(prompt=p, seed=i, steps=20, cfg=4.0) for i, p in enumerate(trigger)])
    without = session.render([Settings(prompt=p, seed=i, steps=20, cfg=4.0) for i, p in enumerate(plain)])
    session.clear()
    return {"kbot_with_trigger": styles.detection_rate("kbot", with_trigger),
            "base_accuracy": evaluate.score(without, plain)["all"],
            "kbot_leak": styles.detection_rate("kbot", without)}


def train(recipe: str, seed: int, out: Path) -> float:
    flags, _ = RECIPES[recipe]
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "studio", "train", "sample_data/characters/kbot", "--out", str(out),
                    "--sample-every", "0", "--seed", str(seed), *flags, *PRIOR], cwd=ROOT, check=True,
                   capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--out", default="/tmp/studio-character")
    parser.add_argument("--reuse", action="store_true", help="score the runs already in --out, train the missing")
    parser.add_argument("--train-only", action="store_true", help="train the runs, score nothing (parallel lanes)")
    args = parser.parse_args()
    from studio.models import load_diffusion_base

    runs = [(r, int(s)) for r in args.recipes.split(",") for s in args.seeds.split(",")]
    if args.train_only:
        for recipe, seed in runs:
            print(f"{recipe} seed {seed}: trained in {train(recipe, seed, Path(args.out) / f'{recipe}-seed{seed}'):.0f} s")
        return
    base = load_diffusion_base()
    base.pipe.set_progress_bar_config(disable=True)
    results = {"ceiling": ceiling(base, args.n), "base model": measure(base, None, "", args.n), "runs": {}}
    bench("kbot_ceiling", results["ceiling"])
    for recipe, seed in runs:
        out = Path(args.out) / f"{recipe}-seed{seed}"
        seconds = None if args.reuse and adapter_file(out).exists() else train(recipe, seed, out)
        row = measure(base, adapter_file(out), RECIPES[recipe][1], args.n) | {"train_seconds": seconds}
        results["runs"][f"{recipe}-seed{seed}"] = row
        print(f"{recipe} seed {seed}: {json.dumps(row)}", flush=True)
        for metric in ("kbot_with_trigger", "base_accuracy", "kbot_leak"):
            bench(f"character_{recipe}_seed{seed}_{metric}", row[metric])
    default = [r for k, r in results["runs"].items() if k.startswith(f"{DEFAULT}-")]
    if default:
        bench("kbot_rate", statistics.mean(r["kbot_with_trigger"] for r in default), ">= 0.8")
        bench("kbot_base_prompts_right", statistics.mean(r["base_accuracy"] for r in default), ">= 0.95")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nceiling (perfect kbots through the VAE): {results['ceiling']:.2f}\n"
          f"\n| recipe, seed | kbot detected, prompts with the trigger | base prompts rendered correctly "
          f"| kbot detected on base prompts | training seconds |\n|---|---|---|---|---|")
    b = results["base model"]
    print(f"| base model, no adapter | {b['kbot_with_trigger']:.2f} | {b['base_accuracy']:.2f} | {b['kbot_leak']:.2f} | — |")
    for key, r in results["runs"].items():
        seconds = "—" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        print(f"| {key} | {r['kbot_with_trigger']:.2f} | {r['base_accuracy']:.2f} | {r['kbot_leak']:.2f} | {seconds} |")


if __name__ == "__main__":
    main()
