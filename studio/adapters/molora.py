"""MoLoRA: a mixture of LoRA experts with a soft per-token router (Zadouri et al. 2023, arXiv 2309.05444).

    y = W0 x + b + w * sum_i g_i(x) s B_i A_i x      g(x) = softmax(R x + c)   (per token)
    A_i: (r, in) random, B_i: (out, r) zeros => a no-op at init;  R: (E, in), c: (E,)

The math (router, stacked experts, the routing statistics) is ``mixture.py``'s; this module names
the method and its defaults. Functional kind: never merged, no plain-LoRA export.
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.adapters import mixture
from studio.adapters.contract import Traits

NAME = "molora"
TRAITS = Traits(kind="functional", summary="MoLoRA, E LoRA experts soft-merged per token by a router",
                lr={"image": 1e-3, "lm": 2e-3}, mergeable=False, export="none")
TRAINABLE = ("A", "B", "R", "c")
SAVED = TRAINABLE


@dataclass(frozen=True)
class Config(mixture.MixtureConfig):
    """rank, alpha, ... of each expert; experts (E, default 4); top_k 0 (soft merging)."""

    label = "MoLoRA"


init = mixture.lora_experts_init
expected_shapes = mixture.lora_experts_shapes
prepare = mixture.prepare


def from_saved(cfg, W0, tensors, site):
    return mixture.lora_experts_from_saved(cfg, tensors, site)


forward = mixture.lora_experts_forward


def describe(config, modules):
    return mixture.describe_lora_experts(config, modules, None)


def freeze(config, modules, gates, kernels):
    return mixture.freeze_lora_experts(NAME, config, modules, gates, kernels)
