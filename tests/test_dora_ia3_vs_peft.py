"""DoRA and (IA)^3 against PEFT, and a LoCon 3x3 delta against F.conv2d by hand (fp32, 1e-5).

DoRA: ours and PEFT's ``LoraConfig(use_dora=True)`` get the same A, B (B moved away from zero)
and magnitude m; forward outputs and the gradients of A, B, m (PEFT: lora_A, lora_B,
lora_magnitude_vector) agree on a tiny MLP, the tiny UNet (attention, feed-forward, the 1x1
proj_in / proj_out and the 3x3 ResNet / strided down-sampler convolutions of ``unet-full``) and
tiny Llama. Merging agrees with PEFT's ``merge_and_unload``.

(IA)^3: ours and PEFT's ``IA3Config`` get the same (perturbed) vectors; logits and merged
weights agree on tiny Llama (with and without attention bias) and GPT-2 (Conv1D, biased c_attn).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import studio.adapters as A
from builders import CASES, TINY_LLAMA

peft = pytest.importorskip("peft")
MLP, UNET, LLAMA, GPT2 = CASES[0], CASES[1], CASES[3], CASES[4]
TOL = 1e-5


def _close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Equal to 1e-5 relative to the larger of 1 and the tensor's own scale (gradients reach ~10)."""
    ours, theirs = ours.detach().reshape(theirs.shape), theirs.detach()
    scale = max(1.0, theirs.abs().max().item())
    err = (ours - theirs).abs().max().item()
    assert err <= TOL * scale, f"{what}: max error {err:.3g} at scale {scale:.3g}"


def _loss(out: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient differs per output element (a plain sum would hide sign errors)."""
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(11))
    return (out * weights).sum()


# -- DoRA ----------------------------------------------------------------------------------------
DORA_CASES = {
    "mlp": (MLP, MLP.targets),
    "unet": (UNET, "unet-full"),   # attention, ff, 1x1 proj_in/out, 3x3 ResNet convs, strided down-sampler
    "llama": (LLAMA, LLAMA.targets),
}


def _dora_pair(case, targets, rank=4, alpha=8):
    torch.manual_seed(0)
    ours = case.build().eval()
    theirs = copy.deepcopy(ours)
    paths = A.attach(ours, "a", "dora", A.dora.Config(rank=rank, alpha=alpha), targets)
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=rank, lora_alpha=alpha, use_dora=True, lora_dropout=0.0, target_modules=paths), theirs)
    layers = A.targets.adapted_layers(ours)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for path, layer in layers.items():
            adapter = layer.adapters["a"]
            peft_layer = theirs.get_submodule(path)
            assert peft_layer.lora_magnitude_vector["default"].weight.numel() == adapter.m.numel()
            # PEFT's own init: m = ||W0|| per output row, the same as ours
            _close(adapter.m, peft_layer.lora_magnitude_vector["default"].weight.flatten(), f"{path} m at init")
            adapter.B.copy_(0.1 * torch.randn(adapter.B.shape, generator=g))
            adapter.m.mul_(1 + 0.1 * torch.randn(adapter.m.shape, generator=g))
            peft_layer.lora_A["default"].weight.copy_(adapter.A.view_as(peft_layer.lora_A["default"].weight))
            peft_layer.lora_B["default"].weight.copy_(adapter.B.view_as(peft_layer.lora_B["default"].weight))
            magnitude = peft_layer.lora_magnitude_vector["default"].weight
            magnitude.copy_(adapter.m.view_as(magnitude))
    return ours, theirs, layers


def _force(monkeypatch, path: str) -> None:
    """DoRA picks per layer and input between W' x and the factored output (a cost model); both must
    give PEFT's numbers, so each test runs every layer down one path."""
    monkeypatch.setattr(A.dora, "_weight_is_cheaper", lambda *args: path == "weight")


@pytest.mark.parametrize("path", ["weight", "factored"])
@pytest.mark.parametrize("name", DORA_CASES)
def test_dora_forward_and_gradients_match_peft(name, path, monkeypatch):
    _force(monkeypatch, path)
    case, targets = DORA_CASES[name]
    ours, theirs, layers = _dora_pair(case, targets)
    if name == "unet":  # every layer kind is in the comparison
        kernels = {tuple(layer.base.kernel_size) if layer.conv else "linear" for layer in layers.values()}
        strided = [p for p, layer in layers.items() if layer.conv and layer.base.stride != (1, 1)]
        assert kernels == {"linear", (1, 1), (3, 3)} and strided, (kernels, strided)
    ours_out, theirs_out = case.run(ours), case.run(theirs)
    _close(ours_out, theirs_out, "forward")
    with torch.no_grad():
        A.set_enabled(ours, "a", False)
        assert (case.run(ours) - ours_out).abs().max() > 1e-3  # the adapter does something
        A.set_enabled(ours, "a", True)
    _loss(ours_out).backward()
    _loss(theirs_out).backward()
    for path, layer in layers.items():
        adapter, peft_layer = layer.adapters["a"], theirs.get_submodule(path)
        for ours_t, theirs_t, what in ((adapter.A, peft_layer.lora_A["default"].weight, "A"),
                                       (adapter.B, peft_layer.lora_B["default"].weight, "B"),
                                       (adapter.m, peft_layer.lora_magnitude_vector["default"].weight, "m")):
            assert ours_t.grad is not None and theirs_t.grad is not None, f"{path}.{what} got no gradient"
            _close(ours_t.grad, theirs_t.grad, f"{path}.{what} gradient")


@pytest.mark.parametrize("name", DORA_CASES)
def test_dora_merge_matches_peft_merge_and_unload(name):
    case, targets = DORA_CASES[name]
    ours, theirs, layers = _dora_pair(case, targets)
    with torch.no_grad():
        unmerged = case.run(ours)
        A.merge(ours)
        theirs = theirs.merge_and_unload() if hasattr(theirs, "merge_and_unload") else _peft_merge(theirs)
        _close(case.run(ours), unmerged, "merged vs unmerged forward")
        _close(case.run(ours), case.run(theirs), "merged forward vs PEFT")
    for path, layer in layers.items():
        _close(layer.base.weight, theirs.get_submodule(path).weight, f"{path} merged weight")


@pytest.mark.parametrize("path", ["weight", "factored"])
@pytest.mark.parametrize("name", DORA_CASES)
def test_dora_user_weight_scales_the_delta_against_w0(name, path, monkeypatch):
    """Weight w runs W0 + w (W' - W0) (PEFT has no such weight): the fused forward folds w into its
    factors, so check it against the merged weight at the same w."""
    _force(monkeypatch, path)
    case, targets = DORA_CASES[name]
    ours, _, _ = _dora_pair(case, targets)
    with torch.no_grad():
        full = case.run(ours)
        A.set_weight(ours, "a", 0.6)
        partial = case.run(ours)
        A.set_enabled(ours, "a", False)
        bare = case.run(ours)
        A.set_enabled(ours, "a", True)
        A.merge(ours)
        merged = case.run(ours)
    assert (partial - bare).abs().max() > 1e-3 and (partial - full).abs().max() > 1e-3
    _close(partial, merged, "weight 0.6 unmerged vs merged")


def _peft_merge(model):
    """merge_and_unload for a model PEFT injected into (no PeftModel wrapper): merge each layer, unwrap it."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "base_layer") and hasattr(module, "merge"):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model


# -- (IA)^3 --------------------------------------------------------------------------------------
def _llama_with_bias():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, attention_bias=True))


IA3_CASES = {
    "llama": (LLAMA.build, LLAMA.run, ["k_proj", "v_proj", "down_proj"], ["down_proj"], 6),
    "llama-bias": (_llama_with_bias, LLAMA.run, ["k_proj", "v_proj", "down_proj"], ["down_proj"], 6),
    "gpt2": (GPT2.build, GPT2.run, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"], 4),
}


def _ia3_pair(name):
    build, run, target_modules, feedforward, count = IA3_CASES[name]
    torch.manual_seed(0)
    ours = build().eval()
    theirs = copy.deepcopy(ours)
    paths = A.attach(ours, "a", "ia3", A.ia3.Config(), "lm-attn,lm-mlp")
    theirs = peft.inject_adapter_in_model(
        peft.IA3Config(target_modules=target_modules, feedforward_modules=feedforward), theirs)
    peft_layers = {n: m for n, m in theirs.named_modules() if hasattr(m, "ia3_l") and "default" in m.ia3_l}
    assert set(paths) == set(peft_layers) and len(paths) == count  # the same layers, on the same side
    layers = A.targets.adapted_layers(ours)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for path, layer in layers.items():
            adapter, peft_layer = layer.adapters["a"], peft_layers[path]
            assert bool(adapter.input_side) == peft_layer.is_feedforward, path
            adapter.l.copy_(1 + 0.2 * torch.randn(adapter.l.shape, generator=g))
            peft_layer.ia3_l["default"].copy_(adapter.l.view_as(peft_layer.ia3_l["default"]))
    return ours, theirs, layers, run


@pytest.mark.parametrize("name", IA3_CASES)
def test_ia3_logits_and_gradients_match_peft(name):
    ours, theirs, layers, run = _ia3_pair(name)
    if name != "llama":  # a biased output-side layer: the bias is scaled too
        assert any(layer.base.bias is not None and not layer.adapters["a"].input_side for layer in layers.values())
    ours_out, theirs_out = run(ours), run(theirs)
    _close(ours_out, theirs_out, "logits")
    with torch.no_grad():
        A.set_enabled(ours, "a", False)
        assert (run(ours) - ours_out).abs().max() > 1e-3
        A.set_enabled(ours, "a", True)
    _loss(ours_out).backward()
    _loss(theirs_out).backward()
    for path, layer in layers.items():
        theirs_l = theirs.get_submodule(path).ia3_l["default"]
        _close(layer.adapters["a"].l.grad, theirs_l.grad, f"{path}.l gradient")


@pytest.mark.parametrize("name", IA3_CASES)
def test_ia3_merge_matches_peft(name):
    ours, theirs, layers, run = _ia3_pair(name)
    with torch.no_grad():
        unmerged = run(ours)
        A.merge(ours)
        theirs = _peft_merge(theirs)
        _close(run(ours), unmerged, "merged vs unmerged logits")
        _close(run(ours), run(theirs), "merged logits vs PEFT")
    for path, layer in layers.items():
        merged = theirs.get_submodule(path)
        _close(layer.base.weight, merged.weight, f"{path} merged weight")
        if merged.bias is not None:
            _close(layer.base.bias, merged.bias, f"{path} merged bias")


# -- LoCon: a low-rank delta on a k x k convolution ---------------------------------------------
@pytest.mark.parametrize("geometry", [dict(stride=2, padding=1), dict(stride=1, padding=2, dilation=2),
                                      dict(stride=(2, 1), padding=(0, 1))])
@pytest.mark.parametrize("cfg, rank, scale", [(A.lora.Config(rank=4, alpha=8), 4, 2.0),
                                              (A.lora.Config(rank=4, alpha=8, conv_rank=3, conv_alpha=1.5), 3, 0.5)])
def test_locon_3x3_delta_is_the_dense_kernel_convolution(geometry, cfg, rank, scale):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 10, 3, **geometry))
    A.attach(model, "a", "lora", cfg, ["0"])
    layer = model[0]
    adapter = layer.adapters["a"]
    assert adapter.A.shape == (rank, 6, 3, 3) and adapter.B.shape == (10, rank)  # LoCon's layout
    with torch.no_grad():
        adapter.B.copy_(torch.randn(adapter.B.shape, generator=torch.Generator().manual_seed(1)))
        x = torch.randn(2, 6, 11, 9, generator=torch.Generator().manual_seed(2))
        dW = scale * adapter.B @ adapter.A.flatten(1)                  # (out, in * 3 * 3)
        expected = F.conv2d(x, dW.view(10, 6, 3, 3), None, **geometry)
        got = model(x) - layer.base(x)
    assert expected.abs().max() > 0.1
    _close(got, expected, "LoCon delta")
    with torch.no_grad():  # and the merged kernel is W0 + dW
        A.merge(model)
        _close(layer.base(x) - F.conv2d(x, layer._w0, layer.base.bias, **geometry), expected, "merged LoCon delta")
