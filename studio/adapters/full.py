"""full: a dense delta per layer, LyCORIS's ``full`` algorithm (its ``diff`` files; native fine-tuning as a delta).

    dW = diff        (out, in), or the kernel's shape (out, in_channels, kh, kw) on a k x k conv
    db = diff_b      (out,), applied only where the layer has a bias

Init diff = 0, diff_b = 0 (a no-op). A weight w gives W0 + w diff, b0 + w diff_b, linear as in
LyCORIS, ComfyUI and A1111. No rank, no alpha, no scale.

``diff_b`` is always present (zeros when a file has none, as LyCORIS writes it only for layers with
a bias): the core saves a fixed set of tensors per method, and ``expected_shapes`` cannot know
whether a layer has a bias. It is trained like ``diff``; on a layer without a bias it never gets
a gradient and stays 0, and an export writes it only when it is not all zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.adapters.contract import Site, Traits
from studio.errors import StudioError

NAME = "full"
TRAITS = Traits(kind="dense", label="full", summary="full, a dense delta per layer (LyCORIS full / diff files)",
                lr={"image": 1e-4, "lm": 1e-4}, has_rank=False, export="truncated", default_energy=0.99)
TRAINABLE = ("diff", "diff_b")
SAVED = ("diff", "diff_b")


@dataclass(frozen=True)
class Config:
    """full has no options: the whole delta trains."""


def _diff_shape(site: Site) -> tuple:
    """A k x k conv keeps the kernel's shape (as LyCORIS stores it, and it tells exports the kernel)."""
    kh, kw = site.kernel
    if site.is_conv:
        return (site.out_features, site.in_features // (kh * kw), kh, kw)
    return (site.out_features, site.in_features)


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    return {"diff": torch.zeros(_diff_shape(site)), "diff_b": torch.zeros(site.out_features)}


def expected_shapes(cfg: Config, site: Site) -> dict:
    return {"diff": _diff_shape(site), "diff_b": (site.out_features,)}


def from_saved(cfg: Config, W0: torch.Tensor | None, tensors: dict, site: Site) -> dict:
    return {k: tensors[k].float() for k in SAVED}


def delta_weight(cfg: Config, state: dict, W0: torch.Tensor | None) -> torch.Tensor:
    return state["diff"].flatten(1)                                    # (out, in)


def delta_bias(cfg: Config, state: dict, bias: torch.Tensor) -> torch.Tensor:
    return state["diff_b"]                                             # (out,)


# -- LyCORIS's layout (kohya files with diff / diff_b keys) -------------------------------------------
LYCORIS_MARKER = ("diff", "diff_b")
LYCORIS_ARGS = {"algo": "full"}
LYCORIS_CONV = {"diff": "kernel"}  # diff has the weight's shape: (out, in, 1, 1) on a 1x1 conv too


def to_lycoris(cfg: Config, state: dict) -> dict:
    out = {"diff": state["diff"].detach()}
    if state["diff_b"].any():  # (a zero bias delta is the same as none, and bias-less layers have no place for it)
        out["diff_b"] = state["diff_b"].detach()
    return out


def from_lycoris(stored: dict, where: str) -> tuple[dict, dict]:
    foreign = sorted(set(stored) - set(LYCORIS_MARKER))
    if foreign:
        raise StudioError(f"{where} mixes full-delta keys (diff) with {', '.join(foreign)}: one module holds one "
                          f"method's keys; the file is damaged or two adapters were merged wrongly: re-export it")
    if "diff" not in stored:
        raise StudioError(f"{where} has diff_b but no diff: the file is damaged or incomplete")
    diff = stored["diff"].float()
    if diff.dim() == 4 and tuple(diff.shape[2:]) == (1, 1):
        diff = diff.flatten(1)  # a 1x1 conv is a Linear to the core
    if diff.dim() not in (2, 4):
        raise StudioError(f"{where}: diff has shape {tuple(diff.shape)}; a weight delta is (out, in) or "
                          f"(out, in, kh, kw): the file is damaged")
    diff_b = stored["diff_b"].float() if "diff_b" in stored else torch.zeros(diff.shape[0])
    if tuple(diff_b.shape) != (diff.shape[0],):
        raise StudioError(f"{where}: diff_b has shape {tuple(diff_b.shape)} but diff has {diff.shape[0]} output "
                          f"channels: the file is damaged")
    return {}, {"diff": diff, "diff_b": diff_b}
