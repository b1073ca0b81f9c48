"""Pure functions over deltas: weighted sums, exact rank concatenation, compression.

Every method exposes its delta as low-rank factors ``dW = up @ down`` (down: (r, in),
up: (out, r); SVF at full rank n). So a weighted mix of any methods is, exactly,

    sum_i w_i up_i @ down_i = [w_1 up_1 | ... | w_k up_k] @ [down_1; ...; down_k]

and compressing it never needs a dense (out, in) SVD: QR of the stacked factors reduces the
problem to an SVD of an (R, R) core, R = sum of ranks (O((out + in) R^2)).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from studio.errors import StudioError


class LowRank(NamedTuple):
    down: torch.Tensor        # (k, in)
    up: torch.Tensor          # (out, k), singular values split evenly into both factors
    energy: float             # retained fraction of sum(sigma^2), 1.0 when exact
    singular_values: torch.Tensor  # (R,) all singular values of the mix, descending


def weighted_sum(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i dW_i in fp32."""
    if len(deltas) != len(weights) or not deltas:
        raise StudioError("weighted_sum needs one weight per delta and at least one delta")
    return sum(w * d.float() for d, w in zip(deltas, weights))


def concat(pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rank-concatenation: (down, up) with up @ down = sum_i w_i up_i @ down_i."""
    if len(pairs) != len(weights) or not pairs:
        raise StudioError("concat needs one weight per (down, up) pair and at least one pair")
    down = torch.cat([d.float() for d, _ in pairs], dim=0)                        # (R, in)
    up = torch.cat([u.float() * w for (_, u), w in zip(pairs, weights)], dim=1)    # (out, R)
    return down, up


def _cutoff(S: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if (rank is None) == (energy is None):
        raise StudioError("give exactly one of rank or energy to compress a delta")
    if rank is not None:
        if rank <= 0:
            raise StudioError(f"compression rank must be positive, got {rank}")
        return min(rank, S.numel())
    if not 0.0 < energy <= 1.0:
        raise StudioError(f"energy threshold must be in (0, 1], got {energy}")
    cumulative = torch.cumsum(S.double() ** 2, 0)
    total = cumulative[-1]
    if total == 0:
        return 1
    return int(torch.searchsorted(cumulative / total, torch.tensor(energy, dtype=torch.float64) - 1e-12)) + 1


def _energy(Sk: torch.Tensor, S: torch.Tensor) -> float:
    total = float((S.double() ** 2).sum())
    return 1.0 if total == 0 else float((Sk.double() ** 2).sum()) / total


def _split_evenly(Uk: torch.Tensor, Sk: torch.Tensor, Vhk: torch.Tensor, S: torch.Tensor) -> LowRank:
    root = Sk.sqrt()
    return LowRank(root[:, None] * Vhk, Uk * root[None, :], _energy(Sk, S), S)


def compress(down: torch.Tensor, up: torch.Tensor, rank: int | None = None, energy: float | None = None) -> LowRank:
    """Best rank-k factors of up @ down (Eckart-Young), k from a rank or an energy threshold.

    up = Qu Ru, down.T = Qd Rd (thin QR)  =>  up @ down = Qu (Ru Rd.T) Qd.T; the SVD of the
    (R, R) core gives the singular values of the mix. Frobenius error = sqrt(dropped energy).
    """
    down, up = down.detach().float(), up.detach().float()
    Qu, Ru = torch.linalg.qr(up)            # (out, R), (R, R)
    Qd, Rd = torch.linalg.qr(down.T)        # (in, R), (R, R)
    Uc, S, Vhc = torch.linalg.svd(Ru @ Rd.T)
    k = _cutoff(S, rank, energy)
    return _split_evenly(Qu @ Uc[:, :k], S[:k], (Qd @ Vhc[:k].T).T, S)


def compress_svf(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, z: torch.Tensor,
                 rank: int | None = None, energy: float | None = None) -> LowRank:
    """An SVF delta U diag(S(z-1)) Vh is already an SVD: keep the largest |S(z-1)|, no new SVD."""
    return compress_svd(U, S.detach().float() * (z.detach().float() - 1), Vh, rank, energy)


def compress_svd(U: torch.Tensor, g: torch.Tensor, Vh: torch.Tensor,
                 rank: int | None = None, energy: float | None = None) -> LowRank:
    """A delta given as an SVD U diag(g) Vh with signed, unsorted g: keep the largest |g|, no new SVD."""
    g = g.detach().float()                                                 # (n,) signed singular values of dW
    order = torch.argsort(g.abs(), descending=True)
    g_sorted = g[order]
    k = _cutoff(g_sorted.abs(), rank, energy)
    keep = order[:k]
    kept = g[keep].abs()
    sign = torch.where(g[keep] < 0, -1.0, 1.0)
    root = kept.sqrt()
    # one gather and one in-place scale per factor: these are the big tensors of an SVF export
    up = U.index_select(1, keep).mul_(sign * root)           # (out, k)
    down = Vh.index_select(0, keep).mul_(root[:, None])      # (k, in)
    return LowRank(down, up, _energy(kept, g_sorted.abs()), g_sorted.abs())


def dense(dW: torch.Tensor, rank: int | None = None, energy: float | None = None) -> LowRank:
    """A dense delta's best rank-k factors by its SVD (dense-kind methods: DoRA, (IA)^3, ...)."""
    U, S, Vh = torch.linalg.svd(dW.detach().float(), full_matrices=False)
    k = _cutoff(S, rank, energy)
    return _split_evenly(U[:, :k], S[:k], Vh[:k], S)


def mix_svf(zs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """z of one SVF expert equal to the weighted delta sum of experts on the same basis."""
    return 1 + sum(w * (z - 1) for z, w in zip(zs, weights))
