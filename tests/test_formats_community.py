"""Community LyCORIS files (issue 16 leftovers).

1. OneTrainer's COMFY key format: ComfyUI's own names (``diffusion_model.<SGM path>``,
   ``text_encoders.clip_l.transformer.<path>`` / ``text_encoders.clip_g.transformer.<path>``; comfy/lora.py
   model_lora_keys_unet / model_lora_keys_clip, reference/lycoris.md 10), any LoRA / LyCORIS kind after the
   module name. Such a file is the kohya file it renames: the same deltas on the same layers.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import studio.adapters as A
import studio.formats as F
from builders import TINY_UNET, tiny_clip, tiny_sdxl_text_encoders, tiny_sdxl_unet
from cli_helpers import one_error_line
from formats_helpers import assert_deltas_close, deltas
from studio.cli import main
from studio.errors import StudioError
from studio.formats.names import diffusers_to_sgm, kohya_name, with_text_model

# SD1.5's block layout (two resnets per block, attention in all but the last down block and the first up
# block) at toy width, so that its SGM block numbers are SD1.5's: input_blocks.3.0.op is the first
# downsampler, output_blocks.2.1.conv the upsampler of the attention-less first up block
TINY_SD15_UNET = dict(TINY_UNET, layers_per_block=2)
CLIP = {"te": "clip_l", "te1": "clip_l", "te2": "clip_g"}


def _sd15():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return {"unet": UNet2DConditionModel(**TINY_SD15_UNET).eval(), "te": tiny_clip().eval()}


def _sdxl():
    torch.manual_seed(0)
    te1, te2 = tiny_sdxl_text_encoders()
    return {"unet": tiny_sdxl_unet().eval(), "te1": te1.eval(), "te2": te2.eval()}


BASES = {"sd15": _sd15, "sdxl": _sdxl}


def _trained(base, method, fields, seed=1):
    models = copy.deepcopy(base)
    cfg = A.make_config(method, fields)
    for component, model in models.items():
        A.attach(model, "a", method, cfg, "unet-full" if component == "unet" else "te-attn")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models.values():
            for p in A.trainable_parameters(model, "a"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return models


def comfy_name(component: str, path: str) -> str:
    """The documented mapping: the UNet's SGM path under diffusion_model., a CLIP's transformers path under
    text_encoders.<clip>.transformer."""
    if component == "unet":
        return "diffusion_model." + diffusers_to_sgm(path)
    return f"text_encoders.{CLIP[component]}.transformer.{with_text_model(path)}"


def as_comfy(kohya_path, af, out_path, layout="diffusers"):
    """The kohya file at ``kohya_path`` (written from ``af``) with every key renamed to ComfyUI's names."""
    tensors, _ = F.files.read(kohya_path)
    names = {kohya_name(c, p, layout): comfy_name(c, p) for c, part in af.parts.items() for p in part.modules()}
    renamed = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        renamed[f"{names[name]}.{suffix}"] = value
    assert len(renamed) == len(tensors)
    save_file(renamed, str(out_path))
    return out_path


def _applied(af, base):
    models = copy.deepcopy(base)
    F.attach_file(af, models, "f")
    return deltas(models, "f")


# -- 1. OneTrainer's COMFY names ---------------------------------------------------------------------
KINDS = {  # method -> config on the UNet (3x3 convs in the resnets and samplers too) and the text encoders
    "lora": {"rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0},   # LoCon
    "loha": {"rank": 2, "alpha": 1.0},
    "lokr": {"rank": 2, "alpha": 4.0, "factor": 4},
}


@pytest.mark.parametrize("family", list(BASES))
@pytest.mark.parametrize("method", list(KINDS))
def test_a_comfy_named_file_applies_the_deltas_of_the_kohya_file_it_renames(tmp_path, family, method):
    base = BASES[family]()
    trained = _trained(base, method, KINDS[method])
    kohya_path = tmp_path / "kohya.safetensors"
    F.save(F.from_models(trained, "a"), kohya_path, "kohya", dtype="fp32", unet_layout="diffusers")
    kohya_file = F.read(kohya_path)
    comfy = F.read(as_comfy(kohya_path, kohya_file, tmp_path / "comfy.safetensors"))
    assert comfy.source["format"] == "OneTrainer / ComfyUI names" and comfy.base == kohya_file.base
    assert {c: p.method for c, p in comfy.parts.items()} == {c: p.method for c, p in kohya_file.parts.items()}
    assert set(comfy.parts) == ({"unet", "te1", "te2"} if family == "sdxl" else {"unet", "te"})
    want = _applied(kohya_file, base)
    assert len(want) == sum(len(p.modules()) for p in kohya_file.parts.values())
    assert any("resnets" in k for k in want) and any("upsamplers" in k for k in want)
    assert_deltas_close(_applied(comfy, base), want, rtol=1e-6)


def test_hand_made_comfy_names_land_on_the_layers_they_name(tmp_path):
    """Names written from ComfyUI's rules, checked against the closed forms: LoCon on SD1.5's attention, its
    first resnet's conv and the upsampler of its attention-less first up block; a CLIP-L MLP."""
    base = _sd15()
    g = torch.Generator().manual_seed(0)
    r = 2

    def pair(out, cols, conv=False):
        down, up = torch.randn(r, cols, generator=g), torch.randn(out, r, generator=g)
        return (down.reshape(r, -1, 3, 3) if conv else down), (up[:, :, None, None] if conv else up)

    modules = {  # file module -> (component, diffusers / transformers path, down, up, alpha)
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q":
            ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", *pair(32, 32), 1.0),
        "diffusion_model.input_blocks.1.0.in_layers.2": ("unet", "down_blocks.0.resnets.0.conv1", *pair(32, 288, True), 4.0),
        "diffusion_model.output_blocks.2.1.conv": ("unet", "up_blocks.0.upsamplers.0.conv", *pair(64, 576, True), 2.0),
        "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc1":
            ("te", "encoder.layers.1.mlp.fc1", *pair(64, 32), 1.0),
    }
    tensors = {}
    for name, (_, _, down, up, alpha) in modules.items():
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    save_file(tensors, str(tmp_path / "onetrainer.safetensors"))
    got = _applied(F.read(tmp_path / "onetrainer.safetensors"), base)
    want = {f"{c}.{p}": alpha / r * (up.flatten(1) @ down.flatten(1)) for c, p, down, up, alpha in modules.values()}
    assert_deltas_close(got, want, rtol=1e-6)


def test_sdxl_hand_made_names_reach_openclip_g_and_the_sgm_mid_block(tmp_path):
    """LoHa on OpenCLIP-G's attention and text projection, LoKr on the mid block's proj_in (Linear on SDXL)."""
    base = _sdxl()
    g = torch.Generator().manual_seed(1)
    loha = {f"text_encoders.clip_g.transformer.{m}": {k: torch.randn(*s, generator=g) for k, s in
                                                      (("hada_w1_a", (16, 2)), ("hada_w1_b", (2, 16)),
                                                       ("hada_w2_a", (16, 2)), ("hada_w2_b", (2, 16)))}
            for m in ("text_model.encoder.layers.0.self_attn.k_proj", "text_projection")}
    lokr = {"diffusion_model.middle_block.1.proj_in": {"lokr_w1": torch.randn(4, 4, generator=g),
                                                       "lokr_w2": torch.randn(8, 8, generator=g)}}
    tensors = {f"{m}.{k}": v for mods in (loha, lokr) for m, t in mods.items() for k, v in t.items()}
    tensors |= {f"{m}.alpha": torch.tensor(1.0) for m in loha}
    save_file(tensors, str(tmp_path / "xl.safetensors"))
    af = F.read(tmp_path / "xl.safetensors")
    assert af.base == "sdxl" and {c: p.method for c, p in af.parts.items()} == {"te2": "loha", "unet": "lokr"}
    want = {f"te2.{m.split('transformer.', 1)[1].removeprefix('text_model.')}":
            0.5 * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) for m, t in loha.items()}
    want["unet.mid_block.attentions.0.proj_in"] = torch.kron(lokr["diffusion_model.middle_block.1.proj_in"]["lokr_w1"],
                                                            lokr["diffusion_model.middle_block.1.proj_in"]["lokr_w2"])
    assert_deltas_close(_applied(af, base), want, rtol=1e-6)


def test_studio_inspect_names_the_layout_and_who_loads_it(tmp_path, capsys):
    base = _sd15()
    trained = _trained(base, "loha", KINDS["loha"])
    F.save(F.from_models(trained, "a"), tmp_path / "k.safetensors", "kohya", dtype="fp32", unet_layout="diffusers")
    path = as_comfy(tmp_path / "k.safetensors", F.read(tmp_path / "k.safetensors"), tmp_path / "ot.safetensors")
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "OneTrainer / ComfyUI names" and info["methods"] == {"unet": "loha", "te": "loha"}
    compat = info["compatibility"]
    assert compat["ComfyUI"]["unloaded"] == [] and compat["Forge"]["unloaded"] == []
    for tool in ("A1111", "kohya", "diffusers"):  # none of them reads dotted ComfyUI names
        assert compat[tool]["modules"] == 0, tool
    assert main(["inspect", str(path)]) == 0
    assert "format:    OneTrainer / ComfyUI names" in capsys.readouterr().out


def _comfy_lora(name="diffusion_model.input_blocks.1.1.proj_in", **extra):
    return {f"{name}.lora_down.weight": torch.randn(2, 32), f"{name}.lora_up.weight": torch.randn(32, 2), **extra}


@pytest.mark.parametrize("tensors,named", [
    (_comfy_lora(**{"diffusion_model.input_blocks.1.1.proj_in.lora_middle.weight": torch.randn(2, 2)}),
     "diffusion_model.input_blocks.1.1.proj_in.lora_middle.weight"),        # no tensor name ComfyUI reads
    (_comfy_lora("diffusion_model.down_blocks.0.attentions.0.proj_in"),    # a diffusers path: ComfyUI skips it
     "diffusion_model.down_blocks.0.attentions.0.proj_in.lora_down.weight"),
    (_comfy_lora("text_encoders.clip_l.transformer.encoder.layers.0.mlp.fc1"),  # outside text_model: not mapped
     "text_encoders.clip_l.transformer.encoder.layers.0.mlp.fc1.lora_down.weight"),
    ({**_comfy_lora(), "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.randn(32, 3)},
     "diffusion_model.input_blocks.1.1.proj_in"),                            # damaged: named as the file has it
])
def test_a_bad_comfy_named_file_is_one_error_line_naming_its_key(tmp_path, capsys, tensors, named):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    line = one_error_line(capsys, ["inspect", str(path)])
    assert named in line and "lora_unet_" not in line, line
    out = tmp_path / "out.safetensors"
    one_error_line(capsys, ["export", str(path), "--format", "kohya", "-o", str(out)])
    assert not out.exists()


def test_a_comfy_named_glora_file_is_refused_by_name(tmp_path):
    name = "diffusion_model.input_blocks.1.1.proj_in"
    save_file({f"{name}.{k}.weight": torch.randn(2, 2) for k in ("a1", "a2", "b1", "b2")}, str(tmp_path / "g.safetensors"))
    with pytest.raises(StudioError, match="is a GLoRA file"):
        F.read(tmp_path / "g.safetensors")
