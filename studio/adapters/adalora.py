"""AdaLoRA: adaptive budget allocation for parameter-efficient fine-tuning (Zhang et al. 2023,
arXiv 2303.10512), in PEFT's layout (``peft/tuners/adalora``) so runs and files line up with it.

    dW = s P diag(lambda) Q      Q = A: (r, in)   lambda = E: (r, 1)   P = B: (out, r)   s = alpha / r

r is ``--rank`` (PEFT's ``init_r``). Init as PEFT: lambda = 0 (a no-op), P and Q ~ N(0, 0.02^2).
It runs as a low-rank pair, down = A * E (PEFT's ``lora_A * lora_E``) and up = s B.

Training adds two things, as the paper and PEFT do (``training.py`` hooks):

- ``aux_loss``: the orthogonality regulariser pushing P, Q towards the singular vectors of dW.
  The paper writes ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2; PEFT (whose runs we match) adds the
  *unsquared* Frobenius norms, averaged over every P and Q of the model, times ``orth_reg_weight``.
- ``after_step``: PEFT's ``RankAllocator``. The sensitivity of every trained entry, I = |w * grad|,
  is smoothed (I_bar, beta1) and its uncertainty U_bar = EMA_beta2 |I - I_bar| tracked; a triplet's
  score is s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji), s = I_bar * U_bar. The budget (total rank
  over all layers) falls from sum(init_r) to target_r * layers on a cubic schedule between ``tinit``
  and total_step - ``tfinal``; every ``deltaT`` steps the lowest-scoring triplets of the whole model
  get lambda_i = 0. At total_step - tfinal the final pattern is fixed and re-applied every later step.

The budget is global, so the hook ranks the triplets of all the run's adapters together (the
trainers pass every adapter of the method at once). The score statistics live on each adapter as
buffers the file leaves out (``CHECKPOINTED``: training checkpoints keep them, so a resume inside
the budget phase ranks the triplets as the uninterrupted run does); the file keeps A, E, B and the
``mask`` of the last allocation (1 = kept). A masked triplet has lambda_i = 0 exactly, so the
plain-LoRA export (kohya, PEFT) drops it and is exact at each layer's kept rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from studio.adapters.common import LowRankConfig, check_rank, conv_down, down_shape
from studio.adapters.contract import Site, Traits
from studio.adapters.mixture import number, whole
from studio.errors import StudioError

NAME = "adalora"
TRAITS = Traits(kind="low-rank", summary="AdaLoRA, dW = P diag(lambda) Q with the rank budget moved between layers "
                "while training (--method-args target_r= tinit= tfinal= deltaT=)", label="AdaLoRA",
                lr={"image": 1e-3, "lm": 2e-3})
TRAINABLE = ("A", "E", "B")
SAVED = ("A", "E", "B", "mask")
SCORED = TRAINABLE  # PEFT's RankAllocator tracks every "lora_" tensor
CHECKPOINTED = tuple(f"{stat}_{key}" for stat in ("sens", "unc") for key in SCORED)
"""I_bar and U_bar of every scored tensor: not in the file, in every training checkpoint."""
INIT_STD = 0.02     # PEFT's reset_lora_parameters


@dataclass(frozen=True)
class Config(LowRankConfig):
    """rank (PEFT's init_r), alpha, rslora, dropout, conv_rank, conv_alpha (``common.LowRankConfig``) and
    PEFT's AdaLoraConfig schedule."""

    target_r: int | None = None
    """Target average rank per layer; None = 2/3 of the rank, at least 1 (PEFT's defaults, 12 -> 8)."""
    tinit: int = 0
    """Steps of warm-up before any rank is pruned."""
    tfinal: int = 0
    """Last steps that fine-tune the final pattern without changing it."""
    deltaT: int = 1
    """Steps between two budget allocations."""
    beta1: float = 0.85
    """EMA of the sensitivity."""
    beta2: float = 0.85
    """EMA of the uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regulariser."""
    total_step: int | None = None
    """Length of the schedule; None = the run's number of steps."""

    label: ClassVar[str] = "AdaLoRA"

    def __post_init__(self) -> None:
        super().__post_init__()
        ints = {k: whole(getattr(self, k), f"AdaLoRA {k}", f"{k}=2")
                for k in ("target_r", "tinit", "tfinal", "deltaT", "total_step") if getattr(self, k) is not None}
        floats = {k: number(getattr(self, k), f"AdaLoRA {k}", f"{k}=0.85") for k in ("beta1", "beta2", "orth_reg_weight")}
        for key, value in {**ints, **floats}.items():
            object.__setattr__(self, key, value)
        target, rank = self.target, min(self.rank, self.conv_rank or self.rank)
        if not 1 <= target <= rank:
            flag = "--rank" if rank == self.rank else "--conv-rank"
            raise StudioError(f"AdaLoRA target rank {target} must be between 1 and the initial rank {flag} {rank}: "
                              f"use --method-args target_r={max(1, rank * 2 // 3)} or a larger {flag}")
        if min(self.tinit, self.tfinal) < 0 or self.deltaT < 1:
            raise StudioError(f"AdaLoRA needs tinit >= 0, tfinal >= 0 and deltaT >= 1, got tinit={self.tinit}, "
                              f"tfinal={self.tfinal}, deltaT={self.deltaT}: use e.g. --method-args tinit=10 tfinal=10")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise StudioError(f"AdaLoRA beta1 and beta2 must be in (0, 1), got {self.beta1}, {self.beta2}: use e.g. "
                              f"--method-args beta1=0.85 beta2=0.85")
        if self.orth_reg_weight < 0:
            raise StudioError(f"AdaLoRA orth_reg_weight must be >= 0, got {self.orth_reg_weight}: use e.g. "
                              f"--method-args orth_reg_weight=0.5")
        if self.total_step is not None:
            self.check_total(self.total_step)

    @property
    def target(self) -> int:
        return max(1, self.rank * 2 // 3) if self.target_r is None else self.target_r

    def check_total(self, total: int) -> None:
        """The schedule needs a budget phase: tinit < total - tfinal (PEFT refuses the same)."""
        if self.tinit >= total - self.tfinal:
            raise StudioError(f"AdaLoRA's schedule leaves no steps to move rank: tinit={self.tinit} must be below "
                              f"total steps {total} - tfinal={self.tfinal}: lower tinit / tfinal or train longer")


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    rank = cfg.rank_at(site.is_conv)
    check_rank(rank, W0.shape, site.path, cfg.rank_flag(site.is_conv))
    out_features, in_features = W0.shape
    A = torch.empty(rank, in_features).normal_(0.0, INIT_STD, generator=generator)
    B = torch.empty(out_features, rank).normal_(0.0, INIT_STD, generator=generator)
    return _with_scores({"A": conv_down(A, site), "E": torch.zeros(rank, 1), "B": B, "mask": torch.ones(rank)})


def _with_scores(state: dict) -> dict:
    """The RankAllocator's statistics (``CHECKPOINTED``, fresh): I_bar and U_bar of every scored tensor."""
    for key in SCORED:
        state[f"sens_{key}"] = torch.zeros_like(state[key])
        state[f"unc_{key}"] = torch.zeros_like(state[key])
    return state


def factors(cfg: Config, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    A = state["A"]
    return A.flatten(1) * state["E"], state["B"] * cfg.scale_at(A.dim() == 4)  # (r, in), (out, r)


def expected_shapes(cfg: Config, site: Site) -> dict:
    rank = cfg.rank_at(site.is_conv)
    return {"A": down_shape(rank, site), "E": (rank, 1), "B": (site.out_features, rank), "mask": (rank,)}


def from_saved(cfg: Config, W0: torch.Tensor | None, tensors: dict, site: Site) -> dict:
    return _with_scores({k: tensors[k].float() for k in SAVED})


# -- training hooks (studio/adapters/training.py) --------------------------------------------------
def aux_loss(adapters) -> torch.Tensor | None:
    """PEFT's orthogonality term: orth_reg_weight * mean over every Q and P of ||Q Q^T - I||_F, ||P^T P - I||_F."""
    weight = adapters[0].cfg.orth_reg_weight
    if not weight:
        return None
    total, count = 0, 0
    for a in adapters:
        Q = a.A.flatten(1)
        for cov in (Q @ Q.T, a.B.T @ a.B):
            total = total + torch.norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device), p="fro")
            count += 1
    return weight * (total / count)


def check_steps(adapters, total: int) -> None:
    adapters[0].cfg.check_total(adapters[0].cfg.total_step or total)


def after_step(adapters, step: int, total: int) -> None:
    """PEFT's ``update_and_allocate(step)``: scores, then the budget's mask (see the module docstring)."""
    cfg = adapters[0].cfg
    total = cfg.total_step or total
    cfg.check_total(total)
    end = total - cfg.tfinal
    if step < end:
        _update_scores(adapters, cfg)
        budget, now = budget_at(step, cfg, _initial_budget(adapters), _target_budget(adapters), total)
        if now:
            _mask_to_budget(adapters, budget)
    elif step == end:  # the final allocation, at the target budget; the statistics are done with
        _mask_to_budget(adapters, _target_budget(adapters))
        for a in adapters:
            for key in SCORED:
                getattr(a, f"sens_{key}").zero_()
                getattr(a, f"unc_{key}").zero_()
    else:  # the final phase keeps the pattern: lambda_i regrown by the step goes back to 0
        for a in adapters:
            a.E.masked_fill_(a.mask[:, None] == 0, 0.0)


def _initial_budget(adapters) -> int:
    return sum(int(a.E.shape[0]) for a in adapters)


def _target_budget(adapters) -> int:
    """PEFT's target_r * layers; a layer's own target under per-module ranks (module_ranks)."""
    return sum(a.cfg.target for a in adapters)


def budget_at(step: int, cfg: Config, initial: int, target: int, total: int) -> tuple[int, bool]:
    """(budget, whether to mask now) for a step before total - tfinal: PEFT's cubic schedule, floored,
    b(t) = target + (initial - target) (1 - (t - tinit) / (total - tfinal - tinit))^3, masking every deltaT steps."""
    if step <= cfg.tinit:
        return initial, False
    left = 1 - (step - cfg.tinit) / (total - cfg.tfinal - cfg.tinit)
    return int((initial - target) * left ** 3 + target), step % cfg.deltaT == 0


def _update_scores(adapters, cfg: Config) -> None:
    """I = |w * grad|; I_bar <- beta1 I_bar + (1 - beta1) I; U_bar <- beta2 U_bar + (1 - beta2) |I - I_bar|."""
    for a in adapters:
        for key in SCORED:
            p = getattr(a, key)
            ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)  # a layer the batch skipped
            sens, unc = getattr(a, f"sens_{key}"), getattr(a, f"unc_{key}")
            sens.copy_(cfg.beta1 * sens + (1 - cfg.beta1) * ipt)
            unc.copy_(cfg.beta2 * unc + (1 - cfg.beta2) * (ipt - sens).abs())


def triplet_scores(a) -> torch.Tensor:
    """(r,) score of each triplet (P_i, lambda_i, Q_i): s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji)."""
    s = {k: getattr(a, f"sens_{k}") * getattr(a, f"unc_{k}") for k in SCORED}
    vectors = torch.cat([s["A"].flatten(1).mean(dim=1, keepdim=True), s["B"].mean(dim=0).view(-1, 1)], dim=1)
    return s["E"].view(-1) + vectors.sum(dim=1)


def _mask_to_budget(adapters, budget: int) -> None:
    """Zero lambda_i of the (initial - budget) lowest-scoring triplets of the whole model (ties: all of them)."""
    scores = [triplet_scores(a) for a in adapters]
    pruned = _initial_budget(adapters) - budget
    if pruned <= 0:  # target_r = rank: nothing to prune (PEFT's kthvalue(k=0) would raise)
        return
    threshold = torch.kthvalue(torch.cat(scores), k=pruned).values.item()
    for a, score in zip(adapters, scores):
        keep = score > threshold
        a.E.masked_fill_(~keep[:, None], 0.0)
        a.mask.copy_(keep.float())


def kept_ranks(tensors: dict) -> int:
    """The rank a saved layer keeps: its triplets with lambda_i != 0."""
    return int((tensors["E"] != 0).sum())

