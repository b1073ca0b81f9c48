"""Sample images rendered during training leave every module in the mode it had (issue 14).

Rendering runs in eval mode; afterwards the UNet, both SDXL text encoders and the VAE must be
back as they were *per submodule*: adapters train inside frozen models, so a parent's
``train(mode)`` (which sets all its children alike) is not a restore.
"""

import pytest
import torch

import studio.adapters as A
from studio.pipeline import Settings
from trainers.diffusion_outputs import render_samples


def _modes(pipe) -> dict[str, bool]:
    parts = {n: getattr(pipe, n, None) for n in ("unet", "text_encoder", "text_encoder_2", "vae")}
    return {f"{part}.{name}": m.training for part, model in parts.items() if model is not None
            for name, m in model.named_modules()}


def _mixed_modes(pipe) -> None:
    """A training run's state, made uneven on purpose: training models with frozen parts in eval,
    an eval model with a training part, a VAE left in training mode."""
    pipe.unet.train()
    A.attach(pipe.unet, "style", "lora", A.make_config("lora", {"rank": 2, "dropout": 0.1}), "unet-attn")
    pipe.unet.down_blocks[0].eval()
    pipe.unet.conv_in.eval()
    for te in [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else []):
        te.eval()
        next(m for n, m in te.named_modules() if n.endswith("self_attn")).train()
    pipe.vae.train()
    pipe.vae.decoder.eval()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_rendering_samples_restores_every_module_mode(family, tmp_path):
    if family == "sd15":
        from studio.models import load_diffusion_base

        pipe = load_diffusion_base(None).pipe
    else:
        from diffusers import StableDiffusionXLPipeline
        from test_train_bases import _save_pipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(_save_pipeline(tmp_path, "sdxl"))
    _mixed_modes(pipe)
    before = _modes(pipe)
    assert len(set(before.values())) == 2  # the test means something only with both modes present
    render_samples(pipe, [Settings(prompt="a red circle", steps=1, cfg=1.0)], tmp_path / "grid.png")
    assert (tmp_path / "grid.png").is_file()
    after = _modes(pipe)
    assert after == before, sorted(k for k in before if before[k] != after[k])[:5]


def test_rendering_runs_the_adapters_in_eval_mode(tmp_path, monkeypatch):
    """During the render every module is in eval (no adapter dropout in the samples)."""
    from studio.models import load_diffusion_base
    from trainers import diffusion_outputs

    pipe = load_diffusion_base(None).pipe
    _mixed_modes(pipe)
    seen = {}

    def fake_generate(p, settings):
        seen.update(_modes(p))
        return [torch.zeros(8, 8, 3, dtype=torch.uint8).numpy() for _ in settings]

    monkeypatch.setattr(diffusion_outputs, "generate", fake_generate)
    render_samples(pipe, [Settings(prompt="x", steps=1)], tmp_path / "grid.png")
    assert seen and not any(seen.values())
