"""One real training step on SD1.5-shaped and SDXL-shaped bases (random weights, from configs).

The SDXL one keeps the real conditioning path: two text encoders (penultimate hidden states
concatenated), the pooled embedding of the second and the added time ids.
"""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.cli import main

ROOT = Path(__file__).resolve().parents[1]
SD15_SHAPED = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
)


def _tokenizer(folder: Path):
    from studio.shapes.tokenizer import load_tokenizer, write_tokenizer
    return load_tokenizer(write_tokenizer(folder, 16))


def _clip(tokenizer, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _save_pipeline(folder: Path, family: str) -> Path:
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from builders import TINY_SDXL_UNET, tiny_vae

    torch.manual_seed(0)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    tok = _tokenizer(folder / "_tok")
    if family == "sd15":
        pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=_clip(tok), tokenizer=tok,
                                       unet=UNet2DConditionModel(**SD15_SHAPED), scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        unet = UNet2DConditionModel(**dict(TINY_SDXL_UNET, sample_size=16))
        pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=_clip(tok), text_encoder_2=_clip(tok, True),
                                         tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler)
    out = folder / family
    pipe.save_pretrained(out)
    return out


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for png in sorted((ROOT / "sample_data" / "styles" / "outline").glob("*.png"))[:4]:
        shutil.copy(png, folder)
        shutil.copy(png.with_suffix(".txt"), folder)
    return folder


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_one_training_step_trains_unet_and_text_encoders(family, data, tmp_path):
    base = _save_pipeline(tmp_path, family)
    out = tmp_path / f"run-{family}"
    code = main(["train", str(data), "--base", str(base), "--out", str(out), "--steps", "2", "--batch-size", "2",
                 "--targets", "unet-attn,te-attn", "--sample-every", "0", "--set", "sample_steps=2",
                 "--set", f"cache_dir={tmp_path / 'cache'}", "--unet-lr", "1e-2"])
    assert code == 0
    from studio import formats
    af = formats.read(out / "data.safetensors")
    expected = {"unet", "te"} if family == "sd15" else {"unet", "te1", "te2"}
    assert set(af.parts) == expected and af.base in ("sd-custom", family)
    for part in af.parts.values():  # every component moved away from B = 0
        assert any(v.abs().max() > 0 for k, v in part.tensors.items() if k.endswith(".B"))
    kohya = load_file(str(out / "data.kohya.safetensors"))
    prefixes = {k.split("_")[1] for k in kohya if k.startswith("lora_")}
    assert prefixes == ({"unet", "te"} if family == "sd15" else {"unet", "te1", "te2"})
