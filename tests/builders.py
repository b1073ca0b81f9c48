"""Models for the tests, built from config dicts (nothing is downloaded).

Tiny models run real numbers; SD1.5 / SDXL-sized UNets are built on the meta device where only
module names and shapes matter.
"""

from __future__ import annotations

import torch
import torch.nn as nn

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77)
TINY_CLIP = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=16)
TINY_LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
TINY_GPT2 = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 10))


def tiny_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**TINY_UNET)


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(**TINY_CLIP))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(**TINY_GPT2))


def meta_unet(config: dict):
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def meta_clip(config: dict = CLIP_L):
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**config))


class Case:
    """A tiny model, its adapter targets, and a function from the model to a float output."""

    def __init__(self, name, build, targets, run):
        self.name, self.build, self.targets, self.run = name, build, targets, run

    def __repr__(self):
        return self.name


def _unet_run(model):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 5, 32, generator=g)
    return model(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample


def _ids(vocab=100, length=12):
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(2))


CASES = [
    Case("mlp", tiny_mlp, ["0", "2"], lambda m: m(torch.randn(4, 12, generator=torch.Generator().manual_seed(3)))),
    Case("unet", tiny_unet, "unet-attn", _unet_run),
    Case("clip", tiny_clip, "te-attn", lambda m: m(input_ids=_ids()).last_hidden_state),
    Case("llama", tiny_llama, "lm-attn,lm-mlp", lambda m: m(input_ids=_ids()).logits),
    Case("gpt2", tiny_gpt2, "lm-attn,lm-mlp", lambda m: m(input_ids=_ids()).logits),
]


# -- appended for the adapter-file tests (studio/formats) --------------------------------------
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
# SDXL's layout at toy width: two resnets per block (so SGM block numbers are SDXL's), the same
# down / up block types, 1-1-2 transformer layers, text_time conditioning (TE1 16 + TE2 16 = 32).
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=32,
    use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=64,
)
TINY_CLIP_16 = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=16)
TINY_CLIP_PROJ = dict(TINY_CLIP_16, projection_dim=16)


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**TINY_SDXL_UNET)


def tiny_sdxl_text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    return CLIPTextModel(CLIPTextConfig(**TINY_CLIP_16)), CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_PROJ))


def meta_clip_with_projection(config: dict = CLIP_BIGG):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    with torch.device("meta"):
        return CLIPTextModelWithProjection(CLIPTextConfig(**config))


def tiny_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=16)


def tiny_pipeline(unet, text_encoder, text_encoder_2=None):
    """A diffusers SD / SDXL pipeline around given models, without tokenizers (LoRA loading only)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False)
    if text_encoder_2 is None:
        return StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=None, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=None, tokenizer_2=None, unet=unet, scheduler=scheduler)
