"""Recreate the embedded mini base: a tiny Stable-Diffusion-architecture model of the shapes world.

The result is an ordinary diffusers ``StableDiffusionPipeline`` folder (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel + CLIPTokenizer, DPM-Solver scheduler), < 30 MB, safetensors only.

Recipe (measured on a 2-core CPU, see the model card for the numbers of the shipped run):

1. VAE 64x64x3 -> 16x16x4, channels (16, 32, 32), trained on shapes-world images (MSE + tiny
   KL). Frozen afterwards; its latent std sets ``scaling_factor``. Known limit: it only draws
   the palette and flat fills (grey turns orange, 6-px stripes turn flat). ``vae_wild`` mixes in
   ``studio.shapes.wild`` images (any colour, stripes, dots, outlines); at 50 % for 14 minutes
   that made shapes worse (MSE 0.015 vs 0.0055) without yet drawing stripes or grey -- a wider
   VAE trained much longer is the open fix.
2. Text encoder (2-layer CLIP, width 64) + UNet trained jointly with the epsilon loss:
   captions padded to ``max_length`` (24) tokens instead of 77 -- the tokenizer's
   ``model_max_length`` and the text encoder's ``max_position_embeddings`` are that length,
   so the pipeline pads the same way at inference; lr 1e-3 with warmup, AdamW, batch 32,
   10 % caption dropout (classifier-free guidance), min-SNR-5 loss weights, offset noise 0.1
   (flat black or white backgrounds need a shift of the image mean the plain epsilon
   objective hardly learns), EMA 0.999 of the weights that are shipped.

Resumable: ``--resume`` loads the weights already in OUT and continues the diffusion stage.
A pipeline of an older UNet layout is grown to the current one first (``grow_unet``: the new
attention levels start as identity), which is how the shipped base gained its 16x16 attention.
The exact optimizer + raw-weight state lives beside OUT in ``OUT-train-state/`` (not shipped);
when it is missing (fresh checkout) training resumes from the shipped EMA weights with a
fresh optimizer and a short warmup, which costs a few hundred steps of re-warming, no more.

Every save is atomic: the pipeline is written to a temp folder beside OUT and swapped in,
so an interrupted run never leaves a half-written model under the target name.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from studio.errors import StudioError
from trainers.mini_base_models import (build_text_encoder, build_unet, build_vae, grow_unet, images_to_tensor,
                                     inference_scheduler, train_scheduler)

STATE_FILE = "state.pt"
LOG_FILE = "training.json"


@dataclass(frozen=True)
class MiniBaseConfig:
    out: str
    """Output folder of the diffusers pipeline."""
    quick: bool = False
    """Seconds-long smoke run (tiny step counts), for tests: proves the recipe end to end."""
    overwrite: bool = False
    """Replace a non-empty OUT (without it, a non-empty OUT is refused)."""
    resume: bool = False
    """Continue from the weights in OUT (skips the VAE stage)."""
    threads: int = 1
    """torch intra-op threads; 1 when another heavy torch process shares the 2 cores."""
    seed: int = 0
    vae_steps: int = 3000
    """VAE optimizer steps (stage 1)."""
    vae_minutes: float = 8.0
    """Stop stage 1 after this many minutes even if vae_steps is not reached."""
    vae_wild: float = 0.0
    """Fraction of each VAE batch drawn from studio.shapes.wild instead of the shapes world."""
    steps: int = 200_000
    """Diffusion optimizer steps to run in this sitting (stage 2)."""
    minutes: float = 60.0
    """Stop stage 2 after this many wall-clock minutes (whichever comes first)."""
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.999
    caption_dropout: float = 0.1
    wild: float = 0.0
    """Fraction of each diffusion batch drawn from studio.shapes.wild with the empty caption: the
    base learns to draw textures no prompt names (as SD knows more than its captions say), and a
    style adapter then only has to bind its trigger word to one of them."""
    offset_noise: float = 0.1
    min_snr: float = 5.0
    max_length: int = 24
    """Token length of captions (tokenizer model_max_length = text encoder positions)."""
    unet_channels: tuple[int, ...] = (32, 64, 64)
    save_minutes: float = 10.0
    """Write improving EMA weights to OUT this often."""
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.threads < 1 or self.batch < 1 or self.max_length < 10:
            raise StudioError("make-base: --threads and --batch must be >= 1, --max-length >= 10")
        if self.quick:
            object.__setattr__(self, "vae_steps", min(self.vae_steps, 4))
            object.__setattr__(self, "steps", min(self.steps, 4))
            object.__setattr__(self, "batch", min(self.batch, 4))


# --------------------------------------------------------------------------- saving
def save_pipeline(out: Path, vae, unet, text_encoder, tokenizer_dir: Path, log: dict) -> None:
    """Write the pipeline to a temp folder beside ``out``, then swap it in."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir),
                                            model_max_length=text_encoder.config.max_position_embeddings)
        pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tok,
                                       scheduler=inference_scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        # model_index.json without safety checker / feature extractor entries: loads plainly.
        index_path = tmp / "model_index.json"
        index = json.loads(index_path.read_text())
        for key in ("safety_checker", "feature_extractor", "image_encoder"):
            index.pop(key, None)
        index["requires_safety_checker"] = False
        index_path.write_text(json.dumps(index, indent=2) + "\n")
        (tmp / LOG_FILE).write_text(json.dumps(log, indent=2) + "\n")
        for name in ("README.md", "grid.png", "quality.json"):  # the card (mini_base_card.py)
            if (out / name).exists():
                shutil.copy2(out / name, tmp / name)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- stage 1: VAE

def train_vae(vae, cfg: MiniBaseConfig, log: dict, say) -> None:
    import numpy as np
    import torch
    from studio.shapes import wild, world

    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    steps, batch = cfg.vae_steps, (cfg.batch if cfg.quick else 16)
    t0, c0 = time.time(), time.process_time()
    mse_avg = None
    vae.train()
    for step in range(steps):
        # cosine over whichever budget (steps or minutes) runs out first
        frac = min(1.0, max(step / max(1, steps), (time.time() - t0) / (cfg.vae_minutes * 60)))
        for g in opt.param_groups:
            g["lr"] = 2e-4 + 0.5 * (2e-3 - 2e-4) * (1 + math.cos(math.pi * frac))
        seed = cfg.seed * 1_000_003 + 7919 * step + 1
        n_wild = int(round(batch * cfg.vae_wild))
        images, _, _ = world.batch(seed, batch - n_wild)
        if n_wild:
            images = np.concatenate([images, wild.wild_batch(seed, n_wild)])
        x = images_to_tensor(images)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        kl = post.kl().mean() / (4 * 16 * 16)
        loss = mse + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        mse_avg = mse.item() if mse_avg is None else 0.98 * mse_avg + 0.02 * mse.item()
        if step % cfg.log_every == 0 or step == steps - 1:
            say(f"vae step {step} mse {mse.item():.5f} avg {mse_avg:.5f} "
                f"{(step + 1) / (time.time() - t0):.2f} steps/s")
        if time.time() - t0 > cfg.vae_minutes * 60:
            steps = step + 1
            break
    vae.eval()
    vae.requires_grad_(False)
    # scaling_factor: unit variance latents for the diffusion stage
    with torch.no_grad():
        images, _, _ = world.batch(cfg.seed + 424242, 256)
        z = vae.encode(images_to_tensor(images)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std().clamp_min(1e-3)))
    log["vae"] = {"steps": steps, "final_mse": round(float(mse_avg), 6),
                  "cpu_seconds": round(time.process_time() - c0, 1),
                  "wall_seconds": round(time.time() - t0, 1),
                  "scaling_factor": vae.config.scaling_factor}


# --------------------------------------------------------------------------- stage 2: diffusion

def _ema_update(ema_model, model, decay: float) -> None:
    import torch

    with torch.no_grad():
        for e, p in zip(ema_model.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def train_diffusion(vae, unet, text_encoder, tokenizer, ema_unet, ema_te, cfg: MiniBaseConfig,
                    log: dict, say, save, state_path: Path | None) -> None:
    import torch
    import torch.nn.functional as F
    from studio.shapes import wild, world

    sched = train_scheduler()
    alphas = sched.alphas_cumprod  # (1000,)
    snr = alphas / (1 - alphas)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.01)
    d = log.setdefault("diffusion", {"steps": 0, "cpu_seconds": 0.0, "wall_seconds": 0.0,
                                     "sittings": 0, "history": []})
    d["sittings"] += 1
    start_step = d["steps"]
    warm_from = start_step
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("step") == start_step:
            unet.load_state_dict(state["unet"])
            text_encoder.load_state_dict(state["text_encoder"])
            opt.load_state_dict(state["opt"])
            warm_from = -10**9  # exact resume: no re-warming
            say(f"resumed optimizer state from {state_path} at step {start_step}")
        else:
            say(f"{state_path} is from step {state.get('step')}, weights are at {start_step}: "
                "fresh optimizer")
    elif start_step:
        say(f"no optimizer state at {state_path}: resuming from the shipped EMA weights with a "
            f"fresh optimizer ({cfg.warmup} warmup steps)")

    captions = world.all_captions()
    tok = tokenizer(captions + [""], padding="max_length", max_length=cfg.max_length,
                    truncation=True, return_tensors="pt").input_ids  # (121, L)
    empty = len(captions)
    gen = torch.Generator().manual_seed(cfg.seed * 7 + start_step)
    t0, c0 = time.time(), time.process_time()  # since the last save (for the log)
    t_start = last_save = t0
    loss_avg = None
    unet.train()
    text_encoder.train()
    step = start_step
    for i in range(cfg.steps):
        step = start_step + i
        lr = cfg.lr * min(1.0, (step - warm_from + 1) / cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        images, caps, scenes = world.batch(cfg.seed * 1_000_003 + 104729 * step + 17, cfg.batch)
        idx = torch.tensor([captions.index(c) for c in caps])
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        idx[drop] = empty
        n_wild = int(round(cfg.batch * cfg.wild))
        if n_wild:
            images[-n_wild:] = wild.wild_batch(cfg.seed * 1_000_003 + 104729 * step + 23, n_wild)
            idx[-n_wild:] = empty
        with torch.no_grad():
            z = vae.encode(images_to_tensor(images)).latent_dist.sample(generator=gen)
            z = z * vae.config.scaling_factor  # (B, 4, 16, 16)
        noise = torch.randn(z.shape, generator=gen)
        noise = noise + cfg.offset_noise * torch.randn(z.shape[0], z.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, 1000, (cfg.batch,), generator=gen)
        zt = sched.add_noise(z, noise, t)
        cond = text_encoder(tok[idx]).last_hidden_state  # (B, L, 64)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        w = torch.clamp(snr[t], max=cfg.min_snr) / snr[t]  # min-SNR-gamma for epsilon targets
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (w * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_te, text_encoder, decay)
        raw = per.mean().item()
        loss_avg = raw if loss_avg is None else 0.99 * loss_avg + 0.01 * raw
        done = i == cfg.steps - 1 or time.time() - t_start > cfg.minutes * 60
        if step % cfg.log_every == 0 or done:
            sps = (i + 1) / (time.time() - t_start)
            say(f"step {step} loss {raw:.4f} avg {loss_avg:.4f} lr {lr:.2e} {sps:.2f} steps/s")
            d["history"].append([step, round(loss_avg, 5)])
        if done or time.time() - last_save > cfg.save_minutes * 60:
            d["steps"] = step + 1
            d["final_loss"] = round(loss_avg, 5)
            d["cpu_seconds"] = round(d["cpu_seconds"] + time.process_time() - c0, 1)
            d["wall_seconds"] = round(d["wall_seconds"] + time.time() - t0, 1)
            t_save = time.time()
            save()
            if state_path is not None:
                _atomic_torch_save({"step": step + 1, "unet": unet.state_dict(),
                                    "text_encoder": text_encoder.state_dict(),
                                    "opt": opt.state_dict()}, state_path)
            say(f"saved at step {step + 1} ({time.time() - t_save:.1f} s)")
            t0, c0, last_save = time.time(), time.process_time(), time.time()
            if done:
                break


# --------------------------------------------------------------------------- entry point

def make_base(cfg: MiniBaseConfig, say=print) -> Path:
    import torch

    threads = torch.get_num_threads()
    try:
        return _make_base(cfg, say)
    finally:
        torch.set_num_threads(threads)  # leave the caller's process (e.g. pytest) as it was


def _make_base(cfg: MiniBaseConfig, say) -> Path:
    import torch
    from studio.shapes.tokenizer import load_tokenizer, write_tokenizer

    out = Path(cfg.out)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.resume:
        if not (out / "model_index.json").exists():
            raise StudioError(f"{out}: no pipeline to resume from (model_index.json missing); "
                              "run without --resume first")
    elif out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise StudioError(f"{out} exists and is not empty; pass --overwrite to replace it, "
                          "--resume to continue training it, or choose another folder")
    state_path = None if cfg.quick else out.parent / f"{out.name}-train-state" / STATE_FILE

    with tempfile.TemporaryDirectory() as tmpdir:
        if cfg.resume:
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import CLIPTextModel

            tok_dir = Path(tmpdir) / "tokenizer"
            shutil.copytree(out / "tokenizer", tok_dir)
            tokenizer = load_tokenizer(tok_dir)
            vae = AutoencoderKL.from_pretrained(str(out / "vae"))
            unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
            text_encoder = CLIPTextModel.from_pretrained(str(out / "text_encoder"))
            log = json.loads((out / LOG_FILE).read_text()) if (out / LOG_FILE).exists() else {}
            grown = grow_unet(unet)
            if grown is not None:  # an older layout: add the missing attention levels, keep the rest
                unet = grown
                at = log.get("diffusion", {}).get("steps", 0)
                log.setdefault("grown", []).append({"at_step": at, "down_block_types": list(unet.config.down_block_types)})
                if state_path is not None and state_path.exists():
                    state_path.unlink()  # the old optimizer state has the old shapes
                say(f"grew the UNet to the current layout at step {at}: new attention starts as identity")
            vae.requires_grad_(False)
            vae.eval()
        else:
            tok_dir = write_tokenizer(Path(tmpdir) / "tokenizer", cfg.max_length)
            tokenizer = load_tokenizer(tok_dir)
            vae, unet = build_vae(), build_unet(cfg.unet_channels)
            text_encoder = build_text_encoder(tokenizer, cfg.max_length)
            log = {}
            if state_path is not None and state_path.exists():
                state_path.unlink()  # a fresh run must never pick up a stale optimizer
            say(f"params: vae {sum(p.numel() for p in vae.parameters()):,} "
                f"unet {sum(p.numel() for p in unet.parameters()):,} "
                f"text encoder {sum(p.numel() for p in text_encoder.parameters()):,}")
            train_vae(vae, cfg, log, say)
        log["settings"] = {k: v for k, v in asdict(cfg).items() if k not in ("out",)}
        ema_unet, ema_te = copy.deepcopy(unet), copy.deepcopy(text_encoder)
        ema_unet.requires_grad_(False)
        ema_te.requires_grad_(False)

        def save() -> None:
            save_pipeline(out, vae, ema_unet, ema_te, tok_dir, log)

        train_diffusion(vae, unet, text_encoder, tokenizer, ema_unet, ema_te, cfg, log, say,
                        save, state_path)
    return out
