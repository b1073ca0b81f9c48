"""LoKr: low-rank Kronecker product (LyCORIS, Yeh et al. 2023, arXiv 2309.14859; after KronA, arXiv 2212.10650).

    dW = s * kron(W1, W2)        W1: (a, c)    W2: (b, d * kh * kw)    out = a b,  in_channels = c d
    W1 = w1,  or w1 @ w1_b       (a, r) @ (r, c)        when W1 is factored (LyCORIS's decompose_both)
    W2 = w2,  or w2 @ w2_b       (b, r) @ (r, d K)      when W2 is factored (r < max(b, d) / 2)
    s  = alpha / r, r the factored half's rank (W2's when both are), applied once; s = 1 when both
         halves are full (LyCORIS ignores alpha then; so do ComfyUI and A1111)

Shapes follow LyCORIS's rule, from the layer and the config alone (``layout``): (a, b) and (c, d)
are ``factorization(out, factor)`` / ``factorization(in_channels, factor)`` (the most balanced
divisor pair m <= n with m <= factor; -1 = no bound; a factor dividing the size gives (factor, size /
factor), sorted), a and b swapped with ``unbalanced_factorization``, or the layer's own W1 shape from
``module_shapes`` (files split with several factors, or unsorted: lokr_shapes.py); W1 is factored when
``decompose_both`` and r < max(a, c) / 2, W2 when r < max(b, d) / 2, neither with ``full_matrix``.
So ``expected_shapes`` is exact: the config decides which halves are factored, per layer.

Canonical tensors (every key present in every module, as the core saves and restores them):
``w1`` is W1 or its left factor, ``w1_b`` its right factor or an empty (0, c) tensor when W1 is full;
``w2`` / ``w2_b`` likewise with (0, d K); ``alpha`` is per module (a file's own scale, see loha.py).
All 2-D: a conv's kernel is flattened into W2's columns (kron(W1, W2) is then the flattened kernel).

Init as LyCORIS: W1 and w2 (factored) kaiming-uniform, the last factor of W2 zero, so dW = 0.

A file is imported as one config (``uniform``): its factor is the one whose rule gives the most
modules' factor shapes, each other module's W1 shape recorded in ``module_shapes`` by path
(``lokr_shapes.choose_split``); its rank per group (Linear / 1x1, k x k convs) the smallest the rule
turns into the file's forms; halves the rule wants full are multiplied out and smaller ranks zero-padded,
with the scale kept, so the delta is the file's. A Tucker W2 (``lokr_t2`` (r, r, kh, kw),
``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d)) is folded into the flat (b, r) / (r, d K) pair exactly.

Forward on Linear / Conv1D layers: kron(W1, W2) x = vec(W1 X W2^T) with X the input as (c, d), two
small matmuls instead of forming the (out, in) delta; convolutions run x @ dW.T. A plain-LoRA export
takes dW's SVD from the two halves' small SVDs (``svd``): exact at rank rank(W1) rank(W2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from studio.adapters.common import LowRankConfig, pad_rank
from studio.adapters.contract import Base, Site, Traits
from studio.adapters.lokr_shapes import (check_module_shapes, check_stored_kinds, choose_split, lycoris_rebuilds,
                                         modules, split, stored_kind)
from studio.adapters.lokr_shapes import factorization  # noqa: F401 (LyCORIS's rule, read here as lokr.factorization)
from studio.errors import StudioError

NAME = "lokr"
TRAITS = Traits(kind="dense", label="LoKr",
                summary="LoKr (LyCORIS), dW = (alpha/r) kron(W1, W2), W2 low-rank (--method-args factor=F)",
                lr={"image": 1e-3, "lm": 2e-3}, export="truncated", default_energy=0.99)
TRAINABLE = ("w1", "w1_b", "w2", "w2_b")
SAVED = ("w1", "w1_b", "w2", "w2_b", "alpha")


@dataclass(frozen=True)
class Config(LowRankConfig):
    """rank, alpha, rslora, dropout, conv_rank, conv_alpha (``common.LowRankConfig``) and LyCORIS's LoKr options."""

    factor: int = -1
    """LyCORIS's factor: W1 is (factor, .) when factor divides the size, else the most balanced
    pair with its smaller side <= factor; -1 = the most balanced pair."""
    decompose_both: bool = False
    """Factor W1 too (when r < max(a, c) / 2)."""
    full_matrix: bool = False
    """Keep both halves full (s = 1): no rank."""
    unbalanced_factorization: bool = False
    """Swap W1's and W2's output sizes (W1 the larger)."""
    module_shapes: tuple = ()
    """Per-module splits, as a file records them: ((regex over module paths, (a, c)), ...); the first rule
    that fullmatches a layer's path gives it W1 (a, c) and W2 (out / a, in_channels / c) in place of the
    factor rule (a file split with several factors, as LyCORIS's module_algo_map; or with W1 the larger
    half, as ai-toolkit writes). Empty = the factor rule everywhere."""

    stored_kinds: tuple = ()
    """Modules a file stored as LoCon beside its LoKr modules (a LyCORIS preset): ((path pattern, "lora"), ...);
    they hold W1 = [[1]] and are written back as LoCon by --format lycoris (formats/lycoris.py)."""

    label: ClassVar[str] = "LoKr"

    def __post_init__(self) -> None:
        super().__post_init__()
        factor = self.factor
        if not isinstance(factor, int) or isinstance(factor, bool) or not (factor == -1 or factor > 0):
            raise StudioError(f"LoKr factor must be -1 or a positive integer, got {self.factor!r}: pass "
                              f"--method-args factor=8 (or leave the default -1)")
        object.__setattr__(self, "module_shapes", check_module_shapes(self.module_shapes, self.label))
        object.__setattr__(self, "stored_kinds", check_stored_kinds(self.stored_kinds, self.label))


class Layout(NamedTuple):
    a: int
    b: int
    c: int
    d: int
    K: int   # kh * kw: W1 (a, c), W2 (b, d K)
    r1: int  # W1's rank, 0 = full
    r2: int  # W2's rank, 0 = full


def layout(cfg: Config, site: Site) -> Layout:
    K = site.kernel[0] * site.kernel[1]
    a, b, c, d = split(cfg, site)
    r = cfg.rank_at(site.is_conv)
    r1 = r if cfg.decompose_both and not cfg.full_matrix and r < max(a, c) / 2 else 0
    r2 = r if not cfg.full_matrix and r < max(b, d) / 2 else 0
    return Layout(a, b, c, d, K, r1, r2)


def _shapes(L: Layout) -> dict:
    return {"w1": (L.a, L.r1 or L.c), "w1_b": (L.r1, L.c), "w2": (L.b, L.r2 or L.d * L.K), "w2_b": (L.r2, L.d * L.K),
            "alpha": ()}


def expected_shapes(cfg: Config, site: Site) -> dict:
    return _shapes(layout(cfg, site))


def _kaiming(rows: int, cols: int, generator) -> torch.Tensor:
    bound = 1.0 / math.sqrt(cols)  # kaiming_uniform_(a=sqrt(5)) on a (rows, cols) matrix, as LyCORIS inits
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=generator)


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    L = layout(cfg, site)
    r = cfg.rank_at(site.is_conv)
    state = {"w1": _kaiming(L.a, L.r1 or L.c, generator),                                    # (a, c) or (a, r)
             "w1_b": _kaiming(L.r1, L.c, generator) if L.r1 else torch.zeros(0, L.c),        # (r, c) or (0, c)
             "w2": _kaiming(L.b, L.r2, generator) if L.r2 else torch.zeros(L.b, L.d * L.K),  # (b, r) or 0 (b, d K)
             "w2_b": torch.zeros(L.r2, L.d * L.K)}                                            # 0 (r, d K) or (0, d K)
    both_full = not (L.r1 or L.r2)  # LyCORIS then writes alpha = r and applies s = 1
    state["alpha"] = torch.tensor(float(r) if both_full else cfg.scale_at(site.is_conv) * r)
    return state


def from_saved(cfg: Config, W0: torch.Tensor | None, tensors: dict, site: Site) -> dict:
    return {k: tensors[k].float() for k in SAVED}


def _half(w: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    return w @ w_b if w_b.shape[0] else w


def scale(state: dict) -> torch.Tensor | float:
    r1, r2 = state["w1_b"].shape[0], state["w2_b"].shape[0]
    return state["alpha"] / (r2 or r1) if (r1 or r2) else 1.0


def delta_weight(cfg: Config, state: dict, W0: torch.Tensor | None) -> torch.Tensor:
    W1, W2 = _half(state["w1"], state["w1_b"]), _half(state["w2"], state["w2_b"])
    return torch.kron(W1 * scale(state), W2)                                        # (a b, c d K) = (out, in)


def svd(cfg: Config, state: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dW's exact SVD from the halves' own: kron(U1 S1 Vh1, U2 S2 Vh2) = kron(U1, U2) kron(S1, S2) kron(Vh1, Vh2)
    (orthonormal, singular values unsorted), so a plain-LoRA export never takes the SVD of an (out, in) matrix."""
    U1, S1, Vh1 = torch.linalg.svd(_half(state["w1"], state["w1_b"]), full_matrices=False)   # (a, k1) (k1,) (k1, c)
    U2, S2, Vh2 = torch.linalg.svd(_half(state["w2"], state["w2_b"]), full_matrices=False)   # (b, k2) (k2,) (k2, d K)
    return torch.kron(U1, U2), torch.kron(S1, S2) * scale(state), torch.kron(Vh1, Vh2)


def forward(cfg: Config, state: dict, x: torch.Tensor, base: Base, weight: float, training: bool) -> torch.Tensor:
    h = F.dropout(x, cfg.dropout, training=True) if training and cfg.dropout > 0 else x
    W1 = _half(state["w1"], state["w1_b"]) * (scale(state) * weight)               # (a, c)
    (a, c), b, r2 = W1.shape, state["w2"].shape[0], state["w2_b"].shape[0]
    d = state["w2_b"].shape[1]
    steps = c * (d * r2 + r2 * b if r2 else d * b) + a * c * b                     # per input row
    if base.channels(W1[:, 0]).dim() != 1 or steps >= a * b * c * d:  # a conv (channels first), or no gain
        return base.apply(h, delta_weight(cfg, state, None) * weight)
    X = h.reshape(-1, c, d)                                                        # (N, c, d)
    T = (X @ state["w2_b"].T) @ state["w2"].T if r2 else X @ state["w2"].T          # (N, c, b)
    return torch.matmul(W1, T).reshape(*h.shape[:-1], a * b)                       # W1 X W2^T -> (..., out)


# -- LyCORIS's layout (kohya files with lokr_* keys; what ComfyUI, A1111 and Forge apply) -------------
LYCORIS_KIND = "LoKr"
HOLD_LEVEL = 1
"""A LyCORIS preset's component mixing kinds is held in the kind of the highest level present (formats/lycoris.py):
LoKr holds LoCon (W1 = [[1]]); LoHa (level 2) holds LoCon and LoKr."""


def hold(parts: dict, where: str) -> dict:
    """A LoCon module's LyCORIS tensors (lora_up U, lora_down D, alpha; s = alpha / r) as LoKr's, the same
    delta: kron([[1]], U D), W2 factored at rank r."""
    up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
    return {"lokr_w1": torch.ones(1, 1), "lokr_w2_a": up, "lokr_w2_b": down,
            "alpha": parts.get("alpha", torch.tensor(0.0)).float()}


LYCORIS_MARKER = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2")
LYCORIS_ARGS = {"algo": "lokr"}
LYCORIS_CONV = {"lokr_w2": "kernel",  # a full W2 is (b, d, kh, kw) on a convolution; the rest stays 2-D
                "lora_down.weight": "kernel", "lora_up.weight": "1x1"}  # (a module written back as LoCon)


def to_lycoris(cfg: Config, state: dict, kernel: tuple | None = None, path: str = "") -> dict:
    """The module in LyCORIS's keys: as LoCon when the file it came from stored it so (``stored_kinds``); else as it
    is; else, for a split LyCORIS's loader cannot rebuild (``lycoris_rebuilds``: W1 the larger half, as ai-toolkit
    writes, or another per-module split), as the split it always rebuilds, exactly: W1 = [[1]] and W2 = kron(W1, W2)
    = kron(P1, P2) kron(Q1, Q2) (each half P Q), factored at rank rank(W1) rank(W2) when LyCORIS's rule factors it,
    else whole with the scale in W1 (both halves whole: s = 1)."""
    state = {k: v.detach() for k, v in state.items()}
    if stored_kind(cfg, path) == "LoCon" and tuple(state["w1"].shape) == (1, 1) and not state["w1_b"].shape[0]:
        return as_locon(state)
    (a, _), (b, _), c, dK = state["w1"].shape, state["w2"].shape, state["w1_b"].shape[1], state["w2_b"].shape[1]
    kernel = kernel or (1, 1)
    d = dK // (kernel[0] * kernel[1])
    if lycoris_rebuilds(a, b, c, d, kernel, (not state["w1_b"].shape[0], not state["w2_b"].shape[0])):
        out = {}
        for half in "12":
            w, w_b = state[f"w{half}"], state[f"w{half}_b"]
            out.update({f"lokr_w{half}_a": w, f"lokr_w{half}_b": w_b} if w_b.shape[0] else {f"lokr_w{half}": w})
        return {**out, "alpha": state["alpha"].reshape(())}
    (P1, Q1), (P2, Q2), s = halves(state, "1"), halves(state, "2"), float(scale(state))
    up, down = torch.kron(P1, P2), torch.kron(Q1, Q2)                               # (out, k), (k, in K)
    k = up.shape[1]
    if k < max(a * b, c * d) / 2:  # LyCORIS's rule for W2 at lora_dim k, with W1 (1, 1): r < max(b, d) / 2
        return {"lokr_w1": torch.ones(1, 1), "lokr_w2_a": up, "lokr_w2_b": down, "alpha": torch.tensor(s * k)}
    return {"lokr_w1": torch.full((1, 1), s), "lokr_w2": up @ down, "alpha": torch.tensor(1.0)}


def as_locon(state: dict) -> dict:
    """A module with W1 (1, 1) as the LoCon it is: up = W1 w2, down = w2_b, the same alpha (s = alpha / r either
    way); a whole W2 as a full-rank pair with the scale folded in (alpha = r)."""
    if state["w2_b"].shape[0]:
        return {"lora_up.weight": state["w2"] * state["w1"][0, 0], "lora_down.weight": state["w2_b"],
                "alpha": state["alpha"].reshape(())}
    W = state["w1"] * scale(state) * state["w2"]                                    # s W1 W2, (out, in K)
    up, down = halves({"w1": W, "w1_b": W.new_zeros(0, W.shape[1])}, "1")
    return {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(float(up.shape[1]))}


def halves(state: dict, half: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W1 or W2 as P (rows, k) @ Q (k, cols): its own factors, or a whole half against the narrower identity."""
    w, w_b = state[f"w{half}"], state[f"w{half}_b"]
    if w_b.shape[0]:
        return w, w_b
    rows, cols = w.shape
    return (w, torch.eye(cols)) if cols <= rows else (torch.eye(rows), w)


def _matrix(where: str, key: str, t: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """A stored factor as a matrix, and the kernel its trailing dims show (W2 and w2_b only carry one)."""
    if t.dim() == 2:
        return t, None
    if t.dim() == 4 and (key in ("lokr_w2", "lokr_w2_b") or tuple(t.shape[2:]) == (1, 1)):
        return t.flatten(1), tuple(t.shape[2:])
    raise StudioError(f"{where}: {key} has shape {tuple(t.shape)}, which no LoKr layout holds (W1 is 2-D; W2 is "
                      f"(b, d[, kh, kw]) or a (b, r) / (r, d * kh * kw) pair): the file is damaged")


def _pair(where: str, stored: dict, half: str) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """(w, w_b, kernel) of one half: W itself and an empty right factor, or the factored pair."""
    full, a, b = (stored.get(f"lokr_w{half}{s}") for s in ("", "_a", "_b"))
    if (full is None) == (a is None or b is None) or (full is not None and (a is not None or b is not None)):
        raise StudioError(f"{where}: LoKr's W{half} needs lokr_w{half}, or lokr_w{half}_a with lokr_w{half}_b "
                          f"(the module has {', '.join(sorted(stored))}): the file is damaged or incomplete")
    core = stored.get(f"lokr_t{half}")
    if core is not None:  # Tucker W2: t (r, r, kh, kw), a (r, b), b (r, d) -> (b, r), (r, d kh kw)
        if full is not None:
            raise StudioError(f"{where}: the Tucker core lokr_t{half} goes with lokr_w{half}_a / lokr_w{half}_b, not a "
                              f"full lokr_w{half}: the file is damaged")
        if a.dim() != 2 or b.dim() != 2 or core.dim() != 4 or core.shape[:2] != (a.shape[0], b.shape[0]):
            raise StudioError(f"{where}: the Tucker core lokr_t{half} of shape {tuple(core.shape)} does not fit "
                              f"lokr_w{half}_a {tuple(a.shape)} and lokr_w{half}_b {tuple(b.shape)} (LyCORIS: t (r, r, "
                              f"kh, kw), a (r, b), b (r, d); r is the core's first two sizes): the file is damaged")
        core = core.float()
        return a.float().T, torch.einsum("pqhw,qd->pdhw", core, b.float()).flatten(1), tuple(core.shape[2:])
    if full is not None:
        w, kernel = _matrix(where, f"lokr_w{half}", full.float())
        return w, w.new_zeros(0, w.shape[1]), kernel
    (w, _), (w_b, kernel) = _matrix(where, f"lokr_w{half}_a", a.float()), _matrix(where, f"lokr_w{half}_b", b.float())
    if w.shape[1] != w_b.shape[0]:
        raise StudioError(f"{where}: lokr_w{half}_a {tuple(a.shape)} and lokr_w{half}_b {tuple(b.shape)} disagree on "
                          f"the rank: the file is damaged")
    return w, w_b, kernel


def from_lycoris(stored: dict, where: str) -> tuple[dict, dict]:
    """(fields, canonical tensors) of one module of a LyCORIS LoKr file; ``fields["kernel"]`` is the kernel
    the tensors show, if any (a hint for the factor search, not a config field)."""
    foreign = sorted(set(stored) - set(LYCORIS_MARKER) - {"alpha"})
    if foreign:
        raise StudioError(f"{where} mixes LoKr keys (lokr_*) with {', '.join(foreign)}: one module holds one method's "
                          f"keys; the file is damaged or two adapters were merged wrongly: re-export it")
    if "lokr_t1" in stored:
        raise StudioError(f"{where} has lokr_t1, a Tucker core on W1, which LyCORIS's LoKr never writes (W1 carries no "
                          f"kernel): the file is damaged")
    w1, w1_b, seen1 = _pair(where, stored, "1")
    w2, w2_b, kernel = _pair(where, stored, "2")
    if seen1 not in (None, (1, 1)):
        raise StudioError(f"{where}: lokr_w1 carries a {seen1} kernel; LoKr's W1 never does: the file is damaged")
    r1, r2 = w1_b.shape[0], w2_b.shape[0]
    r = r2 or r1
    alpha = float(stored["alpha"]) if "alpha" in stored else 0.0
    tensors = {"w1": w1, "w1_b": w1_b, "w2": w2, "w2_b": w2_b, "alpha": torch.tensor(alpha or float(r or 1))}
    return {"rank": r or None, "alpha": float(tensors["alpha"]), "kernel": kernel}, tensors


def _reform(m, L: Layout, r: int) -> dict:
    """The module's tensors in the forms ``L`` wants (halves multiplied out, ranks padded), scale kept."""
    s, t = scale(m.t), {}
    for half, rank in (("1", L.r1), ("2", L.r2)):
        w, w_b = m.t[f"w{half}"], m.t[f"w{half}_b"]
        if rank:
            t[f"w{half}"], t[f"w{half}_b"] = pad_rank(w, rank, 1), pad_rank(w_b, rank, 0)
        else:
            W = _half(w, w_b)
            t[f"w{half}"], t[f"w{half}_b"] = W, W.new_zeros(0, W.shape[1])
    if L.r1 or L.r2:
        t["alpha"] = torch.tensor(float(s) * (L.r2 or L.r1))
    else:  # both full: s = 1 from here on, so the file's scale goes into W1
        t["w1"], t["alpha"] = t["w1"] * s, torch.tensor(float(r))
    return t


def uniform(entries: dict, kernels: dict, where: str) -> tuple[dict, dict]:
    """One config reproducing every module's factor shapes (see the module docstring), and the tensors."""
    mods = modules(entries, kernels)
    factor, unbalanced, module_shapes = choose_split(mods)
    ranks = {}
    for conv in (False, True):
        members = [m for m in mods if m.conv == conv]
        if members:  # the smallest r that keeps every full W2 full and fits every factored half
            ranks[conv] = max([math.ceil(max(m.b, m.d) / 2) for m in members if not m.t["w2_b"].shape[0]]
                              + [m.t[k].shape[0] for m in members for k in ("w1_b", "w2_b")] + [1])
    rank = ranks.get(False, ranks.get(True))
    fields = {"rank": rank, "alpha": None, "rslora": False, "dropout": 0.0, "factor": factor, "full_matrix": False,
              "unbalanced_factorization": unbalanced, "module_shapes": module_shapes,
              "conv_rank": ranks[True] if len(ranks) == 2 and ranks[True] != rank else None, "conv_alpha": None}
    if not any(m.t[k].shape[0] for m in mods for k in ("w1_b", "w2_b")):  # every half full: say so, no rank needed
        stored = {float(m.t["alpha"]) for m in mods}  # (LyCORIS, and init here, store alpha = r then)
        r = stored.pop() if len(stored) == 1 else 0.0
        fields.update(full_matrix=True, conv_rank=None, rank=int(r) if r >= 1 and r == int(r) else rank)
    for decompose_both in ((True, False) if any(m.t["w1_b"].shape[0] for m in mods) else (False,)):
        cfg = Config(**fields, decompose_both=decompose_both)
        layouts = {m.path: layout(cfg, m.site) for m in mods}
        if all(not (L.r1 and not m.t["w1_b"].shape[0]) for m, L in zip(mods, layouts.values())):
            break  # (else a full W1 where the rule wants it factored: multiply every W1 out instead)
    tensors, alphas = {}, {False: set(), True: set()}
    for m in mods:
        L = layouts[m.path]
        t = _reform(m, L, cfg.rank_at(m.conv))
        assert {k: tuple(v.shape) for k, v in t.items()} == _shapes(L), (m.path, L)
        tensors.update({f"{m.path}.{k}": v for k, v in t.items()})
        if L.r1 or L.r2:
            alphas[m.conv].add(float(t["alpha"]))
    # alpha / conv_alpha only tell what init would write (each module keeps its own): the file's, when one
    one = {conv: next(iter(a)) if len(a) == 1 else None for conv, a in alphas.items()}
    fields.update(alpha=one[False] if ranks.get(False) else one[True],
                  conv_alpha=one[True] if fields["conv_rank"] is not None else None)
    return {**fields, "decompose_both": decompose_both}, tensors
