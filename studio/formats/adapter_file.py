"""AdapterFile: one adapter in memory, whatever file it came from or goes to.

    AdapterFile(base="sd15",
                parts={"unet": Part("lora", {"rank": 4, "alpha": 4.0, ...}, {"<module path>.A": ..., ...}),
                       "te":   Part("lora", {...}, {...})},
                metadata={"ss_training_comment": "...", "modelspec.trigger_phrase": "...", ...})

A ``Part`` is exactly what the adapter core saves and loads for one model: the method, its config
fields and the canonical state dict (``ops.adapter_state_dict`` keys). Parts are per component
because a whole SD adapter spans several models (UNet, one or two text encoders), each of which
may carry its own rank. The native format stores this object exactly; the kohya and diffusers
formats are produced from it (``export.py``) and read back into it as plain LoRA parts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from studio.errors import StudioError
from studio.formats.names import FAMILIES, FAMILY_NAMES, TEXT_ENCODERS


@dataclass
class Part:
    """The adapter on one component model."""

    method: str
    """Adapter method: a key of ``studio.adapters.METHODS``."""
    config: dict
    """The method's Config fields (JSON-serialisable)."""
    tensors: dict[str, torch.Tensor]
    """Canonical state dict: ``<module path>.<tensor>`` -> tensor (text-encoder paths without ``text_model.``)."""

    def modules(self) -> dict[str, dict[str, torch.Tensor]]:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in self.tensors.items():
            path, _, tensor = key.rpartition(".")
            grouped.setdefault(path, {})[tensor] = value
        return grouped


@dataclass
class AdapterFile:
    base: str
    """Base-model family: 'sd15', 'sdxl', 'sd-custom' (SD architecture, other sizes) or 'lm'."""
    parts: dict[str, Part]
    """Component ('unet', 'te', 'te1', 'te2', 'lm') -> Part."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Descriptive header fields carried along (ss_*, modelspec.*, studio.*); never the layout keys."""
    source: dict = field(default_factory=dict)
    """How it was read: path, format, ranks and alphas as stored, dtype. Empty for in-memory adapters."""
    prompt: dict[str, torch.Tensor] = field(default_factory=dict)
    """Prompt-side tensors beside the layer parts (``studio.prompt``): a prefix's ``prefix.key`` /
    ``prefix.value`` (L, H_kv, P, d). A prefix-tuning file has these and no parts."""

    def __post_init__(self) -> None:
        if self.base not in FAMILIES:
            raise StudioError(f"unknown base family {self.base!r}: choose one of {', '.join(FAMILIES)}")
        if not self.parts and not self.prompt:
            raise StudioError("an adapter file needs at least one component with tensors")
        allowed = FAMILIES[self.base]
        stray = [c for c in self.parts if c not in allowed]
        if stray:
            raise StudioError(f"components {stray} do not belong to a {FAMILY_NAMES[self.base]} adapter "
                              f"(it has {', '.join(allowed)})")

    @property
    def methods(self) -> list[str]:
        return sorted({p.method for p in self.parts.values()})

    @property
    def method(self) -> str:
        """The method of every part ('lora', 'pissa', ...), or 'mixed'."""
        methods = self.methods
        return methods[0] if len(methods) == 1 else "mixed"

    @property
    def name(self) -> str:
        return self.metadata.get("ss_output_name") or self.metadata.get("modelspec.title") or "adapter"

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat canonical tensors: '<component>.<module path>.<tensor>'."""
        return {f"{c}.{k}": v for c, part in self.parts.items() for k, v in part.tensors.items()}

    def module_counts(self) -> dict[str, int]:
        return {c: len(p.modules()) for c, p in self.parts.items()}

    def replace(self, **changes) -> "AdapterFile":
        return dataclasses.replace(self, **changes)


# -- families --------------------------------------------------------------------------------
def _in_features(part: Part, suffix: str) -> int | None:
    from studio.adapters.contract import Site
    from studio.adapters.registry import get, make_config

    for path, tensors in part.modules().items():
        if path.endswith(suffix) and "A" in tensors:
            return int(tensors["A"].shape[-1])
        if path.endswith(suffix) and "z" in tensors:
            return None
        method = get(part.method)
        if path.endswith(suffix) and method.TRAITS.kind == "dense" and not method.TRAITS.needs_base:
            cfg = make_config(part.method, part.config)  # (LoHa, LoKr, full: the delta follows from the tensors)
            return int(method.delta_weight(cfg, method.from_saved(cfg, None, tensors, Site(path, 0, 0)), None).shape[1])
    return None


def guess_family(components: dict[str, Part], hint: str | None = None) -> str:
    """Family from components and shapes: cross-attention width 768 is SD1.5, 2048 is SDXL."""
    if hint in FAMILIES:
        return hint
    if "lm" in components:
        return "lm"
    if "te1" in components or "te2" in components:
        return "sdxl"
    unet = components.get("unet")
    width = _in_features(unet, "attn2.to_k") if unet is not None else None
    if width is None and "te" in components:
        width = _in_features(components["te"], "self_attn.q_proj")
    return {768: "sd15", 2048: "sdxl"}.get(width, "sd-custom")


def model_family(models: dict[str, nn.Module]) -> str:
    if "lm" in models:
        return "lm"
    if "te2" in models or "te1" in models:
        return "sdxl"
    unet = models.get("unet")
    width = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    return {768: "sd15", 2048: "sdxl"}.get(width, "sd-custom")


_ALIASES = {"text_encoder": "te", "text_encoder_2": "te2", "transformer": "lm", "model": "lm"}


def normalise_models(models: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Accept diffusers component names too: {'unet', 'text_encoder', 'text_encoder_2'}."""
    out = {}
    for key, model in models.items():
        if model is None:
            continue
        name = _ALIASES.get(key, key)
        if name not in ("unet", "lm") + TEXT_ENCODERS:
            raise StudioError(f"unknown model component {key!r}: use unet, te (SD1.5), te1 and te2 (SDXL) or lm")
        out[name] = model
    if "te2" in out and "te" in out:
        out["te1"] = out.pop("te")
    return out
