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
    runtime      what the process holds before any model: the CUDA context on a GPU (assumed
                 0.5 GB), the Python / torch / diffusers libraries on a CPU (measured here)

The adapters are counted from the modules the trainer attaches (its ``attach_adapters``) on a
copy of the base built on the meta device (shapes, no memory): what it leaves trainable, and the rest.

Activations are *counted*, not guessed: LoRA stands in on the layers the run adapts (an
adapter's own activations are a rank-r sliver), one forward runs at batch 1 and the run's
resolution, and a ``saved_tensors_hooks`` pack hook adds up the distinct storages autograd
saves -- not the model's own tensors (a Linear saves its weight's transpose: a view of a weight
counted above), and attention as the run's device computes it (see ``_fused_attention``). The
checkpointing figure comes from the same forward with diffusers' / transformers' checkpointing
switched on and a checkpoint function that counts each block's saved tensors separately.
Transient buffers (a gradient being summed, the VAE encode) are not saved tensors; they are what
the measured peaks exceed the count by (benchmarks/train_step.py ``BENCH memory_estimate_error_*``).

The frozen base runs in bf16 / fp16 while the adapters stay fp32: the layer casts the input
of every adapter up to fp32 and its output down to the base's dtype (``AdaptedLayer``), so the
adapter math, gradients and the optimizer never see half precision. On CPUs without native
bf16 the base matmuls are much slower in bf16 (see the README).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from studio.errors import StudioError

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


# -- counting saved activations on the meta device ---------------------------------------------
class _Saved:
    """Distinct storages saved for backward, in bytes (views of one storage count once), leaving
    out the storages in ``own`` (the model's parameters and buffers, counted as weights)."""

    def __init__(self, own: set[int] = frozenset()):
        self.own = own
        self.seen: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # alive while counting, so no storage id is reused

    def add(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
            s = t.untyped_storage()
            if s._cdata not in self.own:
                self.seen.setdefault(s._cdata, s.nbytes())
                self.keep.append(t)
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}


@contextmanager
def _counting(saved: _Saved):
    with torch.autograd.graph.saved_tensors_hooks(saved.add, lambda t: t), _fused_attention():
        yield


@contextmanager
def _fused_attention():
    """scaled_dot_product_attention as the run's device computes it.

    On the meta device SDPA always takes the math path, which saves the (L x L) attention
    probabilities of every head: 64 MB a 32 x 32-latent self-attention at batch 2. The CPU runs
    a flash kernel and CUDA flash / memory-efficient ones whenever the inputs allow, which save
    q, k, v, the output and one logsumexp per query instead. So each call asks the device which
    backend it would choose for inputs like these (``torch._fused_sdp_choice`` on a small probe)
    and, for a fused one, runs the CPU flash kernel's meta function: its saved tensors are those
    of every fused kernel, up to their small scalars."""
    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.is_meta and not enable_gqa and _device_fuses(query, key, attn_mask, dropout_p, is_causal, scale):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _device_fuses(query, key, attn_mask, dropout_p, is_causal, scale) -> bool:
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def probe(t, grad=False):  # the same heads, head size, dtype; 8 positions
        return torch.zeros(*t.shape[:-2], 8, t.shape[-1], dtype=t.dtype, device=device, requires_grad=grad)
    q, k = probe(query, query.requires_grad), probe(key)
    mask = None if attn_mask is None else torch.zeros(1, 1, 8, 8, dtype=attn_mask.dtype, device=device)
    choice = torch._fused_sdp_choice(q, k, k, mask, dropout_p, is_causal, scale=scale)
    return choice != int(torch.nn.attention.SDPBackend.MATH)


@dataclass
class Activations:
    plain: int
    """Saved bytes of one image's forward, everything kept."""
    outside: int = 0
    """With checkpointing: bytes kept outside the checkpointed blocks (their inputs included)."""
    largest_block: int = 0
    """With checkpointing: the largest block's own saved bytes (live while it is recomputed)."""

    @property
    def checkpointed(self) -> int:
        return self.outside + self.largest_block


def count_activations(model: nn.Module, run, checkpointable: bool = True) -> Activations:
    """Saved bytes of ``run(model)`` (a forward on meta tensors), plain and, when the model has
    checkpointing, with it (each checkpointed call counted on its own)."""
    own = _storages(model)
    plain = _Saved(own)
    with _counting(plain):
        run(model)
    if not checkpointable:
        return Activations(plain.total, plain.total, 0)
    outside, blocks = _Saved(own), []

    def counted_block(function, *args, **kwargs):
        for a in args:  # non-reentrant checkpointing keeps the block's inputs for the recompute
            if isinstance(a, torch.Tensor):
                outside.add(a)
        inner = _Saved(own)
        with _counting(inner):
            out = function(*args, **kwargs)
        blocks.append(inner.total)
        return out

    _set_checkpoint_function(model, counted_block)
    try:
        with _counting(outside):
            run(model)
    finally:
        _unset_checkpointing(model)
    return Activations(plain.total, outside.total, max(blocks, default=0))


def _set_checkpoint_function(model: nn.Module, function) -> None:
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers calls function(module.__call__, *args)
        model.enable_gradient_checkpointing(gradient_checkpointing_func=lambda module, *a: function(module, *a))
    else:  # transformers calls function(layer.__call__, *args, **kwargs)
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=function)


def _unset_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "disable_gradient_checkpointing"):
        model.disable_gradient_checkpointing()
    else:
        model._set_gradient_checkpointing(enable=False)


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

    @property
    def adapter_bytes(self) -> int:
        return self.adapter_params * ADAMW_BYTES + self.adapter_fixed

    def activation_bytes(self, checkpointing: bool) -> int:
        per_image = sum(a.checkpointed if checkpointing else a.plain for a in self.activations.values())
        return per_image * self.batch

    def total(self, checkpointing: bool) -> int:
        return self.runtime + sum(self.weights.values()) + self.adapter_bytes + self.activation_bytes(checkpointing)


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


def adapter_sizes(models) -> tuple[int, int]:
    """(trainable values, bytes of every other adapter tensor) of the adapters attached to ``models``.

    Per adapter, not per distinct tensor: each layer of a real base has its own W0, so its own SVD
    (SVF's U, S, Vh), even where the meta proxy's cache hands one basis to same-shaped layers."""
    from studio.adapters.layer import Adapter

    trainable = fixed = 0
    for module in (m for model in models for m in model.modules() if isinstance(m, Adapter)):
        for t in {id(t): t for t in [*module.parameters(), *module.buffers()]}.values():
            if t.requires_grad:
                trainable += t.numel()
            else:
                fixed += t.numel() * t.element_size()
    return trainable, fixed


class _NoValues(TorchDispatchMode):
    """Attaching on the meta proxy: a method that reads W0's values at init (SVF and its kin hash
    W0 to key their SVD cache) gets uninitialised memory of W0's shape when it copies W0 off the
    meta device. Only the state's shapes are used, and they follow from W0's shape."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if (func is torch.ops.aten._to_copy.default and args[0].is_meta and device is not None
                and torch.device(device).type != "meta"):
            return torch.empty(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype, device=device)
        return func(*args, **kwargs)


def estimate_diffusion(cfg) -> Estimate:
    """The memory of ``cfg``'s run (a DiffusionTrainConfig)."""
    import studio.adapters as A
    from studio.adapters import lora
    from trainers import diffusion

    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  (the libraries a run loads,
    from transformers import CLIPTextModel  # noqa: F401  counted in the runtime)

    # before this estimate holds anything of its own: a single-file base is loaded whole to read its configs
    runtime, note = runtime_overhead()
    family, parts = _meta_parts(cfg.base)
    dtype = DTYPES[cfg.base_dtype]
    unet, vae = parts["unet"], parts["vae"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = cfg.resolution or unet.config.sample_size * scale
    components = {"unet": unet, **({"te1": parts["te"], "te2": parts["te2"]} if family == "sdxl" else {"te": parts["te"]})}
    composed = diffusion.composed_experts(cfg) if cfg.mixture_of else None
    run = "estimate"
    # what the trainer attaches. No meta default device: a method's own new tensors (LoRA's A, a
    # cached pattern) are made on the CPU as in the run -- a cache must not keep meta tensors for a
    # later real run -- and the attach moves each layer's state to the proxy's device, one at a time
    with torch.random.fork_rng(devices=[]), _NoValues():
        diffusion.attach_adapters(cfg, components, family, run, composed)
    params, fixed = adapter_sizes(components.values())
    adapted = {}
    for name, model in components.items():
        if run in A.adapter_names(model):
            adapted[name] = list(A.targets.layers_of(model, run))
            A.detach(model, run)
    # LoRA stands in for the method in the forward, on the same layers: the real state's values
    # (which (IA)^3 and MoV branch on) do not exist on the meta device
    with torch.device("meta"):
        for name, paths in adapted.items():
            A.attach(components[name], run, "lora", lora.Config(rank=min(cfg.rank, 8)), paths)
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
    return Estimate(weights, cfg.base_dtype, params, fixed, activations, cfg.batch_size, runtime, note, resolution)


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
