"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv 2106.09685; rsLoRA: arXiv 2312.03732).

    dW = s * B @ A          A: (r, in) random,  B: (out, r) zeros  =>  dW = 0 at init
    s  = alpha / r          (alpha / sqrt(r) with rsLoRA)

The method is described by pure functions over a dict of tensors (its *state*):
``init`` builds it, ``factors`` returns ``(down, up)`` with ``dW = up @ down``, and
``forward_delta`` computes ``x @ dW.T`` without forming dW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from studio.adapters.common import LowRankConfig, check_rank

TRAINABLE = ("A", "B")
SAVED = ("A", "B")


@dataclass(frozen=True)
class Config(LowRankConfig):
    """rank, alpha, rslora, dropout (see ``common.LowRankConfig``)."""


def init(cfg: Config, W0: torch.Tensor, module: str = "", generator: torch.Generator | None = None) -> dict:
    """A ~ kaiming-uniform(a=sqrt 5) as in PEFT / loralib, B = 0, so dW = 0."""
    out_features, in_features = W0.shape
    check_rank(cfg.rank, W0.shape, module)
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
    A = torch.empty(cfg.rank, in_features).uniform_(-bound, bound, generator=generator)  # (r, in)
    B = torch.zeros(out_features, cfg.rank)  # (out, r)
    return {"A": A, "B": B}


def factors(cfg: Config, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return state["A"], state["B"] * cfg.scale  # (r, in), (out, r)


def forward_delta(cfg: Config, state: dict, x: torch.Tensor, training: bool = False, weight: float = 1.0) -> torch.Tensor:
    """weight * x @ dW.T; the scales multiply the rank-r hidden, not the (.., out) result."""
    if training and cfg.dropout > 0:
        x = F.dropout(x, cfg.dropout, training=True)
    return F.linear(F.linear(x, state["A"]) * (cfg.scale * weight), state["B"])


def expected_shapes(cfg: Config, out_features: int, in_features: int) -> dict:
    return {"A": (cfg.rank, in_features), "B": (out_features, cfg.rank)}


def from_saved(cfg: Config, W0: torch.Tensor, tensors: dict, module: str = "") -> dict:
    return {k: tensors[k].float() for k in SAVED}
