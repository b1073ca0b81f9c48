"""SVF: singular value fine-tuning (Transformer^2, Sun, Cetin, Tang 2025, arXiv 2501.06252).

One gain per singular value of the base weight, in the additive form used throughout the
studio (every adapter is a delta against the pristine W0):

    W0 = U diag(S) Vh              U: (out, n)  S: (n,)  Vh: (n, in)   n = min(out, in)
    dW = U diag(S * (z - 1)) Vh    z: (n,) trained, init 1  =>  dW = 0 at init

Mixing experts of one base is the delta sum: z_mix = 1 + sum_i w_i (z_i - 1) (``mix.mix_svf``). The paper's
nuclear-norm renormalisation is deliberately left out: it would make the delta non-linear in
z and break that rule.

The SVD is computed once per base weight in fp32 (``common.cached_svd``) and shared by every
SVF adapter on that weight; the adapter stores only z and the weight's hash, and refuses a
base whose weight hashes differently. Its factors (Vh, U diag(S(z - 1))) run
x -> Vh x -> * S(z-1) -> U in the stacked low-rank path, so training never forms a dense
(out, in) weight gradient: dL/dz_i = S_i sum_t (u_i.g_t)(v_i.x_t).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.adapters.common import HASH_BYTES, cached_svd, hash_to_tensor, same_base
from studio.adapters.contract import Site, Traits

NAME = "svf"
TRAITS = Traits(kind="low-rank", summary="SVF (Transformer^2), one gain per singular value of W0",
                lr={"image": 2e-2, "lm": 1e-1}, needs_base=True, has_rank=False, export="truncated",
                default_energy=0.99)

TRAINABLE = ("z",)
SAVED = ("z", "basis_hash")


@dataclass(frozen=True)
class Config:
    """SVF has no rank: it trains min(out, in) gains per weight."""

    def __post_init__(self) -> None:
        pass


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    U, S, Vh, h = cached_svd(W0)
    return {"z": torch.ones_like(S), "basis_hash": hash_to_tensor(h), "U": U, "S": S, "Vh": Vh}


def from_saved(cfg: Config, W0: torch.Tensor, tensors: dict, site: Site) -> dict:
    """Rebuild the state from saved (z, basis_hash), refusing a base with a different weight."""
    h = same_base("SVF", W0, tensors, site.path)
    U, S, Vh, h = cached_svd(W0, h)
    return {"z": tensors["z"].float(), "basis_hash": hash_to_tensor(h), "U": U, "S": S, "Vh": Vh}


def gains(state: dict) -> torch.Tensor:
    return state["S"] * (state["z"] - 1)  # (n,) singular values of dW, up to sign


def svd(cfg: Config, state: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dW as the SVD it already is: U (out, n), signed gains (n,), Vh (n, in) (plain-LoRA export)."""
    return state["U"], gains(state), state["Vh"]


def factors(cfg: Config, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return state["Vh"], state["U"] * gains(state)[None, :]  # (n, in), (out, n)


def expected_shapes(cfg: Config, site: Site) -> dict:
    return {"z": (min(site.out_features, site.in_features),), "basis_hash": (HASH_BYTES,)}
