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
    delta(x) = (m/||V|| - 1) * (W0 x) + (m/||V||) * s B A x,
run from the base output y = W0 x + b the layer already has, with every (out,)-vector folded
into the small factors: with k = w (m/||V|| - 1),
    delta(x) = k * y + (w m/||V|| * s B) (A x) - k * b
one in-place multiply-add over the output (the bias term rides on the up-step's matmul) where
PEFT makes five or six passes, each into a new tensor (BENCH dora_step_vs_peft).
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
    if not torch.isfinite(m).all():  # (a negative m is a valid trained state: it flips its row)
        raise StudioError(f"the DoRA magnitude of module '{site.path}' has non-finite entries: the file is damaged "
                          f"or diverged; use another file or an earlier checkpoint")
    return {k: tensors[k].float() for k in SAVED}


def adapted_weight(cfg: Config, state: dict, W0: torch.Tensor, detach_norm: bool = False) -> torch.Tensor:
    """W' = m V / ||V|| (out, in), fp32; ``detach_norm``: ||V|| a constant in the backward (training)."""
    down, up = lora.factors(cfg, state)
    V = torch.addmm(W0.float(), up, down)
    _, K = _channels_in(state, W0)
    scale = state["m"] / _norm(V.detach() if detach_norm else V, cfg.axis, K)
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
        rows = torch.linalg.vector_norm(W0, dim=1).square()     # (out,)   one read of W0, no (out, in) temporary
        return (rows + 2 * cross + square).clamp_min(1e-30).sqrt()


def forward(cfg: Config, state: dict, x: torch.Tensor, base: Base, weight: float, training: bool) -> torch.Tensor:
    """The output delta."""
    return _dora(cfg, state, x, base, weight, training, 0.0)


def output(cfg: Config, state: dict, x: torch.Tensor, base: Base, weight: float, training: bool) -> torch.Tensor:
    """The whole output y + delta when DoRA is its layer's only live adapter (training, or one file in a
    mix): the adapted weight's own product (W0 + w dW) x + b where that is cheaper (_weight_is_cheaper),
    else (1 + k) y + ..., one multiply-add over the output instead of two."""
    if _weight_is_cheaper(cfg, state, x, base, training):
        W = adapted_weight(cfg, state, base.W0, detach_norm=True)
        out = base.apply(x, W if weight == 1 else torch.lerp(base.W0, W, weight))
        return out if base.bias is None else out + base.channels(base.bias)
    return _dora(cfg, state, x, base, weight, training, 1.0)


ELEMENTWISE_COST = 360
"""What the factored path's elementwise passes over the output (writing y and the up-step, the
multiply-add, and in the backward grad * k and the sum of grad * y for m) cost per output element,
in multiply-adds of a matmul: measured on this CPU's single core (a pass over an (8192, 320) fp32
tensor ~1.7 ms, a 320 x 320 matmul over it ~12 ms). GPUs favour the weight path more (their
matmuls are cheaper against memory traffic), so the bound is conservative there."""


def _weight_is_cheaper(cfg: Config, state: dict, x: torch.Tensor, base: Base, training: bool) -> bool:
    """Whether W' x (one matmul with the (out, in) adapted weight; in training, the weight's gradient
    gradᵀ x is the extra cost) beats the factored path (base output + A, B matmuls + passes).

    Per output token: weight path in * out (its weight gradient; the forward is the base's own) or 0
    without gradients; factored path 6 r (in + out) (2 r (in + out) without gradients) plus
    ELEMENTWISE_COST * out. The weight path also composes and differentiates W' once: ~3 r in out.
    A dropout on the adapter's input only exists in the factored path; axis 'in' forms W' anyway; a
    half-precision base keeps its own half-precision product (the weight path would run in fp32)."""
    if cfg.axis != "out" or (training and cfg.dropout > 0) or base.dtype != torch.float32:
        return cfg.axis != "out"
    out_f, in_f = base.W0.shape
    rank = state["A"].shape[0]
    tokens = x.numel() / (x.shape[1] if x.dim() == 4 else x.shape[-1])
    grad = torch.is_grad_enabled()
    weight_path = (tokens if grad else 0) * in_f * out_f + 3 * rank * in_f * out_f
    factored = tokens * ((6 if grad else 2) * rank * (in_f + out_f) + ELEMENTWISE_COST * out_f)
    return weight_path < factored


def _dora(cfg: Config, state: dict, x: torch.Tensor, base: Base, weight: float, training: bool,
          plus: float) -> torch.Tensor:
    down, up = lora.factors(cfg, state)                           # (r, in), (out, r); up carries s
    if cfg.axis == "in":  # rare (old files): form W' once
        return base.apply(x, (adapted_weight(cfg, state, base.W0, detach_norm=True) - base.W0) * weight)
    scale = state["m"] / _row_norm(cfg, state, base.W0, down, up)  # (out,) m / ||V||, gradient to m only
    k = (scale - 1) * weight                                      # (out,)
    c = None if base.bias is None else -k * base.bias             # (out,)  y holds b; W0 x does not
    h = F.dropout(x, cfg.dropout, training=True) if training and cfg.dropout > 0 else x
    hidden = base.apply(h, down)                                  # (..., r): A x
    lin = _project(base, hidden, up * (scale * weight)[:, None], c)  # w m/||V|| s B A x + c
    return _AddScaled.apply(lin, base.out(), base.channels(k + plus))  # + (plus + k) (W0 x + b), in place


def _project(base: Base, hidden: torch.Tensor, up: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """The 1x1 up-step plus a per-channel constant; channels last (Linear, Conv1D) the matmul adds it."""
    if c is None:
        return base.project(hidden, up)
    if base.channels(c).dim() == 1:  # channels last: the up-step is a Linear
        return F.linear(hidden, up, c)
    return base.project(hidden, up).add_(base.channels(c))


class _AddScaled(torch.autograd.Function):
    """out + k * y written into out, a fresh matmul result (its backward does not need it).

    torch.addcmul would allocate a second output-sized tensor and, in its backward, a third
    for y * 1; on CPU each fresh activation-sized tensor costs more than the arithmetic."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y, k)
        ctx.mark_dirty(out)
        return out.addcmul_(y, k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, k = ctx.saved_tensors
        grad_y = grad * k if ctx.needs_input_grad[1] else None
        grad_k = (grad * y).sum_to_size(k.shape) if ctx.needs_input_grad[2] else None
        return grad, grad_y, grad_k


# -- LyCORIS's layout (kohya files with dora_scale; what ComfyUI, A1111 1.9+ and Forge apply) ------
LYCORIS_MARKER = "dora_scale"
LYCORIS_ARGS = {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}  # kohya's ss_network_args
LYCORIS_CONV = {"lora_down.weight": "kernel", "lora_up.weight": "1x1", "dora_scale": "1x1"}  # LoCon's 4-D layout


def to_lycoris(cfg: Config, state: dict) -> dict:
    """LoCon's lora_down / lora_up / alpha with s = alpha / r, and dora_scale = m as (out, 1), the
    output axis (LyCORIS wd_on_out, its default since December 2024), or (1, in) for axis 'in'."""
    A = state["A"].detach()
    rank = A.shape[0]
    m = state["m"].detach()
    if not (m > 0).all():  # LyCORIS files carry a positive magnitude; loaders refuse others (so do we)
        raise StudioError("a DoRA magnitude went zero or negative in training, which the LyCORIS layout does not "
                          "hold: export a plain LoRA with --rank R or --energy E and --base, or keep --format native")
    return {"lora_down.weight": A, "lora_up.weight": state["B"].detach(),
            "alpha": torch.tensor(cfg.scale_at(A.dim() == 4) * rank),
            "dora_scale": m[:, None] if cfg.axis == "out" else m[None, :]}


def from_lycoris(stored: dict, where: str) -> tuple[dict, dict]:
    """(config fields, canonical tensors) of one module of a LyCORIS DoRA file; the axis is read from
    dora_scale's shape, which must fit the factors' output or input channels."""
    down, up, scale = stored["lora_down.weight"].float(), stored["lora_up.weight"].float(), stored["dora_scale"]
    if down.dim() == 4 and tuple(down.shape[2:]) == (1, 1):
        down = down.flatten(1)
    up = up.flatten(1)
    rank, out_features, in_channels = down.shape[0], up.shape[0], down.shape[1]
    alpha = float(stored["alpha"]) if "alpha" in stored else 0.0
    v = scale.float().reshape(scale.shape[:2]) if scale.dim() == 4 and tuple(scale.shape[2:]) == (1, 1) else scale.float()
    if v.dim() == 2 and v.shape == (out_features, 1):
        axis, m = "out", v[:, 0]
    elif v.dim() == 2 and v.shape == (1, in_channels):
        axis, m = "in", v[0]
    else:
        raise StudioError(f"{where}: dora_scale of shape {tuple(scale.shape)} fits neither the output axis "
                          f"({out_features}, 1) nor the input axis (1, {in_channels}) of the module's weight: the "
                          f"file is damaged or not a DoRA file")
    if not (torch.isfinite(m).all() and (m > 0).all()):
        raise StudioError(f"{where}: dora_scale has zero, negative or non-finite entries: the file is damaged "
                          f"or diverged; use another file")
    return {"rank": rank, "alpha": alpha or float(rank), "axis": axis}, {"A": down, "B": up, "m": m.clone()}
