"""LoRA-XS: low-rank adaptation with extremely small number of parameters (Bałazy et al. 2024,
arXiv 2405.17604).

A frozen rank-r SVD frame of the base weight with one small trained matrix between its sides:

    W0 ~ U_r diag(S_r) V_r^T             (the top-r triplets, fp32, from the shared SVD cache)
    dW = s U_r diag(S_r) R V_r^T         R: (r, r) trained, s = alpha / r (alpha / sqrt(r), rsLoRA)

Only r^2 values per layer train and are saved (with the base weight's hash, as SVF): the frame
is rebuilt from W0 on load, so the method needs its base (``needs_base``).

Init: the paper draws R ~ N(0, sigma^2) with a small sigma. The studio's contract is that a fresh
adapter is a no-op (attaching changes nothing; resuming and mixing rely on it), so R starts at 0.
That costs LoRA-XS nothing: the frame is fixed, so dL/dR = s diag(S_r) U_r^T G X^T V_r is non-zero
from the first step (unlike LoRA's B = A = 0, which would be a saddle).

It runs as a low-rank pair, down = R V_r^T (r, in) and up = s U_r diag(S_r) (out, r), so the
plain-LoRA export is exact at rank r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from studio.adapters.common import (HASH_BYTES, LowRankConfig, cached_svd, check_rank, hash_to_tensor,
                                    tensor_to_hash, weight_hash)
from studio.adapters.contract import Site, Traits
from studio.errors import StudioError

NAME = "lora_xs"
TRAITS = Traits(kind="low-rank", summary="LoRA-XS, dW = U_r S_r R V_r^T with only the r x r matrix R trained",
                label="LoRA-XS", lr={"image": 1e-3, "lm": 2e-2}, needs_base=True)
TRAINABLE = ("R",)
SAVED = ("R", "basis_hash")


@dataclass(frozen=True)
class Config(LowRankConfig):
    """rank (r: R is r x r on the top-r singular triplets of W0), alpha, rslora, dropout, conv_rank,
    conv_alpha (see ``common.LowRankConfig``)."""

    label: ClassVar[str] = "LoRA-XS"


def _frame(cfg: Config, rank: int, W0: torch.Tensor, site: Site, h: bytes | None = None) -> dict:
    """The frozen sides, copied out of the cached basis (r rows, not the whole basis, stay alive):
    Vh_r (r, in) and up = s U_r diag(S_r) (out, r), the scale folded in once."""
    check_rank(rank, W0.shape, site.path)
    U, S, Vh, h = cached_svd(W0, h)
    up = U[:, :rank] * (cfg.scale_at(site.is_conv) * S[:rank])[None, :]
    return {"basis_hash": hash_to_tensor(h), "Vh": Vh[:rank].clone(), "up": up}


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    rank = cfg.rank_at(site.is_conv)
    return {"R": torch.zeros(rank, rank), **_frame(cfg, rank, W0, site)}


def from_saved(cfg: Config, W0: torch.Tensor, tensors: dict, site: Site) -> dict:
    """Rebuild the frame from W0, refusing a base whose weight is not the one R was trained on."""
    h = weight_hash(W0)
    if tensor_to_hash(tensors["basis_hash"]) != h:
        raise StudioError(
            f"LoRA-XS adapter was trained on a different base weight for module '{site.path}' (basis hash "
            f"mismatch): load it on the exact base checkpoint it was trained on, or export it as a plain LoRA first")
    return {"R": tensors["R"].float(), **_frame(cfg, tensors["R"].shape[0], W0, site, h)}


def factors(cfg: Config, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return state["R"] @ state["Vh"], state["up"]  # (r, in), (out, r)


def expected_shapes(cfg: Config, site: Site) -> dict:
    r = cfg.rank_at(site.is_conv)
    return {"R": (r, r), "basis_hash": (HASH_BYTES,)}
