"""MoV: a mixture of (IA)^3 vector experts soft-merged per token (Zadouri et al. 2023, arXiv 2309.05444).

    l(x) = sum_i g_i(x) l_i          g(x) = softmax(R x + c) per token,  l_i init 1 (a no-op)
    output side (keys, values):       y' = l(x) * (W0 x + b)
    input side (feed-forward out):    y' = W0 (l(x) * x) + b

The layers and sides are (IA)^3's (``ia3.accepts``). The output side routes on the input that
produces each output position (a convolution: its receptive field); the input side routes on each
input position's channels, the values it rescales. With one expert the gate is 1: (IA)^3 exactly.
A weight w gives w times the delta, as for (IA)^3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.adapters import ia3, mixture
from studio.adapters.contract import Base, Site, Traits
from studio.errors import StudioError

NAME = "mov"
TRAITS = Traits(kind="functional", summary="MoV, E (IA)^3 vector experts soft-merged per token by a router",
                lr={"image": 6e-2, "lm": 3e-1}, needs_base=False, has_rank=False, mergeable=False, export="none")
TRAINABLE = ("L", "R", "c")
SAVED = TRAINABLE


@dataclass(frozen=True)
class Config:
    """experts: E vectors per layer."""

    experts: int = 4
    """E: (IA)^3 vectors per layer."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "experts", mixture.whole(self.experts, "MoV experts", "experts=4"))
        if self.experts <= 0:
            raise StudioError(f"MoV experts must be positive, got {self.experts}: use e.g. --method-args experts=4")


accepts = ia3.accepts


def _router_width(site: Site) -> int:
    """Output side: the receptive field (in * kh * kw); input side: the channels of one input position."""
    return ia3._width(site) if ia3._input_side(site.path) else site.in_features


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    router = mixture.router_init(cfg.experts, _router_width(site), generator)
    return {"L": torch.ones(cfg.experts, ia3._width(site)), **router,
            "input_side": torch.tensor(ia3._input_side(site.path))}


def expected_shapes(cfg: Config, site: Site) -> dict:
    return {"L": (cfg.experts, ia3._width(site)), "R": (cfg.experts, _router_width(site)), "c": (cfg.experts,)}


def from_saved(cfg: Config, W0: torch.Tensor | None, tensors: dict, site: Site) -> dict:
    return {**{k: tensors[k].float() for k in SAVED}, "input_side": torch.tensor(ia3._input_side(site.path))}


def forward(cfg: Config, state: dict, x: torch.Tensor, base: Base, weight: float, training: bool,
            scratch: dict | None = None) -> torch.Tensor:
    dim = mixture.channel_dim(base)
    R, c = state["R"], base.channels(state["c"])
    if state["input_side"]:
        gates = mixture.route(base.project(x, R) + c, 0, dim, scratch, training)     # per input position
        l = base.project(gates, (state["L"] - 1).T * weight)                          # l(x) - 1, scaled
        return base.apply(x * l, base.W0)
    gates = mixture.route(base.apply(x, R) + c, 0, dim, scratch, training)           # per output position
    return base.project(gates, (state["L"] - 1).T * weight) * base.out()


def describe(config, modules):
    return mixture.describe(config, modules, "(IA)^3 vector experts", None)


def freeze(config, modules, gates, kernels):
    """At fixed gates g the vectors are one (IA)^3 vector, l = sum_i g_i l_i (its side follows the path, as here)."""
    return "ia3", {path: ({}, {"l": gates[path].float() @ t["L"].float()}) for path, t in modules.items()}
