"""MiLoRA: minor singular components LoRA (Wang et al. 2024, arXiv 2406.09044).

PiSSA's parametrisation with the *bottom* r singular triplets of W0 (exact SVD; a randomized
range finder cannot reach the minor subspace):

    A0 = diag(sqrt(S_-r / s)) Vh_-r   (r, in)    B0 = U_-r diag(sqrt(S_-r / s))   (out, r)
    dW against W0 = s (B A - B0 A0)    (rank <= 2r)

Everything after the init (factors, forward, shapes) is PiSSA's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.adapters import pissa
from studio.adapters.common import cached_svd, check_rank, lowrank_scale
from studio.errors import StudioError

TRAINABLE = pissa.TRAINABLE
SAVED = pissa.SAVED
factors = pissa.factors
forward_delta = pissa.forward_delta
residual = pissa.residual
expected_shapes = pissa.expected_shapes
from_saved = pissa.from_saved


@dataclass(frozen=True)
class Config:
    rank: int = 4
    """r: number of minor singular triplets used as the initial factors."""
    alpha: float | None = None
    """Scale numerator; None means alpha = rank (the MiLoRA authors' choice, scale 1)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    dropout: float = 0.0
    """Input dropout while training."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise StudioError(f"MiLoRA rank must be a positive integer, got {self.rank!r}: pass --rank 4 or more")
        if not 0.0 <= self.dropout < 1.0:
            raise StudioError(f"MiLoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return lowrank_scale(self.rank, self.alpha, self.rslora)


def init(cfg: Config, W0: torch.Tensor, module: str = "", generator: torch.Generator | None = None) -> dict:
    check_rank(cfg.rank, W0.shape, module)
    U, S, Vh, _ = cached_svd(W0)  # the full spectrum is needed for the minor triplets
    r = cfg.rank
    return pissa.state_from_triplets(cfg.scale, U[:, -r:], S[-r:], Vh[-r:])
