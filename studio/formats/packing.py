"""Plain-LoRA factors as a file stores them: one alpha, a file dtype, convolutions in their 4-D layout.

Storage (``pack``): one alpha for the whole file (r when every module has rank r, else the largest
rank), every other scale folded into the factors: stored = sqrt(r_N / alpha) * balanced factor,
so that (alpha / r_N) up @ down = dW. Half precision shifts all factors by one power of two (and
alpha by its square) when that avoids overflow and underflow, and refuses when nothing does.
Factors of convolutions are stored 4-D, (r, in, kh, kw) / (out, r, 1, 1), as kohya, LyCORIS and PEFT
write them (``conv_kernels``); every loader shapes its LoRA layers from the stored tensors.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn

from studio.adapters.layer import AdaptedLayer, is_conv2d
from studio.errors import StudioError
from studio.formats.adapter_file import Part
from studio.formats.names import resolve_path

if TYPE_CHECKING:
    from studio.formats.lowrank import Factors


# -- storage ---------------------------------------------------------------------------------
class Packed(NamedTuple):
    modules: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # component -> path -> (down, up)
    alpha: float
    notes: list[str]


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pack(factors: dict[str, dict[str, Factors]], dtype: torch.dtype) -> Packed:
    """One alpha for the file, scales folded in, then fitted into ``dtype`` (see module doc)."""
    ranks = {f.down.shape[0] for mods in factors.values() for f in mods.values()}
    alpha = float(max(ranks))
    scale = {c: {p: math.sqrt(f.down.shape[0] / alpha) for p, f in mods.items()} for c, mods in factors.items()}
    peaks = [float(t.abs().max()) * scale[c][p]  # NaN and inf propagate into the max
             for c, mods in factors.items() for p, f in mods.items() for t in (f.down, f.up) if t.numel()]
    shift, notes = _fit(peaks, dtype)
    t = 2.0 ** shift  # a power of two: (x * s) * t == x * (s * t) exactly, one pass per tensor
    stored = {c: {p: ((f.down * (scale[c][p] * t)).to(dtype), (f.up * (scale[c][p] * t)).to(dtype))
                  for p, f in mods.items()} for c, mods in factors.items()}
    return Packed(stored, alpha / (t * t), notes)


def _fit(peaks: list[float], dtype: torch.dtype) -> tuple[int, list[str]]:
    """The power-of-two shift k (factors * 2^k, alpha / 4^k) that fits ``dtype``, nearest to 0.

    ``peaks`` are the largest magnitudes of every stored tensor.
    """
    if not all(math.isfinite(p) for p in peaks):
        raise StudioError("the adapter has NaN or infinite values: it diverged; retrain it or export an "
                          "earlier checkpoint")
    if dtype == torch.float32:
        return 0, []
    info = torch.finfo(dtype)
    largest = max(peaks, default=0.0)
    if largest == 0.0:
        return 0, []
    smallest_significant = min(p for p in peaks if p > 0) * 1e-3  # entries that still matter to a product
    high = math.floor(math.log2(info.max / 4 / largest))              # no overflow, with headroom
    low = math.ceil(math.log2(info.tiny / smallest_significant))      # no significant entry subnormal
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    if low > high:
        raise StudioError(f"the adapter's values span more than {name} can hold (largest {largest:.3g}, "
                          f"smallest significant {smallest_significant:.3g}): export with --dtype fp32"
                          + (" or bf16" if dtype == torch.float16 else ""))
    shift = min(max(0, low), high)
    if shift == 0:
        return 0, []
    why = "overflow" if shift < 0 else "underflow"
    return shift, [f"{name}: scaled every factor by 2^{shift} (alpha by 4^{-shift}) to avoid {why}; "
                   f"the delta is unchanged"]


# SD1.x UNets (use_linear_projection False, diffusers' default, also the embedded mini base) have
# 1x1-conv proj_in / proj_out; SDXL's are Linear. ResNet conv_shortcut is a 1x1 conv everywhere, and
# every other UNet convolution kohya's LoCon set reaches (ResNet conv1 / conv2, the samplers' conv,
# conv_in / conv_out) is 3x3 in SD1.x, SDXL and the mini base.
_CONV_UNLESS_SDXL = ("proj_in", "proj_out")
_CONV_ALWAYS = ("conv_shortcut",)
_CONV_3X3 = ("conv1", "conv2", "conv", "conv_in", "conv_out")


def kernel_of(component: str, path: str, family: str, model: nn.Module | None = None,
              stored: torch.Tensor | None = None) -> tuple[int, int] | None:
    """The kernel of module ``path`` when it is a convolution, else None: asked of the model when given,
    else read from a stored 4-D down factor (LoCon's A), else by the family rule above."""
    name = resolve_path(model, path) if model is not None else None
    if name is not None:
        module = model.get_submodule(name)
        module = module.base if isinstance(module, AdaptedLayer) else module
        return tuple(module.kernel_size) if is_conv2d(module) else None
    if stored is not None and stored.dim() == 4:
        return tuple(stored.shape[2:])
    if component != "unet":
        return None
    leaf = path.rpartition(".")[2]
    if leaf in _CONV_3X3:
        return (3, 3)
    return (1, 1) if leaf in _CONV_ALWAYS or (leaf in _CONV_UNLESS_SDXL and family != "sdxl") else None


def is_conv(component: str, path: str, family: str, model: nn.Module | None = None) -> bool:
    """Whether module ``path`` is a convolution (its factors are stored 4-D)."""
    return kernel_of(component, path, family, model) is not None


def stored_kernels(parts: dict[str, Part]) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {path: a stored 4-D tensor}} of modules that keep a k x k kernel in their canonical tensors
    (LoCon's A (r, in, kh, kw), a full delta (out, in, kh, kw)): its last two sizes are the kernel."""
    return {c: {p: k for p, t in part.modules().items() for k in [next((v for v in t.values() if v.dim() == 4), None)]
                if k is not None} for c, part in parts.items()}


def as_kernel(down: torch.Tensor, up: torch.Tensor, kernel: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, in * kh * kw) / (out, k) factors as LoCon's (k, in, kh, kw) / (out, k, 1, 1) on a conv."""
    if kernel is None:
        return down, up
    return down.reshape(down.shape[0], -1, *kernel), up[:, :, None, None]


def conv_kernels(packed: Packed, family: str, models: dict[str, nn.Module] | None = None,
                 parts: dict[str, Part] | None = None) -> Packed:
    """``packed`` with the factors of convolution modules in kohya's 4-D layout."""
    models, stored = models or {}, stored_kernels(parts or {})
    modules = {c: {p: as_kernel(d, u, kernel_of(c, p, family, models.get(c), stored.get(c, {}).get(p)))
                   for p, (d, u) in mods.items()} for c, mods in packed.modules.items()}
    return packed._replace(modules=modules)
