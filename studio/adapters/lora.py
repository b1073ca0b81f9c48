"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv 2106.09685; rsLoRA: arXiv 2312.03732).

    dW = s * B @ A          A: (r, in) random,  B: (out, r) zeros  =>  dW = 0 at init
    s  = alpha / r          (alpha / sqrt(r) with rsLoRA)

On a k x k convolution (kohya's LoCon) A is stored as the down kernel (r, in_channels, kh, kw)
and B as the (out, r) 1x1 up-projection, with kohya's conv_dim / conv_alpha as ``conv_rank`` /
``conv_alpha``; ``factors`` flattens the kernel, so dW is the (out, in * kh * kw) matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from studio.adapters.common import LowRankConfig, check_rank, conv_down, down_shape
from studio.adapters.contract import Site, Traits

NAME = "lora"
LYCORIS_KIND = "LoCon"  # what LyCORIS presets call a plain LoRA module (formats/lycoris.py)
TRAITS = Traits(kind="low-rank", summary="LoRA, dW = (alpha/r) B A; LoCon on k x k convolutions",
                lr={"image": 1e-3, "lm": 2e-3})
TRAINABLE = ("A", "B")
SAVED = ("A", "B")


@dataclass(frozen=True)
class Config(LowRankConfig):
    """rank, alpha, rslora, dropout, conv_rank, conv_alpha (see ``common.LowRankConfig``)."""


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    """A ~ kaiming-uniform(a=sqrt 5) as in PEFT / loralib (fan-in = in * kh * kw), B = 0, so dW = 0."""
    out_features, in_features = W0.shape
    rank = cfg.rank_at(site.is_conv)
    check_rank(rank, W0.shape, site.path, cfg.rank_flag(site.is_conv))
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
    A = torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator)  # (r, in)
    return {"A": conv_down(A, site), "B": torch.zeros(out_features, rank)}            # B: (out, r)


def factors(cfg: Config, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    A = state["A"]
    return A.flatten(1), state["B"] * cfg.scale_at(A.dim() == 4)  # (r, in), (out, r)


def expected_shapes(cfg: Config, site: Site) -> dict:
    rank = cfg.rank_at(site.is_conv)
    return {"A": down_shape(rank, site), "B": (site.out_features, rank)}


def from_saved(cfg: Config, W0: torch.Tensor | None, tensors: dict, site: Site) -> dict:
    return {k: tensors[k].float() for k in SAVED}
