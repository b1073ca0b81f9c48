"""mix.py: exact concatenation and compression with the energy it reports."""

import pytest
import torch

import studio.adapters as A
from studio.adapters import mix


def _pairs(seed=0, out=40, inp=30, ranks=(3, 5, 2)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)) for r in ranks]


def test_concat_is_exact_rank_concatenation():
    pairs, weights = _pairs(), [0.7, -0.3, 1.5]
    down, up = mix.concat(pairs, weights)
    assert down.shape == (10, 30) and up.shape == (40, 10)
    expected = mix.weighted_sum([u @ d for d, u in pairs], weights)
    torch.testing.assert_close(up @ down, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 4, 7, 10])
def test_compress_reports_energy_and_error_equals_dropped_energy(rank):
    pairs, weights = _pairs(), [0.7, -0.3, 1.5]
    down, up = mix.concat(pairs, weights)
    dense = up @ down
    result = mix.compress(down, up, rank=rank)
    assert result.down.shape == (rank, 30) and result.up.shape == (40, rank)
    S = torch.linalg.svdvals(dense.double())
    torch.testing.assert_close(result.singular_values.double(), S[:10], atol=1e-4, rtol=1e-4)
    dropped = (S[rank:] ** 2).sum()
    assert abs(result.energy - (1 - dropped / (S ** 2).sum()).item()) < 1e-5
    error = (result.up @ result.down - dense).double().norm()
    assert abs(error - dropped.sqrt()) <= 1e-4 * max(dropped.sqrt().item(), 1e-3) + 1e-4
    if rank == 10:
        torch.testing.assert_close(result.up @ result.down, dense, atol=1e-4, rtol=1e-4)


def test_compress_by_energy_threshold_keeps_enough():
    down, up = mix.concat(_pairs(1), [1.0, 1.0, 1.0])
    result = mix.compress(down, up, energy=0.9)
    k = result.down.shape[0]
    S2 = result.singular_values.double() ** 2
    assert result.energy >= 0.9 and (S2[: k - 1].sum() / S2.sum()) < 0.9


def test_compress_factors_share_magnitude_evenly():
    down, up = mix.concat(_pairs(2), [1.0, 1.0, 1.0])
    result = mix.compress(down, up, rank=4)
    torch.testing.assert_close(result.down.norm(dim=1), result.up.norm(dim=0), atol=1e-4, rtol=1e-4)


def test_svf_compression_by_sorting_matches_dense_svd():
    W0 = torch.randn(20, 16, generator=torch.Generator().manual_seed(4))
    state = A.svf.init(A.svf.Config(), W0, A.contract.Site("w", 20, 16))
    state["z"] = 1 + 0.3 * torch.randn(16, generator=torch.Generator().manual_seed(5))
    dense = A.svf.factors(A.svf.Config(), state)[1] @ state["Vh"]
    result = mix.compress_svf(state["U"], state["S"], state["Vh"], state["z"], rank=5)
    S = torch.linalg.svdvals(dense)
    dropped = (S[5:] ** 2).sum().sqrt()
    assert abs((result.up @ result.down - dense).norm() - dropped) <= 1e-4 * dropped + 1e-5
    generic = mix.compress(state["Vh"], A.svf.factors(A.svf.Config(), state)[1], rank=5)
    torch.testing.assert_close(result.up @ result.down, generic.up @ generic.down, atol=1e-4, rtol=1e-4)
    assert abs(result.energy - generic.energy) < 1e-5


def test_mixed_methods_compress_to_one_lora_reproducing_the_live_mix():
    model = torch.nn.Sequential(torch.nn.Linear(16, 24))
    for name, method in [("l", "lora"), ("p", "pissa"), ("s", "svf")]:
        A.attach(model, name, method, targets="0")
        with torch.no_grad():
            for p in A.trainable_parameters(model, name):
                p.add_(0.1 * torch.randn_like(p))
    weights = {"l": 0.8, "p": -0.5, "s": 0.3}
    for n, w in weights.items():
        A.set_weight(model, n, w)
    layer = model[0]
    down, up = mix.concat([layer.adapters[n].factors() for n in weights], list(weights.values()))
    full = mix.compress(down, up, energy=1.0)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer.base(x) + x @ (full.up @ full.down).T, model(x), atol=1e-4, rtol=1e-4)


def test_bad_compression_arguments_are_refused():
    down, up = mix.concat(_pairs(), [1, 1, 1])
    with pytest.raises(A.StudioError, match="exactly one of rank or energy"):
        mix.compress(down, up)
    with pytest.raises(A.StudioError, match="energy threshold"):
        mix.compress(down, up, energy=1.5)
