"""The invariants of DESIGN.md, for every method on every tiny model."""

import copy

import pytest
import torch
import torch.nn.functional as F

import studio.adapters as A
from builders import CASES

METHODS = list(A.METHODS)
CFG = {"lora": A.lora.Config(rank=4, alpha=8), "pissa": A.pissa.Config(rank=4, svd="exact"),
       "milora": A.milora.Config(rank=4), "svf": A.svf.Config()}


def perturb(model, name, scale=0.05, seed=7):
    """Move the trainable tensors away from their init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in A.trainable_parameters(model, name):
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("method", METHODS)
def test_attach_at_init_changes_nothing(case, method):
    model = case.build().eval()
    with torch.no_grad():
        before = case.run(model)
        A.attach(model, "a", method, CFG[method], case.targets)
        after = case.run(model)
    assert (after - before).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_forward_delta_equals_linear_with_delta_weight(method):
    torch.manual_seed(0)
    for shape in [(24, 12), (12, 24)]:
        model = torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0]))
        A.attach(model, "a", method, CFG[method], "0")
        perturb(model, "a")
        adapter = model[0].adapters["a"]
        x = torch.randn(5, shape[1])
        dW = adapter.delta_weight()
        assert dW.abs().max() > 1e-3
        torch.testing.assert_close(adapter(x), F.linear(x, dW), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter(x), A.METHODS[method].forward_delta(adapter.cfg, adapter.state(), x))


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("method", METHODS)
def test_unmerged_equals_merged_and_unmerge_is_bit_exact(case, method):
    model = case.build().eval()
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    A.attach(model, "a", method, CFG[method], case.targets)
    perturb(model, "a", scale=0.02)
    A.set_weight(model, "a", 0.8)
    with torch.no_grad():
        unmerged = case.run(model)
        A.merge(model)
        merged = case.run(model)
        A.merge(model)  # merging twice is a no-op
        merged_twice = case.run(model)
    assert (unmerged - merged).abs().max().item() <= 1e-4 * max(1.0, unmerged.abs().max().item())
    assert torch.equal(merged, merged_twice)
    A.unmerge(model)
    A.detach(model, "a")
    restored = model.state_dict()
    assert restored.keys() == pristine.keys()  # the original module tree is back
    for key, value in pristine.items():
        assert torch.equal(restored[key], value), key


def test_merge_unmerge_bit_exact_in_half_precision():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16)).half()
    W0 = model[0].weight.detach().clone()
    A.attach(model, "a", "lora", A.lora.Config(rank=2), "0")
    perturb(model, "a", scale=0.3)
    A.merge(model)
    assert not torch.equal(model[0].base.weight, W0)
    A.unmerge(model)
    assert torch.equal(model[0].base.weight, W0)


def test_non_finite_delta_is_refused_and_nothing_changes():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    A.attach(model, "ok", "lora", A.lora.Config(rank=2), ["0", "1"])
    A.attach(model, "bad", "lora", A.lora.Config(rank=2), ["1"])
    with torch.no_grad():
        model[1].adapters["bad"].B.fill_(float("nan"))
    before = [m.base.weight.clone() for m in model]
    with pytest.raises(A.StudioError, match="adapter 'bad' into module '1'.*NaN"):
        A.merge(model)
    assert all(torch.equal(m.base.weight, b) for m, b in zip(model, before))
    assert all(m.merged == [] for m in model)


@pytest.mark.parametrize("case", CASES[:3], ids=repr)
@pytest.mark.parametrize("pair", [("lora", "svf"), ("pissa", "lora"), ("svf", "milora"), ("milora", "pissa")])
def test_two_methods_mix_as_weighted_delta_sum(case, pair):
    model = case.build().eval()
    layers0 = {}
    for name, method in zip(("one", "two"), pair):
        A.attach(model, name, method, CFG[method], case.targets)
        perturb(model, name, scale=0.03, seed=len(name))
    A.set_weight(model, "one", 0.7)
    A.set_weight(model, "two", -0.3)
    d1, d2 = A.delta_weights(model, "one"), A.delta_weights(model, "two")
    for path, layer in A.targets.adapted_layers(model).items():
        layers0[path] = layer.pristine_weight.clone()
    with torch.no_grad():
        live = case.run(model)
        A.merge(model)
        merged_out = case.run(model)
    for path, layer in A.targets.adapted_layers(model).items():
        expected = layers0[path] + 0.7 * d1[path] - 0.3 * d2[path]
        torch.testing.assert_close(layer.base.weight, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(live, merged_out, atol=1e-4, rtol=1e-4)


def test_weight_changes_without_reattach_and_enable_disable():
    model = torch.nn.Sequential(torch.nn.Linear(12, 10)).eval()
    x = torch.randn(4, 12)
    base = model(x).detach()
    A.attach(model, "a", "lora", CFG["lora"], "0")
    perturb(model, "a")
    adapter = model[0].adapters["a"]
    with torch.no_grad():
        full = model(x)
        A.set_weight(model, "a", 0.5)
        half = model(x)
        A.set_enabled(model, "a", False)
        off = model(x)
    assert model[0].adapters["a"] is adapter  # same object: nothing was re-attached
    torch.testing.assert_close(half - base, 0.5 * (full - base), atol=1e-5, rtol=1e-4)
    assert torch.equal(off, base)


def test_svf_experts_mix_like_one_expert_with_mixed_z():
    model = CASES[0].build().eval()
    for name in ("x", "y"):
        A.attach(model, name, "svf", targets=["0", "2"])
        perturb(model, name, scale=0.2, seed=ord(name))
    A.set_weight(model, "x", 0.6)
    A.set_weight(model, "y", 0.5)
    with torch.no_grad():
        mixed = CASES[0].run(model)
    zs = {n: {p: l.adapters[n].z.detach().clone() for p, l in A.targets.adapted_layers(model).items()} for n in "xy"}
    A.detach(model, "x")
    A.detach(model, "y")
    A.attach(model, "m", "svf", targets=["0", "2"])
    with torch.no_grad():
        for path, layer in A.targets.adapted_layers(model).items():
            layer.adapters["m"].z.copy_(A.mix.mix_svf([zs["x"][path], zs["y"][path]], [0.6, 0.5]))
        single = CASES[0].run(model)
    torch.testing.assert_close(mixed, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_only_adapter_parameters(case, method):
    model = case.build()
    A.attach(model, "a", method, CFG[method], case.targets)
    perturb(model, "a", scale=0.01)
    case.run(model).float().pow(2).mean().backward()
    adapter_params = {id(p) for p in A.trainable_parameters(model, "a")}
    for name, p in model.named_parameters():
        if id(p) in adapter_params:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


@pytest.mark.parametrize("method", METHODS)
def test_thirty_step_fit_lowers_the_loss(method):
    torch.manual_seed(0)
    model = CASES[0].build()
    x = torch.randn(64, 12)
    target = torch.randn(64, 10)
    A.attach(model, "a", method, CFG[method], ["0", "2"])
    lr = 2e-1 if method == "svf" else 1e-2  # SVF moves only min(out, in) gains: bigger steps
    opt = torch.optim.AdamW(A.trainable_parameters(model, "a"), lr=lr)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=repr)
@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip(case, method):
    model = case.build().eval()
    fresh = copy.deepcopy(model)
    A.attach(model, "a", method, CFG[method], case.targets)
    perturb(model, "a")
    sd, conf = A.adapter_state_dict(model, "a"), A.adapter_config(model, "a")
    with torch.no_grad():
        expected = case.run(model)
    A.load_adapter(fresh, "b", conf["method"], conf["config"], sd)
    with torch.no_grad():
        got = case.run(fresh)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert A.adapter_state_dict(fresh, "b").keys() == sd.keys()
