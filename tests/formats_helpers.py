"""Shared pieces of the adapter-file tests: trained tiny adapters and delta comparisons."""

from __future__ import annotations

import copy

import torch

import studio.adapters as A
from studio.adapters.layer import is_conv1x1
from studio.formats.names import canonical_te_path

TARGETS = {"unet": "unet-attn", "te": "te-attn", "te1": "te-attn", "te2": "te-attn", "lm": "lm-attn"}
METHOD_FIELDS = {"lora": {"rank": 2, "alpha": 3.0}, "pissa": {"rank": 2, "alpha": 3.0},
                 "milora": {"rank": 2, "alpha": 3.0}, "svf": {}}


def copies(models: dict) -> dict:
    return {c: copy.deepcopy(m) for c, m in models.items()}


def train(models: dict, method: str, name: str = "a", seed: int = 0, scale: float = 0.1, targets=None) -> dict:
    """Attach ``method`` on every component and move its trainable tensors off the no-op init."""
    g = torch.Generator().manual_seed(seed)
    cfg = A.make_config(method, METHOD_FIELDS[method])
    for component, model in models.items():
        A.attach(model, name, method, cfg, targets=(targets or TARGETS)[component])
        with torch.no_grad():
            for p in A.trainable_parameters(model, name):
                p.add_(scale * torch.randn(p.shape, generator=g))
    return models


def deltas(models: dict, name: str) -> dict[str, torch.Tensor]:
    """{'<component>.<canonical path>': dW} of one attached adapter."""
    out = {}
    for component, model in models.items():
        if name in A.adapter_names(model):
            for path, dW in A.delta_weights(model, name).items():
                out[f"{component}.{canonical_te_path(path)}"] = dW
    return out


def assert_deltas_close(got: dict, want: dict, rtol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    for key, dW in want.items():
        error = (got[key] - dW).norm() / max(dW.norm(), 1e-12)
        assert error <= rtol, f"{key}: relative error {error:.2e}"


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Live (out, in) weights of every Linear and 1x1 convolution, by canonical path (AdaptedLinear
    and PEFT wrappers see through)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or is_conv1x1(module):
            path = name[:-len(".base")] if name.endswith(".base") else name
            path = path[:-len(".base_layer")] if path.endswith(".base_layer") else path
            out[canonical_te_path(path)] = module.weight.detach().flatten(1).clone()
    return out


def tiny_sd() -> dict:
    """The tiny SD1.5-layout UNet and CLIP in eval mode, seeded (the LyCORIS-kind tests' base)."""
    from builders import tiny_clip, tiny_unet

    torch.manual_seed(0)
    return {"unet": tiny_unet().eval(), "te": tiny_clip().eval()}


def unet_sample(unet) -> torch.Tensor:
    """The UNet's output on one fixed batch (two timesteps, a 5-token context)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]),
                    encoder_hidden_states=torch.randn(2, 5, 32, generator=g)).sample
