"""Training step: `studio train` vs a minimal diffusers + PEFT loop, same run, same everything.

The reference is shaped like diffusers' examples/text_to_image/train_text_to_image_lora.py:
PEFT LoRA on the UNet attention (to_q, to_k, to_v, to_out.0), VAE encode (of contiguous pixel
batches, as its collate_fn makes them) + text encoder every step, AdamW. Both train the same
base on the same images (resized to ``--resolution``), batch, rank and steps. Two bases:

  --model sd15  an SD1.5-sized pipeline (UNet 860M, the SD VAE, CLIP ViT-L text encoder) with
                random weights, written once to a temporary folder -- the cost structure of a
                real SD1.5 run (VAE encode ~1/3 of the step); 256 px, batch 1 by default
  --model mini  the embedded mini base at 64 px, batch 8: its VAE is tiny next to its UNet, so
                caching can save little there

Time: the reference and ``studio train`` run in lock-step -- every studio step is followed by
one reference step (through ``trainers.loop.report_step``, which the trainer calls once per
optimizer step), the reference in its own process so each side keeps its own allocator
settings, and only one side computes at a time -- so each ratio is between two adjacent steps
and load drifting on the machine hits both alike; the first ``--skip`` pairs (loading, first
touches of the weights) are dropped and the median ratio is reported. First the studio fills
its latent / text cache, then runs plain (no caches, VAE and text encoder every step, like the
reference), then cached.
The final sample grid, which the reference does not render, is switched off.
Memory: the reference and the plain studio each run alone in a fresh process, ``--rss-runs``
times in turn; peak RSS is each process's maximum resident set, and the medians are compared.

Prints BENCH train_step_vs_reference, train_step_cached_vs_reference, train_rss_vs_reference.

``--part memory``: the studio alone, plain and with --gradient-checkpointing, each in a fresh
process (``--memory-batch``, default 2): the peak RSS and the median step ratios
(BENCH checkpointing_rss_vs_plain, checkpointing_step_vs_plain), and how far the
``studio train --check`` estimate, computed in that same process before it trains, is from the
process's measured peak (BENCH memory_estimate_error_<model>_plain / _checkpointing, signed:
estimate / measured - 1). BENCH checkpointing_rss_above_weights_vs_plain compares the peaks less the
frozen weights' bytes (counted from the models; what is left is activations, adapters and the
libraries): at SD1.5 size the fp32 weights alone are most of the peak.
Run: OMP_NUM_THREADS=1 python benchmarks/train_step.py [--model sd15|mini] [--part all|speed|memory] [--steps N]
     [--skip N] [--batch N] [--rank 8] [--resolution PX]   (sd15: about 25 minutes on one core and 11 GB in two
     processes, --part memory about 8 minutes; mini: about 3 minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "styles" / "outline"
MINI = ROOT / "sample_data" / "mini-sd"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from timing import bench  # noqa: E402
from trainers import memory  # noqa: E402  (the one peak-RSS reading)

DEFAULTS = {"sd15": {"steps": 10, "skip": 2, "batch": 1, "resolution": 256},
            "mini": {"steps": 40, "skip": 5, "batch": 8, "resolution": 64}}


def sd15_folder(folder: Path) -> Path:
    """A diffusers SD1.5 pipeline folder with random weights (the mini base's tokenizer and scheduler)."""
    import torch
    from builders import CLIP_L, SD15_UNET, SD15_VAE
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        tokenizer=CLIPTokenizer.from_pretrained(str(MINI / "tokenizer")), unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DDPMScheduler.from_pretrained(str(MINI / "scheduler")), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def reference_loop(base: Path, batch: int, rank: int, resolution: int):
    """The reference, set up; returns a function that runs its next training step."""
    import numpy as np
    import peft
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from PIL import Image

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, te):
        m.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    files = sorted(DATA.glob("*.png"))
    images = [np.asarray(Image.open(f).convert("RGB").resize((resolution, resolution), Image.BICUBIC), np.float32)
              / 127.5 - 1 for f in files]
    captions = [f.with_suffix(".txt").read_text().strip() for f in files]
    done = [0]

    def step() -> None:
        idx = [(done[0] * batch + i) % len(files) for i in range(batch)]
        pixels = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2).contiguous()
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ids = tok([captions[i] for i in idx], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        embeds = te(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,))
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, embeds).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        done[0] += 1
    return step


def studio(base: Path, steps: int, batch: int, rank: int, resolution: int, cached: bool, after_step=None,
           checkpointing: bool = False, before=None) -> None:
    """``studio train`` for ``steps`` steps; ``after_step()`` runs at the end of each step, ``before(cfg)``
    before the trainer starts."""
    from studio.allocator import keep_freed_memory
    from trainers import diffusion, diffusion_outputs, loop
    from trainers.diffusion_config import DiffusionTrainConfig

    keep_freed_memory()  # as the `studio` command does before anything loads

    diffusion_outputs.render_samples = lambda *_, **__: None  # the final sample grid: not part of a step, and the reference has none

    report = loop.report_step

    def hooked(*args, **kwargs):  # the trainer calls this once at the end of every step
        report(*args, **kwargs)
        if after_step:
            after_step()
    loop.report_step = hooked

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DiffusionTrainConfig(data=str(DATA), out=f"{tmp}/run", base=None if base == MINI else str(base),
                                   steps=steps, batch_size=batch, rank=rank, resolution=resolution, buckets=False,
                                   targets="unet-attn",  # the reference's layers
                                   sample_every=0, save_every=10 ** 9, sample_steps=1, cache_latents=cached,
                                   cache_text=cached, cache_dir=f"{tmp}/cache" if not cached else None,
                                   min_snr_gamma=None, gradient_checkpointing=checkpointing)
        if before:
            before(cfg)
        try:
            diffusion.train(cfg, say=lambda *_: None)
        finally:
            loop.report_step = report


def paired(base: Path, args) -> dict:
    """Studio steps (plain, then cached) each followed by one reference step; the ratio is taken
    per adjacent pair, so drifting machine load hits both sides alike. The reference runs in its
    own process, in lock-step: one side computes while the other waits, and each keeps its own
    allocator settings (the studio's trainer tunes glibc's malloc; diffusers' script does not)."""
    shape = (args.batch, args.rank, args.resolution)
    server = subprocess.Popen([sys.executable, __file__, "--child", "reference-server", "--base", str(base),
                               *_flags(args, args.steps)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)

    def reference_step() -> float:
        server.stdin.write("step\n")
        server.stdin.flush()
        answer = server.stdout.readline()
        if not answer:
            raise SystemExit("the reference process died")
        return float(answer)
    try:
        studio(base, args.steps, *shape, cached=True)  # fills the latent / text cache: same steps, images and flips
        if server.stdout.readline().strip() != "ready":  # loaded while the cache filled; nothing timed overlaps
            raise SystemExit("the reference process failed to start")
        result = {}
        for kind, cached in (("studio", False), ("cached", True)):
            pairs, mark = [], [time.perf_counter()]

            def after_step():
                ours = time.perf_counter() - mark[0]
                pairs.append((ours, reference_step()))
                mark[0] = time.perf_counter()
            studio(base, args.steps, *shape, cached=cached, after_step=after_step)
            timed = pairs[args.skip:]  # the first steps include loading and first touches of the weights
            result[kind] = {"ratio": statistics.median(o / r for o, r in timed),
                            "seconds": statistics.median(o for o, _ in timed),
                            "reference_seconds": statistics.median(r for _, r in timed), "pairs": len(timed)}
        return result
    finally:
        server.stdin.close()
        server.wait()


def serve_reference(base: Path, args) -> None:
    """One reference step per line read from stdin; answers with that step's seconds."""
    step = reference_loop(base, args.batch, args.rank, args.resolution)
    print("ready", flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        step()
        print(time.perf_counter() - start, flush=True)


def child(kind: str, base: Path, args) -> None:
    if kind == "paired":
        print(json.dumps(paired(base, args)))
        return
    if kind == "reference-server":
        serve_reference(base, args)
        return
    if kind in ("plain", "checkpointing"):
        print(json.dumps(memory_child(base, args, kind == "checkpointing")))
        return
    shape = (args.batch, args.rank, args.resolution)
    if kind == "reference":
        step = reference_loop(base, *shape)
        for _ in range(args.steps):
            step()
    else:
        studio(base, args.steps, *shape, cached=False)
    print(json.dumps({"rss_mb": memory.peak_rss() / 1024 ** 2}))


def _flags(args, steps: int) -> list[str]:
    return [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("model", "skip", "batch", "rank", "resolution",
                                                                    "memory_batch")] + [f"--steps={steps}"]


def run(kind: str, base: Path, args, steps: int | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--base", str(base), *_flags(args, steps or args.steps)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DEFAULTS), default="sd15")
    parser.add_argument("--steps", type=int, help="steps per process")
    parser.add_argument("--skip", type=int, help="untimed first steps")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--rss-runs", type=int, default=3, help="processes per side for peak RSS")
    parser.add_argument("--part", choices=("all", "speed", "memory"), default="all")
    parser.add_argument("--memory-batch", type=int, default=2, help="batch of the --part memory runs")
    parser.add_argument("--child", default=None)
    parser.add_argument("--base", default=None)
    args = parser.parse_args()
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.child:
        child(args.child, Path(args.base), args)
        return
    with tempfile.TemporaryDirectory(prefix="train-step-bench-") as tmp:
        base = MINI if args.model == "mini" else sd15_folder(Path(tmp) / "sd15")
        measure(base, args)


def _spread(values: list[float]) -> str:
    return f"({min(values):.0f}-{max(values):.0f})"


def memory_child(base: Path, args, checkpointing: bool) -> dict:
    """One studio run alone in this process: its step seconds, peak RSS and its own --check estimate."""

    marks, estimate = [time.perf_counter()], {}

    def after_step():
        marks.append(time.perf_counter())

    def before(cfg):
        counted = memory.estimate_diffusion(cfg)
        estimate["bytes"], estimate["weights"] = counted.total(checkpointing), sum(counted.weights.values())
    studio(base, args.steps, args.memory_batch, args.rank, args.resolution, cached=False, after_step=after_step,
           checkpointing=checkpointing, before=before)
    steps = [b - a for a, b in zip(marks, marks[1:])][args.skip:]
    return {"rss_mb": memory.peak_rss() / 1024 ** 2, "step_s": statistics.median(steps),
            "estimate_mb": estimate["bytes"] / 1024 ** 2, "weights_mb": estimate["weights"] / 1024 ** 2}


def measure_memory(base: Path, args) -> None:
    sides = {kind: run(kind, base, args, steps=args.skip + 3) for kind in ("plain", "checkpointing")}
    for kind, r in sides.items():
        print(f"{kind:13s} peak RSS {r['rss_mb']:.0f} MB (of which the frozen weights {r['weights_mb']:.0f} MB), "
              f"estimate {r['estimate_mb']:.0f} MB, "
              f"{r['step_s']:.2f} s/step  [{args.model}, {args.resolution} px, batch {args.memory_batch}]", flush=True)
    plain, ckpt = sides["plain"], sides["checkpointing"]
    bench("checkpointing_rss_vs_plain", ckpt["rss_mb"] / plain["rss_mb"], "<= 0.6")
    # the peak above the frozen weights (counted from the models): activations, adapters, libraries
    bench("checkpointing_rss_above_weights_vs_plain",
          (ckpt["rss_mb"] - ckpt["weights_mb"]) / (plain["rss_mb"] - plain["weights_mb"]))
    bench("checkpointing_step_vs_plain", ckpt["step_s"] / plain["step_s"], "<= 1.4")
    for kind, r in sides.items():
        bench(f"memory_estimate_error_{args.model}_{kind}", r["estimate_mb"] / r["rss_mb"] - 1, "within +-0.25")


def measure(base: Path, args) -> None:
    if args.part in ("all", "memory"):
        measure_memory(base, args)
    if args.part == "memory":
        return
    timing = run("paired", base, args)
    for kind in ("studio", "cached"):
        t = timing[kind]
        print(f"{kind:7s} {t['seconds'] * 1e3:8.1f} ms/step, reference {t['reference_seconds'] * 1e3:8.1f} ms/step: "
              f"median of {t['pairs']} adjacent-step ratios {t['ratio']:.3f}", flush=True)
    runs = {"reference": [], "studio": []}
    for _ in range(args.rss_runs):  # alternated: a process's peak varies by tens of MB between runs
        for kind in runs:
            runs[kind].append(run(kind, base, args, steps=args.skip + 2)["rss_mb"])
    rss = {kind: statistics.median(values) for kind, values in runs.items()}
    print(f"peak RSS ({args.skip + 2} steps, one process each, median of {args.rss_runs}): reference "
          f"{rss['reference']:.0f} MB {_spread(runs['reference'])}, studio {rss['studio']:.0f} MB {_spread(runs['studio'])}"
          f"  [{args.model}, {args.resolution} px, batch {args.batch}, rank {args.rank}]")
    bench("train_step_vs_reference", timing["studio"]["ratio"], "<= 1.0")
    bench("train_step_cached_vs_reference", timing["cached"]["ratio"], "<= 0.7")
    bench("train_rss_vs_reference", rss["studio"] / rss["reference"], "<= 1.0")


if __name__ == "__main__":
    main()
