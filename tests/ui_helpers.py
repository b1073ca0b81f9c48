"""Adapters for the mini base, built in seconds with the core + formats APIs (no training run)."""

from __future__ import annotations

from pathlib import Path

import torch

import studio.adapters as A
from studio import formats
from studio.formats.metadata import training_metadata
from studio.models import load_diffusion_base

FIELDS = {"lora": {"rank": 4, "alpha": 4.0}, "pissa": {"rank": 4, "alpha": 4.0}, "svf": {}}
SCALE = {"lora": 0.3, "pissa": 0.3, "svf": 0.5}


def make_adapter(path: Path, method: str, seed: int, trigger: str, base=None) -> Path:
    """A native adapter file on the mini base's UNet and text encoder, moved well off its no-op init."""
    base = base or load_diffusion_base()
    models = base.components
    g = torch.Generator().manual_seed(seed)
    name = f"tmp{seed}"
    cfg = A.make_config(method, FIELDS[method])
    for component, model in models.items():
        A.attach(model, name, method, cfg, targets="unet-attn" if component == "unet" else "te-attn")
        with torch.no_grad():
            for p in A.trainable_parameters(model, name):
                p.add_(SCALE[method] * torch.randn(p.shape, generator=g))
    meta = training_metadata(title=path.stem, output_name=path.stem, trigger_phrase=trigger, steps=1, seed=seed)
    af = formats.from_models(models, name, metadata=meta)
    for model in models.values():
        A.detach(model, name)
    formats.save(af, path, "native", overwrite=True)
    return path
