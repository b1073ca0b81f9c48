"""OneTrainer's OMI key format (issue 16): the Open Model Initiative's LoRA names, as OneTrainer's convert_to_omi writes
them and InvokeAI's convert_from_omi reads them (omi_model_standards.convert.lora: convert_sd_lora / convert_sdxl_lora).

    unet.<SGM path>                  the UNet (SD1.5 and SDXL), e.g. unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q
    clip_l.<transformers path>       CLIP-L (SD1.5's text encoder, SDXL's first), e.g. clip_l.text_model.encoder.layers.0.mlp.fc1
    clip_g.<transformers path>       OpenCLIP-G (SDXL), e.g. clip_g.text_projection

then the tensor names of the kind (lora_down.weight, alpha, dora_scale, hada_w1_a, lokr_w1, ...). Each such file is the
kohya file it renames: the same deltas on the same layers; a key the standard does not name is refused as the file has it.
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
from studio.formats.files import read as read_file
from studio.formats.names import diffusers_to_sgm, kohya_name, with_text_model

# SD1.5's block layout at toy width (two resnets per block; the first up block has no attention), so that its SGM
# numbers are SD1.5's: OMI names that block's upsampler unet.output_blocks.2.2.conv (LDM itself says 2.1.conv)
TINY_SD15_UNET = dict(TINY_UNET, layers_per_block=2)
CLIP = {"te": "clip_l", "te1": "clip_l", "te2": "clip_g"}
OMI = "OneTrainer OMI names"
SDXL_HEADER = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
               "ot_branch": "omi_format"}  # what InvokeAI's OMI probe asks of a file


def _sd15():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return {"unet": UNet2DConditionModel(**TINY_SD15_UNET).eval(), "te": tiny_clip().eval()}


def _sdxl():
    torch.manual_seed(0)
    te1, te2 = tiny_sdxl_text_encoders()
    return {"unet": tiny_sdxl_unet().eval(), "te1": te1.eval(), "te2": te2.eval()}


BASES = {"sd15": _sd15, "sdxl": _sdxl}


def omi_name(component: str, path: str) -> str:
    """The standard's names: the UNet's SGM path under unet., a CLIP's transformers path under clip_l. / clip_g."""
    if component == "unet":
        return "unet." + diffusers_to_sgm(path)
    return f"{CLIP[component]}.{with_text_model(path)}"


def as_omi(kohya_path, af, out_path, metadata=None):
    """The kohya file at ``kohya_path`` (written from ``af`` with diffusers UNet names) renamed key by key to OMI's."""
    tensors, _ = read_file(kohya_path)
    names = {kohya_name(c, p): omi_name(c, p) for c, part in af.parts.items() for p in part.modules()}
    renamed = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        renamed[f"{names[name]}.{suffix}"] = value
    assert len(renamed) == len(tensors)
    save_file(renamed, str(out_path), metadata=metadata)
    return out_path


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


def _applied(af, base):
    models = copy.deepcopy(base)
    F.attach_file(af, models, "f")
    return deltas(models, "f")


KINDS = {  # method -> config on the UNet (3x3 convs in the resnets and samplers too) and the text encoders
    "lora": {"rank": 4, "alpha": 2.0, "conv_rank": 2, "conv_alpha": 1.0},   # LoCon
    "loha": {"rank": 2, "alpha": 1.0},
    "lokr": {"rank": 2, "alpha": 4.0, "factor": 4},
    "dora": {"rank": 2, "alpha": 2.0},
    "full": {},
}


@pytest.mark.parametrize("family", list(BASES))
@pytest.mark.parametrize("method", list(KINDS))
def test_an_omi_named_file_applies_the_deltas_of_the_kohya_file_it_renames(tmp_path, family, method):
    base = BASES[family]()
    trained = _trained(base, method, KINDS[method])
    kohya_path = tmp_path / "kohya.safetensors"
    F.save(F.from_models(trained, "a"), kohya_path, "kohya", dtype="fp32", unet_layout="diffusers")
    kohya_file = F.read(kohya_path)
    omi = F.read(as_omi(kohya_path, kohya_file, tmp_path / "omi.safetensors"))
    assert omi.source["format"] == OMI and omi.base == kohya_file.base
    assert {c: p.method for c, p in omi.parts.items()} == {c: p.method for c, p in kohya_file.parts.items()}
    assert set(omi.parts) == ({"unet", "te1", "te2"} if family == "sdxl" else {"unet", "te"})
    want = _applied(kohya_file, base)
    assert len(want) == sum(len(p.modules()) for p in kohya_file.parts.values())
    assert any("resnets" in k for k in want) and any("upsamplers" in k for k in want)
    assert_deltas_close(_applied(omi, base), want, rtol=1e-6)


def _pair(g, out, cols, r=2, conv=False):
    down, up = torch.randn(r, cols, generator=g), torch.randn(out, r, generator=g)
    return (down.reshape(r, -1, 3, 3) if conv else down), (up[:, :, None, None] if conv else up)


def test_hand_made_sd15_omi_names_land_on_the_layers_they_name(tmp_path):
    """Names written from the standard's SD1.5 key set, checked against the closed forms: a LoRA in an attention
    block, LoCon on a resnet's conv1 and on the upsampler of the attention-less first up block (output_blocks.2.2),
    the mid block's time_emb_proj, conv_in, and a CLIP-L MLP under clip_l."""
    base = _sd15()
    g = torch.Generator().manual_seed(0)
    modules = {  # file module -> (component, diffusers / transformers path, down, up, alpha)
        "unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k":
            ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", *_pair(g, 32, 32), 1.0),
        "unet.input_blocks.2.0.in_layers.2": ("unet", "down_blocks.0.resnets.1.conv1", *_pair(g, 32, 288, conv=True), 4.0),
        "unet.output_blocks.2.2.conv": ("unet", "up_blocks.0.upsamplers.0.conv", *_pair(g, 64, 576, conv=True), 2.0),
        "unet.middle_block.2.emb_layers.1": ("unet", "mid_block.resnets.1.time_emb_proj", *_pair(g, 64, 128), 1.0),
        "unet.input_blocks.0.0": ("unet", "conv_in", *_pair(g, 32, 36, conv=True), 2.0),
        "clip_l.text_model.encoder.layers.1.mlp.fc1": ("te", "encoder.layers.1.mlp.fc1", *_pair(g, 64, 32), 1.0),
    }
    tensors = {}
    for name, (_, _, down, up, alpha) in modules.items():
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    save_file(tensors, str(tmp_path / "onetrainer.safetensors"))
    af = F.read(tmp_path / "onetrainer.safetensors")
    assert af.base == "sd-custom" and af.source["format"] == OMI and set(af.parts) == {"unet", "te"}
    want = {f"{c}.{p}": alpha / 2 * (up.flatten(1) @ down.flatten(1)) for c, p, down, up, alpha in modules.values()}
    assert_deltas_close({k: v.flatten(1) for k, v in _applied(af, base).items()}, want, rtol=1e-6)


def test_hand_made_sdxl_omi_names_reach_openclip_g_and_the_label_embedding(tmp_path):
    """From the SDXL key set: LoHa on OpenCLIP-G's attention and text projection (clip_g.), LoKr on the label embedding
    (unet.label_emb.0.0 = add_embedding.linear_1); and a LoRA file of the UNet alone (a transformer's to_out.0 in the
    second down block), which the header OneTrainer writes makes an SDXL file."""
    base = _sdxl()
    g = torch.Generator().manual_seed(1)
    loha = {f"clip_g.{m}": {k: torch.randn(*s, generator=g) for k, s in
                            (("hada_w1_a", (16, 2)), ("hada_w1_b", (2, 16)), ("hada_w2_a", (16, 2)), ("hada_w2_b", (2, 16)))}
            for m in ("text_model.encoder.layers.0.self_attn.k_proj", "text_projection")}
    lokr = {"unet.label_emb.0.0": {"lokr_w1": torch.randn(4, 4, generator=g), "lokr_w2": torch.randn(16, 16, generator=g)}}
    to_out = "unet.input_blocks.4.1.transformer_blocks.0.attn1.to_out.0"
    down, up = _pair(g, 32, 32)
    tensors = {f"{m}.{k}": v for mods in (loha, lokr) for m, t in mods.items() for k, v in t.items()}
    tensors |= {f"{m}.alpha": torch.tensor(1.0) for m in loha}
    save_file(tensors, str(tmp_path / "xl.safetensors"), metadata=SDXL_HEADER)
    af = F.read(tmp_path / "xl.safetensors")
    assert af.base == "sdxl" and {c: p.method for c, p in af.parts.items()} == {"te2": "loha", "unet": "lokr"}
    want = {f"te2.{m.removeprefix('clip_g.').removeprefix('text_model.')}":
            0.5 * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) for m, t in loha.items()}
    want["unet.add_embedding.linear_1"] = torch.kron(lokr["unet.label_emb.0.0"]["lokr_w1"], lokr["unet.label_emb.0.0"]["lokr_w2"])
    assert_deltas_close(_applied(af, base), want, rtol=1e-6)
    # a plain LoRA file of the SDXL UNet alone: the header, not a text encoder, says SDXL
    save_file({f"{to_out}.lora_down.weight": down, f"{to_out}.lora_up.weight": up, f"{to_out}.alpha": torch.tensor(1.0)},
              str(tmp_path / "unet.safetensors"), metadata=SDXL_HEADER)
    af = F.read(tmp_path / "unet.safetensors")
    assert af.base == "sdxl" and af.source["header"] == SDXL_HEADER  # (the header as the file has it)
    save_file(read_file(tmp_path / "unet.safetensors")[0], str(tmp_path / "bare.safetensors"))
    assert F.read(tmp_path / "bare.safetensors").base != "sdxl"  # (toy widths: the shapes alone do not tell)
    assert_deltas_close(_applied(af, base), {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0":
                                             0.5 * up @ down}, rtol=1e-6)


def test_diffusers_files_with_unet_keys_stay_diffusers_files(tmp_path):
    """diffusers writes unet.<diffusers path> too: only SGM paths (or clip_l. / clip_g.) make a file OMI's."""
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{name}.lora_A.weight": torch.randn(2, 32), f"{name}.lora_B.weight": torch.randn(32, 2)},
              str(tmp_path / "d.safetensors"))
    assert F.read(tmp_path / "d.safetensors").source["format"] == "diffusers"


def test_studio_inspect_names_the_layout_and_what_each_tool_does_with_it(tmp_path, capsys):
    base = _sdxl()
    trained = _trained(base, "lora", {"rank": 2, "alpha": 1.0})
    F.save(F.from_models(trained, "a"), tmp_path / "k.safetensors", "kohya", dtype="fp32", unet_layout="diffusers")
    kohya_file = F.read(tmp_path / "k.safetensors")
    path = as_omi(tmp_path / "k.safetensors", kohya_file, tmp_path / "ot.safetensors", SDXL_HEADER)
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == OMI and info["base"] == "sdxl"
    compat = info["compatibility"]
    modules = sum(len(p.modules()) for p in kohya_file.parts.values())
    assert compat["studio"] == {"modules": modules, "of": modules, "unloaded": [], "note": ""}
    for tool in ("A1111", "Forge", "ComfyUI", "kohya", "diffusers"):  # none of them maps OMI's names
        assert compat[tool]["modules"] == 0 and len(compat[tool]["unloaded"]) == len(read_file(path)[0]), tool
        assert f"studio export {path} --format kohya" in compat[tool]["note"], tool
    # InvokeAI converts the SDXL key set: every Linear / conv the standard lists, not the resnets' norms (none here)
    assert compat["InvokeAI"]["unloaded"] == [] and compat["InvokeAI"]["modules"] == modules
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"format:    {OMI}" in text and f"InvokeAI  all {modules} modules" in text


def test_inspect_says_which_omi_files_invokeai_does_not_convert(tmp_path, capsys):
    """Its OMI path needs OneTrainer's header and converts SDXL (and Flux) only; one-part tensor names other than
    alpha / dora_scale (LoHa's hada_*) lose their dot in its renaming."""
    to_q = "unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    loha = {f"{to_q}.{k}": torch.randn(*s) for k, s in (("hada_w1_a", (32, 2)), ("hada_w1_b", (2, 32)),
                                                       ("hada_w2_a", (32, 2)), ("hada_w2_b", (2, 32)))}
    lora = {"clip_g.text_projection.lora_down.weight": torch.randn(2, 16),
            "clip_g.text_projection.lora_up.weight": torch.randn(16, 2)}
    cases = {"no-header": ({**lora, **loha}, {}),
             "sd15": ({"clip_l.text_model.encoder.layers.0.mlp.fc1.lora_down.weight": torch.randn(2, 32),
                       "clip_l.text_model.encoder.layers.0.mlp.fc1.lora_up.weight": torch.randn(64, 2)},
                      {**SDXL_HEADER, "modelspec.architecture": "stable-diffusion-v1/lora"}),
             "loha": ({**lora, **loha}, SDXL_HEADER)}
    lines = {}
    for case, (tensors, header) in cases.items():
        save_file(tensors, str(tmp_path / f"{case}.safetensors"), metadata=header)
        assert main(["inspect", str(tmp_path / f"{case}.safetensors"), "--json"]) == 0
        lines[case] = json.loads(capsys.readouterr().out)["compatibility"]["InvokeAI"]
    assert lines["no-header"]["modules"] == 0 and "ot_branch" in lines["no-header"]["note"]
    assert lines["sd15"]["modules"] == 0 and "SDXL and Flux" in lines["sd15"]["note"]
    assert lines["loha"]["modules"] == 1 and lines["loha"]["unloaded"] == sorted(loha)
    assert "hada_" in lines["loha"]["note"]


def test_an_omi_files_bundled_embedding_rides_along_and_invokeai_is_said_to_strip_it(tmp_path, capsys):
    """OMI keeps A1111's bundle_emb.<token>.* keys (clip_l / clip_g on SDXL) beside its own names."""
    to_q = "unet.input_blocks.4.1.transformer_blocks.0.attn2.to_q"
    tensors = {f"{to_q}.lora_down.weight": torch.randn(2, 32), f"{to_q}.lora_up.weight": torch.randn(32, 2),
               "bundle_emb.sks.clip_l": torch.randn(1, 768), "bundle_emb.sks.clip_g": torch.randn(1, 1280)}
    path = tmp_path / "pivotal.safetensors"
    save_file(tensors, str(path), metadata=SDXL_HEADER)
    af = F.read(path)
    assert af.source["format"] == OMI and set(af.parts) == {"unet"}
    (emb,) = af.source["embeddings"]
    assert emb.token == "sks" and torch.equal(emb.vectors["te2"], tensors["bundle_emb.sks.clip_g"])
    assert main(["inspect", str(path), "--json"]) == 0
    line = json.loads(capsys.readouterr().out)["compatibility"]["InvokeAI"]
    assert line["modules"] == 1 and line["unloaded"] == ["bundle_emb.sks.clip_g", "bundle_emb.sks.clip_l"]
    assert "strips the bundle_emb keys" in line["note"]


def _omi_lora(name="unet.input_blocks.1.1.proj_in", **extra):
    return {f"{name}.lora_down.weight": torch.randn(2, 32), f"{name}.lora_up.weight": torch.randn(32, 2), **extra}


@pytest.mark.parametrize("tensors,named", [
    (_omi_lora(**{"unet.input_blocks.1.1.proj_in.lora_middle.weight": torch.randn(2, 2)}),
     "unet.input_blocks.1.1.proj_in.lora_middle.weight"),                    # no tensor name the kinds have
    (_omi_lora("unet.input_blocks.1.0.in_layers.0"), "unet.input_blocks.1.0.in_layers.0.lora_down.weight"),  # a norm
    (_omi_lora("unet.output_blocks.2.1.conv"), "unet.output_blocks.2.1.conv.lora_down.weight"),  # OMI: 2.2.conv
    (_omi_lora("unet.input_blocks.1.7.proj_in"), "unet.input_blocks.1.7.proj_in.lora_down.weight"),  # no such slot
    (_omi_lora("clip_l.encoder.layers.0.mlp.fc1"), "clip_l.encoder.layers.0.mlp.fc1.lora_down.weight"),  # no text_model
    ({**_omi_lora(), "unet.input_blocks.1.1.proj_in.lora_up.weight": torch.randn(32, 3)},
     "unet.input_blocks.1.1.proj_in"),                                       # damaged: named as the file has it
])
def test_a_bad_omi_named_file_is_one_error_line_naming_its_key(tmp_path, capsys, tensors, named):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    line = one_error_line(capsys, ["inspect", str(path)])
    assert named in line and str(path) in line and "lora_unet_" not in line, line
    out = tmp_path / "out.safetensors"
    one_error_line(capsys, ["export", str(path), "--format", "kohya", "-o", str(out)])
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]
