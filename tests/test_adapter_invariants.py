"""The invariants of DESIGN.md for every registered method, on every layer kind and tiny model.

Parametrised from ``registry.METHODS``: a new method is tested here without editing this file.
"""

import copy
import gc
import weakref
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import studio.adapters as A
from studio.adapters import common, registry
from builders import CASES

METHODS = list(registry.METHODS)
FIXED = [m for m in METHODS if registry.METHODS[m].TRAITS.mergeable]
"""Methods with a fixed weight delta; a functional (routed) method's delta depends on the input
(its own invariants: tests/test_mixture_core.py)."""


def config(method, **extra):
    """Each method's config from the trainers' generic options (rank 4, alpha 8, where it has them)."""
    return registry.config_from_options(method, {"rank": 4, "alpha": 8.0}, extra)


def perturb(model, name, scale=0.05, seed=7):
    """Move the trainable tensors away from their init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in A.trainable_parameters(model, name):
            size = p.abs().mean().item()  # relative to the tensor's scale (DoRA's m must stay positive)
            p.add_(scale * torch.randn(p.shape, generator=g) * (max(size, 0.1) if size > 0 else 1.0))


def _conv1d(nf, nx):
    from transformers.pytorch_utils import Conv1D
    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.1)
    return layer


class LayerCase:
    """Two layers of one kind named so every method adapts them ((IA)^3: an output-side key
    projection, then an input-side feed-forward projection), and an input."""

    def __init__(self, name, first, second, shape):
        self.name, self.first, self.second, self.shape = name, first, second, shape
        self.targets = ["to_k", "down_proj"]

    def build(self):
        torch.manual_seed(0)
        return nn.Sequential(OrderedDict(to_k=self.first(), act=nn.Tanh(), down_proj=self.second()))

    def run(self, model):
        return model(torch.randn(*self.shape, generator=torch.Generator().manual_seed(3)))

    def __repr__(self):
        return self.name


LAYERS = [
    LayerCase("linear", lambda: nn.Linear(12, 16), lambda: nn.Linear(16, 10), (4, 12)),
    LayerCase("conv1d", lambda: _conv1d(16, 12), lambda: _conv1d(10, 16), (2, 3, 12)),
    LayerCase("conv1x1", lambda: nn.Conv2d(6, 8, 1), lambda: nn.Conv2d(8, 5, 1), (2, 6, 5, 5)),
    LayerCase("conv3x3_strided", lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1),
              lambda: nn.Conv2d(8, 5, 3, padding=(1, 2), dilation=(1, 2)), (2, 6, 9, 9)),
]
UNET_FULL = type(CASES[1])("unet-full", CASES[1].build, "unet-full", CASES[1].run)
MODELS = [c for c in CASES if c.name != "mlp"] + [UNET_FULL]
ALL = LAYERS + MODELS


def _close(a, b, rel=1e-4):
    assert (a - b).abs().max().item() <= rel * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("case", ALL, ids=repr)
@pytest.mark.parametrize("method", METHODS)
def test_attach_at_init_changes_nothing(case, method):
    model = case.build().eval()
    with torch.no_grad():
        before = case.run(model)
        A.attach(model, "a", method, config(method), case.targets)
        after = case.run(model)
    assert (after - before).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ALL, ids=repr)
@pytest.mark.parametrize("method", METHODS)
def test_unmerged_equals_merged_and_unmerge_is_bit_exact(case, method):
    model = case.build().eval()
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    A.attach(model, "a", method, config(method), case.targets)
    perturb(model, "a", scale=0.05)
    A.set_weight(model, "a", 0.8)
    with torch.no_grad():
        unmerged = case.run(model)
        A.merge(model)
        merged = case.run(model)
        A.merge(model)  # merging twice is a no-op
        merged_twice = case.run(model)
    assert (unmerged - pristine_run(case, pristine)).abs().max() > 1e-4  # the adapter does something
    _close(unmerged, merged)
    assert torch.equal(merged, merged_twice)
    A.unmerge(model)
    A.detach(model, "a")
    restored = model.state_dict()
    assert restored.keys() == pristine.keys()  # the original module tree is back
    for key, value in pristine.items():
        assert torch.equal(restored[key], value), key


def pristine_run(case, state):
    model = case.build().eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return case.run(model)


@pytest.mark.parametrize("case", LAYERS, ids=repr)
@pytest.mark.parametrize("method", FIXED)
def test_layer_delta_equals_the_base_layer_with_the_merged_weight(case, method):
    """delta(x) == layer(x; W0 + w dW, b0 + w db) - layer(x; W0, b0), gradients included."""
    model = case.build()
    A.attach(model, "a", method, config(method), case.targets)
    perturb(model, "a")
    layer = model.to_k
    A.set_weight(model, "a", 0.7)
    x = torch.randn(*case.shape, generator=torch.Generator().manual_seed(5))
    got = layer(x)
    adapter = layer.adapters["a"]
    W = layer.pristine_weight + 0.7 * adapter.delta_weight(layer.pristine_weight)
    db = adapter.delta_bias(layer.pristine_bias)
    b = layer.pristine_bias + (0 if db is None else 0.7 * db)
    want = layer.apply_matrix(x, W) + layer.channels(b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for p in A.trainable_parameters(model, "a"):
        p.grad = None
    g_got = torch.autograd.grad(got.square().sum(), list(adapter.parameters()), allow_unused=True)
    g_want = torch.autograd.grad(want.square().sum(), list(adapter.parameters()), allow_unused=True)
    if adapter.method.TRAITS.kind == "dense" and "m" in adapter.method.TRAINABLE:
        return  # DoRA detaches its norm in the forward only (paper 4.3): gradients differ by design
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("case", ALL, ids=repr)
@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip(case, method):
    model = case.build().eval()
    fresh = copy.deepcopy(model)
    A.attach(model, "a", method, config(method), case.targets)
    perturb(model, "a")
    sd, conf = A.adapter_state_dict(model, "a"), A.adapter_config(model, "a")
    with torch.no_grad():
        expected = case.run(model)
    A.load_adapter(fresh, "b", conf["method"], conf["config"], sd)
    with torch.no_grad():
        got = case.run(fresh)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert A.adapter_state_dict(fresh, "b").keys() == sd.keys()


@pytest.mark.parametrize("case", LAYERS, ids=repr)
@pytest.mark.parametrize("method", METHODS)
def test_user_weight_is_linear(case, method):
    """Every method's delta scales with its weight: W0 + w (W' - W0) (ComfyUI's strength)."""
    model = case.build().eval()
    x = torch.randn(*case.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = model.to_k(x)
    A.attach(model, "a", method, config(method), case.targets)
    perturb(model, "a")
    outs = {}
    with torch.no_grad():
        for w in (1.0, -0.5, 2.0):
            A.set_weight(model, "a", w)
            outs[w] = model.to_k(x) - base
    assert outs[1.0].abs().max() > 1e-4
    _close(outs[-0.5], -0.5 * outs[1.0], 1e-5)
    _close(outs[2.0], 2.0 * outs[1.0], 1e-5)


@pytest.mark.parametrize("method", FIXED)
def test_two_methods_mix_as_weighted_delta_sum(method):
    case = MODELS[0]  # the tiny UNet: every method with a LoRA beside it
    model = case.build().eval()
    A.attach(model, "one", method, config(method), case.targets)
    A.attach(model, "two", "lora", config("lora"), case.targets)
    perturb(model, "one", seed=1)
    perturb(model, "two", seed=2)
    A.set_weight(model, "one", 0.7)
    A.set_weight(model, "two", -0.3)
    with torch.no_grad():
        live = case.run(model)
        A.merge(model)
        merged = case.run(model)
    _close(live, merged)
    d1, d2 = A.delta_weights(model, "one"), A.delta_weights(model, "two")
    for path, layer in A.targets.adapted_layers(model).items():
        expected = layer.pristine_weight + 0.7 * d1.get(path, 0) - 0.3 * d2.get(path, 0)
        torch.testing.assert_close(layer.base.weight.flatten(1) if layer.conv else layer.base.weight, expected,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", LAYERS, ids=repr)
@pytest.mark.parametrize("method", METHODS)
def test_a_live_adapter_beside_a_merged_one_sees_the_pristine_base(case, method):
    """Merging one adapter must not change what another, unmerged one adds (DoRA, (IA)^3 read the
    base output: they must get W0's, not the merged weight's)."""
    model = case.build().eval()
    A.attach(model, "one", method, config(method), case.targets)
    A.attach(model, "two", "lora", config("lora"), case.targets)
    perturb(model, "one", seed=1)
    perturb(model, "two", seed=2)
    with torch.no_grad():
        live = case.run(model)
        A.merge(model, ["two"])
        half = case.run(model)
        A.merge(model)
        merged = case.run(model)
    _close(half, live)
    _close(merged, live)


@pytest.mark.parametrize("case", [LAYERS[0], LAYERS[3]] + MODELS, ids=repr)
@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_only_adapter_parameters(case, method):
    model = case.build()
    A.attach(model, "a", method, config(method), case.targets)
    perturb(model, "a", scale=0.01)
    case.run(model).float().pow(2).mean().backward()
    adapter_params = {id(p) for p in A.trainable_parameters(model, "a")}
    reached = 0
    for name, p in model.named_parameters():
        if id(p) in adapter_params:
            reached += p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None and not p.requires_grad, name
    assert reached >= len(adapter_params) // 2  # (a GPT-2 layer's last value rows may see no gradient)


@pytest.mark.parametrize("method", METHODS)
def test_thirty_step_fit_lowers_the_loss(method):
    case = LAYERS[0]
    model = case.build()
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    target = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    A.attach(model, "a", method, config(method), case.targets)
    opt = torch.optim.AdamW(A.trainable_parameters(model, "a"), lr=registry.default_lr(method, "lm") * 5)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0], losses  # ((IA)^3 fits a random map with 26 values only)


@pytest.mark.parametrize("method", METHODS)
def test_an_eval_model_stays_deterministic(method):
    """Bug: adapters attached to an eval-mode model ran in training mode (dropout on)."""
    options = {"dropout": 0.5} if "dropout" in registry.option_names(method) else {}
    case = MODELS[0]
    model = case.build().eval()
    A.attach(model, "a", method, config(method, **options), case.targets)
    perturb(model, "a")
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(case.run(model), case.run(model))
    model.train()  # and a training model gets training adapters
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("case", [LAYERS[0], LAYERS[3]], ids=repr)
@pytest.mark.parametrize("method", METHODS)
def test_a_half_precision_base_runs_fp32_adapters(case, method):
    """fp16 bases (GPU inference) with fp32 adapters: the result is the fp32 computation, cast."""
    model = case.build().eval()
    A.attach(model, "a", method, config(method), case.targets)
    perturb(model, "a")
    with torch.no_grad():
        want = model.to_k(torch.randn(*case.shape, generator=torch.Generator().manual_seed(5)))
        model.to_k.base.half()
        got = model.to_k(torch.randn(*case.shape, generator=torch.Generator().manual_seed(5)).half())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_merge_unmerge_bit_exact_in_half_precision():
    model = nn.Sequential(nn.Linear(16, 16)).half()
    W0 = model[0].weight.detach().clone()
    A.attach(model, "a", "lora", A.lora.Config(rank=2), "0")
    perturb(model, "a", scale=0.3)
    A.merge(model)
    assert not torch.equal(model[0].base.weight, W0)
    A.unmerge(model)
    assert torch.equal(model[0].base.weight, W0)


def test_non_finite_delta_is_refused_and_nothing_changes():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    A.attach(model, "ok", "lora", A.lora.Config(rank=2), ["0", "1"])
    A.attach(model, "bad", "lora", A.lora.Config(rank=2), ["1"])
    with torch.no_grad():
        model[1].adapters["bad"].B.fill_(float("nan"))
    before = [m.base.weight.clone() for m in model]
    with pytest.raises(A.StudioError, match="adapter 'bad' into module '1'.*NaN"):
        A.merge(model)
    assert all(torch.equal(m.base.weight, b) for m, b in zip(model, before))
    assert all(m.merged == [] for m in model)


def test_weight_changes_without_reattach_and_enable_disable():
    model = nn.Sequential(nn.Linear(12, 10)).eval()
    x = torch.randn(4, 12)
    base = model(x).detach()
    A.attach(model, "a", "lora", config("lora"), "0")
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


def test_the_svd_cache_is_released_with_the_last_adapter():
    """Bug: the global SVD cache kept fp32 U, S, Vh of every weight after every SVF detach."""
    gc.collect()
    held = common.svd_cache_size()
    model = MODELS[0].build()
    A.attach(model, "x", "svf", targets="unet-attn")
    A.attach(model, "y", "svf", targets="unet-attn")
    layer = next(iter(A.targets.adapted_layers(model).values()))
    assert layer.adapters["x"].U is layer.adapters["y"].U  # one basis shared by both
    basis = weakref.ref(layer.adapters["x"].U)
    n = len(A.targets.adapted_layers(model))
    assert common.svd_cache_size() == held + n
    A.detach(model, "x")
    assert basis() is not None and common.svd_cache_size() == held + n  # still used by "y"
    A.detach(model, "y")
    del layer
    gc.collect()
    assert basis() is None
    assert common.svd_cache_size() == held
