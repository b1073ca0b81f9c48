"""MoRA: high-rank updating for parameter-efficient fine-tuning (Jiang et al. 2024, arXiv 2405.12130).

One square trained matrix M (r^ x r^) between two fixed, parameter-free operators:

    delta(x) = f_decomp(M f_comp(x)),   dW = the (out, in) matrix of that linear map

with r^ = floor(sqrt((in + out) r)), so M has (within the floor) the r (in + out) values of a LoRA
of rank r; the rotation type rounds r^ down to even. No alpha (the code's scaling is 1); M starts
at 0 (the code's init), so a fresh adapter is a no-op and dL/dM is non-zero from the first step.

Operators, as the authors' ``peft-mora`` defines them in ``_apply_mora`` (the forward). The input
is cut into c = ceil(in / r^) chunks of r^, the last one filled up by wrapping around to x's start
(input p of the padded x is x[p mod in]):

    sharing (mora_type 1, the paper's Eq. 6, for large r): f_comp sums the chunks; f_decomp repeats
        the r^ outputs over the out rows:  dW[k, i] = sum over p = i (mod in) of M[k mod r^, p mod r^]
    rotation (mora_type 6, Eq. 9, RoPE-like, for small r): chunk j is rotated by RoPE's angles
        theta_t = j / 10000^(2t / r^) (rotate-half layout) and multiplied by M on its own; the
        c r^ outputs are cut to out, or repeated when out is larger:
        dW = rows k mod (c r^) of blockdiag(M R_0, ..., M R_{c-1}), columns wrapped mod in

Rank: sharing reaches r^, rotation up to min(out, in) (one block per chunk): both above a LoRA's r.
Where in > out, the rotation type's code keeps only the first out rows of the block diagonal: input
chunks past them get no delta. Its ``get_delta_weight`` overwrites instead of adding where the wrapped
columns meet (a single chunk) and fails there; the forward is the definition used here.

``delta_weight`` builds dW without the code's Python loop over in: a gather and an index-add
(sharing) or a scatter-add of (out, r^) values (rotation). The forward runs the operators on
Linear and Conv1D inputs (O(in r^) per token, where x @ dW.T costs O(in out) and a dense weight
gradient); on a convolution it runs dW as the kernel. There is no dropout. M alone does not
give the layer's shape, so each layer also stores it (``shape``, two integers), and the plain-LoRA
export (a truncated SVD of dW, error reported) needs no base model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch

from studio.adapters.contract import Base, Site, Traits
from studio.errors import StudioError

NAME = "mora"
TRAITS = Traits(kind="dense", summary="MoRA, one square r^ x r^ matrix between fixed compress / decompress "
                "operators, LoRA rank r's parameter count (--method-args type=rotation|sharing)", label="MoRA",
                lr={"image": 1e-4, "lm": 1e-3}, export="truncated", default_energy=0.99)
TRAINABLE = ("M",)
SAVED = ("M", "shape")
TYPES = ("rotation", "sharing")


@dataclass(frozen=True)
class Config:
    """rank (r, LoRA's rank of equal size), conv_rank, module_ranks (as ``common.LowRankConfig``) and the type."""

    rank: int = 4
    """r: M is r^ x r^ with r^ = floor(sqrt((in + out) r))."""
    type: str = "rotation"
    """rotation (the paper's choice for small r, the studio's ranks) or sharing (large r)."""
    conv_rank: int | None = None
    """r on k x k (k > 1) convolutions; None = rank."""
    module_ranks: tuple = ()
    """Per-module ranks: ((regex over module paths, rank), ...), the first full match wins, 0 = no adapter."""

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise StudioError(f"unknown MoRA type {self.type!r}: use --method-args type=rotation (small ranks) or "
                              f"type=sharing (large ranks)")
        for name, value in (("rank", self.rank), ("conv_rank", self.conv_rank)):
            if name == "conv_rank" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise StudioError(f"MoRA {name} must be a positive integer, got {value!r}: pass "
                                  f"--{name.replace('_', '-')} 4 or more")
        rules = tuple((str(p), r) for p, r in self.module_ranks)  # a file's JSON gives lists
        if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for _, r in rules):
            raise StudioError(f"MoRA module_ranks must map patterns to ranks >= 0, got {list(self.module_ranks)}")
        object.__setattr__(self, "module_ranks", rules)

    def rank_at(self, conv: bool) -> int:
        return self.conv_rank if conv and self.conv_rank is not None else self.rank

    def at(self, path: str):
        """The config of the layer at ``path`` under ``module_ranks`` (None: no adapter there)."""
        for pattern, rank in self.module_ranks:
            if re.fullmatch(pattern, path):
                return None if rank == 0 else dataclasses.replace(self, rank=rank, module_ranks=())
        return self


def hat_rank(cfg: Config, out_features: int, in_features: int, conv: bool = False) -> int:
    """r^ = floor(sqrt((in + out) r)), even for the rotation type."""
    r_hat = math.isqrt((in_features + out_features) * cfg.rank_at(conv))
    return r_hat - r_hat % 2 if cfg.type == "rotation" else r_hat


def _checked_hat_rank(cfg: Config, site: Site) -> int:
    """r^ of a layer, refused past its larger side (M would be a full fine-tune with wasted values)."""
    r_hat = hat_rank(cfg, site.out_features, site.in_features, site.is_conv)
    limit = max(site.out_features, site.in_features)
    if r_hat > limit or r_hat < 2:
        flag = "--conv-rank" if site.is_conv and cfg.conv_rank is not None else "--rank"
        best = max(1, ((limit + 1) ** 2 - 1) // (site.in_features + site.out_features))
        raise StudioError(f"MoRA rank {cfg.rank_at(site.is_conv)} gives r^ = {r_hat}, outside 2..max(out, in) = "
                          f"{limit} of module '{site.path}' (weight {site.out_features} x {site.in_features}): "
                          f"use {flag} {best} or less, or target other modules")
    return r_hat


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    r_hat = _checked_hat_rank(cfg, site)
    return {"M": torch.zeros(r_hat, r_hat), "shape": torch.tensor([site.out_features, site.in_features])}


def expected_shapes(cfg: Config, site: Site) -> dict:
    r_hat = hat_rank(cfg, site.out_features, site.in_features, site.is_conv)
    return {"M": (r_hat, r_hat), "shape": (2,)}


def from_saved(cfg: Config, W0: torch.Tensor | None, tensors: dict, site: Site) -> dict:
    shape = tuple(int(v) for v in tensors["shape"].tolist())
    if site.out_features and shape != (site.out_features, site.in_features):
        raise StudioError(f"the MoRA adapter of module '{site.path}' was trained on a {shape[0]} x {shape[1]} layer "
                          f"but the base has {site.out_features} x {site.in_features}: use the base it was "
                          f"trained on")
    return {"M": tensors["M"].float(), "shape": tensors["shape"].long()}


def _rotations(r_hat: int, chunks: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (chunks, r^) of chunk j's angles j / 10000^(2t / r^), rotate-half layout (the code's)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r_hat, 2, device=device).float() / r_hat))
    angles = torch.outer(torch.arange(chunks, device=device).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=1)
    return angles.cos(), angles.sin()


def delta_weight(cfg: Config, state: dict, W0: torch.Tensor | None) -> torch.Tensor:
    M = state["M"]
    out, inp = W0.shape if W0 is not None else state["shape"].tolist()
    r_hat, dev = M.shape[0], M.device
    chunks = -(-inp // r_hat)
    if cfg.type == "sharing":  # (M C) with C the chunk sum, then rows k mod r^ (the repeat)
        p = torch.arange(chunks * r_hat, device=dev)
        compressed = M.new_zeros(r_hat, inp).index_add(1, p % inp, M[:, p % r_hat])
        return compressed[torch.arange(out, device=dev) % r_hat]
    cos, sin = _rotations(r_hat, chunks, dev)
    h = r_hat // 2
    turned = torch.cat([M[:, h:], -M[:, :h]], dim=1)                       # M times rotate-half
    blocks = M[None] * cos[:, None, :] + turned[None] * sin[:, None, :]    # (chunks, r^, r^): M R_j
    q = torch.arange(out, device=dev) % (chunks * r_hat)                    # output row -> row of the padded map
    chunk = q // r_hat
    values = blocks[chunk, q % r_hat]                                      # (out, r^)
    cols = (chunk[:, None] * r_hat + torch.arange(r_hat, device=dev)[None, :]) % inp
    return M.new_zeros(out, inp).scatter_add(1, cols, values)


def _operators(cfg: Config, M: torch.Tensor, x: torch.Tensor, out: int) -> torch.Tensor:
    """f_decomp(M f_comp(x)) on (..., in) inputs: O(in r^) per token instead of the dense O(in out)."""
    inp, r_hat = x.shape[-1], M.shape[0]
    chunks = -(-inp // r_hat)
    padded = x[..., torch.arange(chunks * r_hat, device=x.device) % inp]   # wrap around to fill the last chunk
    pieces = padded.unflatten(-1, (chunks, r_hat))                          # (..., chunks, r^)
    if cfg.type == "sharing":
        hidden = pieces.sum(dim=-2) @ M.T                                   # (..., r^)
        return hidden[..., torch.arange(out, device=x.device) % r_hat]
    cos, sin = _rotations(r_hat, chunks, x.device)
    h = r_hat // 2
    turned = torch.cat([-pieces[..., h:], pieces[..., :h]], dim=-1)        # rotate-half
    hidden = ((pieces * cos + turned * sin) @ M.T).flatten(-2)              # (..., chunks r^)
    return hidden[..., torch.arange(out, device=x.device) % hidden.shape[-1]]


def forward(cfg: Config, state: dict, x: torch.Tensor, base: Base, weight: float, training: bool) -> torch.Tensor:
    """The output delta. Linear / Conv1D inputs (..., in) run the operators themselves; a convolution's
    input is not a vector per position, so there dW is formed and run as the kernel."""
    M = state["M"] if weight == 1 else state["M"] * weight
    if base.channels(M.new_ones(1)).dim() != 1:                             # a Conv2d's (1, C, 1, 1) layout
        return base.apply(x, delta_weight(cfg, {**state, "M": M}, base.W0))
    return _operators(cfg, M, x, base.W0.shape[0])
