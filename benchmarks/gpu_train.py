"""GPU check: `studio train` at SD1.5 and SDXL size with the low-memory switches, against diffusers + PEFT.

For a machine with CUDA (without it, one line saying so and exit 0). Each model is written once
to a temporary folder with random weights (built from config dicts, as tests/builders.py and
benchmarks/train_step.py do; bf16 files, made on the GPU), then two sides train it for
``--steps`` steps at batch 1 on the stripes images resized to its size, each alone in a fresh process:

  studio     ``studio train``'s trainer with --base-dtype bf16 --gradient-checkpointing
             --optimizer adamw8bit, LoRA on the attention projections (--targets unet-attn), no
             latent / text caches (the reference has none), no sample grid
  reference  shaped like diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py (and
             train_text_to_image_lora.py for SD1.5) run with --mixed_precision bf16
             --gradient_checkpointing --use_8bit_adam: the UNet and text encoders in bf16 (SDXL's
             VAE in fp32, as that script keeps it), PEFT LoRA (gaussian init, alpha = rank) on
             to_q / to_k / to_v / to_out.0 cast to fp32, the UNet forward under bf16 autocast,
             VAE encode and text encoders every step, bitsandbytes AdamW8bit, clipping at 1.0

Step seconds: median over the steps after the first (CUDA synchronised). Peak: the largest
``torch.cuda.max_memory_allocated`` over the steps after the first; ``load_peak`` is the
process's peak from loading on (the trainer moves the fp32 base to the device before casting it).
The ``studio train --check`` estimate of the same run is compared with the measured peak.

Prints, per model (sd15 at 512 px, sdxl at 1024 px): BENCH gpu_<model>_step_seconds, _peak_gb,
_load_peak_gb, _reference_step_seconds, _reference_peak_gb, _step_vs_reference,
_memory_vs_reference, _estimate_error (estimate / peak - 1). Not yet run on a GPU: sized for a few
minutes on one 16-24 GB card (building SDXL's UNet holds 10 GB of fp32 weights on it for a moment).
``--device cpu --tiny``: the same code path on toy SD1.5 / SDXL-layout models at 32 px, here on
the CPU (names cpu_tiny_<model>_*, memory as the process's peak RSS); a smoke test, not a measure.
Run: python benchmarks/gpu_train.py [--models sd15,sdxl] [--steps 10] [--rank 8] [--device cuda|cpu --tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "styles" / "stripes"
MINI = ROOT / "sample_data" / "mini-sd"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from timing import bench  # noqa: E402

RESOLUTION = {"sd15": 512, "sdxl": 1024}
TINY_RESOLUTION = 32
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # the diffusers LoRA scripts' targets = --targets unet-attn


def build_folder(family: str, folder: Path, tiny: bool, device: str) -> None:
    """A diffusers pipeline folder with random weights, created on ``device`` and stored in bf16
    (fp32 for the toy models); the mini base's tokenizer and scheduler."""
    import torch
    import builders as B
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(str(MINI / "tokenizer"))
    # the configs' token ids are real CLIP's; the pooled output is read at the tokenizer's end token
    vocab = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
             "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if tiny:
        unet_cfg = B.TINY_SDXL_UNET if family == "sdxl" else B.TINY_UNET
        te_cfg = {**(B.TINY_CLIP_16 if family == "sdxl" else B.TINY_CLIP), **vocab,
                  "max_position_embeddings": tokenizer.model_max_length}
        te2_cfg = {**B.TINY_CLIP_PROJ, **vocab, "max_position_embeddings": tokenizer.model_max_length}
    else:
        tokenizer.model_max_length = 77  # real prompts: 77 tokens of cross-attention context
        unet_cfg = B.SDXL_UNET if family == "sdxl" else B.SD15_UNET
        te_cfg, te2_cfg = {**B.CLIP_L, **vocab, "vocab_size": 49408}, {**B.CLIP_BIGG, **vocab, "vocab_size": 49408}
    dtype = torch.float32 if tiny else torch.bfloat16
    makers = dict(unet=lambda: UNet2DConditionModel(**unet_cfg),
                  text_encoder=lambda: CLIPTextModel(CLIPTextConfig(**te_cfg)),
                  vae=lambda: B.tiny_vae() if tiny else AutoencoderKL(**B.SD15_VAE, **(
                      {"scaling_factor": 0.13025, "force_upcast": True} if family == "sdxl" else {})))
    if family == "sdxl":
        makers["text_encoder_2"] = lambda: CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg))
    parts = {}
    for name, make in makers.items():  # one fp32 part at a time on the device (SDXL's UNet: 10 GB)
        with torch.device(device):
            parts[name] = make().to(dtype)
    scheduler = DDPMScheduler.from_pretrained(str(MINI / "scheduler"))
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler, **parts)
    else:
        pipe = StableDiffusionPipeline(tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False, **parts)
    pipe.save_pretrained(str(folder))


class Meter:
    """Step times and the peak memory of the steps after the first (the first allocates the
    optimizer state and warms the kernels); ``load_peak`` covers everything before too."""

    def __init__(self, device: str):
        import torch

        self.cuda = device == "cuda"
        self.torch = torch
        self.marks: list[float] = []
        self.load_peak = 0

    def _peak(self) -> int:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated()
        from trainers.memory import peak_rss
        return peak_rss()

    def start(self) -> None:
        self.marks = [self._now()]

    def _now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def step_done(self) -> None:
        self.marks.append(self._now())
        if len(self.marks) == 2:  # after step 1: the steady peak is counted from here
            self.load_peak = self._peak()
            if self.cuda:
                self.torch.cuda.reset_peak_memory_stats()

    def result(self) -> dict:
        steps = [b - a for a, b in zip(self.marks, self.marks[1:])][1:]
        peak = self._peak()
        return {"step_s": statistics.median(steps), "peak_gb": peak / 1e9,
                "load_peak_gb": max(peak, self.load_peak) / 1e9}


def studio_side(base: Path, args) -> dict:
    """``studio train``'s trainer in this process, with the memory switches; step marks through
    ``trainers.loop.report_step``, which the trainer calls once per optimizer step."""
    from studio.allocator import keep_freed_memory
    from trainers import diffusion, diffusion_outputs, loop, memory
    from trainers.diffusion_config import DiffusionTrainConfig

    keep_freed_memory()  # as the `studio` command does before anything loads
    diffusion_outputs.render_samples = lambda *_, **__: None  # the final grid: not part of a step, the reference has none
    meter = Meter(args.device)
    report = loop.report_step

    def hooked(*a, **k):
        report(*a, **k)
        meter.step_done()
    loop.report_step = hooked
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DiffusionTrainConfig(data=str(DATA), out=f"{tmp}/run", base=str(base), steps=args.steps, batch_size=1,
                                   rank=args.rank, resolution=args.resolution, buckets=False, targets="unet-attn",
                                   sample_every=0, save_every=10 ** 9, sample_steps=1, cache_latents=False,
                                   cache_text=False, base_dtype="bf16", gradient_checkpointing=True,
                                   optimizer="adamw8bit")
        estimate = memory.estimate_diffusion(cfg).total(True)
        meter.start()  # the first "step" also holds loading: it is dropped
        diffusion.train(cfg, say=lambda *_: None)
    return {**meter.result(), "estimate_gb": estimate / 1e9}


def reference_side(base: Path, family: str, args) -> dict:
    """The diffusers LoRA scripts' training step with their low-memory flags (see the docstring)."""
    import bitsandbytes as bnb
    import numpy as np
    import peft
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from PIL import Image

    device, bf16, res = args.device, torch.bfloat16, args.resolution
    torch.manual_seed(0)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    meter = Meter(device)
    meter.start()
    pipe = cls.from_pretrained(str(base), torch_dtype=bf16, **extra)
    unet, vae = pipe.unet, pipe.vae
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    for model in (unet, vae, *encoders):
        model.requires_grad_(False)
        model.to(device)
    if family == "sdxl":
        vae.to(dtype=torch.float32)  # the SDXL script: "The VAE is in float32 to avoid NaN losses"
    unet.add_adapter(peft.LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                     target_modules=ATTENTION))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # the scripts' cast_training_params(unet, dtype=torch.float32)
        p.data = p.data.float()
    unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    files = sorted(DATA.glob("*.png"))
    for step in range(args.steps):
        file = files[step % len(files)]
        image = np.asarray(Image.open(file).convert("RGB").resize((res, res), Image.BICUBIC), np.float32) / 127.5 - 1
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].to(device, vae.dtype)
        with torch.no_grad():
            latents = (vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor).to(bf16)
            ids = [pipe.tokenizer(file.with_suffix(".txt").read_text().strip(), padding="max_length", truncation=True,
                                  max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)]
            outputs = [te(ids[0], output_hidden_states=True) for te in encoders]
        if family == "sdxl":  # encode_prompt: penultimate hidden states of both, the pooled output of the second
            embeds = torch.cat([o.hidden_states[-2] for o in outputs], dim=-1)
            time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=bf16)
            added = {"text_embeds": outputs[1][0], "time_ids": time_ids}
        else:
            embeds, added = outputs[0][0], None
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), device=device)
        with torch.autocast(device_type=device, dtype=bf16):
            pred = unet(noise_scheduler.add_noise(latents, noise, t), t, embeds, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.step_done()
    return meter.result()


def child(kind: str, family: str, base: Path, args) -> None:
    if kind == "build":
        build_folder(family, base, args.tiny, args.device)
        print(json.dumps({}))
    elif kind == "studio":
        print(json.dumps(studio_side(base, args)))
    else:
        print(json.dumps(reference_side(base, family, args)))


def run(kind: str, family: str, base: Path, args) -> dict:
    """One side in a fresh process (its own allocator and peak)."""
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}))
    flags = ["--child", kind, "--models", family, "--base", str(base), "--steps", str(args.steps), "--rank",
             str(args.rank), "--device", args.device, "--resolution", str(args.resolution)] + (["--tiny"] if args.tiny else [])
    out = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{kind} ({family}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(family: str, args) -> None:
    prefix = f"{'cpu_tiny' if args.tiny else 'gpu'}_{family}"
    args.resolution = TINY_RESOLUTION if args.tiny else RESOLUTION[family]
    with tempfile.TemporaryDirectory(prefix="gpu-train-", dir=args.workdir) as tmp:
        base = Path(tmp) / family
        start = time.perf_counter()
        run("build", family, base, args)
        built = time.perf_counter() - start
        ours, ref = run("studio", family, base, args), run("reference", family, base, args)
    print(f"{family} at {args.resolution} px, rank {args.rank}, {args.steps} steps (built in {built:.0f} s): studio "
          f"{ours['step_s']:.3f} s/step, {ours['peak_gb']:.2f} GB (from loading on: {ours['load_peak_gb']:.2f}); "
          f"reference {ref['step_s']:.3f} s/step, {ref['peak_gb']:.2f} GB; --check estimate {ours['estimate_gb']:.2f} GB",
          flush=True)
    bench(f"{prefix}_step_seconds", ours["step_s"])
    bench(f"{prefix}_peak_gb", ours["peak_gb"])
    bench(f"{prefix}_load_peak_gb", ours["load_peak_gb"])
    bench(f"{prefix}_reference_step_seconds", ref["step_s"])
    bench(f"{prefix}_reference_peak_gb", ref["peak_gb"])
    bench(f"{prefix}_step_vs_reference", ours["step_s"] / ref["step_s"], "<= 1.0")
    bench(f"{prefix}_memory_vs_reference", ours["peak_gb"] / ref["peak_gb"], "<= 1.0")
    bench(f"{prefix}_estimate_error", ours["estimate_gb"] / ours["peak_gb"] - 1, "within +-0.25")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15 (512 px), sdxl (1024 px)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy models at 32 px (with --device cpu: a smoke test)")
    parser.add_argument("--workdir", default=None, help="where the random-weight folders go (SDXL: ~7 GB)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    families = [f for f in args.models.split(",") if f]
    if set(families) - set(RESOLUTION) or args.steps < 2:
        parser.error(f"--models takes {', '.join(RESOLUTION)}; --steps must be >= 2 (the first is not timed)")
    if args.child:
        child(args.child, families[0], Path(args.base), args)
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_train: skipped: no CUDA device (torch.cuda.is_available() is False); "
              "--device cpu --tiny runs the code path on toy models")
        return 0
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu needs --tiny: SD1.5 / SDXL-sized runs on a CPU take hours")
    for family in families:
        measure(family, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
