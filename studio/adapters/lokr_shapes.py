"""LoKr's split of a layer's weight, dW (a b, c d K) = kron(W1 (a, c), W2 (b, d K)), and how a file's splits are read.

A layer splits by LyCORIS's factor rule, from the config alone: (a, b) = ``factorization(out, factor)``
(swapped with ``unbalanced_factorization``), (c, d) = ``factorization(in_channels, factor)``. Files do not
always follow one rule: LyCORIS's ``module_algo_map`` gives each module class its own factor (SimpleTuner's
recommended LoKr config: 16 on attention, 8 on the feed-forward), and ai-toolkit writes W1 the larger half on
both sides (W1 (8, 8), W2 (4, 4) on a 32 x 32 weight), which no factor gives. So the config may carry
``module_shapes``, per-module W1 shapes resolved by module path like ``LowRankConfig.module_ranks``: a file's
config then reproduces every module's split, and a trained adapter (no record) keeps the one factor.

``choose_split`` reads a file's modules: the factor rule that gives the most of them (every one, for a file of
one factor: no record), and one ``module_shapes`` rule per other W1 shape, naming its modules' paths.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from functools import lru_cache
from typing import NamedTuple

from studio.adapters.contract import Site
from studio.errors import StudioError

# A model may hold a file's module one level deeper than the file names it (transformers 4's CLIP keeps its
# layers inside text_model): a recorded path matches with any leading module path
_ANY_PARENT = r"(?:.+\.)?"


@lru_cache(maxsize=4096)
def factorization(size: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m n = size: LyCORIS's rule (the most balanced divisor pair with m <= factor; a factor
    dividing the size gives (factor, size / factor), sorted; -1 = no bound)."""
    if factor > 0 and size % factor == 0:
        return min(factor, size // factor), max(factor, size // factor)
    limit = size if factor < 0 else factor
    m = 1
    for candidate in range(2, size + 1):  # divisors in ascending order, until the pair crosses or passes the bound
        if size % candidate:
            continue
        if candidate > limit:
            break
        m = candidate
        if candidate >= size // candidate:
            break
    return min(m, size // m), max(m, size // m)


def check_module_shapes(rules, label: str) -> tuple:
    """``rules`` as ((pattern, (a, c)), ...) of positive sizes and valid patterns (a file's JSON gives lists)."""
    out = []
    for rule in rules:
        try:
            pattern, (a, c) = rule
            re.compile(pattern)
            ok = isinstance(pattern, str) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                  for v in (a, c))
        except (TypeError, ValueError, re.error):
            ok = False
        if not ok:
            raise StudioError(f"{label} module_shapes must be ((module path pattern, (W1 rows, W1 columns)), ...) with "
                              f"positive sizes, got {rule!r}: the file is damaged, or leave module_shapes out")
        out.append((pattern, (a, c)))
    return tuple(out)


def split(cfg, site: Site) -> tuple[int, int, int, int]:
    """(a, b, c, d): W1 (a, c), W2 (b, d K) of the layer at ``site``: its ``module_shapes`` record, else the rule."""
    K = site.kernel[0] * site.kernel[1]
    channels = site.in_features // K
    for pattern, (a, c) in cfg.module_shapes:
        if re.fullmatch(pattern, site.path):
            if site.out_features % a or channels % c:
                raise StudioError(f"LoKr module_shapes gives module '{site.path}' W1 ({a}, {c}), which does not divide "
                                  f"its weight ({site.out_features} out, {channels} in channels): the adapter was made "
                                  f"for another base model")
            return a, site.out_features // a, c, channels // c
    a, b = factorization(site.out_features, cfg.factor)
    if cfg.unbalanced_factorization:
        a, b = b, a
    c, d = factorization(channels, cfg.factor)
    return a, b, c, d


# -- a file's splits ---------------------------------------------------------------------------------
class Module(NamedTuple):
    path: str
    t: dict    # canonical tensors: w1 (a, .), w1_b (., c), w2 (b, .), w2_b (., d K)
    a: int
    b: int
    c: int
    d: int
    kernel: tuple

    @property
    def conv(self) -> bool:
        return self.kernel != (1, 1)

    @property
    def site(self) -> Site:
        return Site(self.path, self.a * self.b, self.c * self.d * self.kernel[0] * self.kernel[1], self.kernel)


def modules(entries: dict, kernels: dict) -> list[Module]:
    """A file's modules {path: (fields, canonical tensors)} with their splits, as the tensors show them."""
    out = []
    for path, (_, t) in entries.items():
        kernel = kernels.get(path) or (1, 1)
        q, K = t["w2_b"].shape[1], kernel[0] * kernel[1]
        if q % K:  # the name rule guessed a kernel the tensors cannot hold: attach checks against the layer
            kernel, K = (1, 1), 1
        out.append(Module(path, t, t["w1"].shape[0], t["w2"].shape[0], t["w1_b"].shape[1], q // K, kernel))
    return out


def fits(shape: tuple[int, int, int, int], factor: int, unbalanced: bool) -> bool:
    """Whether the factor rule splits a weight as (a, b, c, d) = ``shape``."""
    a, b, c, d = shape
    m, n = factorization(a * b, factor)
    return ((n, m) if unbalanced else (m, n)) == (a, b) and factorization(c * d, factor) == (c, d)


def choose_split(mods: list[Module]) -> tuple[int, bool, tuple]:
    """(factor, unbalanced_factorization, module_shapes) giving every module its split (see the module docstring)."""
    counts = Counter((m.a, m.b, m.c, m.d) for m in mods)  # (a handful of distinct splits, however many modules)
    small = max(max(m.a, m.c) for m in mods)
    candidates = [-1] + sorted(set(range(1, small + 1)) | {v for shape in counts for v in shape})
    # the first choice (most balanced, then the smallest factor) among those covering the most modules
    factor, unbalanced = max(((f, u) for f in candidates for u in (False, True)),
                             key=lambda choice: sum(n for shape, n in counts.items() if fits(shape, *choice)))
    others = defaultdict(list)
    for m in mods:
        if not fits((m.a, m.b, m.c, m.d), factor, unbalanced):
            others[(m.a, m.c)].append(m.path)
    return factor, unbalanced, tuple((paths_rule(paths), w1) for w1, paths in sorted(others.items()))


def paths_rule(paths) -> str:
    """One pattern that fullmatches exactly these module paths (under any parent module)."""
    return _ANY_PARENT + "(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")"


# -- modules a file stored in another kind (LyCORIS presets, formats/lycoris.py) ----------------------
STORED_AS = ("LoCon",)
"""Kinds (LyCORIS names) a LoKr or LoHa module of an imported file can be written back as, exactly: LoCon
(a plain LoRA)."""


def check_stored_kinds(rules, label: str) -> tuple:
    """``rules`` as ((pattern, kind), ...) with valid patterns and kinds of ``STORED_AS``."""
    out = []
    for rule in rules:
        try:
            pattern, kind = rule
            re.compile(pattern)
            ok = isinstance(pattern, str) and kind in STORED_AS
        except (TypeError, ValueError, re.error):
            ok = False
        if not ok:
            raise StudioError(f"{label} stored_kinds must be ((module path pattern, 'LoCon'), ...), got {rule!r}: the "
                              f"file is damaged, or leave stored_kinds out")
        out.append((pattern, kind))
    return tuple(out)


def stored_kind(cfg, path: str) -> str | None:
    """The kind the file stored module ``path`` as, when it was another than the config's method."""
    return next((kind for pattern, kind in cfg.stored_kinds if path and re.fullmatch(pattern, path)), None)


# -- what LyCORIS's own loader rebuilds ---------------------------------------------------------------
def lycoris_rebuilds(a: int, b: int, c: int, d: int, kernel: tuple, full: tuple[bool, bool]) -> bool:
    """Whether LyCORIS's loader (``LokrModule.make_module_from_state_dict``) rebuilds a stored W1 (a, c) x W2
    (b, d K) (``full``: which halves are stored whole). It infers one factor from the stored shapes and builds
    the module from ``factorization(out, f)`` / ``factorization(in_channels, f)``, always sorted, then copies
    the tensors in: a split no factor gives (W1 the larger half, ``unbalanced_factorization``, per-module
    records) fails to load there. The inference below is LyCORIS's, shape for shape (W2 stored 4-D when
    whole on a convolution, its right factor 2-D (r, d K) when factored)."""
    K = kernel[0] * kernel[1]
    w2 = ((b, d, *kernel) if K > 1 else (b, d)) if full[1] else (b, d * K)  # the stored W2 shape as LyCORIS reads it
    out, ins = a * b, c * w2[1]
    if (a, c) == (factorization(out)[0], factorization(ins)[0]):
        f = -1
    else:
        f = min(max(a, c), max(w2))
        for candidate in (max(a, c), max(w2)):
            if out % candidate == 0 and ins % candidate == 0 and candidate in (a, b) and candidate in (c, w2[1]):
                f = candidate
                break
    return factorization(a * b, f) == (a, b) and factorization(c * d, f) == (c, d)
