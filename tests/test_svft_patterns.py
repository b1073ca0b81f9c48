"""SVFT's random and top-k patterns (arXiv 2405.19597 section 3.1) against their definitions.

random: k distinct entries of M drawn from (seed, the layer's weight hash) by the documented SHAKE-256
rule, so a file reproduces its pattern from its config and basis_hash alone. top_k: the k entries of
largest |u_i . v_j| of a square W0 (non-square layers are skipped, as the paper says the pattern needs
u and v of one size). Both: M has exactly the pattern's non-zeros, the invariant suite holds, native
files reload exactly, plain-LoRA exports report the error they make.
"""

import hashlib
import inspect
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import studio.adapters as A
import studio.formats as SF
import test_adapter_invariants as suite
from builders import tiny_unet
from cli_helpers import one_error_line
from lm_helpers import pirate_jsonl, tiny_lm  # noqa: F401  (fixture)
from studio.adapters import common, registry, svft, svft_patterns
from studio.adapters.layer import base_matrix
from studio.cli import main
from studio.errors import StudioError
from test_svft_mora import _export_error_is_the_measured_one, _lm_run, _rel, _reload_is_exact, _train_mini, \
    canonical_frame


# == the patterns by hand ================================================================================
def hand_random(n: int, k: int, seed: int, key: bytes) -> list[int]:
    """The documented draw, in plain Python: SHAKE-256 of 'studio-svft-random/<seed>/<n>/' + the weight hash
    read as little-endian 64-bit words; the first k distinct words mod n^2, or, for k >= n^2 / 4, the k
    entries of smallest word (one word per entry). Returned as sorted flat indices i n + j."""
    total = n * n
    stream = hashlib.shake_256(f"studio-svft-random/{seed}/{n}/".encode() + key)
    if 4 * k >= total:
        data = stream.digest(8 * total)
        words = [int.from_bytes(data[8 * i:8 * i + 8], "little") for i in range(total)]
        return sorted(sorted(range(total), key=lambda i: (words[i], i))[:k])
    data, seen = stream.digest(8 * 64 * k), []
    for i in range(64 * k):
        value = int.from_bytes(data[8 * i:8 * i + 8], "little") % total
        if value not in seen:
            seen.append(value)
            if len(seen) == k:
                return sorted(seen)
    raise AssertionError("64 k draws gave fewer than k distinct entries")


def hand_top_k(W0: torch.Tensor, k: int) -> list[int]:
    """The k largest |u_i . v_j| of W0's own double-precision SVD, as sorted flat indices; asserts a gap
    after the k-th, so that the set is well defined."""
    U, S, Vh = torch.linalg.svd(W0.double(), full_matrices=False)
    alignment = (U.T @ Vh.T).abs().flatten()
    values, order = alignment.sort(descending=True)
    if k < values.numel():
        assert values[k - 1] - values[k] > 1e-9
    return sorted(order[:k].tolist())


def _flat(state: dict) -> list[int]:
    n = state["Vh"].shape[0]
    return (state["rows"] * n + state["cols"]).tolist()


def _hash(W0):
    return common.weight_hash(W0)


SQUARE = [(lambda: nn.Linear(12, 12), (5, 12)), (lambda: nn.Conv2d(10, 10, 1), (2, 10, 4, 4)),
          (lambda: nn.Conv2d(2, 18, 3, padding=1), (2, 2, 6, 6))]  # 2 * 3 * 3 = 18: a square 3x3 kernel matrix
SQUARE_IDS = ["linear", "conv1x1", "conv3x3"]
OPTIONS = [{"pattern": "random", "seed": 3}, {"pattern": "random", "k": 17}, {"pattern": "top_k"},
           {"pattern": "top_k", "k": 9}]
OPTION_IDS = ["random_bands2", "random_k17", "top_k_bands2", "top_k_k9"]


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("build,shape", SQUARE, ids=SQUARE_IDS)
def test_m_has_exactly_the_patterns_entries_and_the_delta_is_u_m_vt(build, shape, options):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(to_k=build()))
    W0 = model.to_k.weight.detach().flatten(1).clone()
    n = min(W0.shape)
    x = torch.randn(*shape)
    cfg = A.make_config("svft", options)
    k = options.get("k", n * 5 - 6)  # bands=2: n (2d + 1) - d (d + 1)
    want_entries = (hand_random(n, k, options.get("seed", 0), _hash(W0)) if options["pattern"] == "random"
                    else hand_top_k(W0, k))
    with torch.no_grad():
        before = model(x)
        A.attach(model, "s", "svft", cfg, ["to_k"])
        (m,) = A.trainable_parameters(model, "s")
        assert m.numel() == k == len(set(want_entries))
        assert torch.equal(m, torch.zeros_like(m)) and torch.equal(model(x), before)  # a no-op at init
        state = model.to_k.adapters["s"].state()
        assert _flat(state) == want_entries  # m holds the pattern's entries row by row
        m.copy_(torch.randn(m.shape))
        M = torch.zeros(n * n, dtype=torch.float64)
        M[want_entries] = m.double()
        M = M.view(n, n)
        U, S, Vh = canonical_frame(W0)
        got = A.delta_weights(model, "s")["to_k"]
        assert _rel(got, U @ M @ Vh) < 1e-5
        core = U.T @ got.double() @ Vh.T  # back in the singular frame: M, non-zero exactly on the pattern
        mask = torch.zeros(n * n, dtype=torch.bool)
        mask[want_entries] = True
        mask = mask.view(n, n)
        assert core[~mask].abs().max() < 1e-4 * core.abs().max() and core[mask].abs().min() > 1e-4  # fp32 frame
        assert torch.equal(svft.core(cfg, state) != 0, mask)


def test_random_patterns_are_uniform_distinct_and_differ_by_seed_and_layer():
    key, other = bytes(range(32)), bytes(32)
    for n, k in ((5, 4), (4, 6)):  # the stream branch and the one-key-per-entry branch (k >= n^2 / 4)
        counts = torch.zeros(n * n)
        for seed in range(2000):
            rows, cols = svft_patterns.random_entries(n, k, seed, key)
            flat = (rows * n + cols).tolist()
            assert flat == hand_random(n, k, seed, key) and len(set(flat)) == k
            counts[flat] += 1
        p = k / (n * n)
        expected, sd = 2000 * p, (2000 * p * (1 - p)) ** 0.5
        assert (counts - expected).abs().max() < 5 * sd, counts  # every entry about equally likely
    first = svft_patterns.random_entries(64, 300, 0, key)
    assert not torch.equal(first[1], svft_patterns.random_entries(64, 300, 1, key)[1])
    assert not torch.equal(first[1], svft_patterns.random_entries(64, 300, 0, other)[1])
    # k = n^2 is all of M
    rows, cols = svft_patterns.random_entries(3, 9, 0, key)
    assert (rows * 3 + cols).tolist() == list(range(9))


def test_top_k_breaks_ties_towards_the_lower_entry():
    """u_i . v_j = [i == j] for U = V = I: the n diagonal entries, then the zeros of the first row."""
    rows, cols = svft_patterns.top_k_entries(torch.eye(6), torch.eye(6), 8)
    assert (rows * 6 + cols).tolist() == [0, 1, 2, 7, 14, 21, 28, 35]


@pytest.mark.parametrize("options", [{"pattern": "random", "k": 40}, {"pattern": "top_k", "bands": 3}],
                         ids=["random", "top_k"])
def test_pattern_and_delta_do_not_depend_on_the_signs_the_svd_returns(monkeypatch, options):
    """Another LAPACK may flip singular pairs: the pattern (|u_i . v_j| for top_k) and a saved m's delta stay."""
    torch.manual_seed(2)
    W0 = torch.randn(16, 16)
    site = A.contract.Site("to_k", 16, 16)
    cfg = A.make_config("svft", options)
    saved = {"m": torch.randn(svft.count(cfg, 16)), "basis_hash": common.hash_to_tensor(_hash(W0))}
    state = svft.from_saved(cfg, W0, saved, site)
    down, up = svft.factors(cfg, state)
    want, entries = up @ down, _flat(state)
    flips = torch.tensor([1.0, -1, -1, 1, -1] + [1] * 10 + [-1])

    def flipped(W, h=None):
        U, S, Vh, h = common.cached_svd(W, h)
        return common.Basis(U * flips, S, Vh * flips[:, None], h)

    monkeypatch.setattr(svft, "cached_svd", flipped)
    state = svft.from_saved(cfg, W0, saved, site)
    down, up = svft.factors(cfg, state)
    assert _flat(state) == entries and _rel(up @ down, want) < 1e-6
    with pytest.raises(StudioError, match="basis hash mismatch"):
        svft.from_saved(cfg, W0 + 1e-3, saved, site)


def test_own_svd_is_the_svd_of_the_delta():
    torch.manual_seed(3)
    W0 = torch.randn(9, 9)
    for options in OPTIONS:
        cfg = A.make_config("svft", options)
        state = svft.init(cfg, W0, A.contract.Site("to_k", 9, 9))
        state["m"] = torch.randn(state["m"].shape)
        down, up = svft.factors(cfg, state)
        U, g, Vh = svft.svd(cfg, state)
        dW = (up @ down).double()
        assert _rel(U @ torch.diag(g) @ Vh, dW) < 1e-5
        assert torch.allclose(g.abs().sort(descending=True).values.double(), torch.linalg.svdvals(dW), atol=1e-5)


def test_trained_values_per_layer_on_the_tiny_unet_and_top_k_takes_square_layers_only():
    targets = list(A.targets.find_targets(tiny_unet(), "unet-full"))
    for options in ({"pattern": "random", "k": 20}, {"pattern": "random"}, {"pattern": "top_k", "k": 20},
                    {"pattern": "top_k"}):
        unet = tiny_unet()
        paths = A.attach(unet, "s", "svft", A.make_config("svft", options), "unet-full")
        shapes = {p: unet.get_submodule(p).pristine_weight.shape for p in paths}
        if options["pattern"] == "top_k":
            square = [p for p in targets if len(set(base_matrix(unet.get_submodule(p)).shape)) == 1]
            assert sorted(paths) == sorted(square) and 0 < len(square) < len(targets)
        else:
            assert sorted(paths) == sorted(targets) and any(unet.get_submodule(p).site.is_conv for p in paths)
        trained = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        assert trained == sum(options.get("k", min(s) * 5 - 6) for s in shapes.values())


# == the invariant suite on the new patterns ==============================================================
SQUARE_CASES = [  # the suite's layer cases with a square first layer (top_k skips the non-square second one)
    suite.LayerCase("linear", lambda: nn.Linear(12, 12), lambda: nn.Linear(12, 10), (4, 12)),
    suite.LayerCase("conv1d", lambda: suite._conv1d(12, 12), lambda: suite._conv1d(10, 12), (2, 3, 12)),
    suite.LayerCase("conv1x1", lambda: nn.Conv2d(6, 6, 1), lambda: nn.Conv2d(6, 5, 1), (2, 6, 5, 5)),
    suite.LayerCase("conv3x3_strided", lambda: nn.Conv2d(2, 18, 3, stride=2, padding=1),
                    lambda: nn.Conv2d(18, 5, 3, padding=(1, 2), dilation=(1, 2)), (2, 2, 9, 9)),
]
SQUARE_OF = {c.name: s for c, s in zip(suite.LAYERS, SQUARE_CASES)}


def _suite_calls():
    """(test name, case) for every method-parametrised test of the suite, with the cases it runs."""
    for name, fn in vars(suite).items():
        if name.startswith("test_") and "method" in inspect.signature(fn).parameters:
            marks = {m.args[0]: m.args[1] for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"}
            for case in marks.get("case", [None]):
                yield name, case


CALLS = list(_suite_calls())


@pytest.mark.parametrize("options", [{"pattern": "random", "seed": 1}, {"pattern": "top_k", "k": 20}],
                         ids=["random", "top_k"])
@pytest.mark.parametrize("name,case", CALLS, ids=[f"{n}-{c}" for n, c in CALLS])
def test_the_invariant_suite_holds_for_the_pattern(monkeypatch, options, name, case):
    """tests/test_adapter_invariants.py, unedited, with svft configured to the pattern. top_k runs on square
    twins of the suite's layer cases (the suite's non-square layers would leave it nothing to adapt)."""
    base = suite.config
    monkeypatch.setattr(suite, "config", lambda method, **extra: base(method, **({**options, **extra}
                                                                             if method == "svft" else extra)))
    if options["pattern"] == "top_k":
        monkeypatch.setattr(suite, "LAYERS", SQUARE_CASES)  # the tests that pick LAYERS[0] themselves
        case = SQUARE_OF.get(getattr(case, "name", None), case)
    fn = getattr(suite, name)
    fn(**({"case": case} if case is not None else {}), method="svft")


def test_the_suite_calls_cover_the_suite():
    assert len({n for n, _ in CALLS}) >= 10 and registry.METHODS["svft"].TRAITS.mergeable


# == files: the mini base, a tiny LM ======================================================================
@pytest.mark.parametrize("options", [["pattern=random", "seed=5"], ["pattern=top_k"]], ids=["random", "top_k"])
def test_mini_base_training_file_reproduces_its_pattern_and_export_reports_its_error(options, tmp_path, capsys):
    run = _train_mini(tmp_path, "--method", "svft", "--method-args", *options)
    path = run / "stripes.safetensors"
    af = SF.read(path)
    pattern = options[0].split("=")[1]
    assert af.parts["unet"].config == {"pattern": pattern, "bands": 2, "k": None,
                                       "seed": 5 if pattern == "random" else None}
    modules = af.parts["unet"].modules()
    assert modules and all(set(t) == {"m", "basis_hash"} for t in modules.values())  # no pattern tensors
    assert all(t["m"].abs().max() > 0 for t in modules.values())
    svft_patterns.random_entries.cache_clear()  # the reload derives the pattern afresh
    models, want = _reload_is_exact(path, tmp_path, "s")
    report = _export_error_is_the_measured_one(af, tmp_path, 4, models, want)
    print(f"SVFT {pattern} d=2 -> kohya rank 4: retained energy {report.energy:.4f}, "
          f"relative error {report.relative_error:.4f}")


def test_top_k_on_the_tiny_lm_adapts_its_square_projections(tiny_lm, tmp_path):
    part = _lm_run(tiny_lm, tmp_path, "--method", "svft", "--method-args", "pattern=top_k", "k=20")
    modules = part.modules()
    assert sorted({p.rsplit(".", 1)[1] for p in modules}) == ["o_proj", "q_proj"]  # 32 x 32; k, v, MLP are not
    assert len(modules) == 4 and all(t["m"].numel() == 20 and t["m"].abs().max() > 0 for t in modules.values())


def test_bad_pattern_options_are_one_error_line_and_write_nothing(tiny_lm, tmp_path, capsys):
    data, out = pirate_jsonl(tmp_path, 8), tmp_path / "run"
    args = ["train", "--task", "lm", str(data), "--base", str(tiny_lm), "--out", str(out), "--steps", "2",
            "--method", "svft", "--method-args"]
    line = one_error_line(capsys, args + ["pattern=sparse"])
    assert "unknown SVFT pattern 'sparse'" in line and "pattern=random" in line and "pattern=top_k" in line
    line = one_error_line(capsys, args + ["pattern=random", "k=300"])  # k_proj is 16 x 32: M has 256 entries
    assert "k=300 is more than the 256 entries of M for module" in line and "k=256 or less" in line
    assert "k must be at least 1" in one_error_line(capsys, args + ["pattern=top_k", "k=0"])
    assert "whole number" in one_error_line(capsys, args + ["pattern=random", "k=many"])
    assert "not both" in one_error_line(capsys, args + ["pattern=random", "k=5", "bands=1"])
    assert "seed=1 does not apply to pattern=top_k" in one_error_line(capsys, args + ["pattern=top_k", "seed=1"])
    assert "k=5 does not apply to pattern=banded" in one_error_line(capsys, args + ["pattern=banded", "k=5"])
    assert "seed must be >= 0" in one_error_line(capsys, args + ["pattern=random", "seed=-1"])
    line = one_error_line(capsys, args + ["pattern=top_k", "--targets", "lm-mlp"])  # no square layer
    assert "adapts none of the layers" in line
    assert not out.exists()


def test_the_banded_pattern_cache_is_on_the_cpu_whatever_the_default_device():
    """The cached band indices serve every later caller: a first call under a meta default device (the
    --check estimate) must not hand meta tensors to a real run."""
    from studio.adapters import svft_patterns

    svft_patterns.banded_entries.cache_clear()
    with torch.device("meta"):
        rows, cols = svft_patterns.banded_entries(7, 2)
    assert rows.device.type == cols.device.type == "cpu"
    assert torch.equal(rows, svft_patterns.banded_entries(7, 2)[0])
