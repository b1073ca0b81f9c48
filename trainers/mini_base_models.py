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


def build_unet(channels: tuple[int, ...] = (32, 64, 64)):
    from diffusers import UNet2DConditionModel

    # Attention only below the 16x16 level: CPU flash attention over 256 tokens with head
    # dim 8 took 55 % of a step; without it a step is 2.5x faster (measured, batch 32).
    n = len(channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 2) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 2) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=tuple(channels),
        down_block_types=down, up_block_types=up, layers_per_block=1, cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=8, transformer_layers_per_block=1)


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
