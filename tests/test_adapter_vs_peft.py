"""Our numbers against PEFT's, on the same tiny UNet with the same factors."""

import copy

import pytest
import torch

import studio.adapters as A
from builders import CASES

peft = pytest.importorskip("peft")
UNET = CASES[1]
UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def _peft_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft_with_same_factors(rslora):
    ours = UNET.build().eval()
    theirs = copy.deepcopy(ours)
    A.attach(ours, "a", "lora", A.lora.Config(rank=4, alpha=8, rslora=rslora), "unet-attn")
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=UNET_MODULES), theirs)
    layers = _peft_layers(theirs)
    ours_layers = A.targets.adapted_layers(ours)
    assert set(layers) == set(ours_layers) and len(layers) == 32
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for path, layer in ours_layers.items():
            adapter = layer.adapters["a"]
            adapter.B.copy_(0.1 * torch.randn(adapter.B.shape, generator=g))
            layers[path].lora_A["default"].weight.copy_(adapter.A)
            layers[path].lora_B["default"].weight.copy_(adapter.B)
        ours_out, theirs_out = UNET.run(ours), UNET.run(theirs)
        A.set_enabled(ours, "a", False)
        assert (ours_out - UNET.run(ours)).abs().max() > 1e-3  # the adapter does something
    assert (ours_out - theirs_out).abs().max().item() <= 1e-6


def test_pissa_exact_matches_peft_factors_and_residual():
    ours = UNET.build().eval()
    theirs = copy.deepcopy(ours)
    cfg = A.pissa.Config(rank=4, alpha=8, svd="exact")
    A.attach(ours, "a", "pissa", cfg, "unet-attn")
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=UNET_MODULES), theirs)
    layers = _peft_layers(theirs)
    for path, layer in A.targets.adapted_layers(ours).items():
        state = layer.adapters["a"].state()
        peft_layer = layers[path]
        torch.testing.assert_close(state["A0"], peft_layer.lora_A["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(state["B0"], peft_layer.lora_B["default"].weight, atol=1e-5, rtol=0)
        residual = A.pissa.residual(cfg, state, layer.pristine_weight)
        torch.testing.assert_close(residual, peft_layer.base_layer.weight, atol=1e-5, rtol=0)


def test_pissa_fast_svd_is_a_no_op_and_finds_the_top_subspace():
    model = UNET.build().eval()
    with torch.no_grad():
        before = UNET.run(model)
    A.attach(model, "fast", "pissa", A.pissa.Config(rank=4, svd="fast"), "unet-attn")
    with torch.no_grad():
        assert (UNET.run(model) - before).abs().max() <= 1e-5
    # a trained weight has a decaying spectrum; there the randomized SVD matches the exact one
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    W = U[:, :48] @ torch.diag(0.7 ** torch.arange(48.0)) @ V.T  # (64, 48)
    site = A.contract.Site("w", 64, 48)
    exact = A.pissa.init(A.pissa.Config(rank=4, svd="exact"), W, site)
    top_exact = exact["B0"] @ exact["A0"]
    for niter, tolerance in [(4, 0.1), (16, 1e-3)]:  # q = r as in PEFT: error ~ (s5/s4)^(2 niter)
        fast = A.pissa.init(A.pissa.Config(rank=4, svd="fast", niter=niter), W, site)
        assert (fast["B0"] @ fast["A0"] - top_exact).norm() / top_exact.norm() < tolerance
