"""SVFT: singular vectors guided fine-tuning (Lingam et al. 2024, arXiv 2405.19597).

The full singular bases of the base weight stay frozen and a sparse n x n matrix between them
trains. In the studio's (out, in) layout, W0 = U diag(S) Vh (thin, fp32, the shared SVD cache):

    dW = U M Vh        U: (out, n)  Vh: (n, in)  n = min(out, in)  M: (n, n), non-zero only on a pattern

Patterns (``--method-args pattern=...``), as the paper defines them (``svft_patterns.py``):

    plain    M diagonal: n values (SVFT-P; the additive form of SVF's gains)
    banded   |i - j| <= d (``bands=d``, default 2): n (2d + 1) - d (d + 1) values (SVFT-B^d)
    random   k distinct entries drawn from ``seed`` (default 0) and the layer's weight hash (SVFT-R)
    top_k    the k entries of largest |u_i . v_j|; square layers only, the others are skipped (SVFT-T)

random and top_k take ``k=K`` entries per layer, or ``bands=d`` for the banded pattern's count
(the paper's R_d / T_d; default d = 2). The pattern is never stored: plain / banded follow from n,
random from the config's seed and the file's ``basis_hash``, top_k from W0, whose hash the file checks.

Init: the code draws m kaiming-normal behind a gate sigmoid(g), g = 0, so its M starts at 0.5 m,
not 0. The studio's contract is a no-op at init (attaching, resuming and mixing rely on it), so m
starts at 0 and there is no gate (one trained scalar on all of M: the reachable deltas are the same).
dL/dM_ij = u_i^T G X^T v_j is non-zero at M = 0, so training starts at once.

It runs as a low-rank pair, down = M Vh (n, in) and up = U (out, n), so no dense (out, in) weight
or its gradient is formed; M Vh is one gather of the pattern's rows of Vh and a scatter-add, O(nnz
in). The file holds m and the base weight's hash (as SVF); U, Vh are rebuilt from W0 on load
(``needs_base``). A banded, random or top-k M couples pairs i != j, so the sign LAPACK picks for
each singular pair matters: the frame is made canonical as LoRA-XS's (each u_i's largest entry
positive), and a base whose singular values repeat has no unique frame (m then reloads only on the
same SVD; likewise a top-k pattern whose k-th and (k+1)-th alignments tie). A
plain-LoRA export needs no new SVD of dW: M = P diag(sigma) Q^T (n x n, cheap) gives
dW = (U P) diag(sigma) (Q^T Vh), sorted and truncated at a rank / energy with the error reported.
The paper's limitation stays: U and Vh cost about twice W0 in fp32 memory (not counted by
``studio train --check``, which sees only the saved tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from studio.adapters import svft_patterns as patterns
from studio.adapters.common import HASH_BYTES, cached_svd, hash_to_tensor, same_base
from studio.adapters.contract import Site, Traits
from studio.adapters.lora_xs import canonical_signs
from studio.adapters.mixture import whole
from studio.errors import StudioError

NAME = "svft"
TRAITS = Traits(kind="low-rank", summary="SVFT, dW = U M V^T on the full singular bases of W0, M sparse "
                "(--method-args pattern=plain|banded|random|top_k bands=d k=K seed=S)", label="SVFT",
                lr={"image": 5e-3, "lm": 5e-2}, needs_base=True, has_rank=False, export="truncated",
                default_energy=0.99)
TRAINABLE = ("m",)
SAVED = ("m", "basis_hash")
PATTERNS = patterns.PATTERNS
DEFAULT_BANDS = 2
SIZED = tuple(p for p, options in patterns.OPTIONS.items() if "k" in options)
"""random, top_k: patterns whose size is free, k entries or the count of the banded pattern of width d."""
USAGE = "pattern=plain, pattern=banded bands=2, pattern=random k=64 seed=0 or pattern=top_k bands=2"


@dataclass(frozen=True)
class Config:
    """SVFT has no rank: its size is the pattern's on the n = min(out, in) singular vectors."""

    pattern: str = "plain"
    """plain: M diagonal; banded: |i - j| <= bands; random: k entries drawn from seed; top_k: the k best aligned."""
    bands: int | None = None
    """d: banded's off-diagonals per side; random / top_k: their size as SVFT-R_d / T_d, n (2d + 1) - d (d + 1).
    None = 2 (random / top_k: unless k is given)."""
    k: int | None = None
    """random / top_k: trained entries per layer (instead of bands)."""
    seed: int | None = None
    """random: the draw (None = 0); kept in the file's config, so the file reproduces its pattern."""

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise StudioError(f"unknown SVFT pattern {self.pattern!r}: use --method-args {USAGE}")
        given = [f for f in ("bands", "k", "seed") if getattr(self, f) is not None]
        allowed = patterns.OPTIONS[self.pattern]
        wrong = [f for f in given if f not in allowed]
        if wrong:
            takes = " / ".join(allowed) or "no options"
            raise StudioError(f"SVFT {wrong[0]}={getattr(self, wrong[0])} does not apply to pattern={self.pattern}, "
                              f"which takes {takes}: use --method-args {USAGE}")
        if self.bands is not None and self.k is not None:
            raise StudioError(f"SVFT takes bands (the banded count) or k (entries per layer), not both: drop "
                              f"bands={self.bands} or k={self.k}")
        for f in given:
            object.__setattr__(self, f, whole(getattr(self, f), f"SVFT {f}", f"pattern={self.pattern} {f}=2"))
        if self.pattern == "plain":
            return
        if self.k is None:
            object.__setattr__(self, "bands", DEFAULT_BANDS if self.bands is None else self.bands)
        if self.pattern == "random" and self.seed is None:
            object.__setattr__(self, "seed", 0)
        low = 1 if self.pattern == "banded" else 0
        if self.bands is not None and self.bands < low:
            raise StudioError(f"SVFT bands must be at least {low}, got {self.bands}: use --method-args "
                              f"pattern={self.pattern} bands=2" + (" (bands=0 is pattern=plain)" if low else ""))
        if self.k is not None and self.k < 1:
            raise StudioError(f"SVFT k must be at least 1, got {self.k}: use --method-args pattern={self.pattern} k=64")
        if self.seed is not None and self.seed < 0:
            raise StudioError(f"SVFT seed must be >= 0, got {self.seed}: use --method-args pattern=random seed=0")

    @property
    def width(self) -> int:
        """d: off-diagonals on each side of a plain (0) or banded M."""
        return self.bands if self.pattern == "banded" else 0


def count(cfg: Config, n: int) -> int:
    """Trained values on n singular vectors: n (plain), n (2d + 1) - d (d + 1) (banded, d < n), k or that count
    (random, top_k)."""
    if cfg.pattern in SIZED and cfg.k is not None:
        return cfg.k
    return patterns.banded_count(n, cfg.bands if cfg.pattern in SIZED else cfg.width)


def accepts(cfg: Config, site: Site) -> bool:
    """top_k ranks u_i . v_j, defined only when W0 is square (the paper); every pattern takes the rest."""
    return cfg.pattern != "top_k" or site.out_features == site.in_features


def _entries(cfg: Config, U: torch.Tensor, Vh: torch.Tensor, h: bytes, path: str):
    """(rows, cols) of the layer's pattern, in the order of ``m`` (``svft_patterns``)."""
    n = Vh.shape[0]
    if cfg.pattern not in SIZED:
        return patterns.banded_entries(n, cfg.width)
    k = count(cfg, n)
    if k > n * n:
        raise StudioError(f"SVFT k={k} is more than the {n * n} entries of M for module '{path}' "
                          f"(n = min(out, in) = {n}): use --method-args k={n * n} or less, or bands=d")
    if cfg.pattern == "random":
        return patterns.random_entries(n, k, cfg.seed, h)
    if U.shape[0] != Vh.shape[1]:
        raise StudioError(f"SVFT pattern=top_k needs a square weight, module '{path}' is {U.shape[0]} x "
                          f"{Vh.shape[1]}: the file is damaged, or use pattern=random")
    return patterns.top_k_entries(U, Vh, k)


def _state(cfg: Config, m: torch.Tensor, W0: torch.Tensor, path: str, h: bytes | None = None) -> dict:
    """m with the shared basis and the pattern. ``flip`` = s_i s_j per entry, s the canonical signs of the
    singular pairs (LoRA-XS's rule): U M Vh with M_ij s_i s_j is the delta on the canonical frame, without
    a signed copy of U and Vh."""
    U, S, Vh, h = cached_svd(W0, h)
    rows, cols = _entries(cfg, U, Vh, h, path)
    signs = canonical_signs(U)
    return {"m": m, "basis_hash": hash_to_tensor(h), "U": U, "Vh": Vh, "rows": rows, "cols": cols,
            "flip": signs[rows] * signs[cols]}


def init(cfg: Config, W0: torch.Tensor, site: Site, generator: torch.Generator | None = None) -> dict:
    return _state(cfg, torch.zeros(count(cfg, min(W0.shape))), W0, site.path)


def from_saved(cfg: Config, W0: torch.Tensor, tensors: dict, site: Site) -> dict:
    """Rebuild the bases (and the pattern) from W0, refusing a base whose weight is not the one m was trained on."""
    h = same_base("SVFT", W0, tensors, site.path)
    return _state(cfg, tensors["m"].float(), W0, site.path, h)
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
    """dW as an SVD: U, m, Vh for plain; (U P) diag(sigma) (Q^T Vh) from M's own n x n SVD otherwise."""
    U, Vh = state["U"], state["Vh"]
    if cfg.pattern == "plain":
        return U, state["m"].detach(), Vh
    P, sigma, Qh = torch.linalg.svd(core(cfg, state).detach().double())
    return U @ P.float(), sigma.float(), Qh.float() @ Vh


def expected_shapes(cfg: Config, site: Site) -> dict:
    return {"m": (count(cfg, min(site.out_features, site.in_features)),), "basis_hash": (HASH_BYTES,)}
