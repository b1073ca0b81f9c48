"""Key names and module counts on full-size SD1.5 / SDXL models built on the meta device.

The expected names are spelled out here from the documented templates
(../shared/reference/formats.md, section (a)), not computed by the code under test.
"""

import json

import pytest
import torch
from safetensors import safe_open

import studio.adapters as A
import studio.formats as F
from builders import CLIP_L, SD15_UNET, SDXL_UNET, meta_clip, meta_clip_with_projection, meta_unet
from formats_helpers import TARGETS
from studio.formats.names import canonical_te_path, resolve_path

N = ("attn1", "attn2")
O = ("to_q", "to_k", "to_v", "to_out_0")
P = ("q", "k", "v", "out")


def shape_adapter(models: dict, base: str, unet_targets: str = "unet-attn") -> F.AdapterFile:
    """A rank-1 LoRA with small random factors on every attention Linear, from shapes alone."""
    g = torch.Generator().manual_seed(0)
    parts = {}
    for component, model in models.items():
        tensors = {}
        for path, module in A.find_targets(model, unet_targets if component == "unet" else TARGETS[component]).items():
            out, inp = module.weight.shape[:2]
            tensors[f"{canonical_te_path(path)}.A"] = 0.1 * torch.randn(1, inp, generator=g)
            tensors[f"{canonical_te_path(path)}.B"] = 0.1 * torch.randn(out, 1, generator=g)
        parts[component] = F.Part("lora", {"rank": 1, "alpha": 1.0, "rslora": False, "dropout": 0.0}, tensors)
    return F.AdapterFile(base, parts)


def sd15_names():
    unet = [f"lora_unet_down_blocks_{b}_attentions_{a}_transformer_blocks_0_{n}_{o}"
            for b in range(3) for a in range(2) for n in N for o in O]
    unet += [f"lora_unet_mid_block_attentions_0_transformer_blocks_0_{n}_{o}" for n in N for o in O]
    unet += [f"lora_unet_up_blocks_{b}_attentions_{a}_transformer_blocks_0_{n}_{o}"
             for b in (1, 2, 3) for a in range(3) for n in N for o in O]
    te = [f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}_proj" for i in range(12) for p in P]
    return unet, te


def sdxl_names():
    def blocks(kind, ids, depth):
        return [f"lora_unet_{kind}_{i}_1_transformer_blocks_{t}_{n}_{o}"
                for i in ids for t in range(depth) for n in N for o in O]
    unet = (blocks("input_blocks", (4, 5), 2) + blocks("input_blocks", (7, 8), 10)
            + [f"lora_unet_middle_block_1_transformer_blocks_{t}_{n}_{o}" for t in range(10) for n in N for o in O]
            + blocks("output_blocks", (0, 1, 2), 10) + blocks("output_blocks", (3, 4, 5), 2))
    te1 = [f"lora_te1_text_model_encoder_layers_{i}_self_attn_{p}_proj" for i in range(12) for p in P]
    te2 = [f"lora_te2_text_model_encoder_layers_{i}_self_attn_{p}_proj" for i in range(32) for p in P]
    return unet, te1, te2


def file_keys(path):
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def sd15():
    return {"unet": meta_unet(SD15_UNET), "te": meta_clip(CLIP_L)}


@pytest.fixture(scope="module")
def sdxl():
    return {"unet": meta_unet(SDXL_UNET), "te1": meta_clip(CLIP_L), "te2": meta_clip_with_projection()}


def _check_round_trip(af, back, models):
    assert back.base == af.base
    for component, part in af.parts.items():
        assert sorted(back.parts[component].modules()) == sorted(part.modules())
        for path in back.parts[component].modules():
            assert resolve_path(models[component], path) is not None
    F.attach_file(back, models, "fits")  # shapes checked by the importer and the core, on meta tensors
    F.detach_file(models, "fits")


def test_sd15_kohya_names(sd15, tmp_path):
    af = shape_adapter(sd15, "sd15")
    assert af.module_counts() == {"unet": 128, "te": 48}
    F.save(af, tmp_path / "sd15.safetensors", "kohya")
    keys, meta = file_keys(tmp_path / "sd15.safetensors")
    unet, te = sd15_names()
    assert (len(unet), len(te)) == (128, 48)
    expected = {f"{n}.{s}" for n in unet + te for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(keys) == expected
    assert keys["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"] == (1, 768)
    assert keys["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"] == (320, 1)
    assert keys["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight"] == (1280, 1)
    assert keys["lora_te_text_model_encoder_layers_11_self_attn_q_proj.lora_down.weight"] == (1, 768)
    assert keys["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"] == ()
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.implementation"] == "diffusers"
    _check_round_trip(af, F.read(tmp_path / "sd15.safetensors"), sd15)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohyas_transformer_set_feed_forward_and_projections_round_trip(family, sd15, sdxl, tmp_path):
    models = {"sd15": sd15, "sdxl": sdxl}[family]
    af = shape_adapter({"unet": models["unet"]}, family, "unet-transformer")
    F.save(af, tmp_path / "t.safetensors", "kohya")
    keys, _ = file_keys(tmp_path / "t.safetensors")
    prefix = {"sd15": "lora_unet_down_blocks_1_attentions_0", "sdxl": "lora_unet_input_blocks_4_1"}[family]
    width = {"sd15": 640, "sdxl": 640}[family]
    assert keys[f"{prefix}_transformer_blocks_0_ff_net_0_proj.lora_up.weight"] == (2 * 4 * width, 1)  # GEGLU
    assert keys[f"{prefix}_transformer_blocks_0_ff_net_2.lora_down.weight"] == (1, 4 * width)
    assert keys[f"{prefix}_proj_in.lora_down.weight"][:2] == (1, width)
    assert len(keys) == 3 * (192 if family == "sd15" else 722)
    _check_round_trip(af, F.read(tmp_path / "t.safetensors"), {"unet": models["unet"]})


def test_sd15_diffusers_names(sd15, tmp_path):
    af = shape_adapter(sd15, "sd15")
    F.save(af, tmp_path / "d.safetensors", "diffusers")
    keys, meta = file_keys(tmp_path / "d.safetensors")
    assert len(keys) == 2 * 176 and all("lora" in k for k in keys) and not any(k.endswith("alpha") for k in keys)
    assert keys["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"] == (1, 768)
    assert keys["unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0.lora_B.weight"] == (320, 1)
    assert keys["text_encoder.text_model.encoder.layers.11.self_attn.out_proj.lora_B.weight"] == (768, 1)
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.r"] == 1 and config["text_encoder.r"] == 1 and len(config["unet.target_modules"]) == 128
    assert meta["format"] == "pt" and "diffusers only" in meta["studio.note"]
    _check_round_trip(af, F.read(tmp_path / "d.safetensors"), sd15)


def test_sdxl_kohya_names_use_one_sgm_layout(sdxl, tmp_path):
    af = shape_adapter(sdxl, "sdxl")
    assert af.module_counts() == {"unet": 560, "te1": 48, "te2": 128}
    F.save(af, tmp_path / "xl.safetensors", "kohya")
    keys, meta = file_keys(tmp_path / "xl.safetensors")
    unet, te1, te2 = sdxl_names()
    assert (len(unet), len(te1), len(te2)) == (560, 48, 128)
    expected = {f"{n}.{s}" for n in unet + te1 + te2 for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(keys) == expected
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in keys)
    for i in range(32):  # A1111 applies a TE2 layer only when all four projections are there
        assert all(f"lora_te2_text_model_encoder_layers_{i}_self_attn_{p}_proj.alpha" in keys for p in P)
    assert keys["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"] == (1, 2048)
    assert keys["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight"] == (640, 1)
    assert keys["lora_unet_middle_block_1_transformer_blocks_9_attn1_to_q.lora_up.weight"] == (1280, 1)
    assert keys["lora_te2_text_model_encoder_layers_31_self_attn_v_proj.lora_down.weight"] == (1, 1280)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    back = F.read(tmp_path / "xl.safetensors")
    assert back.source["unet_layout"] == "sgm"
    _check_round_trip(af, back, sdxl)


def test_sgm_names_of_every_sdxl_unet_module_agree_with_diffusers_checkpoint_conversion():
    """The SGM <-> diffusers maps on every module of an SDXL-layout UNet (resnets, samplers, embeddings,
    in / out convs, transformer blocks), against diffusers' own LDM checkpoint conversion: a checkpoint
    named by ``diffusers_to_sgm`` converts back to the UNet's own state dict, tensor for tensor."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from builders import tiny_sdxl_unet
    from studio.formats.names import diffusers_to_sgm, sgm_to_diffusers

    unet = tiny_sdxl_unet()
    state = unet.state_dict()
    ldm = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        sgm = diffusers_to_sgm(module)
        assert sgm_to_diffusers(sgm) == module
        ldm[f"model.diffusion_model.{sgm}.{leaf}"] = tensor
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert converted.keys() == state.keys()
    assert all(converted[k] is state[k] or torch.equal(converted[k], state[k]) for k in state)
    assert sgm_to_diffusers("input_blocks.9.0.in_layers.2") is None  # a downsampler's slot holds no resnet
    assert sgm_to_diffusers("output_blocks.4.2.conv") is None  # not the last slot of its block: no upsampler
