"""Any adapter as a plain LoRA: exact factors, truncation with reported energy (storage: packing.py).

Every method's delta is ``dW = up @ down`` (``factors``). For LoRA / PiSSA / MiLoRA the stacked
factors are re-factorised by QR + a small SVD (``mix.compress``): the result is sorted by singular
value, its magnitude is split evenly between the two factors, and PiSSA's cancelling B0 A0 terms
are gone (the factors scale with ||dW||, not ||W0||). SVF's delta is already an SVD
(``mix.compress_svf``). Truncation keeps the r largest singular values; its Frobenius error is
sqrt(sum of the dropped sigma^2) (Eckart-Young), reported per module and overall.

"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn as nn

from studio.adapters import make_config, mix
from studio.adapters.contract import Site
from studio.adapters.layer import AdaptedLayer, base_matrix, site_of
from studio.adapters.registry import get
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
    W = base_matrix(model.get_submodule(name)) if name is not None else None
    if W is None:
        raise StudioError(f"the base model has no Linear or convolution layer '{path}' for this adapter: give the "
                          f"base it was trained on")
    return W


def _site(model: nn.Module | None, path: str) -> Site:
    name = resolve_path(model, path) if model is not None else None
    site = site_of(model.get_submodule(name), path) if name is not None else None
    return site if site is not None else Site(path, 0, 0)


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


def states(part: Part, model: nn.Module | None, component: str):
    """(path, method, cfg, state, W0) per module of a part; the base model is asked for W0 when the
    method needs it (SVF's basis, DoRA's norm, (IA)^3's scaled weight)."""
    method, cfg = get(part.method), make_config(part.method, part.config)
    if method.TRAITS.needs_base and model is None:
        raise StudioError(
            f"{part.method} adapters depend on their base weights (their delta is not stored as low-rank factors), "
            f"so converting one to a plain LoRA needs its base model: pass --base (the exact checkpoint it was "
            f"trained on), or export --format native")
    for path, tensors in part.modules().items():
        W0 = base_weight(model, path) if method.TRAITS.needs_base else None
        site = _site(model, path)._replace(path=f"{component}.{path}")  # errors name the component too
        yield path, method, cfg, method.from_saved(cfg, W0, tensors, site), W0


def _finite(where: str, *tensors: torch.Tensor) -> None:
    if not all(torch.isfinite(t).all() for t in tensors):
        raise StudioError(f"module '{where}' of the adapter has NaN or infinite values: it diverged; retrain it "
                          f"with a lower learning rate or use an earlier checkpoint")


def _full(method, cfg, state: dict, W0: torch.Tensor | None, where: str, policy: Policy | None = None
          ) -> mix.LowRank | tuple:
    """The exact delta: (down, up) of a low-rank method, else its sorted full-rank SVD (mix.LowRank). A method's
    own SVD (SVF, LoHa, LoKr) is gathered only as far as ``policy`` keeps (all singular values still reported)."""
    hook = getattr(method, "svd", None)
    if hook is not None:
        U, g, Vh = hook(cfg, state)
        _finite(where, g)
        k = g.numel() if policy is None else keep(g.abs().sort(descending=True).values, policy)
        return mix.compress_svd(U, g, Vh, rank=k)
    if method.TRAITS.kind == "low-rank":
        down, up = method.factors(cfg, state)
        _finite(where, down, up)
        return down.detach().float(), up.detach().float()
    if not method.TRAITS.mergeable:
        raise StudioError(f"module '{where}': a {method.NAME} adapter has no fixed weight delta, so it cannot become "
                          f"a plain LoRA: export it with --format native")
    dW = method.delta_weight(cfg, state, None if W0 is None else W0.float()).detach()  # (W0 only if needs_base)
    _finite(where, dW)
    return mix.dense(dW, rank=min(dW.shape))


def _bias_delta(method, cfg, state: dict, model: nn.Module | None, path: str, width: int) -> torch.Tensor | None:
    """db of a method that changes a bias ((IA)^3 on a key / value projection with a bias, a full delta's
    diff_b), or None. Without the base, a method that needs none (full) is asked with a zero bias of the
    module's width (its bias delta is stored, not derived from the bias), so a lost bias still counts."""
    if getattr(method, "delta_bias", None) is None or (model is None and method.TRAITS.needs_base):
        return None
    if model is None:
        bias = torch.zeros(width)
    else:
        module = model.get_submodule(resolve_path(model, path))
        bias = getattr(module.base if isinstance(module, AdaptedLayer) else module, "bias", None)
    db = method.delta_bias(cfg, state, bias.detach().float()) if bias is not None else None
    return db.detach() if db is not None and db.any() else None


def exact_factors(part: Part, model: nn.Module | None = None, component: str = "") -> dict[str, tuple]:
    """{module path: (down, up)} with up @ down = dW exactly (fp32; full rank for dense methods)."""
    out = {}
    for path, method, cfg, state, W0 in states(part, model, component):
        full = _full(method, cfg, state, W0, f"{component}.{path}")
        out[path] = (full.down, full.up) if isinstance(full, mix.LowRank) else full
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
    """{module path: Factors} of one part as a plain LoRA under the policy. A bias delta no LoRA can hold
    ((IA)^3 on a biased projection) counts as error, so the reported energy stays honest."""
    with one_thread():
        out = {}
        for path, method, cfg, state, W0 in states(part, model, component):
            full = _full(method, cfg, state, W0, f"{component}.{path}", policy)
            f = truncate(full if isinstance(full, mix.LowRank) else sorted_full(*full), policy)
            _check_fits(f, model, path, component)
            db = _bias_delta(method, cfg, state, model, path, f.up.shape[0])
            if db is not None:
                lost = float(db.double().square().sum())
                norm2 = f.norm ** 2 + lost
                f = f._replace(error=math.sqrt(f.error ** 2 + lost), norm=math.sqrt(norm2),
                               energy=1.0 if norm2 == 0 else 1.0 - (f.error ** 2 + lost) / norm2)
            out[path] = f
        return out


def _check_fits(f: Factors, model: nn.Module | None, path: str, component: str) -> None:
    """A delta of another shape than the base's layer (a LoKr whose factors do not multiply out to it,
    a file for another model) is refused here, when the base is given, instead of written."""
    site = _site(model, path) if model is not None else None
    if site is None or not site.out_features:
        return
    shape, layer = (f.up.shape[0], f.down.shape[1]), (site.out_features, site.in_features)
    if shape != layer:
        raise StudioError(f"module '{component}.{path}' of the adapter makes a {shape[0]} x {shape[1]} delta but the "
                          f"base's layer is {layer[0]} x {layer[1]}: the file is for another model or damaged; "
                          f"check --base, or use the file with the model it was made for")


def summarise(factors: dict[str, dict[str, Factors]]) -> dict:
    """Overall energy and error over every module of every component."""
    norm2 = sum(f.norm ** 2 for mods in factors.values() for f in mods.values())
    err2 = sum(f.error ** 2 for mods in factors.values() for f in mods.values())
    return {"energy": 1.0 if norm2 == 0 else 1.0 - err2 / norm2,
            "error": math.sqrt(err2), "relative_error": 0.0 if norm2 == 0 else math.sqrt(err2 / norm2),
            "per_module": {f"{c}.{p}": round(f.energy, 6) for c, mods in factors.items() for p, f in mods.items()}}


# -- plain LoRA parts from stored factors (imports) ------------------------------------------
def lora_part(modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> Part:
    """{path: (down, up, alpha)} with dW = (alpha / r) up @ down -> a core LoRA part."""
    if not modules:
        raise StudioError("no LoRA modules to import")
    return uniform_part("lora", {p: ({"rank": int(d.shape[0]), "alpha": float(a)}, {"A": d, "B": u})
                                 for p, (d, u, a) in modules.items()}, "the file")


def uniform_part(method: str, entries: dict[str, tuple[dict, dict]], where: str,
                 kernels: dict[str, tuple[int, int] | None] | None = None) -> Part:
    """Modules {path: (config fields, tensors with A (r, in[, kh, kw]) and B (out, r))} -> one Part.

    A Part has one config. Ranks and alphas uniform over the Linear (and 1x1) modules and over the
    k x k convolutions keep the tensors as they are (``rank`` / ``alpha``, ``conv_rank`` / ``conv_alpha``,
    kohya's network_dim and conv_dim). Otherwise each module's scale is folded into B and ranks are
    zero-padded to the largest, which is exact. Other fields (DoRA's axis) must agree.

    A method whose shapes follow other rules (LoHa, LoKr) gives its own ``uniform(entries, kernels, where)
    -> (config, {path.tensor: tensor})``, told each module's kernel (``kernels``; None: not a conv or
    unknown); a method without a rank keeps its tensors as they are."""
    hook = getattr(get(method), "uniform", None)
    if hook is not None:
        config, tensors = hook(entries, kernels or {}, where)
        return Part(method, config, tensors)

    def key(fields):
        return int(fields["rank"]), float(fields["alpha"])

    others = {tuple(sorted((k, v) for k, v in f.items() if k not in ("rank", "alpha"))) for f, _ in entries.values()}
    if len(others) > 1:
        raise StudioError(f"{where}: its {method} modules disagree on {sorted(others)}: the studio keeps one setting "
                          f"per component; re-export the file with one setting")
    common = dict(others.pop()) if others else {}
    if not get(method).TRAITS.has_rank:  # ((IA)^3, full: nothing per module to reconcile)
        return Part(method, common, {f"{p}.{k}": v.float() for p, (_, t) in entries.items() for k, v in t.items()})
    conv = {p for p, (_, t) in entries.items() if t["A"].dim() == 4}
    groups = [{key(f) for p, (f, _) in entries.items() if (p in conv) == is_conv_group} for is_conv_group in (False, True)]
    tensors = {}
    if all(len(g) <= 1 for g in groups):
        (rank, alpha), conv_key = (next(iter(groups[0])) if groups[0] else next(iter(groups[1]))), next(iter(groups[1]), None)
        for path, (_, t) in entries.items():
            tensors.update({f"{path}.{k}": v.float() for k, v in t.items()})
        config = {**common, "rank": rank, "alpha": alpha, "rslora": False, "dropout": 0.0,
                  "conv_rank": None if conv_key in (None, (rank, alpha)) else conv_key[0],
                  "conv_alpha": None if conv_key in (None, (rank, alpha)) else conv_key[1]}
        return Part(method, config, tensors)
    R = max(r for g in groups for r, _ in g)
    for path, (fields, t) in entries.items():
        r, alpha = key(fields)
        A = torch.zeros(R, *t["A"].shape[1:])             # (R, in) or LoCon's (R, in, kh, kw)
        B = torch.zeros(t["B"].shape[0], R)               # (out, R)
        A[:r] = t["A"].float()
        B[:, :r] = t["B"].float() * (alpha / r)
        tensors.update({f"{path}.{k}": v.float() for k, v in t.items()})
        tensors[f"{path}.A"], tensors[f"{path}.B"] = A, B
    return Part(method, {**common, "rank": R, "alpha": float(R), "rslora": False, "dropout": 0.0}, tensors)


def check_pair(where: str, name: str, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical factors of a stored pair: (r, in) / (out, r); 1x1-conv kernels are squeezed away and
    k x k LoCon kernels keep their down kernel (r, in, kh, kw), as the core stores them."""
    refuse_conv_kernel(where, name, down, up)
    if down.dim() == 4:
        up = up.flatten(1)                         # (out, r, 1, 1) -> (out, r)
        if tuple(down.shape[2:]) == (1, 1):
            down = down.flatten(1)                 # (r, in, 1, 1) -> (r, in)
    if down.shape[0] != up.shape[1]:
        raise StudioError(f"{where}: module '{name}' has lora_down rank {down.shape[0]} but lora_up rank "
                          f"{up.shape[1]}: the file is damaged")
    return down, up
