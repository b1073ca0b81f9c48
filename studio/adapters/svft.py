"""SVFT: singular vectors guided fine-tuning (Lingam et al. 2024, arXiv 2405.19597).

The full singular bases of the base weight stay frozen and a sparse n x n matrix between them
trains. In the studio's (out, in) layout, W0 = U diag(S) Vh (thin, fp32, the shared SVD cache):

    dW = U M Vh        U: (out, n)  Vh: (n, in)  n = min(out, in)  M: (n, n), non-zero only on a pattern

Patterns (``--method-args pattern=... bands=d``), as the paper and its code (``svft/svft_layers.py``):

    plain    M diagonal: n values (SVFT-P; the additive form of SVF's gains)
    banded   |i - j| <= d: n (2d + 1) - d (d + 1) values (SVFT-B^d); d >= n - 1 is the whole M

The values ``m`` are M's diagonals one after another, in the order 0, +1, -1, +2, -2, ..., each
read from the top left: diagonal +o holds M[i, i + o], -o holds M[i + o, i]. The paper's random
and top-k patterns are not offered: a random pattern would have to be stored with every layer (the
core saves one fixed set of tensors per method), and the code's top-k ranks the entries of U Vh^T
(of U or Vh alone when W0 is not square), a choice the paper does not pin down.

Init: the code draws m kaiming-normal behind a gate sigmoid(g), g = 0, so its M starts at 0.5 m,
not 0. The studio's contract is a no-op at init (attaching, resuming and mixing rely on it), so m
starts at 0 and there is no gate (one trained scalar on all of M: the reachable deltas are the same).
dL/dM_ij = u_i^T G X^T v_j is non-zero at M = 0, so training starts at once.

It runs as a low-rank pair, down = M Vh (n, in) and up = U (out, n), so no dense (out, in) weight
or its gradient is formed; M Vh is one gather of the pattern's rows of Vh and a scatter-add, O(nnz
in). The file holds m and the base weight's hash (as SVF); U, Vh are rebuilt from W0 on load
(``needs_base``). A banded M couples pairs i != j, so the sign LAPACK picks for each singular pair
matters: the frame is made canonical as LoRA-XS's (each u_i's largest entry positive), and a base
whose singular values repeat has no unique frame (m then reloads only on the same SVD). A
plain-LoRA export needs no new SVD of dW: M = P diag(sigma) Q^T (n x n, cheap) gives
dW = (U P) diag(sigma) (Q^T Vh), sorted and truncated at a rank / energy with the error reported.
The paper's limitation stays: U and Vh cost about twice W0 in fp32 memory (not counted by
``studio train --check``, which sees only the saved tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from studio.adapters.common import HASH_BYTES, cached_svd, hash_to_tensor, same_base
from studio.adapters.contract import Site, Traits
from studio.adapters.lora_xs import canonical_signs
from studio.adapters.mixture import whole
from studio.errors import StudioError

NAME = "svft"
TRAITS = Traits(kind="low-rank", summary="SVFT, dW = U M V^T on the full singular bases of W0, M sparse "
                "(--method-args pattern=plain|banded bands=d)", label="SVFT",
                lr={"image": 5e-3, "lm": 5e-2}, needs_base=True, has_rank=False, export="truncated",
                default_energy=0.99)
TRAINABLE = ("m",)
SAVED = ("m", "basis_hash")
PATTERNS = ("plain", "banded")
DEFAULT_BANDS = 2


@dataclass(frozen=True)
class Config:
    """SVFT has no rank: its size is the pattern's on the n = min(out, in) singular vectors."""

    pattern: str = "plain"
    """plain: M diagonal (n values); banded: M non-zero where |i - j| <= bands."""
    bands: int | None = None
    """d of the banded pattern (off-diagonals on each side); None = 2. Only with pattern=banded."""

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise StudioError(f"unknown SVFT pattern {self.pattern!r}: use --method-args pattern=plain or "
                              f"pattern=banded (with bands=d)")
        if self.pattern == "plain":
            if self.bands is not None:
                raise StudioError(f"SVFT bands={self.bands} applies to the banded pattern only: add "
                                  f"--method-args pattern=banded, or drop bands")
            return
        bands = DEFAULT_BANDS if self.bands is None else whole(self.bands, "SVFT bands", "pattern=banded bands=2")
        if bands < 1:
            raise StudioError(f"SVFT bands must be at least 1, got {bands}: use --method-args pattern=banded "
                              f"bands=2 (bands=0 is pattern=plain)")
        object.__setattr__(self, "bands", bands)

    @property
    def width(self) -> int:
        """d: off-diagonals on each side of M (0 for plain)."""
        return 0 if self.pattern == "plain" else self.bands


@lru_cache(maxsize=64)
def _pattern(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of M's trained entries, in the order of ``m`` (see the module docstring)."""
    rows, cols = [torch.arange(n)], [torch.arange(n)]
    for o in range(1, min(d, n - 1) + 1):
        i = torch.arange(n - o)
        rows += [i, i + o]
        cols += [i + o, i]
    return torch.cat(rows), torch.cat(cols)


def count(cfg: Config, n: int) -> int:
    """Trained values on n singular vectors: n (plain), n (2d + 1) - d (d + 1) (banded, d < n)."""
    d = min(cfg.width, n - 1)
    return n * (2 * d + 1) - d * (d + 1)


def _state(cfg: Config, m: torch.Tensor, W0: torch.Tensor, h: bytes | None = None) -> dict:
    """m with the shared basis and the pattern. ``flip`` = s_i s_j per entry, s the canonical signs of the
    singular pairs (LoRA-XS's rule): U M Vh with M_ij s_i s_j is the delta on the canonical frame, without
    a signed copy of U and Vh."""
    U, S, Vh, h = cached_svd(W0, h)
    rows, cols = _pattern(S.numel(), cfg.width)
    signs = canonical_signs(U)
    return {"m": m, "basis_hash": hash_to_tensor(h), "U": U, "Vh": Vh, "rows": rows, "cols": cols,
            "flip": signs[rows] * signs[cols]}


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    return _state(cfg, torch.zeros(count(cfg, min(W0.shape))), W0)


def from_saved(cfg: Config, W0: torch.Tensor, tensors: dict, site: Site) -> dict:
    """Rebuild the bases from W0, refusing a base whose weight is not the one m was trained on."""
    h = same_base("SVFT", W0, tensors, site.path)
    return _state(cfg, tensors["m"].float(), W0, h)


def core(cfg: Config, state: dict) -> torch.Tensor:
    """M as a dense (n, n) matrix on the cached (unsigned) bases, U core Vh = dW (tests, the export's SVD)."""
    n = state["Vh"].shape[0]
    return state["m"].new_zeros(n, n).index_put((state["rows"], state["cols"]), state["m"] * state["flip"])


def factors(cfg: Config, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    m, Vh = state["m"], state["Vh"]
    if cfg.pattern == "plain":  # (a joint sign flip of a pair leaves u_i v_i^T as it is)
        return m[:, None] * Vh, state["U"]                                  # diag(m) Vh, U
    rows = (m * state["flip"])[:, None] * Vh.index_select(0, state["cols"])  # (nnz, in): M_ij v_j^T
    return Vh.new_zeros(Vh.shape).index_add(0, state["rows"], rows), state["U"]  # (n, in) M Vh, (out, n)


def svd(cfg: Config, state: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dW as an SVD: U, m, Vh for plain; (U P) diag(sigma) (Q^T Vh) from M's own n x n SVD for banded."""
    U, Vh = state["U"], state["Vh"]
    if cfg.pattern == "plain":
        return U, state["m"].detach(), Vh
    P, sigma, Qh = torch.linalg.svd(core(cfg, state).detach().double())
    return U @ P.float(), sigma.float(), Qh.float() @ Vh


def expected_shapes(cfg: Config, site: Site) -> dict:
    return {"m": (count(cfg, min(site.out_features, site.in_features)),), "basis_hash": (HASH_BYTES,)}
