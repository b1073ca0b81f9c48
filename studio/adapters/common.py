"""Helpers shared by the method modules: rank checks, weight hashing and the SVD cache.

The SVD of a base weight is computed once, in fp32, and cached keyed by a SHA-256 of the
weight's fp32 bytes and shape. SVF adapters store that hash and refuse a base whose weight
hashes differently, because their gains z are only meaningful in that exact basis.

The cache holds its bases *weakly*: an entry lives while some adapter holds its tensors (SVF
keeps U, S, Vh as buffers) or a caller keeps the returned ``Basis``, and is released with the
last of them, so detaching every SVF adapter hands the fp32 U, S, Vh of each weight back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import weakref
from dataclasses import dataclass
from typing import ClassVar

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
    conv_rank: int | None = None
    """Rank on k x k (k > 1) convolutions, kohya's conv_dim; None = rank."""
    conv_alpha: float | None = None
    """Alpha on k x k convolutions, kohya's conv_alpha; None = alpha when conv_rank is None, else conv_rank."""
    module_ranks: tuple = ()
    """Per-module ranks: ((regex over module paths, rank), ...); the first rule that fullmatches a
    layer's path sets its rank, 0 leaves the layer without an adapter (kohya's block_dims). The
    scale stays ``scale`` (that of rank / alpha) on every layer. Empty = rank everywhere."""

    label: ClassVar[str] = "LoRA"

    def __post_init__(self) -> None:
        for name, value in (("rank", self.rank), ("conv_rank", self.conv_rank)):
            if value is None and name == "conv_rank":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise StudioError(f"{self.label} {name} must be a positive integer, got {value!r}: pass "
                                  f"--{name.replace('_', '-')} 4 or more")
        if not 0.0 <= self.dropout < 1.0:
            raise StudioError(f"{self.label} dropout must be in [0, 1), got {self.dropout}")
        rules = tuple((str(p), r) for p, r in self.module_ranks)  # a file's JSON gives lists
        if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for _, r in rules):
            raise StudioError(f"{self.label} module_ranks must map patterns to ranks >= 0, got {list(self.module_ranks)}")
        object.__setattr__(self, "module_ranks", rules)

    @property
    def scale(self) -> float:
        return lowrank_scale(self.rank, self.alpha, self.rslora)

    def rank_at(self, conv: bool) -> int:
        """r of a layer: conv_rank on k x k convolutions when given."""
        return self.conv_rank if conv and self.conv_rank is not None else self.rank

    def rank_flag(self, conv: bool) -> str:
        """The option that sets ``rank_at(conv)``, for errors."""
        return "--conv-rank" if conv and self.conv_rank is not None else "--rank"

    def at(self, path: str):
        """The config of the layer at ``path`` under ``module_ranks`` (None: no adapter there).

        A resolved config has the layer's rank and an alpha that keeps ``scale``, so every method's
        shapes follow from ``rank_at`` as usual and its factors (which read ``scale_at``) need no path."""
        for pattern, rank in self.module_ranks:
            if re.fullmatch(pattern, path):
                if rank == 0:
                    return None
                keep = self.alpha is None and not self.rslora  # scale 1 at every rank
                alpha = None if keep else self.scale * (math.sqrt(rank) if self.rslora else rank)
                return dataclasses.replace(self, rank=rank, alpha=alpha, module_ranks=())
        return self

    def scale_at(self, conv: bool) -> float:
        if not conv or (self.conv_rank is None and self.conv_alpha is None):
            return self.scale
        return lowrank_scale(self.rank_at(True), self.conv_alpha, self.rslora)


def conv_down(down: torch.Tensor, site) -> torch.Tensor:
    """A down factor (r, in * kh * kw) as LoCon's kernel (r, in, kh, kw) on a k x k conv site."""
    return down.reshape(down.shape[0], -1, *site.kernel) if site.is_conv else down


def down_shape(rank: int, site) -> tuple:
    """The stored shape of a down factor: (r, in) or LoCon's (r, in_channels, kh, kw)."""
    kh, kw = site.kernel
    return (rank, site.in_features // (kh * kw), kh, kw) if site.is_conv else (rank, site.in_features)


def pad_rank(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """``t`` with its rank axis ``dim`` zero-padded to ``rank``: the product of two padded factors is unchanged."""
    missing = rank - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def check_rank(rank: int, shape: tuple[int, int] | torch.Size, module: str, flag: str = "--rank") -> None:
    """``flag``: the option that set this layer's rank (``LowRankConfig.rank_flag``), named in the error."""
    limit = min(shape)
    if rank > limit:
        raise StudioError(
            f"rank {rank} is larger than min(out, in) = {limit} of module '{module}' "
            f"(weight {tuple(shape)}): use {flag} {limit} or less, or target other modules")


def weight_hash(W: torch.Tensor) -> bytes:
    """SHA-256 of the fp32 bytes and shape of a weight (device and dtype independent)."""
    data = W.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(str(tuple(data.shape)).encode())
    digest.update(data.numpy())  # the buffer itself, no copy
    return digest.digest()


def same_base(label: str, W0: torch.Tensor, tensors: dict, path: str) -> bytes:
    """The hash of W0, refusing a base whose weight is not the one a frozen-basis method (SVF, SVFT,
    LoRA-XS) was trained on: its saved numbers mean nothing in another weight's singular frame."""
    h = weight_hash(W0)
    if tensor_to_hash(tensors["basis_hash"]) != h:
        raise StudioError(
            f"{label} adapter was trained on a different base weight for module '{path}' (basis hash mismatch): "
            f"load it on the exact base checkpoint it was trained on, or export it as a plain LoRA first")
    return h


def hash_to_tensor(h: bytes) -> torch.Tensor:
    return torch.tensor(list(h), dtype=torch.uint8)


def tensor_to_hash(t: torch.Tensor) -> bytes:
    return bytes(t.to(torch.uint8).tolist())


class Basis(tuple):
    """(U (out, n), S (n,) descending, Vh (n, in), hash): unpacks like the tuple it is."""

    __slots__ = ()

    def __new__(cls, U, S, Vh, h):
        return super().__new__(cls, (U, S, Vh, h))

    U = property(lambda self: self[0])
    S = property(lambda self: self[1])
    Vh = property(lambda self: self[2])
    hash = property(lambda self: self[3])


# key -> weak references to (U, S, Vh): alive while any adapter (or caller) holds the tensors
_SVD_CACHE: dict[tuple[bytes, str], tuple[weakref.ref, weakref.ref, weakref.ref]] = {}


def cached_svd(W0: torch.Tensor, h: bytes | None = None) -> Basis:
    """Thin SVD of W0 in fp32, computed once per distinct weight (and device) while it is in use.

    ``h`` is W0's ``weight_hash`` when the caller has it already (hashing is the cost of a hit)."""
    h = h if h is not None else weight_hash(W0)
    key = (h, str(W0.device))
    refs = _SVD_CACHE.get(key)
    tensors = tuple(r() for r in refs) if refs else (None,)
    if any(t is None for t in tensors):
        for dead in [k for k, rs in _SVD_CACHE.items() if any(r() is None for r in rs)]:
            del _SVD_CACHE[dead]
        tensors = torch.linalg.svd(W0.detach().float(), full_matrices=False)
        _SVD_CACHE[key] = tuple(weakref.ref(t) for t in tensors)
    return Basis(*tensors, h)


def svd_cache_size() -> int:
    """Bases still held by someone (dead entries are not counted)."""
    return sum(all(r() is not None for r in rs) for rs in _SVD_CACHE.values())


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
