"""Training memory: gradient checkpointing, a half-precision frozen base, and the estimate of
what a run needs (``studio train --check``, ``--vram-budget``).

What an adapter run holds on the accelerator, and what this module counts:

    weights      every frozen parameter and buffer, at --base-dtype (UNet, text encoders, VAE)
    adapters     trainable tensors in fp32 + their fp32 gradients + AdamW's two fp32 moments
                 (16 bytes a parameter), and every other adapter tensor (PiSSA's A0 / B0, SVF's
                 U, S, Vh, a --mixture-of's frozen experts)
    activations  the tensors autograd keeps for the backward pass, per image at the resolution;
                 with checkpointing, only each block's inputs are kept, plus one block's own
                 activations while it is recomputed in the backward pass
    vae encode   the peak of the tensors alive at once in the VAE encode of an uncached latent,
                 per image; it runs before the forward, so a step needs the larger of the two
    runtime      what the process holds before any model: the CUDA context on a GPU (assumed
                 0.5 GB), the Python / torch / diffusers libraries on a CPU (measured here)

The adapters are counted from the modules the trainer attaches (its ``attach_adapters``) on a
copy of the base built on the meta device (shapes, no memory): what it leaves trainable, and the rest.

Activations are *counted*, not guessed: with those adapters, one forward runs at batch 1 and
the run's resolution, and a ``saved_tensors_hooks`` pack hook adds up the distinct storages autograd
saves -- not the model's own tensors (a Linear saves its weight's transpose: a view of a weight
counted above), and attention as the run's device computes it. The checkpointing figure comes
from the same forward with diffusers' / transformers' checkpointing switched on and a checkpoint
function that counts each block's saved tensors separately (trainers/memory_count.py). Transient
buffers (a gradient being summed) and the allocator's fragmentation are not counted; they are what
the measured peaks exceed the count by (benchmarks/train_step.py ``BENCH memory_estimate_error_*``).

The frozen base runs in bf16 / fp16 while the adapters stay fp32: the layer casts the input
of every adapter up to fp32 and its output down to the base's dtype (``AdaptedLayer``), so the
adapter math, gradients and the optimizer never see half precision. On CPUs without native
bf16 the base matmuls are much slower in bf16 (see the README).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from studio.errors import StudioError
from trainers.memory_count import Activations, NoValues, adapter_sizes, count_activations, peak_live

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GB = 1024 ** 3
CUDA_CONTEXT = GB // 2
"""Memory the CUDA context and its kernels take before any tensor (0.3-1 GB by GPU and driver)."""
ADAMW_BYTES = 16
"""A trainable fp32 parameter under AdamW: the value, its gradient and two moments, 4 bytes each."""


# -- what the trainers call -----------------------------------------------------------------
def enable_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing on a diffusers model or a transformers model, non-reentrant: the
    adapters inside a checkpointed block get their gradients although the block's frozen inputs
    do not require any (the reentrant form would drop them)."""
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers: non-reentrant by default
        model.enable_gradient_checkpointing()
        return
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise StudioError(f"{type(model).__name__} has no gradient checkpointing: drop --gradient-checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def adapter_parameters(model: nn.Module) -> set[int]:
    from studio.adapters.layer import Adapter

    return {id(t) for m in model.modules() if isinstance(m, Adapter) for t in [*m.parameters(), *m.buffers()]}


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Every parameter and buffer of ``model`` outside its adapters to ``dtype`` (floating ones only)."""
    keep = adapter_parameters(model)
    with torch.no_grad():
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for key, t in store.items():
                    if t is None or id(t) in keep or not t.is_floating_point() or t.dtype == dtype:
                        continue
                    if isinstance(t, nn.Parameter):
                        store[key] = nn.Parameter(t.to(dtype), requires_grad=False)
                    else:
                        store[key] = t.to(dtype)


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """{"frozen": bytes, "adapters": bytes} of a model's parameters and buffers as they are stored."""
    keep = adapter_parameters(model)
    out = {"frozen": 0, "adapters": 0}
    seen = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out["adapters" if id(t) in keep else "frozen"] += t.numel() * t.element_size()
    return out


# -- sizes ----------------------------------------------------------------------------------------
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(GB|GIB|G|MB|MIB|M)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'12GB', '12 GiB', '11.5G', '8000MB' -> bytes (GB = GiB = 2^30: what GPU tools call a GB)."""
    m = _SIZE.fullmatch(str(text))
    if m is None or float(m.group(1)) <= 0:
        raise StudioError(f"--vram-budget {text!r} is not a memory size: use e.g. --vram-budget 12GB or 8000MB")
    unit = (m.group(2) or "GB").upper()
    return int(float(m.group(1)) * (GB if unit.startswith("G") else 1024 ** 2))


def gb(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= GB / 2 else f"{n / 1024 ** 2:.0f} MB"


# -- the estimate -------------------------------------------------------------------------------
@dataclass
class Estimate:
    weights: dict[str, int]
    """Frozen bytes per component at the base dtype."""
    base_dtype: str
    adapter_params: int
    """Trainable adapter parameters (numel)."""
    adapter_fixed: int
    """Bytes of the adapters' fixed tensors (fp32)."""
    activations: dict[str, Activations]
    """Per component with trainable adapters, per image."""
    batch: int
    runtime: int
    runtime_note: str
    resolution: int
    encode: int = 0
    """Peak bytes of one image's VAE encode (no autograd; a latent not in the cache yet)."""

    @property
    def adapter_bytes(self) -> int:
        return self.adapter_params * ADAMW_BYTES + self.adapter_fixed

    def activation_bytes(self, checkpointing: bool) -> int:
        per_image = sum(a.checkpointed if checkpointing else a.plain for a in self.activations.values())
        return per_image * self.batch

    def working_bytes(self, checkpointing: bool, batch: int | None = None) -> int:
        """The step's own peak: the VAE encode runs before the forward, while no activation is kept,
        so the larger of the two."""
        per_image = sum(a.checkpointed if checkpointing else a.plain for a in self.activations.values())
        return max(per_image, self.encode) * (self.batch if batch is None else batch)

    def total(self, checkpointing: bool) -> int:
        return self.runtime + sum(self.weights.values()) + self.adapter_bytes + self.working_bytes(checkpointing)


def _rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    """This process's peak resident bytes since it started (VmHWM: exec starts it afresh; ``ru_maxrss``
    would carry a forking parent's peak, such as a test runner's, into its child)."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def runtime_overhead() -> tuple[int, str]:
    if torch.cuda.is_available():
        return CUDA_CONTEXT, "the CUDA context, assumed"
    return _rss_now(), "measured: this process with its libraries loaded, on the CPU"


def _meta_parts(base: str | None) -> tuple[str, dict[str, nn.Module]]:
    """(family, {component: model on the meta device}) of a base, from its configs: a folder (the
    mini base included) is read without any weights; a single file or a hub id is loaded once."""
    from pathlib import Path

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.models import MINI_BASE

    folder = Path(str(base) if base else MINI_BASE).expanduser()
    if folder.is_dir() and (folder / "model_index.json").is_file():
        configs = {"unet": UNet2DConditionModel.load_config(str(folder), subfolder="unet"),
                   "vae": AutoencoderKL.load_config(str(folder), subfolder="vae"),
                   "te": CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))}
        if (folder / "text_encoder_2").is_dir():
            configs["te2"] = CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2"))
    else:
        from studio.models import load_diffusion_base
        pipe = load_diffusion_base(base, channels_last=()).pipe
        configs = {"unet": pipe.unet.config, "vae": pipe.vae.config, "te": pipe.text_encoder.config}
        if getattr(pipe, "text_encoder_2", None) is not None:
            configs["te2"] = pipe.text_encoder_2.config
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                 "vae": AutoencoderKL.from_config(configs["vae"]), "te": CLIPTextModel(configs["te"])}
        if "te2" in configs:
            parts["te2"] = CLIPTextModelWithProjection(configs["te2"])
    return ("sdxl" if "te2" in parts else "sd15"), parts


def estimate_diffusion(cfg) -> Estimate:
    """The memory of ``cfg``'s run (a DiffusionTrainConfig)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  (the libraries a run loads,
    from transformers import CLIPTextModel  # noqa: F401  counted in the runtime)

    import studio.adapters as A
    from trainers import diffusion

    # before this estimate holds anything of its own: a single-file base is loaded whole to read its configs
    runtime, note = runtime_overhead()
    family, parts = _meta_parts(cfg.base)
    dtype = DTYPES[cfg.base_dtype]
    unet, vae = parts["unet"], parts["vae"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = cfg.resolution or unet.config.sample_size * scale
    components = {"unet": unet, **({"te1": parts["te"], "te2": parts["te2"]} if family == "sdxl" else {"te": parts["te"]})}
    composed = diffusion.composed_experts(cfg) if cfg.mixture_of else None
    # what the trainer attaches. No meta default device: a method's own new tensors (LoRA's A, a
    # cached pattern) are made on the CPU as in the run -- a cache must not keep meta tensors for a
    # later real run -- and the attach moves each layer's state to the proxy's device, one at a time
    with torch.random.fork_rng(devices=[]), NoValues():
        diffusion.attach_adapters(cfg, components, family, "estimate", composed)
    params, fixed = adapter_sizes(components.values())
    adapted = [name for name, model in components.items() if "estimate" in A.adapter_names(model)]
    for model in parts.values():
        cast_frozen(model, dtype)
    weights = {name: parameter_bytes(m)["frozen"] for name, m in parts.items()}
    # textual inversion's new token rows train: the gradient flows from the loss through the UNet
    # and every text encoder down to the token embedding (its rows are a few thousand values)
    prompted = [k for k in components if k != "unet"] if cfg.ti_module else []
    for name in prompted:
        components[name].get_input_embeddings().weight.requires_grad_(True)
    # the UNet's activations are kept whenever anything trains: a text-encoder adapter's gradient
    # flows back through the whole UNet to the text embeddings
    trained = (["unet"] if adapted or prompted else []) + [k for k in components if k != "unet" and
                                                           (k in adapted or k in prompted)]
    activations = {name: count_activations(components[name], _forward(name, components, family, resolution // scale,
                                                                      dtype, embeds_grad="unet" not in adapted))
                   for name in trained}
    encode = peak_live(vae, lambda model: _encode(model, resolution, dtype))
    return Estimate(weights, cfg.base_dtype, params, fixed, activations, cfg.batch_size, runtime, note, resolution,
                    encode)


def _encode(vae: nn.Module, resolution: int, dtype: torch.dtype) -> None:
    """The trainer's encode of one image: the posterior's mean and std (trainers/diffusion.py)."""
    with torch.device("meta"):
        dist = vae.encode(torch.zeros(1, 3, resolution, resolution, dtype=dtype)).latent_dist
        dist.mean, dist.std


def _forward(name: str, parts: dict, family: str, latent: int, dtype: torch.dtype, embeds_grad: bool = False):
    """A batch-1 training forward of one component on meta tensors."""
    unet = parts["unet"]

    def run_unet(model):
        with torch.device("meta"):
            width = unet.config.cross_attention_dim
            extra = ({"added_cond_kwargs": {"text_embeds": torch.zeros(1, parts["te2"].config.projection_dim, dtype=dtype),
                                            "time_ids": torch.zeros(1, 6, dtype=dtype)}} if family == "sdxl" else {})
            model(torch.zeros(1, unet.config.in_channels, latent, latent, dtype=dtype), torch.tensor([500]),
                  encoder_hidden_states=torch.zeros(1, 77, width, dtype=dtype, requires_grad=embeds_grad), **extra)

    def run_te(model):
        with torch.device("meta"):
            model(torch.zeros(1, model.config.max_position_embeddings, dtype=torch.long))
    return run_unet if name == "unet" else run_te
