"""Helpers shared by the method modules: rank checks, weight hashing and the SVD cache.

The SVD of a base weight is computed once, in fp32, and cached in memory keyed by a SHA-256
of the weight's fp32 bytes and shape. SVF adapters store that hash and refuse a base whose
weight hashes differently, because their gains z are only meaningful in that exact basis.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from studio.errors import StudioError

HASH_BYTES = 32


def lowrank_scale(rank: int, alpha: float | None, rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA; alpha None means alpha = r."""
    alpha = rank if alpha is None else alpha
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass(frozen=True)
class LowRankConfig:
    """The fields every low-rank method shares (LoRA, PiSSA, MiLoRA)."""

    rank: int = 4
    """r: the number of rows of A and columns of B."""
    alpha: float | None = None
    """Scale numerator; None means alpha = rank (scale 1, the diffusers default)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training (0 disables it)."""

    label: ClassVar[str] = "LoRA"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise StudioError(f"{self.label} rank must be a positive integer, got {self.rank!r}: pass --rank 4 or more")
        if not 0.0 <= self.dropout < 1.0:
            raise StudioError(f"{self.label} dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return lowrank_scale(self.rank, self.alpha, self.rslora)


def check_rank(rank: int, shape: tuple[int, int] | torch.Size, module: str) -> None:
    limit = min(shape)
    if rank > limit:
        raise StudioError(
            f"rank {rank} is larger than min(out, in) = {limit} of module '{module}' "
            f"(weight {tuple(shape)}): use --rank {limit} or less, or target other modules")


def weight_hash(W: torch.Tensor) -> bytes:
    """SHA-256 of the fp32 bytes and shape of a weight (device and dtype independent)."""
    data = W.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(str(tuple(data.shape)).encode())
    digest.update(data.numpy())  # the buffer itself, no copy
    return digest.digest()


def hash_to_tensor(h: bytes) -> torch.Tensor:
    return torch.tensor(list(h), dtype=torch.uint8)


def tensor_to_hash(t: torch.Tensor) -> bytes:
    return bytes(t.to(torch.uint8).tolist())


class Basis(NamedTuple):
    U: torch.Tensor   # (out, n)
    S: torch.Tensor   # (n,)  descending
    Vh: torch.Tensor  # (n, in)
    hash: bytes


_SVD_CACHE: dict[tuple[bytes, str], Basis] = {}


def cached_svd(W0: torch.Tensor, h: bytes | None = None) -> Basis:
    """Thin SVD of W0 in fp32, computed once per distinct weight (and device).

    ``h`` is W0's ``weight_hash`` when the caller has it already (hashing is the cost of a hit)."""
    h = h if h is not None else weight_hash(W0)
    key = (h, str(W0.device))
    if key not in _SVD_CACHE:
        U, S, Vh = torch.linalg.svd(W0.detach().float(), full_matrices=False)
        _SVD_CACHE[key] = Basis(U, S, Vh, h)
    return _SVD_CACHE[key]


def clear_svd_cache() -> None:
    _SVD_CACHE.clear()


def check_shapes(tensors: dict, expected: dict, module: str) -> None:
    """Refuse saved tensors whose names or shapes do not fit the target module."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise StudioError(
            f"adapter tensors for module '{module}' do not fit its method: missing {missing}, "
            f"unexpected {extra}: the file was saved by another method or is damaged")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise StudioError(
                f"adapter tensor '{module}.{key}' has shape {tuple(tensors[key].shape)} but the base "
                f"needs {tuple(shape)}: the adapter was trained for another base model or rank")
