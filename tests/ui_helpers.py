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


def make_sd15_adapter(path: Path) -> Path:
    """A small LoRA shaped for SD1.5 (768-wide cross-attention): the mini base must refuse it."""
    from studio.formats import AdapterFile, Part

    g = torch.Generator().manual_seed(7)
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    tensors = {f"{module}.A": torch.randn(4, 768, generator=g), f"{module}.B": torch.randn(640, 4, generator=g)}
    af = AdapterFile("sd15", {"unet": Part("lora", {"rank": 4, "alpha": 4.0}, tensors)},
                     metadata={"modelspec.title": path.stem})
    path.parent.mkdir(parents=True, exist_ok=True)
    formats.save(af, path, "native", overwrite=True)
    return path


def make_library(root: Path) -> dict[str, Path]:
    """adapters/: a LoRA and an SVF adapter (different methods, with trigger words), a broken file
    and an SD1.5 adapter; returns their paths by role."""
    root.mkdir(parents=True, exist_ok=True)
    base = load_diffusion_base()
    paths = {"lora": make_adapter(root / "stripy.safetensors", "lora", 1, "stripy", base),
             "svf": make_adapter(root / "glow.safetensors", "svf", 2, "glowing", base),
             "sd15": make_sd15_adapter(root / "other" / "sd15-style.safetensors")}
    broken = root / "broken.safetensors"
    broken.write_bytes(b"this is not a safetensors file")
    paths["broken"] = broken
    return paths


# -- shared fixtures of the UI / generate tests (imported by the test modules) -----------------
import pytest  # noqa: E402

MINI = "mini-sd (embedded)"
PROMPT = "a red circle on a blue background"
EMPTY_SLOT = [None, 1.0, False, 1.0]


@pytest.fixture(scope="session")
def ui_library(tmp_path_factory) -> dict[str, Path]:
    return make_library(tmp_path_factory.mktemp("ui") / "adapters")


@pytest.fixture(scope="session")
def ui_app(ui_library, tmp_path_factory):
    """The studio UI launched on a free port (prevent_thread_lock), with its gradio_client."""
    from gradio_client import Client

    from studio.ui.launch import start

    root = ui_library["lora"].parent
    demo, url = start(root, tmp_path_factory.mktemp("ui") / "outputs", port=None, prevent_thread_lock=True)
    try:
        yield demo, url, Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    finally:
        demo.close()


def slots(*rows) -> list:
    """Flat slot values for /generate: rows of (key, weight) or (key, weight, te_weight)."""
    flat = []
    for row in rows:
        key, weight, *te = row
        flat += [key, weight, bool(te), te[0] if te else 1.0]
    for _ in range(4 - len(rows)):
        flat += EMPTY_SLOT
    return flat


def ui_generate(client, *rows, steps=6, seed=3, prompt=PROMPT, **extra):
    """One /generate call; returns (uint8 image, parameters text)."""
    import numpy as np
    from PIL import Image

    args = dict(width=0, height=0, count=1, cfg=4.0, sampler="dpmpp_2m") | extra
    gallery, parameters, _ = client.predict(MINI, prompt, "", seed, False, steps, args["cfg"], args["width"],
                                            args["height"], args["sampler"], args["count"], *slots(*rows),
                                            api_name="/generate")
    return np.asarray(Image.open(gallery[0]["image"]).convert("RGB")), parameters
