"""SVFT's sparsity patterns: which entries of the n x n M train (arXiv 2405.19597, section 3.1).

Each builder returns (rows, cols) of M's trained entries in the order ``m`` stores them:

    plain, banded    |i - j| <= d (plain: d = 0), the diagonals one after another in the order
                     0, +1, -1, +2, -2, ..., each read from the top left (SVFT-P, SVFT-B^d)
    random           k distinct entries drawn uniformly from the n^2 (SVFT-R)
    top_k            the k entries of largest alignment |u_i . v_j| of the left and right singular
                     vectors; the paper: "this only works when left and right singular vectors
                     have the same size", so a square W0 only (SVFT-T)

random and top_k are stored row by row (ascending i n + j). Their size is ``k``, or the paper's
R_d / T_d budget: as many entries as the banded pattern of width d, n (2d + 1) - d (d + 1).

A random pattern must come back from the file alone, on another machine and another torch: it is
drawn from SHAKE-256 of (seed, n, the layer's 32-byte weight hash), a byte stream fixed by the
standard, not from torch's generators (their streams are not promised across versions). The
weight hash is already in the file (``basis_hash``), so every layer gets its own pattern without
keying on the module path (which a conversion may rename). The authors' code draws rows and
columns independently with ``torch.randint``, so two of its k entries can coincide; here they are
k distinct entries (the paper: "randomly selecting k elements").

top_k ranks magnitudes: u_i . v_j changes sign with the sign LAPACK picks for pair i or j, its
magnitude does not, so the pattern is a function of W0 alone. (The code ranks the signed values
and, for a non-square W0, the entries of U or V themselves, which the paper does not describe.)
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch

OPTIONS = {"plain": (), "banded": ("bands",), "random": ("bands", "k", "seed"), "top_k": ("bands", "k")}
"""Each pattern and the ``svft.Config`` fields it takes."""
PATTERNS = tuple(OPTIONS)


def banded_count(n: int, d: int) -> int:
    """Entries of the width-d band of an n x n matrix: n (2d + 1) - d (d + 1), d clipped to n - 1."""
    d = min(d, n - 1)
    return n * (2 * d + 1) - d * (d + 1)


@lru_cache(maxsize=64)
def banded_entries(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    # on the CPU whatever the default device: the cache hands these to every later caller (a meta or
    # CUDA default device at the first call would leak into them)
    rows, cols = [torch.arange(n, device="cpu")], [torch.arange(n, device="cpu")]
    for o in range(1, min(d, n - 1) + 1):
        i = torch.arange(n - o, device="cpu")
        rows += [i, i + o]
        cols += [i + o, i]
    return torch.cat(rows), torch.cat(cols)


def _split(flat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = flat.sort().values
    return flat // n, flat % n


@lru_cache(maxsize=256)
def random_entries(n: int, k: int, seed: int, key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct entries of n x n, uniformly: the first k distinct values of a stream of uniform draws
    (sequential sampling without replacement), or, when k is a quarter of M or more (the stream would
    repeat itself a lot), the k smallest of one uniform key per entry."""
    total = n * n
    assert 1 <= k <= total, (k, total)
    stream = hashlib.shake_256(f"studio-svft-random/{seed}/{n}/".encode() + key)

    def draws(count: int) -> np.ndarray:  # digest(m) is a prefix of digest(m'): one stream, any length
        return np.frombuffer(stream.digest(8 * count), dtype="<u8")

    if 4 * k >= total:
        chosen = np.argsort(draws(total), kind="stable")[:k]
    else:
        count = 2 * k
        while True:
            values = draws(count) % np.uint64(total)  # 2^64 mod n^2 bias: < n^2 / 2^64
            _, first = np.unique(values, return_index=True)  # index of each value's first occurrence
            if first.size >= k:
                chosen = values[np.sort(first)[:k]]
                break
            count *= 2
    return _split(torch.from_numpy(chosen.astype(np.int64)), n)


def top_k_entries(U: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest |u_i . v_j| of a square W0's U (n, n) and Vh (n, n); ties go to the lower i n + j."""
    n = U.shape[1]
    assert U.shape[0] == Vh.shape[1] == n, "top_k needs a square weight"
    alignment = (U.T @ Vh.T).abs().flatten().cpu()  # [i, j] = u_i . v_j, as precise as the fp32 SVD it reads
    threshold = torch.topk(alignment, k).values[-1]  # O(n^2), not a sort of all n^2 (a 4096-wide layer has 16.8 M)
    above = (alignment > threshold).nonzero().flatten()
    ties = (alignment == threshold).nonzero().flatten()[:k - above.numel()]  # ascending: the lower i n + j first
    return _split(torch.cat([above, ties]), n)
