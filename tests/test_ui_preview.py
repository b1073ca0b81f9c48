"""A trained adapter's library card: the trainer's last sample as ``<name>.preview.png``, and the
embedded base named "mini-sd" (not "a custom-size SD model")."""

from __future__ import annotations

import numpy as np
from PIL import Image

from studio.ui.library import Library


def test_the_trainer_writes_the_card_preview_and_the_card_names_the_base(tmp_path):
    from trainers.diffusion import train
    from trainers.diffusion_config import DiffusionTrainConfig

    out = tmp_path / "adapters" / "stripes-lora"
    cfg = DiffusionTrainConfig(data="sample_data/styles/stripes", out=str(out), steps=2, batch_size=1, rank=2,
                               sample_every=0, sample_steps=2, cache_latents=False, cache_text=False,
                               sample_prompts=["stripes, a red circle on a blue background"])
    train(cfg, say=lambda *_: None)
    preview = out / "stripes.preview.png"
    grid = np.asarray(Image.open(out / "samples" / "step-0000002.png").convert("RGB"))
    image = np.asarray(Image.open(preview).convert("RGB"))
    assert image.shape == (64, 64, 3)
    assert np.array_equal(image, grid[:64, :64])  # the first sample of the last grid, alone
    assert Image.open(preview).text["parameters"].startswith("stripes, a red circle on a blue background\nSeed: 0")
    cards = {c.key: c for c in Library(tmp_path / "adapters").scan()}
    card = cards["stripes-lora/stripes"]
    assert card.preview == preview
    assert card.family == "mini-sd" and card.base == "sd-custom"
    assert card.caption.startswith("stripes-lora/stripes · lora · rank 2 · mini-sd")
