"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

    V  = W0 + s B A                     A: (r, in), B: (out, r), s = alpha / r   (LoRA's factors)
    W' = m * V / ||V||                  m: (out,) trained, init ||W0|| (one norm per output row)
    dW = W' - W0                        => W' = W0 at init (B = 0)

The norm is taken per output channel (over in * kh * kw for a convolution): PEFT's
``use_dora=True`` and LyCORIS's ``wd_on_out=True`` (its ``dora_scale`` of shape (out, 1)).
``axis="in"`` is the older LyCORIS layout (``dora_scale`` (1, in)), one norm per input channel,
kept so such files import. As in the paper (section 4.3) and PEFT, ||V|| is detached in the
backward: m and (A, B) get the gradients of m / c * V with c a constant.

The forward never forms V: per output row,
    ||V_o||^2 = ||W0_o||^2 + 2 s B_o . (W0 A^T)_o + s^2 B_o (A A^T) B_o^T,
an (out, r) and an (r, r) product instead of PEFT's (out, in) weight and its norm, and
    delta(x) = (m/||V|| - 1) * (W0 x) + (m/||V||) * s B A x.
A user weight w gives W0 + w (W' - W0): linear in w (ComfyUI's strength), so DoRA mixes like
any delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from studio.adapters import lora
from studio.adapters.common import LowRankConfig
from studio.adapters.contract import Base, Site, Traits
from studio.errors import StudioError

NAME = "dora"
TRAITS = Traits(kind="dense", summary="DoRA, LoRA with a learned magnitude per output channel (m V/||V||)",
                lr={"image": 1e-3, "lm": 2e-3}, needs_base=True, export="truncated", default_energy=0.99)
TRAINABLE = ("A", "B", "m")
SAVED = ("A", "B", "m")
AXES = ("out", "in")


@dataclass(frozen=True)
class Config(LowRankConfig):
    """rank, alpha, rslora, dropout, conv_rank, conv_alpha as LoRA, plus the norm's axis."""

    axis: str = "out"
    """'out': one magnitude per output channel (PEFT, LyCORIS wd_on_out); 'in': per input channel
    (LyCORIS files written before December 2024)."""

    label: ClassVar[str] = "DoRA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.axis not in AXES:
            raise StudioError(f"DoRA axis must be one of {AXES}, got {self.axis!r}")


def _channels_in(state: dict, W0: torch.Tensor) -> tuple[int, int]:
    """(in_channels, kh * kw) of the flattened base weight."""
    A = state["A"]
    K = math.prod(A.shape[2:]) if A.dim() == 4 else 1
    return W0.shape[1] // K, K


def _norm(V: torch.Tensor, axis: str, K: int) -> torch.Tensor:
    if axis == "out":
        return V.norm(dim=1)                                     # (out,)
    return V.view(V.shape[0], -1, K).norm(dim=(0, 2))            # (in_channels,)


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    state = lora.init(cfg, W0, site, generator)
    state["m"] = _norm(W0.detach().float(), cfg.axis, site.kernel[0] * site.kernel[1])
    return state


def expected_shapes(cfg: Config, site: Site) -> dict:
    shapes = lora.expected_shapes(cfg, site)
    K = site.kernel[0] * site.kernel[1]
    shapes["m"] = (site.out_features,) if cfg.axis == "out" else (site.in_features // K,)
    return shapes


def from_saved(cfg: Config, W0: torch.Tensor | None, tensors: dict, site: Site) -> dict:
    m = tensors["m"].float()
    if not (torch.isfinite(m).all() and (m > 0).all()):
        raise StudioError(f"the DoRA magnitude of module '{site.path}' has zero, negative or non-finite entries: "
                          f"the file is damaged or diverged; use another file or an earlier checkpoint")
    return {k: tensors[k].float() for k in SAVED}


def adapted_weight(cfg: Config, state: dict, W0: torch.Tensor) -> torch.Tensor:
    """W' = m V / ||V|| (out, in), fp32."""
    down, up = lora.factors(cfg, state)
    V = W0.float() + up @ down
    _, K = _channels_in(state, W0)
    scale = state["m"] / _norm(V, cfg.axis, K)
    if cfg.axis == "out":
        return V * scale[:, None]
    return (V.view(V.shape[0], -1, K) * scale[None, :, None]).flatten(1)


def delta_weight(cfg: Config, state: dict, W0: torch.Tensor) -> torch.Tensor:
    return adapted_weight(cfg, state, W0) - W0.float()


def _row_norm(cfg: Config, state: dict, W0: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """||W0 + up down|| per output row without forming the (out, in) sum; no gradient."""
    with torch.no_grad():
        W0 = W0.float()
        cross = (W0 @ down.T * up).sum(dim=1)                     # (out,)   W0_o . (up down)_o
        square = ((up @ (down @ down.T)) * up).sum(dim=1)         # (out,)   ||(up down)_o||^2
        return (W0.square().sum(dim=1) + 2 * cross + square).clamp_min(1e-30).sqrt()


def forward(cfg: Config, state: dict, x: torch.Tensor, base: Base, weight: float, training: bool) -> torch.Tensor:
    down, up = lora.factors(cfg, state)                           # (r, in), (out, r); up carries s
    if cfg.axis == "in":  # rare (old files): form W' once
        return base.apply(x, delta_weight(cfg, state, base.W0) * weight)
    scale = state["m"] / _row_norm(cfg, state, base.W0, down, up)  # (out,) m / ||V||, gradient to m only
    y0 = base.out() if base.bias is None else base.out() - base.channels(base.bias)  # W0 x
    h = F.dropout(x, cfg.dropout, training=True) if training and cfg.dropout > 0 else x
    lora_out = base.project(base.apply(h, down), up)              # s B A x
    s = base.channels(scale)
    return ((s - 1) * y0 + s * lora_out) * weight
