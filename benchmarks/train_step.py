"""Training step: `studio train` vs a minimal diffusers + PEFT loop, same run, same everything.

The reference is shaped like diffusers' examples/text_to_image/train_text_to_image_lora.py:
PEFT LoRA on the UNet attention (to_q, to_k, to_v, to_out.0), VAE encode + text encoder every
step, AdamW. Both train the embedded mini base on the same images, batch, rank and steps.
Time per step = (T(2N steps) - T(N steps)) / N, so loading and the final save cancel out.
Each variant runs in its own process; peak RSS is that process's maximum resident set.

Prints BENCH train_step_vs_reference, train_step_cached_vs_reference, train_rss_vs_reference.
Run: python benchmarks/train_step.py [--steps 40] [--repeat 2] [--batch 8] [--rank 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "styles" / "outline"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench  # noqa: E402


def reference(steps: int, batch: int, rank: int) -> None:
    import numpy as np
    import peft
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from PIL import Image

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / "sample_data" / "mini-sd"))
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, te):
        m.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    files = sorted(DATA.glob("*.png"))
    images = [np.asarray(Image.open(f).convert("RGB"), np.float32) / 127.5 - 1 for f in files]
    captions = [f.with_suffix(".txt").read_text().strip() for f in files]
    for step in range(steps):
        idx = [(step * batch + i) % len(files) for i in range(batch)]
        pixels = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2)
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


def studio(steps: int, batch: int, rank: int, cached: bool) -> None:
    from trainers.diffusion import train
    from trainers.diffusion_config import DiffusionTrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DiffusionTrainConfig(data=str(DATA), out=f"{tmp}/run", steps=steps, batch_size=batch, rank=rank,
                                   targets="unet-attn",  # the reference's layers
                                   sample_every=0, save_every=10 ** 9, sample_steps=1, cache_latents=cached,
                                   cache_text=cached, cache_dir=f"{tmp}/cache" if not cached else None,
                                   min_snr_gamma=None)
        train(cfg, say=lambda *_: None)


def child(kind: str, steps: int, batch: int, rank: int) -> None:
    start = time.perf_counter()
    if kind == "reference":
        reference(steps, batch, rank)
    else:
        studio(steps, batch, rank, cached=kind == "cached")
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run(kind: str, steps: int, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(steps), "--batch", str(args.batch),
                          "--rank", str(args.rank)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=2, help="median over repeated (N, 2N) pairs")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.batch, args.rank)
        return
    kinds = ("reference", "studio", "cached")
    run("cached", 8, args)  # warm the latent / text cache: every image and caption (24 images, batch 8)
    estimates: dict[str, list[float]] = {k: [] for k in kinds}
    peaks: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.repeat):  # round-robin, so load from other jobs hits every variant alike
        for kind in kinds:
            short, long = run(kind, args.steps, args), run(kind, 2 * args.steps, args)
            estimates[kind].append((long["seconds"] - short["seconds"]) / args.steps)
            peaks[kind] += [short["rss_mb"], long["rss_mb"]]
    per_step = {k: statistics.median(v) for k, v in estimates.items()}
    rss = {k: max(v) for k, v in peaks.items()}
    for kind in kinds:
        print(f"{kind:9s} {per_step[kind] * 1e3:7.1f} ms/step  peak RSS {rss[kind]:.0f} MB", flush=True)
    bench("train_step_vs_reference", per_step["studio"] / per_step["reference"], "<= 1.0")
    bench("train_step_cached_vs_reference", per_step["cached"] / per_step["reference"], "<= 0.7")
    bench("train_rss_vs_reference", rss["studio"] / rss["reference"], "<= 1.0")


if __name__ == "__main__":
    main()
