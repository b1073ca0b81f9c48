"""Model-level operations on attached adapters: weights, enable, merge, state dicts.

The canonical key scheme of one adapter's state dict is ``<module path>.<tensor>``, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.A``, with the tensor names of
the method's ``SAVED`` tuple (LoRA: A, B; PiSSA / MiLoRA: A, B, A0, B0; SVF: z, basis_hash; ...).
Module paths are those of the original (unwrapped) model. ``adapter_config`` gives the method
and config that, with the state dict, rebuild the adapter through ``load_adapter``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from studio.adapters.targets import adapted_layers, attach, layers_of


def set_weight(model: nn.Module, name: str, weight: float) -> None:
    """Change the user weight of adapter ``name``; no re-attach, merged layers re-merge."""
    for layer in layers_of(model, name).values():
        layer.adapters[name].weight = float(weight)
        if name in layer.merged:
            layer.refresh()


def set_enabled(model: nn.Module, name: str, enabled: bool) -> None:
    for layer in layers_of(model, name).values():
        layer.adapters[name].enabled = bool(enabled)
        if name in layer.merged:
            layer.refresh()


def merge(model: nn.Module, names: list[str] | None = None) -> None:
    """Fold adapters into the base weights (fp32 math, cast back). Already merged: a no-op.

    A non-finite delta raises before anything is written to that layer; layers merged before
    the failure are unmerged again, so the model is left as it was.
    """
    layers = adapted_layers(model)
    done = []
    try:
        for layer in layers.values():
            before = list(layer.merged)
            layer.merge(list(layer.adapters) if names is None else names)
            done.append((layer, before))
    except Exception:
        for layer, before in done:
            layer.unmerge()
            layer.merge(before)
        raise


def unmerge(model: nn.Module) -> None:
    """Restore every pristine base weight bit-exactly."""
    for layer in adapted_layers(model).values():
        layer.unmerge()


def trainable_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    return [p for layer in layers_of(model, name).values() for p in layer.adapters[name].parameters()]


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in layers_of(model, name).items():
        for key, tensor in layer.adapters[name].saved_tensors().items():
            out[f"{path}.{key}"] = tensor.clone().cpu()
    return out


def adapter_config(model: nn.Module, name: str) -> dict:
    """{'method': ..., 'config': {...}} of an attached adapter (JSON-serialisable)."""
    adapter = next(iter(layers_of(model, name).values())).adapters[name]
    return {"method": adapter.method_name, "config": dataclasses.asdict(adapter.cfg)}


def split_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``<module path>.<tensor>`` keys -> {module path: {tensor: value}}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        path, _, tensor = key.rpartition(".")
        grouped.setdefault(path, {})[tensor] = value
    return grouped


def load_adapter(model: nn.Module, name: str, method: str, config: dict | object,
                 state_dict: dict[str, torch.Tensor], weight: float = 1.0) -> list[str]:
    """Attach adapter ``name`` from a canonical state dict (shapes and SVF base hashes checked)."""
    from studio.adapters.registry import get, make_config

    cfg = make_config(method, config) if isinstance(config, dict) else config
    if not isinstance(cfg, get(method).Config):
        cfg = make_config(method, dataclasses.asdict(cfg))
    return attach(model, name, method, cfg, weight=weight, saved=split_state_dict(state_dict))


def delta_weights(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """{module path: dW (out, in), fp32} of one adapter, without its user weight."""
    return {p: layer.delta_weight(name).detach() for p, layer in layers_of(model, name).items()}
