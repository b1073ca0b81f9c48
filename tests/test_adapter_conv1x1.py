"""The DESIGN.md invariants on 1x1 convolutions: SD1.5's proj_in / proj_out (use_linear_projection False).

A 1x1 Conv2d is a Linear over the channel dimension: W0 = weight.view(out, in). Every method must
be a no-op at init, run a delta equal to the convolution with the merged weight, merge / unmerge
bit-exactly and survive a state-dict round trip, exactly as on Linear layers.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import studio.adapters as A
from builders import _unet_run, tiny_unet
from studio.adapters.layer import AdaptedLinear

# the low-rank kind's conv path; every method on every layer kind is in test_adapter_invariants.py
METHODS = [m for m, module in A.METHODS.items() if module.TRAITS.kind == "low-rank"]
CFG = {m: A.config_from_options(m, {"rank": 4, "alpha": 8.0}) for m in METHODS}
PROJ = ["proj_in", "proj_out"]
TARGETS = {"proj": PROJ, "proj+attn": PROJ + ["unet-attn"]}


def perturb(model, name, scale=0.05, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in A.trainable_parameters(model, name):
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = tiny_unet().eval()
    assert not model.config.use_linear_projection
    return model


def test_the_tiny_unet_has_1x1_proj_convs_and_presets_leave_them_alone(unet):
    found = A.find_targets(unet, PROJ)
    assert len(found) == 8 and all(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in found.values())
    assert not any(n.endswith(("proj_in", "proj_out")) for n in A.find_targets(unet, "unet-attn"))


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("method", METHODS)
def test_attach_at_init_changes_nothing(unet, method, targets):
    model = copy.deepcopy(unet)
    with torch.no_grad():
        before = _unet_run(model)
        paths = A.attach(model, "a", method, CFG[method], TARGETS[targets])
        after = _unet_run(model)
    assert sum(p.endswith(("proj_in", "proj_out")) for p in paths) == 8
    assert (after - before).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_delta_equals_the_conv_with_the_merged_weight(method, channels_last):
    torch.manual_seed(0)
    for out_c, in_c in [(24, 12), (12, 24)]:
        model = nn.Sequential(nn.Conv2d(in_c, out_c, 1))
        A.attach(model, "a", method, CFG[method], "0")
        perturb(model, "a")
        A.set_weight(model, "a", 0.7)
        layer = model[0]
        assert isinstance(layer, AdaptedLinear) and layer.pristine_weight.shape == (out_c, in_c)
        dW = layer.delta_weight("a")
        assert dW.abs().max() > 1e-3
        x = torch.randn(3, in_c, 5, 4)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        W = (layer.pristine_weight + 0.7 * dW).view(out_c, in_c, 1, 1)
        with torch.no_grad():
            torch.testing.assert_close(model(x), F.conv2d(x, W, layer.base.bias), atol=1e-5, rtol=1e-5)
        # the channel-last view of the same numbers is a Linear with the delta weight
        with torch.no_grad():
            delta = model(x) - layer.base(x)
            want = F.linear(x.movedim(1, -1), 0.7 * dW)
        torch.testing.assert_close(delta, want.movedim(-1, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_the_conv_with_the_merged_weight(method):
    """Training through the 1x1-conv path gives the gradients of conv(x, W0 + dW(params))."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 16, 1))
    A.attach(model, "a", method, CFG[method], "0")
    perturb(model, "a")
    layer, x, target = model[0], torch.randn(2, 12, 6, 6), torch.randn(2, 16, 6, 6)
    adapter = layer.adapters["a"]
    F.mse_loss(model(x), target).backward()
    ours = {k: p.grad.clone() for k, p in adapter.named_parameters()}
    for p in adapter.parameters():
        p.grad = None
    W = layer.pristine_weight + layer.delta_weight("a")
    F.mse_loss(F.conv2d(x, W.view(16, 12, 1, 1), layer.base.bias), target).backward()
    for k, p in adapter.named_parameters():
        torch.testing.assert_close(ours[k], p.grad, atol=1e-6, rtol=1e-4)
    assert layer.base.weight.grad is None and not layer.base.weight.requires_grad


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("method", METHODS)
def test_unmerged_equals_merged_and_unmerge_is_bit_exact(unet, method, targets):
    model = copy.deepcopy(unet)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    A.attach(model, "a", method, CFG[method], TARGETS[targets])
    perturb(model, "a", scale=0.02)
    A.set_weight(model, "a", 0.8)
    with torch.no_grad():
        unmerged = _unet_run(model)
        A.merge(model)
        merged = _unet_run(model)
    assert (unmerged - merged).abs().max().item() <= 1e-4 * max(1.0, unmerged.abs().max().item())
    layer = model.get_submodule("down_blocks.0.attentions.0.proj_in")
    assert layer.base.weight.shape == pristine["down_blocks.0.attentions.0.proj_in.weight"].shape
    assert not torch.equal(layer.base.weight, pristine["down_blocks.0.attentions.0.proj_in.weight"])
    A.unmerge(model)
    A.detach(model, "a")
    restored = model.state_dict()
    assert restored.keys() == pristine.keys()
    for key, value in pristine.items():
        assert torch.equal(restored[key], value), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_unmerge_bit_exact_in_half_precision(dtype):
    model = nn.Sequential(nn.Conv2d(16, 16, 1)).to(dtype)
    W0 = model[0].weight.detach().clone()
    A.attach(model, "a", "lora", A.lora.Config(rank=2), "0")
    perturb(model, "a", scale=0.3)
    x = torch.randn(2, 16, 3, 3, dtype=dtype)
    with torch.no_grad():
        live = model(x)
        A.merge(model)
        merged = model(x)
    assert not torch.equal(model[0].base.weight, W0)
    torch.testing.assert_close(live, merged, atol=2e-2, rtol=2e-2)
    A.unmerge(model)
    assert torch.equal(model[0].base.weight, W0)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip(unet, method):
    model, fresh = copy.deepcopy(unet), copy.deepcopy(unet)
    A.attach(model, "a", method, CFG[method], TARGETS["proj+attn"])
    perturb(model, "a")
    sd, conf = A.adapter_state_dict(model, "a"), A.adapter_config(model, "a")
    if {"A", "B"} <= set(A.METHODS[method].SAVED):  # LoRA-like factors are canonical 2-D, whatever the layer stores
        assert sd["down_blocks.0.attentions.0.proj_in.A"].shape == (4, 32)
        assert sd["up_blocks.1.attentions.0.proj_out.B"].shape == (32, 4)
    with torch.no_grad():
        expected = _unet_run(model)
    A.load_adapter(fresh, "b", conf["method"], conf["config"], sd)
    with torch.no_grad():
        got = _unet_run(fresh)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert A.adapter_state_dict(fresh, "b").keys() == sd.keys()


@pytest.mark.parametrize("pair", [("lora", "svf"), ("pissa", "milora")])
def test_two_adapters_mix_as_weighted_delta_sum(unet, pair):
    """Several live adapters run as one stacked pair of 1x1 convs (the slider path)."""
    model = copy.deepcopy(unet)
    for name, method in zip(("one", "two"), pair):
        A.attach(model, name, method, CFG[method], PROJ)
        perturb(model, name, scale=0.03, seed=len(name))
    A.set_weight(model, "one", 0.7)
    A.set_weight(model, "two", -0.3)
    d1, d2 = A.delta_weights(model, "one"), A.delta_weights(model, "two")
    W0 = {p: layer.pristine_weight.clone() for p, layer in A.targets.adapted_layers(model).items()}
    with torch.no_grad():
        live = _unet_run(model)
        live_again = _unet_run(model)  # cached stack
        A.merge(model)
        merged = _unet_run(model)
    assert torch.equal(live, live_again)
    for path, layer in A.targets.adapted_layers(model).items():
        expected = (W0[path] + 0.7 * d1[path] - 0.3 * d2[path]).view_as(layer.base.weight)
        torch.testing.assert_close(layer.base.weight, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(live, merged, atol=1e-4, rtol=1e-4)


def test_dropout_trains_on_the_conv_path():
    model = nn.Sequential(nn.Conv2d(8, 8, 1))
    A.attach(model, "a", "lora", A.lora.Config(rank=2, dropout=0.5), "0")
    perturb(model, "a")
    x = torch.randn(2, 8, 4, 4)
    model.train()
    torch.manual_seed(1)
    noisy = model(x)
    noisy.pow(2).mean().backward()
    assert all(p.grad is not None for p in A.trainable_parameters(model, "a"))
    model.eval()
    with torch.no_grad():
        clean = model(x)
    assert not torch.allclose(noisy, clean)


def test_grouped_or_reflect_padded_convs_are_refused():
    for conv in (nn.Conv2d(8, 8, 1, groups=2), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")):
        with pytest.raises(A.StudioError, match=r"'0' is a Conv2d.*grouped or non-zero-padded"):
            A.attach(nn.Sequential(conv), "a", "lora", A.lora.Config(rank=2), "0")
        with pytest.raises(A.StudioError, match="Conv2d with one group and zero padding"):
            AdaptedLinear(conv, "x")


def test_strided_and_padded_convs_are_adapted():
    for conv in (nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 1, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)):
        assert A.attach(nn.Sequential(conv), "a", "lora", A.lora.Config(rank=2), "0") == ["0"]


def test_regexes_reach_every_convolution(unet):
    paths = A.attach(copy.deepcopy(unet), "a", "lora", A.lora.Config(rank=2), r"down_blocks\.0\..*")
    assert "down_blocks.0.attentions.0.proj_in" in paths and "down_blocks.0.resnets.0.time_emb_proj" in paths
    assert any(p.endswith("conv1") for p in paths) and any(p.endswith("downsamplers.0.conv") for p in paths)
