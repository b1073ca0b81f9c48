"""MiLoRA: minor singular components LoRA (Wang et al. 2024, arXiv 2406.09044).

PiSSA's parametrisation with the *bottom* r singular triplets of W0 (exact SVD; a randomized
range finder cannot reach the minor subspace):

    A0 = diag(sqrt(S_-r / s)) Vh_-r   (r, in)    B0 = U_-r diag(sqrt(S_-r / s))   (out, r)
    dW against W0 = s (B A - B0 A0)    (rank <= 2r)

Everything after the init (factors, shapes, loading) is PiSSA's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from studio.adapters import pissa
from studio.adapters.common import LowRankConfig, cached_svd, check_rank
from studio.adapters.contract import Site

NAME = "milora"
TRAITS = replace(pissa.TRAITS, summary="MiLoRA, PiSSA on the minor (bottom-r) singular triplets", label="MiLoRA",
                 lr={"image": 1e-3, "lm": 2e-3})
TRAINABLE = pissa.TRAINABLE
SAVED = pissa.SAVED
factors = pissa.factors
residual = pissa.residual
expected_shapes = pissa.expected_shapes
from_saved = pissa.from_saved


@dataclass(frozen=True)
class Config(LowRankConfig):
    """rank (the r minor triplets), alpha (None: alpha = rank, the MiLoRA authors' choice),
    rslora, dropout, conv_rank, conv_alpha."""

    label: ClassVar[str] = "MiLoRA"


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    r = cfg.rank_at(site.is_conv)
    check_rank(r, W0.shape, site.path, cfg.rank_flag(site.is_conv))
    U, S, Vh, _ = cached_svd(W0)  # the full spectrum is needed for the minor triplets
    return pissa.state_from_triplets(cfg.scale_at(site.is_conv), U[:, -r:], S[-r:], Vh[-r:], site)
