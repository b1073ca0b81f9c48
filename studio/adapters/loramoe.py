"""LoRAMoE: LoRA experts in two groups with a localized balancing constraint (Dou et al. 2023, arXiv 2312.09979).

    y = W0 x + b + w * sum_i g_i(x) s B_i A_i x      g(x) = softmax(R x + c)   (dense, per token)
    I_n = sum_tokens g_n(x)                         importance of expert n in the batch
    Q_n = 1 - delta  for the world-knowledge group (the first ``knowledge`` experts),
          1 + delta  for the task group (the samples' type: every training sample is task data here)
    Z = I * Q;    loss += balance * Var(Z) / Mean(Z)        (population variance, mean over layers)

The constraint balances the experts within each group while the task group, whose importance is
weighted up, takes the task: the knowledge group stays close to the base (the paper's claim: less
forgetting of what the base knew). The paper puts the experts on the feed-forward layers: train
with ``--targets lm-mlp`` (LM) or the UNet's feed-forward (``unet-transformer``); the method adapts
whatever it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.adapters import mixture
from studio.adapters.contract import Traits
from studio.errors import StudioError

NAME = "loramoe"
TRAITS = Traits(kind="functional", summary="LoRAMoE, LoRA experts in a knowledge and a task group with a "
                "localized balancing loss", lr={"image": 1e-3, "lm": 2e-3}, mergeable=False, export="none")
TRAINABLE = ("A", "B", "R", "c")
SAVED = TRAINABLE


@dataclass(frozen=True)
class Config(mixture.MixtureConfig):
    """rank, alpha, ... of each expert; experts 6, of which ``knowledge`` 3; delta 0.1; balance 0.01."""

    experts: int = 6
    """E: experts per layer."""
    knowledge: int = 3
    """Experts of the world-knowledge group (the first ones); the others are the task group."""
    delta: float = 0.1
    """The constraint's group weight: Q = 1 - delta (knowledge) / 1 + delta (task)."""
    balance: float = 0.01
    """Weight of the localized balancing loss."""

    label = "LoRAMoE"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "knowledge", mixture.whole(self.knowledge, "LoRAMoE knowledge", "knowledge=3"))
        object.__setattr__(self, "delta", mixture.number(self.delta, "LoRAMoE delta", "delta=0.1"))
        if self.counts or self.profile:
            raise StudioError("LoRAMoE keeps the same experts in every layer (its groups are expert numbers): "
                              "drop --method-args counts / profile and set experts=N")
        if not 0 < self.knowledge < self.experts:
            raise StudioError(f"LoRAMoE knowledge {self.knowledge} must leave experts in both groups of "
                              f"{self.experts}: use --method-args knowledge=1..{self.experts - 1}")
        if not 0 <= self.delta < 1:
            raise StudioError(f"LoRAMoE delta must be in [0, 1), got {self.delta}: use e.g. --method-args delta=0.1")


init = mixture.lora_experts_init
expected_shapes = mixture.lora_experts_shapes
prepare = mixture.prepare
forward = mixture.lora_experts_forward


def from_saved(cfg, W0, tensors, site):
    return mixture.lora_experts_from_saved(cfg, tensors, site)


def localized_balance(probs: torch.Tensor, knowledge: int, delta: float) -> torch.Tensor:
    """Var(Z) / Mean(Z) with Z = I * Q over one layer's (tokens, E) router probabilities."""
    importance = probs.sum(0)                                              # (E,)
    Q = torch.full_like(importance, 1 + delta)
    Q[:knowledge] = 1 - delta
    Z = importance * Q
    return Z.var(correction=0) / Z.mean()


def aux_loss(adapters):
    cfg = adapters[0].cfg
    return mixture.mean_over_layers(adapters, lambda a: localized_balance(a.scratch["probs"], cfg.knowledge, cfg.delta))


def describe(config, modules):
    k, E = config["knowledge"], config["experts"]
    return mixture.describe_lora_experts(
        config, modules, f"localized balancing loss x {config['balance']:g} (training only): experts 1-{k} "
        f"world knowledge (Q = 1 - {config['delta']:g}), {k + 1}-{E} task (Q = 1 + {config['delta']:g})")


def freeze(config, modules, gates, kernels):
    return mixture.freeze_lora_experts(NAME, config, modules, gates, kernels)
