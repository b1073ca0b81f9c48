"""The mini base's model builders and schedulers (split from mini_base.py to keep it short).

Sizes are the recipe's: see the docstring of ``trainers.mini_base`` for why each is what it is.
"""

from __future__ import annotations

def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        mid_block_add_attention=False)  # 16x16 attention is the slowest op on CPU; flat shapes need none


def _unet_layout(n: int) -> dict:
    """Block types and heads for ``n`` levels: attention at every level but the lowest, like SD1.5.

    The first shipped base (steps 0-4956) had attention only below the 16x16 level, for speed;
    style adapters then had no layer at the resolution where textures live (stripes reached a
    0.5-0.7 detector rate at most). Two heads of 16 dims at 16x16 cost ~1.4x per training step
    and ~1.2x per image (measured, batch 4 / CFG batch 2).
    """
    return {"down_block_types": ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            "attention_head_dim": (2,) + (8,) * (n - 1)}


def build_unet(channels: tuple[int, ...] = (32, 64, 64)):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=tuple(channels),
        layers_per_block=1, cross_attention_dim=64, norm_num_groups=8, transformer_layers_per_block=1,
        **_unet_layout(len(channels)))


def grow_unet(unet):
    """``unet`` in the current layout if it is an older one, else None.

    Every tensor of the old model is kept; each added Transformer2DModel starts with a zero
    ``proj_out``, so it adds nothing and the grown model computes exactly what the old one did.
    """
    import torch
    from diffusers import UNet2DConditionModel

    layout = _unet_layout(len(unet.config.block_out_channels))
    if tuple(unet.config.down_block_types) == layout["down_block_types"]:
        return None
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")} | layout
    grown = UNet2DConditionModel.from_config(config)
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or not all(".attentions." in k for k in missing):
        raise ValueError(f"cannot grow this UNet: unexpected {unexpected[:3]}, missing {missing[:3]}")
    added = sorted({k.split(".transformer_blocks.")[0].rsplit(".", 2)[0] for k in missing if "proj_out" in k})
    with torch.no_grad():
        for name in added:
            grown.get_submodule(name).proj_out.weight.zero_()
            grown.get_submodule(name).proj_out.bias.zero_()
    return grown


def build_text_encoder(tokenizer, max_length: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    bos = tokenizer.convert_tokens_to_ids(tokenizer.bos_token)
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, projection_dim=64,
                         max_position_embeddings=max_length, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos)
    return CLIPTextModel(cfg)


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon",
                         clip_sample=False, steps_offset=1)


def inference_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(train_scheduler().config)


def images_to_tensor(images):
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0
