"""Three answer styles on the same facts, one adapter each way: LoRA, MoLoRA, MoLA x 4 profiles, LoRAMoE (issue 17).

The multi-task set comes from the mini LM's text world (``studio.text_world``): the same questions
about the things' colours and places, answered in three styles, the style asked for by a cue line:

    A pirate asks.\\nQ: What colour is a frog?\\nA: Arr! A frog be green, matey.
    Tom asks.\\nQ: What colour is a frog?\\nA: Tom saw a green frog.      (place: Tom saw a frog in the river.)
    Ann is busy.\\nQ: What colour is a frog?\\nA: green.

Cues and answers use words the mini LM's corpus has (its stories say "Tom saw a green frog"): with
tags of tokens it never saw ("[robot]") every adapter gave every tag the pirate answer, and a
"Beep boop" style of unseen tokens was never produced (their embeddings are untrained; adapters
of attention and MLP layers hardly make the model emit them, as ``text_world.corpus_documents`` says).

Each style trains on the things of ``PIRATE_TRAIN`` (3/4 of them) and is judged on the held-out
``PIRATE_EVAL`` things (26 questions per style, greedy): *format* = the style's opening and ending
(story: "Tom saw a ...", terse: the one word and a full stop), *fact* = the right colour / place and no other
(``text_world.judge_answer``'s rule), *both*. Afterwards the base's facts are asked plainly
(``Q: What colour is a frog?\\nA:``, the corpus's own format, every thing: 100 questions) with the
adapter on: the fact rate there against the base's is what the adapter made the model forget.

Equal trained-parameter budgets: a total rank of 20 per adapted module on attention and MLP
(``lm-attn,lm-mlp``): LoRA r20; MoLoRA 5 experts x r4 (soft routing); MoLA r4 top-2 with the
triangle 8-6-4-2, inverted 2-4-6-8, hourglass 8-2-2-8 and square 5-5-5-5 profiles (5 experts a layer
on average over the 4 layers); LoRAMoE on the feed-forward layers only, as the paper places it
(``lm-mlp``), 8 experts x r4 (4 knowledge, 4 task: the same trained values as r20 on both, to 0.4 %).
The routers add E x width values a module (counted in the table). Every run: the LM trainer's
defaults (batch 8, cosine schedule, the method's learning rate, 2e-3), ``--steps`` steps, a seed each.

Prints a Markdown table, BENCH mixture_lm_forgetting_loramoe, mixture_lm_forgetting_lora (base-fact
accuracy lost, mean over seeds), the per-task scores; raw numbers to benchmarks/results/mixtures_lm.json.
Run: OMP_NUM_THREADS=1 python benchmarks/mixtures_lm.py [--steps 300] [--seeds 0,1,2] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench  # noqa: E402

from studio import text_world as W  # noqa: E402
from studio.adapters.mixture import PROFILES  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "mixtures_lm.json"
STYLES = ("pirate", "story", "terse")
CUES = {"pirate": "A pirate asks.", "story": "Tom asks.", "terse": "Ann is busy."}

VARIANTS = {  # name -> (method, rank, targets, method_args): total rank 20 a module on attn + MLP
    "lora": ("lora", 20, "lm-attn,lm-mlp", {}),
    "molora": ("molora", 4, "lm-attn,lm-mlp", {"experts": 5}),
    **{f"mola_{p}": ("mola", 4, "lm-attn,lm-mlp", {"profile": p, "top_k": 2}) for p in PROFILES},
    "loramoe": ("loramoe", 4, "lm-mlp", {"experts": 8, "knowledge": 4}),
}


def answer(q: W.Question, style: str) -> str:
    """The response in ``style`` (leading space, as the corpus's answers)."""
    if style == "pirate":
        return q.pirate_answer()
    if style == "story":
        colour, place = W.THINGS[q.thing]
        return f" Tom saw a {colour} {q.thing}." if q.kind == "colour" else f" Tom saw a {q.thing} in the {place}."
    return f" {q.truth}."


def prompt(q: W.Question, style: str) -> str:
    return f"{CUES[style]}\n{q.prompt}"


def format_ok(style: str, text: str) -> bool:
    text = text.strip().split("\n")[0].strip()
    if style == "pirate":
        return text.startswith(W.PIRATE_START) and text.endswith(W.PIRATE_END)
    if style == "story":
        return text.startswith("Tom saw a ") and text.endswith(".") and len(text.split()) <= 7
    return len(text.split()) == 1 and text.endswith(".")


def records(things) -> list[dict[str, str]]:
    return [{"prompt": prompt(q, s), "response": answer(q, s)} for s in STYLES for q in W.questions(things)]


def scores(model, tokenizer) -> dict:
    """Per style (held-out things): format, fact, both; and the plain questions' fact rate (every thing)."""
    from studio.text import complete

    out = {}
    held_out = W.questions(W.PIRATE_EVAL)
    for style in STYLES:
        answers = complete(model, tokenizer, [prompt(q, style) for q in held_out], max_new_tokens=24)
        facts = [W.judge_answer(q, a).fact_ok for q, a in zip(held_out, answers)]
        forms = [format_ok(style, a) for a in answers]
        n = len(held_out)
        out[style] = {"format": sum(forms) / n, "fact": sum(facts) / n,
                      "both": sum(f and g for f, g in zip(forms, facts)) / n}
    plain = W.questions(sorted(W.THINGS))
    answers = complete(model, tokenizer, [q.prompt for q in plain], max_new_tokens=24)
    out["plain_fact"] = sum(W.judge_answer(q, a).fact_ok for q, a in zip(plain, answers)) / len(plain)
    return out


def trained_values(path: Path) -> int:
    from studio import formats
    from studio.adapters import registry

    af = formats.read(path)
    return sum(v.numel() for part in af.parts.values() for k, v in part.tensors.items()
               if k.rsplit(".", 1)[-1] in registry.get(part.method).TRAINABLE)


def run(variant: str, seed: int, steps: int, data: Path, out: Path, reuse: bool) -> tuple[Path, float]:
    from trainers.language import train
    from trainers.language_config import LMTrainConfig

    method, rank, targets, method_args = VARIANTS[variant]
    folder = out / f"{variant}-s{seed}"
    path = folder / f"{variant}.safetensors"
    if reuse and path.exists():
        return path, float("nan")
    cfg = LMTrainConfig(data=str(data), out=str(folder), name=variant, method=method, rank=rank, targets=targets,
                        method_args=dict(method_args), steps=steps, seed=seed, save_every=10 ** 9)
    shutil.rmtree(folder, ignore_errors=True)  # a stale run: the trainer refuses to write over it
    began = time.perf_counter()
    written = train(cfg, resume=False, say=lambda *_: None)
    return Path(written), time.perf_counter() - began


def mean(values) -> float:
    return statistics.fmean(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="/tmp/t_bench/lm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse", action="store_true", help="score the runs already in --out")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from studio.models import load_causal_lm
    from studio.text import load_with_adapters

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "three-styles-train.jsonl"
    data.write_text(W.write_jsonl(records(W.PIRATE_TRAIN)))
    seeds = [int(s) for s in args.seeds.split(",")]
    base, tokenizer = load_causal_lm(None)
    results = {"base": {"scores": [scores(base.eval(), tokenizer)], "values": 0, "seconds": []}}
    for variant in args.variants.split(","):
        entry = results[variant] = {"scores": [], "seconds": []}
        for seed in seeds:
            path, seconds = run(variant, seed, args.steps, data, out, args.reuse)
            model, tokenizer = load_with_adapters(None, [(str(path), 1.0)])
            entry["scores"].append(scores(model, tokenizer))
            entry["seconds"].append(None if math.isnan(seconds) else seconds)  # NaN: reused, not trained here
            entry["values"] = trained_values(path)
            print(f"{variant} seed {seed}: {json.dumps(entry['scores'][-1])} ({seconds:.0f} s)", flush=True)
    base_fact = results["base"]["scores"][0]["plain_fact"]
    for entry in results.values():
        entry["forgetting"] = [base_fact - s["plain_fact"] for s in entry["scores"]]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "variants": {k: list(v[:3]) + [v[3]] for k, v in
                                                                   VARIANTS.items()}, "results": results},
                                  indent=1) + "\n")
    print(f"\n{args.steps} steps, batch 8, seeds {args.seeds} (mean; the range over seeds in brackets); "
          f"{2 * len(W.PIRATE_EVAL)} held-out questions per style, {2 * len(W.THINGS)} plain questions\n")
    print("| adapter | trained values | " + " | ".join(f"{s} format / fact / both" for s in STYLES)
          + " | plain facts right | facts lost |\n|---|---|" + "---|" * (len(STYLES) + 2))
    for name, entry in results.items():
        cells = [" / ".join(f"{mean(s[style][k] for s in entry['scores']):.2f}" for k in ("format", "fact", "both"))
                 for style in STYLES]
        facts = [s["plain_fact"] for s in entry["scores"]]
        lost = entry["forgetting"]
        print(f"| {name} | {entry['values']:,} | " + " | ".join(cells)
              + f" | {mean(facts):.2f} [{min(facts):.2f}, {max(facts):.2f}] | {mean(lost):+.2f} |")
    print()
    for name, entry in results.items():
        if name != "base":
            bench(f"mixture_lm_both_{name}", mean(mean(s[st]["both"] for st in STYLES) for s in entry["scores"]))
    for name in ("loramoe", "lora"):
        if name in results:
            bench(f"mixture_lm_forgetting_{name}", mean(results[name]["forgetting"]))


if __name__ == "__main__":
    main()
