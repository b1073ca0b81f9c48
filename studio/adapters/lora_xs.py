"""LoRA-XS: low-rank adaptation with extremely small number of parameters (Bałazy et al. 2024,
arXiv 2405.17604).

A frozen rank-r SVD frame of the base weight with one small trained matrix between its sides.
In the studio's (out, in) layout, W0 = U diag(S) V^T (the top-r triplets, fp32, from the shared
SVD cache):

    dW = s U_r R diag(S_r) V_r^T        R: (r, r) trained, s = alpha / r (alpha / sqrt(r), rsLoRA)

The paper writes h = x W + x A R B with x a row vector, so its W is our W0^T: its A = U_r S_r and
B = V_r^T are, in our names, the input side diag(S_r) V_r^T and the output side U_r (the
authors' code does the same: lora_A = diag(S_r) V_r^T, lora_B = U_r, R in between). Which side
carries S_r does not change the reachable deltas (U_r M V_r^T for any M), but it does change the
gradient: dL/dR = s U_r^T G X^T V_r diag(S_r) scales R's columns, as in the paper.

Only r^2 values per layer train and are saved, with the base weight's hash (as SVF): the frame
is rebuilt from W0 on load, so the method needs its base (``needs_base``). A singular pair is
defined only up to a joint sign, and a flip of pair i changes dW wherever R_ij, i != j, is
non-zero; another LAPACK (a GPU's, a newer torch) may return other signs. So the frame is made
canonical: each u_i's entry of largest magnitude is positive (v_i flips with it). A base whose
top-r singular values repeat has no unique frame at all; R then only reloads on the same SVD.

Init: the paper draws R ~ N(0, sigma^2), sigma = 1e-5. The studio's contract is that a fresh
adapter is a no-op (attaching changes nothing; resuming and mixing rely on it), so R starts at 0.
That costs LoRA-XS nothing: the frame is fixed, so dL/dR above is non-zero from the first step
(unlike LoRA's B = A = 0, which would be a saddle).

It runs as a low-rank pair, down = R diag(S_r) V_r^T (r, in) and up = s U_r (out, r), so the
plain-LoRA export is exact at rank r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from studio.adapters.common import HASH_BYTES, LowRankConfig, cached_svd, check_rank, hash_to_tensor, same_base
from studio.adapters.contract import Site, Traits

NAME = "lora_xs"
TRAITS = Traits(kind="low-rank", summary="LoRA-XS, dW = U_r R S_r V_r^T with only the r x r matrix R trained",
                label="LoRA-XS", lr={"image": 1e-3, "lm": 2e-2}, needs_base=True)
TRAINABLE = ("R",)
SAVED = ("R", "basis_hash")


@dataclass(frozen=True)
class Config(LowRankConfig):
    """rank (r: R is r x r on the top-r singular triplets of W0), alpha, rslora, dropout, conv_rank,
    conv_alpha (see ``common.LowRankConfig``)."""

    label: ClassVar[str] = "LoRA-XS"


def canonical_signs(U: torch.Tensor) -> torch.Tensor:
    """(r,) of +-1 that make each column's entry of largest magnitude positive."""
    rows = U.abs().argmax(dim=0)
    signs = U[rows, torch.arange(U.shape[1])].sign()
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def _frame(cfg: Config, rank: int, W0: torch.Tensor, site: Site, h: bytes | None = None) -> dict:
    """The frozen sides, copied out of the cached basis (r rows, not the whole basis, stay alive):
    A = diag(S_r) V_r^T (r, in) and B = s U_r (out, r), signs canonical, the scale folded in once."""
    check_rank(rank, W0.shape, site.path, cfg.rank_flag(site.is_conv))
    U, S, Vh, h = cached_svd(W0, h)
    signs = canonical_signs(U[:, :rank])
    A = (signs * S[:rank])[:, None] * Vh[:rank]
    B = U[:, :rank] * (cfg.scale_at(site.is_conv) * signs)[None, :]
    return {"basis_hash": hash_to_tensor(h), "A": A, "B": B}


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    rank = cfg.rank_at(site.is_conv)
    return {"R": torch.zeros(rank, rank), **_frame(cfg, rank, W0, site)}


def from_saved(cfg: Config, W0: torch.Tensor, tensors: dict, site: Site) -> dict:
    """Rebuild the frame from W0, refusing a base whose weight is not the one R was trained on."""
    h = same_base("LoRA-XS", W0, tensors, site.path)
    return {"R": tensors["R"].float(), **_frame(cfg, tensors["R"].shape[0], W0, site, h)}


def factors(cfg: Config, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return state["R"] @ state["A"], state["B"]  # (r, in), (out, r)


def expected_shapes(cfg: Config, site: Site) -> dict:
    r = cfg.rank_at(site.is_conv)
    return {"R": (r, r), "basis_hash": (HASH_BYTES,)}
