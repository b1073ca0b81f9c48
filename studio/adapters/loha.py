"""LoHa: low-rank Hadamard product (FedPara, Hyeon-Woo et al. 2021, arXiv 2108.06098; LyCORIS, arXiv 2309.14859).

    dW = s * (w1_a @ w1_b) * (w2_a @ w2_b)      elementwise product of two rank-r terms
         w1_a, w2_a: (out, r)    w1_b, w2_b: (r, in)    (in = in_channels * kh * kw on a conv)
    s  = alpha / r,  r = w1_b.shape[0]              applied ONCE, as LyCORIS's forward, ComfyUI and
                                                    A1111 do (LyCORIS's merge paths apply s^2)

Init as LyCORIS: w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1), w2_a = 0, so dW = 0.

``alpha`` is a per-module 0-d tensor (as in the file), not only a config field: a LoHa file's
modules carry their own alpha and rank, and the delta of a module must follow from its tensors
alone (a plain-LoRA export without the base has no layer to ask whether it is a convolution). The
config's ``rank`` / ``conv_rank`` decide the shapes (``expected_shapes``); ``alpha`` / ``conv_alpha``
/ ``rslora`` only what ``init`` writes into ``alpha`` (s * r, so rsLoRA's alpha / sqrt(r) reads back
as LyCORIS's ``rs_lora`` files do).

All tensors are 2-D: on a k x k conv the kernel is flattened into ``in`` (LyCORIS's non-Tucker conv
layout). Imports also take LyCORIS's Tucker convs (``hada_t1`` / ``hada_t2`` (r, r, kh, kw) with
``hada_w*_a`` (r, out), ``hada_w*_b`` (r, in_channels)), folded exactly into the flat form at the same
rank: W[o, (i, h, w)] = sum_p a[p, o] (sum_q t[p, q, h, w] b[q, i]); and OneTrainer's 4-D conv factors
(a (out, r, 1, 1), b (r, in_channels, kh, kw)). A file whose modules differ in rank becomes one config
by zero-padding ranks (per group: Linear / 1x1 vs k x k convs, told apart by the file's kernels or
the UNet's names), with alpha scaled so s is unchanged: exact, and free at run time since the
delta is formed densely.

Forward: dW has rank <= r^2, dW = U V with U[:, p r + q] = w1_a[:, p] * w2_a[:, q] (out, r^2) and
V[p r + q] = w1_b[p] * w2_b[q] (r^2, in) (the Khatri-Rao products), so when r^2 (out + in) < out * in
the layer runs x through V then U (a LoCon pair of rank r^2) instead of forming dW. The same pair
gives the exact SVD for a plain-LoRA export (``svd``) from a QR of each factor: exact at rank r^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from studio.adapters.common import LowRankConfig, pad_rank
from studio.adapters.contract import Base, Site, Traits
from studio.adapters.lokr_shapes import check_stored_kinds, stored_kind
from studio.errors import StudioError

NAME = "loha"
TRAITS = Traits(kind="dense", label="LoHa",
                summary="LoHa (LyCORIS), dW = (alpha/r) (w1_a w1_b) * (w2_a w2_b), rank up to r^2",
                lr={"image": 1e-3, "lm": 2e-3}, export="truncated", default_energy=0.99)
TRAINABLE = ("w1_a", "w1_b", "w2_a", "w2_b")
SAVED = ("w1_a", "w1_b", "w2_a", "w2_b", "alpha")
FACTORS = ("w1_a", "w1_b", "w2_a", "w2_b")


@dataclass(frozen=True)
class Config(LowRankConfig):
    """rank, alpha, rslora, dropout, conv_rank, conv_alpha (see ``common.LowRankConfig``); kohya's
    network_dim / conv_dim decide the shapes, alpha is stored per module."""

    stored_kinds: tuple = ()
    """Modules a file stored as LoCon beside its LoHa modules (a LyCORIS preset): ((path pattern, "lora"), ...);
    they hold w2 = 1 1^T and are written back as LoCon by --format lycoris (formats/lycoris.py)."""

    label: ClassVar[str] = "LoHa"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "stored_kinds", check_stored_kinds(self.stored_kinds, self.label))


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    out_features, in_features = W0.shape
    r = cfg.rank_at(site.is_conv)
    return {"w1_a": torch.randn(out_features, r, generator=generator) * 0.1,   # (out, r)
            "w1_b": torch.randn(r, in_features, generator=generator),          # (r, in)
            "w2_a": torch.zeros(out_features, r),                              # (out, r): dW = 0
            "w2_b": torch.randn(r, in_features, generator=generator),          # (r, in)
            "alpha": torch.tensor(cfg.scale_at(site.is_conv) * r)}


def expected_shapes(cfg: Config, site: Site) -> dict:
    r = cfg.rank_at(site.is_conv)
    O, I = site.out_features, site.in_features
    return {"w1_a": (O, r), "w1_b": (r, I), "w2_a": (O, r), "w2_b": (r, I), "alpha": ()}


def from_saved(cfg: Config, W0: torch.Tensor | None, tensors: dict, site: Site) -> dict:
    return {k: tensors[k].float() for k in SAVED}


def scale(state: dict) -> torch.Tensor:
    return state["alpha"] / state["w1_b"].shape[0]


def delta_weight(cfg: Config, state: dict, W0: torch.Tensor | None) -> torch.Tensor:
    return (state["w1_a"] @ state["w1_b"]) * (state["w2_a"] @ state["w2_b"]) * scale(state)  # (out, in)


def khatri_rao(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(V (r^2, in), U (out, r^2)) with U @ V = (w1_a w1_b) * (w2_a w2_b), unscaled."""
    w1_a, w1_b, w2_a, w2_b = (state[k] for k in FACTORS)
    U = (w1_a[:, :, None] * w2_a[:, None, :]).flatten(1)        # (out, r * r)
    V = (w1_b[:, None, :] * w2_b[None, :, :]).flatten(0, 1)     # (r * r, in)
    return V, U


def svd(cfg: Config, state: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dW's exact SVD through its rank-r^2 factors (QR of each, then an SVD of the small core), so a plain-LoRA
    export never takes the SVD of an (out, in) matrix: U (out, k), singular values (k,), Vh (k, in)."""
    V, U = khatri_rao(state)
    Qu, Ru = torch.linalg.qr(U * scale(state))                     # (out, k), (k, r^2)
    Qv, Rv = torch.linalg.qr(V.T)                                  # (in, k'), (k', r^2)
    Uc, S, Vhc = torch.linalg.svd(Ru @ Rv.T, full_matrices=False)
    return Qu @ Uc, S, Vhc @ Qv.T


def forward(cfg: Config, state: dict, x: torch.Tensor, base: Base, weight: float, training: bool) -> torch.Tensor:
    h = F.dropout(x, cfg.dropout, training=True) if training and cfg.dropout > 0 else x
    (out_features, r), in_features = state["w1_a"].shape, state["w1_b"].shape[1]
    if r * r * (out_features + in_features) < out_features * in_features:  # the rank-r^2 pair is cheaper
        V, U = khatri_rao(state)
        return base.project(base.apply(h, V), U * (scale(state) * weight))
    return base.apply(h, delta_weight(cfg, state, None) * weight)


# -- LyCORIS's layout (kohya files with hada_* keys; what ComfyUI, A1111 and Forge apply) -------------
LYCORIS_KIND = "LoHa"
HOLD_LEVEL = 2
"""LoHa holds the other kinds of a LyCORIS preset's mixed component (formats/lycoris.py), module by module."""


def hold(parts: dict, where: str) -> dict:
    """A LoCon or LoKr module's LyCORIS tensors as LoHa's, the same delta:
        LoCon (U, D, s = alpha / r):  w1 = (U, D), w2 = (1_out, 1_in^T):  (U D) * (1 1^T) = U D
        LoKr:  kron(P1 Q1, P2 Q2) = (kron(P1, 1_b) kron(Q1, 1_dK^T)) * (kron(1_a, P2) kron(1_c^T, Q2)),
               each half W = P Q its own factors (a full half: W I or I W, the narrower)."""
    if "lora_down.weight" in parts:
        up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
        return {"hada_w1_a": up, "hada_w1_b": down, "hada_w2_a": torch.ones(up.shape[0], 1),
                "hada_w2_b": torch.ones(1, down[0].numel()), "alpha": parts.get("alpha", torch.tensor(0.0)).float()}
    from studio.adapters import lokr

    fields, t = lokr.from_lycoris(parts, where)
    (a, _), (b, _), c, dK = t["w1"].shape, t["w2"].shape, t["w1_b"].shape[1], t["w2_b"].shape[1]
    (P1, Q1), (P2, Q2) = lokr.halves(t, "1"), lokr.halves(t, "2")
    w1_b = torch.kron(Q1, torch.ones(1, dK))                       # (k1, c d K)
    kernel = fields.get("kernel")
    return {"hada_w1_a": torch.kron(P1, torch.ones(b, 1)), "hada_w2_a": torch.kron(torch.ones(a, 1), P2),
            "hada_w1_b": w1_b if kernel in (None, (1, 1)) else w1_b.reshape(w1_b.shape[0], -1, *kernel),
            "hada_w2_b": torch.kron(torch.ones(1, c), Q2), "alpha": torch.tensor(float(lokr.scale(t)) * P1.shape[1])}


LYCORIS_MARKER = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LYCORIS_ARGS = {"algo": "loha"}
LYCORIS_CONV = {"lora_down.weight": "kernel", "lora_up.weight": "1x1"}  # a module written back as LoCon; every
# LoHa tensor stays 2-D on a convolution (LyCORIS's non-Tucker layout)
KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def to_lycoris(cfg: Config, state: dict, path: str = "") -> dict:
    """The module in LyCORIS's keys; as LoCon (up = w1_a, down = w1_b, the same alpha) when the file it came from
    stored it so (``stored_kinds``) and its second product is still all ones."""
    if stored_kind(cfg, path) == "LoCon" and bool((state["w2_a"] @ state["w2_b"] == 1).all()):
        return {"lora_up.weight": state["w1_a"].detach(), "lora_down.weight": state["w1_b"].detach(),
                "alpha": state["alpha"].detach().reshape(())}
    out = {f"hada_{k}": state[k].detach() for k in FACTORS}
    out["alpha"] = state["alpha"].detach().reshape(())
    return out


def _flat(where: str, key: str, t: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """One factor in its flat 2-D form, and the kernel it shows (OneTrainer's 4-D conv factors)."""
    if t.dim() == 4 and key.endswith("_a") and tuple(t.shape[2:]) == (1, 1):
        return t.flatten(1), None                                  # a (out, r, 1, 1) -> (out, r)
    if t.dim() == 4 and key.endswith("_b"):
        return t.flatten(1), tuple(t.shape[2:])                    # b (r, in_channels, kh, kw) -> (r, in)
    if t.dim() != 2:
        raise StudioError(f"{where}: {key} has shape {tuple(t.shape)}; LoHa factors are 2-D (a (out, r), b (r, in)): "
                          f"the file is damaged")
    return t, None


def _untucker(where: str, half: str, core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple:
    """A Tucker half (t (r, r, kh, kw), a (r, out), b (r, in_channels)) as flat (out, r) / (r, in) factors."""
    if core.dim() != 4 or a.dim() != 2 or b.dim() != 2 or core.shape[:2] != (a.shape[0], b.shape[0]):
        raise StudioError(f"{where}: the Tucker core hada_t{half} of shape {tuple(core.shape)} does not fit "
                          f"hada_w{half}_a {tuple(a.shape)} and hada_w{half}_b {tuple(b.shape)} (LyCORIS: t (r, r, "
                          f"kh, kw), a (r, out), b (r, in_channels)): the file is damaged")
    return a.T, torch.einsum("pqhw,qi->pihw", core, b).flatten(1)   # (out, r), (r, in_channels * kh * kw)


def from_lycoris(stored: dict, where: str) -> tuple[dict, dict]:
    """(fields, canonical tensors) of one module of a LyCORIS LoHa file; ``fields["kernel"]`` is the kernel the
    tensors show, if any (a hint for grouping conv ranks, not a config field)."""
    foreign = sorted(set(stored) - set(LYCORIS_MARKER) - {"alpha"})
    if foreign:
        raise StudioError(f"{where} mixes LoHa keys (hada_*) with {', '.join(foreign)}: one module holds one method's "
                          f"keys; the file is damaged or two adapters were merged wrongly: re-export it")
    missing = [k for k in KEYS if k not in stored]
    if missing:
        raise StudioError(f"{where}: its LoHa factors lack {', '.join(missing)} (a LoHa module needs hada_w1_a, "
                          f"hada_w1_b, hada_w2_a and hada_w2_b): the file is damaged or incomplete")
    if ("hada_t1" in stored) != ("hada_t2" in stored):
        raise StudioError(f"{where}: a Tucker LoHa module needs both hada_t1 and hada_t2: the file is damaged")
    t, kernel = {}, None
    for half in "12":
        a, b = stored[f"hada_w{half}_a"].float(), stored[f"hada_w{half}_b"].float()
        if f"hada_t{half}" in stored:
            core = stored[f"hada_t{half}"].float()
            a, b = _untucker(where, half, core, a, b)
            kernel = tuple(core.shape[2:])
        else:
            a, _ = _flat(where, f"hada_w{half}_a", a)
            b, seen = _flat(where, f"hada_w{half}_b", b)
            kernel = kernel or seen
        t[f"w{half}_a"], t[f"w{half}_b"] = a, b
    (O1, r1), (r1b, I1), (O2, r2), (r2b, I2) = (t[k].shape for k in FACTORS)
    if not (O1 == O2 and I1 == I2 and r1 == r1b and r2 == r2b):
        raise StudioError(f"{where}: LoHa factors of shapes {[tuple(t[k].shape) for k in FACTORS]} do not fit "
                          f"(w*_a (out, r), w*_b (r, in), one out and in): the file is damaged")
    alpha = float(stored["alpha"]) if "alpha" in stored else 0.0
    s = (alpha or float(r1)) / r1                                  # a missing or 0 alpha means alpha = r
    r = max(r1, r2)  # LyCORIS writes one r; another writer's unequal pair is zero-padded, s kept
    tensors = {k: pad_rank(v, r, 1 if k.endswith("_a") else 0) for k, v in t.items()}
    tensors["alpha"] = torch.tensor(s * r)
    return {"rank": r, "alpha": s * r, "kernel": kernel}, tensors


def uniform(entries: dict, kernels: dict, where: str) -> tuple[dict, dict]:
    """One config for a file's modules {path: (fields, tensors)}: rank for Linear / 1x1 modules, conv_rank
    for k x k convs (``kernels``: path -> kernel or None), each group's smaller ranks zero-padded to
    the group's largest with alpha scaled by R / r (s unchanged)."""
    groups = {False: {}, True: {}}
    for path, (fields, t) in entries.items():
        groups[kernels.get(path) not in (None, (1, 1))][path] = (fields, t)
    ranks, alphas, tensors = {}, {}, {}
    for conv, members in groups.items():
        if not members:
            continue
        R = max(f["rank"] for f, _ in members.values())
        ranks[conv] = R
        seen = set()
        for path, (fields, t) in members.items():
            padded = {k: pad_rank(t[k], R, 1 if k.endswith("_a") else 0) for k in FACTORS}
            padded["alpha"] = t["alpha"] * (R / fields["rank"])
            seen.add(float(padded["alpha"]))
            tensors.update({f"{path}.{k}": v for k, v in padded.items()})
        alphas[conv] = seen.pop() if len(seen) == 1 else None
    rank = ranks.get(False, ranks.get(True))
    both = len(ranks) == 2
    conv_rank = ranks[True] if both and (ranks[True], alphas[True]) != (ranks[False], alphas[False]) else None
    config = {"rank": rank, "alpha": alphas.get(False, alphas.get(True)), "rslora": False, "dropout": 0.0,
              "conv_rank": conv_rank, "conv_alpha": alphas.get(True) if conv_rank is not None else None}
    return config, tensors
