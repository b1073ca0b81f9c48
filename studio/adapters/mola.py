"""MoLA: top-k routed LoRA experts, more experts in higher layers (Gao et al. 2024, arXiv 2402.08562).

    g(x) = topk_k(p) / sum topk_k(p),  p = softmax(R x + c)       k = 2 by default
    y = W0 x + b + w * sum_{i in topk} g_i(x) s B_i A_i x
    loss += balance * E * sum_i f_i P_i      (mean over layers; f_i share of assignments, P_i mean p_i)

Experts per layer: ``experts`` everywhere, or ``profile`` triangle (8-6-4-2), inverted (2-4-6-8),
hourglass (8-2-2-8), square (5-5-5-5) over quarters of the depth, or an explicit per-block ``counts``
(``mixture.prepare``). The paper's finding to check: inverted (more experts higher up) beats triangle.
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.adapters import mixture
from studio.adapters.contract import Traits

NAME = "mola"
TRAITS = Traits(kind="functional", summary="MoLA, top-k routed LoRA experts with per-layer expert counts "
                "and a load-balancing loss", lr={"image": 1e-3, "lm": 2e-3}, mergeable=False, export="none")
TRAINABLE = ("A", "B", "R", "c")
SAVED = TRAINABLE


@dataclass(frozen=True)
class Config(mixture.MixtureConfig):
    """rank, alpha, ... of each expert; experts 8, profile / counts per block; top_k 2; balance 0.01."""

    experts: int = 8
    """E: experts per layer (when neither ``profile`` nor ``counts`` is given)."""
    top_k: int = 2
    """Experts kept per token (the paper's k = 2)."""
    balance: float = 0.01
    """Weight of the Switch load-balancing loss."""

    label = "MoLA"


init = mixture.lora_experts_init
expected_shapes = mixture.lora_experts_shapes
prepare = mixture.prepare
forward = mixture.lora_experts_forward


def from_saved(cfg, W0, tensors, site):
    return mixture.lora_experts_from_saved(cfg, tensors, site)


def aux_loss(adapters):
    return mixture.mean_over_layers(adapters, lambda a: mixture.switch_balance(a.scratch["probs"], a.scratch["mask"]))


def describe(config, modules):
    balance = f"Switch load-balancing loss x {config['balance']:g} (training only)"
    return mixture.describe_lora_experts(config, modules, balance)


def freeze(config, modules, gates, kernels):
    return mixture.freeze_lora_experts(NAME, config, modules, gates, kernels)
