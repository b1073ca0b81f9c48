"""Three concepts at once on the mini base: a static mix, one LoRA, a trained router, MoLoRA (issue 17).

The concepts: the stripes style (trigger ``zxq``), the outline style (``qwo``) and the kbot character
(``kbot``), each with its sample set (48 captioned images). Trained with ``studio train`` (UNet,
kohya's transformer set, the trainer's defaults otherwise), at equal trained-parameter budgets:

    alone      one rank-R LoRA per concept, each scored on its own prompts (the reference)
    (a) mix    the three LoRAs attached together at weight 1 (a static, unmerged mix)
    (b) lora   one LoRA of rank 3 R on the union of the three sets (144 images)
    (c) router ``--mixture-of`` the three frozen LoRAs: only a per-layer, per-token router trains,
               on the union set (the images show one concept each, with its trigger: the router
               has to learn which expert a prompt's tokens want)
    (d) molora MoLoRA, 3 experts of rank R plus routers, on the union set

Scores, N prompts per concept (the evaluator's base-world captions with the trigger appended; kbot:
"a kbot robot on a <colour> background"), seeds 0..N-1, 20 steps, CFG 4:

    rate        the concept's own detector (studio.shapes.styles) on its prompts
    crosstalk   every other concept's detector on those prompts (stripes on kbot prompts, ...)
    colour      the prompt's colours read back (studio.shapes.evaluate.read_image): background and,
                for the shapes, the figure's colour (a striped figure is half its colour: the
                evaluator reads the most common palette colour of the figure)
    plain       base-world prompts without a trigger rendered right (shape and both colours)

The goal (issue 17): (c) or (d) keeps each concept's rate within 0.1 of its adapter alone while
cross-talk stays <= 0.1 and colour accuracy >= 0.9, where (a) fails at least one of these.
Prints a Markdown table and BENCH mixture_sd_concept_rate_min, mixture_sd_crosstalk_max,
mixture_sd_colour_accuracy (of the best routed variant, (c) or (d)); raw numbers to
benchmarks/results/mixtures_sd.json.

Run: OMP_NUM_THREADS=1 python benchmarks/mixtures_sd.py [--steps 1200] [--union-steps 2400] [--router-steps 400]
     [--n 24] [--out DIR] [--reuse] [--train-only]
(--reuse scores the runs already in --out and trains only the missing ones.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench  # noqa: E402

CONCEPTS = {"stripes": "sample_data/styles/stripes", "outline": "sample_data/styles/outline",
            "kbot": "sample_data/characters/kbot"}
RESULTS = ROOT / "benchmarks" / "results" / "mixtures_sd.json"


def union_set(out: Path) -> Path:
    """The three sample sets in one folder (symlinks; file names are distinct across the sets)."""
    folder = out / "union"
    folder.mkdir(parents=True, exist_ok=True)
    for data in CONCEPTS.values():
        for f in (ROOT / data).iterdir():
            link = folder / f.name
            if not link.exists():
                link.symlink_to(f)
    return folder


def runs(args, out: Path) -> dict[str, list[str]]:
    """name -> `studio train` arguments; the router's experts are the three concept runs."""
    union = str(union_set(out))
    experts = [str(out / c / f"{c}.safetensors") for c in CONCEPTS]
    plan = {c: [data, "--rank", str(args.rank), "--steps", str(args.steps)] for c, data in CONCEPTS.items()}
    plan["lora"] = [union, "--rank", str(3 * args.rank), "--steps", str(args.union_steps)]
    plan["router"] = [union, "--mixture-of", *experts, "--steps", str(args.router_steps)]
    plan["router"] += ["--unet-lr", str(args.router_lr)] if args.router_lr else []
    plan["molora"] = [union, "--method", "molora", "--rank", str(args.rank), "--method-args", "experts=3",
                      "--steps", str(args.union_steps)]
    return plan


def train_all(args, out: Path) -> dict[str, float]:
    """Train every run not already there (all of them without --reuse); seconds per run trained."""
    seconds = {}
    for name, argv in runs(args, out).items():
        folder = out / name
        if args.reuse and (folder / f"{name}.safetensors").exists():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        command = [sys.executable, "-m", "studio", "train", *argv, "--out", str(folder), "--name", name,
                   "--sample-every", "0"]
        start = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            subprocess.run(command, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        seconds[name] = time.perf_counter() - start
        print(f"trained {name} in {seconds[name]:.0f} s", flush=True)
    return seconds


def prompts(concept: str, n: int) -> list[tuple[str, str]]:
    """(prompt, plain caption the colours are read against) for ``concept``'s trigger."""
    from studio.shapes import evaluate, styles
    from studio.shapes.world import COLOURS

    if concept == "kbot":
        colours = list(COLOURS)
        return [(f"a kbot robot on a {colours[i % len(colours)]} background",) * 2 for i in range(n)]
    trigger = styles.STYLE_TRIGGERS[concept]
    return [(f"{p}, {trigger} style", p) for p in evaluate.eval_prompts(n, seed=123)]


def colour_right(image, caption: str) -> bool:
    from studio.shapes import evaluate
    from studio.shapes.world import parse_caption

    reading = evaluate.read_image(image)
    if caption.startswith("a kbot robot"):
        return reading.background == caption.split(" on a ")[1].split()[0]
    colour, _, background = parse_caption(caption)
    return reading.background == background and reading.colour == colour


def measure(base, n: int) -> dict:
    """Detector rates, cross-talk and colours per concept, and plain prompts, for what is attached now."""
    from studio.shapes import evaluate, styles

    row = {}
    for concept in CONCEPTS:
        pairs = prompts(concept, n)
        images = evaluate.render_prompts(base.pipe, [p for p, _ in pairs], seed=0)
        row[concept] = {"rate": styles.detection_rate(concept, images),
                        "crosstalk": {o: styles.detection_rate(o, images) for o in CONCEPTS if o != concept},
                        "colour": sum(colour_right(im, c) for im, (_, c) in zip(images, pairs)) / n}
    plain = evaluate.eval_prompts(n, seed=321)
    row["plain"] = evaluate.score(evaluate.render_prompts(base.pipe, plain, seed=0), plain)["all"]
    return row


def score_all(out: Path, n: int) -> dict:
    from studio import formats
    from studio.models import load_diffusion_base

    base = load_diffusion_base()
    base.pipe.set_progress_bar_config(disable=True)
    files = {name: out / name / f"{name}.safetensors" for name in (*CONCEPTS, "lora", "router", "molora")}
    rows = {"base": measure(base, n)}
    print(f"base: {rows['base']}", flush=True)
    alone = {}
    for concept in CONCEPTS:  # each adapter alone: only its own concept's numbers are the reference
        formats.attach_file(formats.read(files[concept]), base.components, concept, 1.0)
        alone[concept] = measure(base, n)
        formats.detach_file(base.components, concept)
    rows["alone"] = {c: alone[c][c] for c in CONCEPTS} | {"plain": min(alone[c]["plain"] for c in CONCEPTS)}
    for concept in CONCEPTS:
        formats.attach_file(formats.read(files[concept]), base.components, concept, 1.0)
    rows["mix"] = measure(base, n)
    print(f"alone: {rows['alone']}\nmix: {rows['mix']}", flush=True)
    for concept in CONCEPTS:
        formats.detach_file(base.components, concept)
    for name in ("lora", "router", "molora"):
        formats.attach_file(formats.read(files[name]), base.components, name, 1.0)
        rows[name] = measure(base, n)
        formats.detach_file(base.components, name)
        print(f"{name}: {rows[name]}", flush=True)
    return rows


def summary(rows: dict) -> dict[str, dict]:
    """Per variant: lowest rate, largest rate drop from alone, largest cross-talk, mean colour, goal met."""
    out = {}
    for name, row in rows.items():
        if name == "base":
            continue
        drop = max(rows["alone"][c]["rate"] - row[c]["rate"] for c in CONCEPTS)
        talk = max(v for c in CONCEPTS for v in row[c]["crosstalk"].values())
        colour = sum(row[c]["colour"] for c in CONCEPTS) / len(CONCEPTS)
        out[name] = {"rate_min": min(row[c]["rate"] for c in CONCEPTS), "rate_drop_max": drop,
                     "crosstalk_max": talk, "colour": colour,
                     "goal": drop <= 0.1 and talk <= 0.1 and colour >= 0.9}
    return out


LABELS = {"base": "base model, no adapter", "alone": "each LoRA alone (on its own prompts)",
          "mix": "(a) the three LoRAs mixed at weight 1", "lora": "(b) one LoRA on the union, rank 3R",
          "router": "(c) router over the three frozen LoRAs", "molora": "(d) MoLoRA on the union, 3 experts"}


def table(rows: dict, sums: dict) -> str:
    head = ("| model | " + " | ".join(f"{c} rate" for c in CONCEPTS) + " | largest cross-talk | colours right | "
            "plain prompts right | goal |\n|---|" + "---|" * (len(CONCEPTS) + 4))
    lines = [head]
    for name, row in rows.items():
        talk = max(v for c in CONCEPTS for v in row[c]["crosstalk"].values())
        colour = sum(row[c]["colour"] for c in CONCEPTS) / len(CONCEPTS)
        goal = "-" if name in ("base", "alone") else ("met" if sums[name]["goal"] else "missed")
        lines.append(f"| {LABELS[name]} | " + " | ".join(f"{row[c]['rate']:.2f}" for c in CONCEPTS)
                     + f" | {talk:.2f} | {colour:.2f} | {row['plain']:.2f} | {goal} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200, help="steps of each concept's own LoRA")
    parser.add_argument("--union-steps", type=int, default=2400, help="steps of (b) and (d) on the union")
    parser.add_argument("--router-steps", type=int, default=400, help="steps of (c)'s router")
    parser.add_argument("--router-lr", type=float, default=None, help="(c)'s learning rate (default: MoLoRA's)")
    parser.add_argument("--rank", type=int, default=8, help="R: each concept LoRA's rank, each MoLoRA expert's")
    parser.add_argument("--n", type=int, default=24, help="prompts per concept")
    parser.add_argument("--out", default="/tmp/t_bench/sd")
    parser.add_argument("--reuse", action="store_true", help="score the runs in --out, train only missing ones")
    parser.add_argument("--train-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = train_all(args, out)
    if args.train_only:
        return
    rows = score_all(out, args.n)
    sums = summary(rows)
    print("\n" + table(rows, sums) + "\n")
    best = min(("router", "molora"), key=lambda v: (not sums[v]["goal"], sums[v]["rate_drop_max"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "train_seconds": seconds, "rows": rows, "summary": sums,
                                   "best_routed": best}, indent=1) + "\n")
    print(f"best routed variant: {best}; goal met by: "
          + (", ".join(v for v, s in sums.items() if s["goal"]) or "none"))
    bench("mixture_sd_concept_rate_min", sums[best]["rate_min"])
    bench("mixture_sd_crosstalk_max", sums[best]["crosstalk_max"], "<= 0.1")
    bench("mixture_sd_colour_accuracy", sums[best]["colour"], ">= 0.9")
    bench("mixture_sd_concept_rate_drop_max", sums[best]["rate_drop_max"], "<= 0.1")
    bench("mixture_sd_static_mix_goal_met", float(sums["mix"]["goal"]), "0: (a) fails")


if __name__ == "__main__":
    main()
