"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022, arXiv 2205.05638).

A learned vector l, init 1, rescales one side of a layer:

    keys / values (output side):       y' = l * (W0 x + b)   dW = diag(l - 1) W0,  db = (l - 1) b
    feed-forward 2nd projection (input side):  y' = W0 (l * x) + b    dW = W0 diag(l - 1)

The layers and sides are PEFT's ``IA3Config`` defaults and LyCORIS's ``ia3`` preset: ``k_proj`` /
``v_proj`` / ``to_k`` / ``to_v`` / GPT-2 ``c_attn`` scale their outputs; ``down_proj``, ``fc2``,
``ff.net.2`` and GPT-2's ``mlp.c_proj`` scale their inputs. Other targeted layers are left alone
(``accepts``). A weight w gives W0 + w dW (linear, so vectors of one base mix by their deltas).
On a convolution the vector runs over channels (input side: repeated over the kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.adapters.contract import Base, Site, Traits

NAME = "ia3"
TRAITS = Traits(kind="dense", summary="(IA)^3, a learned scale on key/value outputs and feed-forward inputs",
                label="(IA)³",
                lr={"image": 6e-2, "lm": 3e-1}, needs_base=True, has_rank=False, export="truncated",
                default_energy=0.99)
TRAINABLE = ("l",)
SAVED = ("l",)
OUTPUT_SIDE = ("k_proj", "v_proj", "to_k", "to_v", "c_attn")
INPUT_SIDE = ("down_proj", "fc2", "ff.net.2", "mlp.c_proj")


@dataclass(frozen=True)
class Config:
    """(IA)^3 has no options: one vector per adapted layer."""


def _input_side(path: str) -> bool:
    return any(path == n or path.endswith("." + n) for n in INPUT_SIDE)


def accepts(cfg: Config, site: Site) -> bool:
    return _input_side(site.path) or any(site.path == n or site.path.endswith("." + n) for n in OUTPUT_SIDE)


def _width(site: Site) -> int:
    return site.in_features // (site.kernel[0] * site.kernel[1]) if _input_side(site.path) else site.out_features


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    return {"l": torch.ones(_width(site)), "input_side": torch.tensor(_input_side(site.path))}


def expected_shapes(cfg: Config, site: Site) -> dict:
    return {"l": (_width(site),)}


def from_saved(cfg: Config, W0: torch.Tensor | None, tensors: dict, site: Site) -> dict:
    return {"l": tensors["l"].float(), "input_side": torch.tensor(_input_side(site.path))}


def delta_weight(cfg: Config, state: dict, W0: torch.Tensor) -> torch.Tensor:
    g = state["l"] - 1
    if not state["input_side"]:
        return g[:, None] * W0                                               # diag(l - 1) W0
    K = W0.shape[1] // g.shape[0]
    return (W0.view(W0.shape[0], -1, K) * g[None, :, None]).flatten(1)       # W0 diag(l - 1), per input channel


def delta_bias(cfg: Config, state: dict, bias: torch.Tensor) -> torch.Tensor | None:
    return None if state["input_side"] else (state["l"] - 1) * bias


def forward(cfg: Config, state: dict, x: torch.Tensor, base: Base, weight: float, training: bool) -> torch.Tensor:
    g = base.channels((state["l"] - 1) * weight)
    if not state["input_side"]:
        return g * base.out()
    return base.apply(x * g, base.W0)
