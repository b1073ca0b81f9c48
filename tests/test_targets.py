"""Target presets find exactly the layers kohya / diffusers / PEFT adapt, at real model sizes."""

import pytest
import torch

import studio.adapters as A
from builders import CASES, SD15_UNET, SDXL_UNET, meta_clip, meta_unet


@pytest.mark.parametrize("config, count", [(SD15_UNET, 128), (SDXL_UNET, 560)], ids=["sd15", "sdxl"])
def test_unet_attn_counts(config, count):
    found = A.find_targets(meta_unet(config), "unet-attn")
    assert len(found) == count
    assert all(n.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0"} for n in found)


@pytest.mark.parametrize("config, blocks, transformers", [(SD15_UNET, 16, 16), (SDXL_UNET, 70, 11)], ids=["sd15", "sdxl"])
def test_unet_transformer_is_kohyas_default_set(config, blocks, transformers):
    """kohya's LoRA targets every Linear / 1x1 conv in a Transformer2DModel: per transformer block
    8 attention projections + 2 feed-forward layers, per Transformer2DModel proj_in and proj_out."""
    found = A.find_targets(meta_unet(config), "unet-transformer")
    assert len(found) == 10 * blocks + 2 * transformers
    assert set(A.find_targets(meta_unet(config), "unet-attn")) < set(found)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj" in found
    assert "up_blocks.1.attentions.2.proj_out" in found


def test_te_attn_count_on_clip_l():
    found = A.find_targets(meta_clip(), "te-attn")
    assert len(found) == 48
    assert "encoder.layers.0.self_attn.q_proj" in found


def test_lm_presets_on_llama_and_gpt2():
    llama, gpt2 = CASES[3].build(), CASES[4].build()
    assert sorted(A.find_targets(llama, "lm-attn"))[:4] == [
        "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj",
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert len(A.find_targets(llama, "lm-mlp")) == 6
    assert sorted(A.find_targets(gpt2, "lm-attn")) == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
        "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"]
    assert sorted(A.find_targets(gpt2, "lm-mlp")) == [
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]


def test_names_and_regexes():
    unet = CASES[1].build()
    assert len(A.find_targets(unet, ["to_q", "to_v"])) == 8 * 2
    assert len(A.find_targets(unet, r"down_blocks\..*attn2\.to_k")) == 1
    assert len(A.find_targets(unet, "unet-attn,te-attn")) == 32


def test_detach_restores_the_module_tree_and_gpt2_conv1d_is_wrapped():
    gpt2 = CASES[4].build()
    before = [(n, type(m)) for n, m in gpt2.named_modules()]
    paths = A.attach(gpt2, "a", "lora", A.lora.Config(rank=2), "lm-attn")
    assert type(gpt2.get_submodule(paths[0])).__name__ == "AdaptedLayer"
    assert gpt2.get_submodule(paths[0]).in_features == 32
    A.detach(gpt2, "a")
    assert [(n, type(m)) for n, m in gpt2.named_modules()] == before


def test_attach_on_meta_weights_only_needs_shapes():
    unet = meta_unet(SD15_UNET)
    paths = A.attach(unet, "a", "lora", A.lora.Config(rank=4), "unet-attn")
    assert len(paths) == 128 and A.adapter_names(unet) == ["a"]
    assert torch.device("meta") == next(iter(A.targets.adapted_layers(unet).values())).base.weight.device
