"""PiSSA: principal singular values and vectors adaptation (Meng et al. 2024, arXiv 2404.02948).

LoRA's architecture with its factors initialised from the top-r singular triplets of W0:

    W0 = U diag(S) Vh                         (fp32; fast randomized SVD or exact)
    A0 = diag(sqrt(S_r / s)) Vh_r   (r, in)    B0 = U_r diag(sqrt(S_r / s))   (out, r)
    W_res = W0 - s B0 A0                      (PEFT's residual base)
    trained: A, B starting at A0, B0;  dW against W0 = s (B A - B0 A0)    (rank <= 2r)

Unlike PEFT we never overwrite the base weight with W_res: the layer keeps W0 and adds
s(BA - B0A0), which is the same function (W_res + sBA) and keeps every adapter a delta
against the pristine W0, so PiSSA mixes, merges and unmerges like any other method. The
price is a rank-2r instead of rank-r adapter matmul, small next to the base layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from studio.adapters.common import LowRankConfig, check_rank, conv_down, down_shape
from studio.adapters.contract import Site, Traits
from studio.errors import StudioError

NAME = "pissa"
TRAITS = Traits(kind="low-rank", summary="PiSSA, LoRA initialised on the top-r singular triplets of W0",
                lr={"image": 1e-3, "lm": 1e-3})
TRAINABLE = ("A", "B")
SAVED = ("A", "B", "A0", "B0")
SVD_KINDS = ("fast", "exact")


@dataclass(frozen=True)
class Config(LowRankConfig):
    """rank, alpha (None: alpha = rank, the PiSSA authors' choice), rslora, dropout (the
    authors recommend 0), plus the SVD of the init."""

    svd: str = "fast"
    """'fast': torch.svd_lowrank (randomized, top-r only); 'exact': torch.linalg.svd."""
    niter: int = 4
    """Power iterations of the fast SVD (PEFT's pissa_niter_N); 4 or more is close to exact."""

    label: ClassVar[str] = "PiSSA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.svd not in SVD_KINDS:
            raise StudioError(f"PiSSA svd must be one of {SVD_KINDS}, got {self.svd!r}")
        if self.niter < 0:
            raise StudioError(f"PiSSA niter must be >= 0, got {self.niter}")


def state_from_triplets(scale: float, U_r: torch.Tensor, S_r: torch.Tensor, Vh_r: torch.Tensor,
                        site: Site | None = None) -> dict:
    """Split r singular triplets evenly into (A0, B0) so that s * B0 @ A0 = U_r diag(S_r) Vh_r."""
    root = torch.sqrt(S_r / scale)  # (r,)
    A0 = root[:, None] * Vh_r       # (r, in)
    B0 = U_r * root[None, :]        # (out, r)
    if site is not None:
        A0 = conv_down(A0, site)    # LoCon's (r, in_channels, kh, kw) on a k x k conv
    return {"A": A0.clone(), "B": B0.clone(), "A0": A0, "B0": B0}


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    rank = cfg.rank_at(site.is_conv)
    check_rank(rank, W0.shape, site.path, cfg.rank_flag(site.is_conv))
    W = W0.detach().float()
    if cfg.svd == "exact":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U_r, S_r, Vh_r = U[:, :rank], S[:rank], Vh[:rank]
    else:  # PEFT's pissa_niter_N: q = r, no oversampling
        U_r, S_r, V_r = torch.svd_lowrank(W, q=rank, niter=cfg.niter)
        Vh_r = V_r.T
    return state_from_triplets(cfg.scale_at(site.is_conv), U_r, S_r, Vh_r, site)


def factors(cfg: Config, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """s (B A - B0 A0) as one rank-2r pair."""
    scale = cfg.scale_at(state["A"].dim() == 4)
    down = torch.cat([state["A"].flatten(1), state["A0"].flatten(1)], dim=0)   # (2r, in)
    up = torch.cat([state["B"], -state["B0"]], dim=1) * scale                  # (out, 2r)
    return down, up


def residual(cfg: Config, state: dict, W0: torch.Tensor) -> torch.Tensor:
    """W_res = W0 - s B0 A0, the base PEFT trains against (for comparison and export)."""
    return W0.float() - cfg.scale_at(state["A0"].dim() == 4) * state["B0"] @ state["A0"].flatten(1)


def expected_shapes(cfg: Config, site: Site) -> dict:
    r = cfg.rank_at(site.is_conv)
    return {"A": down_shape(r, site), "B": (site.out_features, r), "A0": down_shape(r, site),
            "B0": (site.out_features, r)}


def from_saved(cfg: Config, W0: torch.Tensor | None, tensors: dict, site: Site) -> dict:
    return {k: tensors[k].float() for k in SAVED}
