"""Any adapter as a plain LoRA: exact factors, truncation with reported energy, storage packing.

Every method's delta is ``dW = up @ down`` (``factors``). For LoRA / PiSSA / MiLoRA the stacked
factors are re-factorised by QR + a small SVD (``mix.compress``): the result is sorted by singular
value, its magnitude is split evenly between the two factors, and PiSSA's cancelling B0 A0 terms
are gone (the factors scale with ||dW||, not ||W0||). SVF's delta is already an SVD
(``mix.compress_svf``). Truncation keeps the r largest singular values; its Frobenius error is
sqrt(sum of the dropped sigma^2) (Eckart-Young), reported per module and overall.

Storage (``pack``): one alpha for the whole file (r when every module has rank r, else the largest
rank), every other scale folded into the factors: stored = sqrt(r_N / alpha) * balanced factor,
so that (alpha / r_N) up @ down = dW. Half precision shifts all factors by one power of two (and
alpha by its square) when that avoids overflow and underflow, and refuses when nothing does.
Factors of 1x1 convolutions are stored 4-D, (r, in, 1, 1) / (out, r, 1, 1), as kohya and PEFT
write them (``conv_kernels``); every loader shapes its LoRA layers from the stored tensors.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn as nn

from studio.adapters import METHODS, make_config, mix
from studio.adapters.layer import AdaptedLinear, is_conv1d, is_conv1x1
from studio.errors import StudioError
from studio.formats.adapter_file import Part
from studio.formats.names import resolve_path
from studio.formats.refuse import refuse_conv_kernel

ZERO = 1e-6  # singular values below ZERO * sigma_max are fp32 round-off of an exact zero


class Policy(NamedTuple):
    rank: int | None = None
    energy: float | None = None

    @property
    def exact(self) -> bool:
        return self.rank is None and (self.energy is None or self.energy >= 1.0)

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank={self.rank}"
        return "exact" if self.exact else f"energy={self.energy}"


class Factors(NamedTuple):
    down: torch.Tensor     # (k, in)
    up: torch.Tensor       # (out, k); up @ down approximates dW, magnitude split evenly
    energy: float          # kept fraction of ||dW||_F^2
    error: float           # ||dW - up @ down||_F = sqrt(sum of dropped sigma^2)
    norm: float            # ||dW||_F


def base_weight(model: nn.Module, path: str) -> torch.Tensor:
    name = resolve_path(model, path)
    module = model.get_submodule(name) if name is not None else None
    if isinstance(module, AdaptedLinear):
        return module.pristine_weight
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if module is not None and is_conv1d(module):
        return module.weight.detach().T
    if module is not None and is_conv1x1(module):
        return module.weight.detach().flatten(1)  # (out, in, 1, 1) -> (out, in), as AdaptedLinear sees it
    raise StudioError(f"the base model has no Linear layer (or 1x1 convolution) '{path}' for this SVF adapter: "
                      f"give the base it was trained on")


@contextlib.contextmanager
def one_thread():
    """Per-module QR / SVD of thin factor matrices: OpenMP fan-out costs more than it gains (measured
    10-100x slower with 2 threads when another process shares the cores), so run them on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def exact_factors(part: Part, model: nn.Module | None = None, component: str = "") -> dict[str, tuple]:
    """{module path: (down, up)} with up @ down = dW exactly (fp32). SVF needs its base model."""
    method = METHODS[part.method]
    cfg = make_config(part.method, part.config)
    out = {}
    for path, tensors in part.modules().items():
        if part.method == "svf":
            if model is None:
                raise StudioError(
                    f"SVF adapters store gains on the base weight's singular vectors, so converting one to "
                    f"a plain LoRA needs its base model: pass --base (the exact checkpoint it was trained on)")
            state = method.from_saved(cfg, base_weight(model, path), tensors, module=f"{component}.{path}")
        else:
            state = method.from_saved(cfg, None, tensors, module=path)
        down, up = method.factors(cfg, state)
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise StudioError(f"module '{component}.{path}' of the adapter has NaN or infinite values: it diverged; "
                              f"retrain it with a lower learning rate or use an earlier checkpoint")
        out[path] = (down.detach().float(), up.detach().float())
    return out


def keep(S: torch.Tensor, policy: Policy) -> int:
    """How many leading singular values (sorted, descending) the policy keeps; at least one."""
    S = S.double()
    nonzero = max(1, int((S > ZERO * S[0]).sum())) if S.numel() and S[0] > 0 else 1
    if policy.rank is not None:
        if policy.rank <= 0:
            raise StudioError(f"--rank must be positive, got {policy.rank}")
        return min(policy.rank, nonzero)
    if policy.exact:
        return nonzero
    if not 0.0 < policy.energy <= 1.0:
        raise StudioError(f"--energy must be in (0, 1], got {policy.energy}")
    cumulative = torch.cumsum(S ** 2, 0)
    total = float(cumulative[-1])
    return nonzero if total == 0 else min(nonzero, int((cumulative < policy.energy * total * (1 - 1e-12)).sum()) + 1)


def _factors(lowrank: mix.LowRank, k: int) -> Factors:
    S = lowrank.singular_values.double()
    total, dropped = float((S ** 2).sum()), float((S[k:] ** 2).sum())
    return Factors(lowrank.down[:k].contiguous(), lowrank.up[:, :k].contiguous(),
                   1.0 if total == 0 else 1.0 - dropped / total, math.sqrt(dropped), math.sqrt(total))


def truncate(full: mix.LowRank, policy: Policy) -> Factors:
    """Keep the leading components of a sorted, full-rank LowRank according to the policy."""
    return _factors(full, keep(full.singular_values, policy))


def sorted_full(down: torch.Tensor, up: torch.Tensor) -> mix.LowRank:
    return mix.compress(down, up, rank=down.shape[0])


def to_lowrank(part: Part, policy: Policy, model: nn.Module | None = None, component: str = "") -> dict[str, Factors]:
    """{module path: Factors} of one part as a plain LoRA under the policy."""
    with one_thread():
        return _to_lowrank(part, policy, model, component)


def _to_lowrank(part: Part, policy: Policy, model: nn.Module | None, component: str) -> dict[str, Factors]:
    if part.method == "svf":
        method, cfg = METHODS["svf"], make_config("svf", part.config)
        if model is None:
            exact_factors(part, None, component)  # raises the explanation
        out = {}
        for path, tensors in part.modules().items():
            if not torch.isfinite(tensors["z"]).all():
                raise StudioError(f"module '{component}.{path}' of the SVF adapter has NaN or infinite gains: it "
                                  f"diverged; retrain it with a lower learning rate or use an earlier checkpoint")
            state = method.from_saved(cfg, base_weight(model, path), tensors, module=f"{component}.{path}")
            sigma = (state["S"] * (state["z"] - 1)).abs().sort(descending=True).values  # dW's singular values
            k = keep(sigma, policy)  # decided first, so only k singular vectors are gathered and scaled
            out[path] = _factors(mix.compress_svf(state["U"], state["S"], state["Vh"], state["z"], rank=k), k)
        return out
    return {path: truncate(sorted_full(down, up), policy)
            for path, (down, up) in exact_factors(part, model, component).items()}


def summarise(factors: dict[str, dict[str, Factors]]) -> dict:
    """Overall energy and error over every module of every component."""
    norm2 = sum(f.norm ** 2 for mods in factors.values() for f in mods.values())
    err2 = sum(f.error ** 2 for mods in factors.values() for f in mods.values())
    return {"energy": 1.0 if norm2 == 0 else 1.0 - err2 / norm2,
            "error": math.sqrt(err2), "relative_error": 0.0 if norm2 == 0 else math.sqrt(err2 / norm2),
            "per_module": {f"{c}.{p}": round(f.energy, 6) for c, mods in factors.items() for p, f in mods.items()}}


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
# 1x1-conv proj_in / proj_out; SDXL's are Linear. ResNet conv_shortcut is a 1x1 conv everywhere.
_CONV_UNLESS_SDXL = ("proj_in", "proj_out")
_CONV_ALWAYS = ("conv_shortcut",)


def is_conv(component: str, path: str, family: str, model: nn.Module | None = None) -> bool:
    """Whether module ``path`` is a 1x1 convolution: asked of the model when given, else by family rule."""
    name = resolve_path(model, path) if model is not None else None
    if name is not None:
        module = model.get_submodule(name)
        return module.conv if isinstance(module, AdaptedLinear) else is_conv1x1(module)
    if component != "unet":
        return False
    leaf = path.rpartition(".")[2]
    return leaf in _CONV_ALWAYS or (leaf in _CONV_UNLESS_SDXL and family != "sdxl")


def conv_kernels(packed: Packed, family: str, models: dict[str, nn.Module] | None = None) -> Packed:
    """``packed`` with the factors of 1x1-conv modules viewed as (r, in, 1, 1) / (out, r, 1, 1)."""
    models = models or {}
    modules = {c: {p: (d[:, :, None, None], u[:, :, None, None]) if is_conv(c, p, family, models.get(c)) else (d, u)
                   for p, (d, u) in mods.items()} for c, mods in packed.modules.items()}
    return packed._replace(modules=modules)


# -- plain LoRA parts from stored factors (imports) ------------------------------------------
def lora_part(modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> Part:
    """{path: (down, up, alpha)} with dW = (alpha / r) up @ down -> a core LoRA part.

    Uniform rank and alpha keep the tensors as they are (A = down, B = up). Otherwise the
    per-module scale is folded into B and ranks are zero-padded to the largest (exact).
    """
    if not modules:
        raise StudioError("no LoRA modules to import")
    ranks = {int(d.shape[0]) for d, _, _ in modules.values()}
    alphas = {float(a) for _, _, a in modules.values()}
    if len(ranks) == 1 and len(alphas) == 1:
        r, a = ranks.pop(), alphas.pop()
        tensors = {}
        for path, (down, up, _) in modules.items():
            tensors[f"{path}.A"], tensors[f"{path}.B"] = down.float(), up.float()
        return Part("lora", {"rank": r, "alpha": a, "rslora": False, "dropout": 0.0}, tensors)
    R = max(ranks)
    tensors = {}
    for path, (down, up, alpha) in modules.items():
        r = down.shape[0]
        A = torch.zeros(R, down.shape[1])                 # (R, in)
        B = torch.zeros(up.shape[0], R)                   # (out, R)
        A[:r] = down.float()
        B[:, :r] = up.float() * (float(alpha) / r)
        tensors[f"{path}.A"], tensors[f"{path}.B"] = A, B
    return Part("lora", {"rank": R, "alpha": float(R), "rslora": False, "dropout": 0.0}, tensors)


def check_pair(where: str, name: str, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical (r, in) / (out, r) factors of a stored pair; 1x1-conv kernels are squeezed away."""
    refuse_conv_kernel(where, name, down, up)
    if down.dim() == 4:
        down, up = down.flatten(1), up.flatten(1)  # (r, in, 1, 1) -> (r, in); (out, r, 1, 1) -> (out, r)
    if down.shape[0] != up.shape[1]:
        raise StudioError(f"{where}: module '{name}' has lora_down rank {down.shape[0]} but lora_up rank "
                          f"{up.shape[1]}: the file is damaged")
    return down, up
