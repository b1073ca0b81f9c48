"""Community LyCORIS files (issue 16 leftovers).

1. OneTrainer's COMFY key format: ComfyUI's own names (``diffusion_model.<SGM path>``,
   ``text_encoders.clip_l.transformer.<path>`` / ``text_encoders.clip_g.transformer.<path>``; comfy/lora.py
   model_lora_keys_unet / model_lora_keys_clip, reference/lycoris.md 10), any LoRA / LyCORIS kind after the
   module name. Such a file is the kohya file it renames: the same deltas on the same layers.
2. LyCORIS presets that give module classes their own algorithm (``module_algo_map``: LoCon on attention,
   LoKr or LoHa on the ResNets, LoHa on CLIP's MLP): built with lycoris-lora's kohya wrapper on the tiny SD
   layouts, the studio's whole-model outputs equal LyCORIS's own at weight 1 and 0.5; such a file mixes in
   ``studio generate`` and re-exports with ``--format lycoris`` to a file LyCORIS loads to the same outputs.
3. LoKr splits LyCORIS's own loader cannot rebuild (it infers one factor and re-derives sorted pairs: ai-toolkit's
   W1-the-larger-half, ``unbalanced_factorization``): ``--format lycoris`` writes them as W1 = [[1]],
   W2 = kron(W1, W2), exactly, and lycoris-lora loads the file to the same outputs.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import studio.adapters as A
import studio.formats as F
from builders import TINY_UNET, tiny_clip, tiny_sdxl_text_encoders, tiny_sdxl_unet
from cli_helpers import one_error_line
from formats_helpers import assert_deltas_close, deltas, tiny_sd, unet_sample
from studio.cli import main
from studio.errors import StudioError
from studio.formats.files import read as read_file
from studio.formats.names import diffusers_to_sgm, kohya_name, with_text_model

# SD1.5's block layout (two resnets per block, attention in all but the last down block and the first up
# block) at toy width, so that its SGM block numbers are SD1.5's: input_blocks.3.0.op is the first
# downsampler, output_blocks.2.1.conv the upsampler of the attention-less first up block
TINY_SD15_UNET = dict(TINY_UNET, layers_per_block=2)
ROOT = Path(__file__).resolve().parents[1]
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
    tensors, _ = read_file(kohya_path)
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


# -- 2. presets mixing kinds within one component -----------------------------------------------------
PRESET_HEAD = """unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
# case -> (the network's algo (samplers, CLIP attention), module_algo_map, kinds per component as stored)
PRESETS = {
    "locon-attention-lokr-resnets": ("lokr", {"Transformer2DModel": 'algo = "lora"',
                                              "ResnetBlock2D": 'algo = "lokr"\nfactor = 4', "CLIPMLP": 'algo = "loha"'},
                                     {"unet": {"LoCon", "LoKr"}, "te": {"LoHa", "LoKr"}}),
    "locon-attention-loha-resnets": ("lora", {"Transformer2DModel": 'algo = "lora"', "ResnetBlock2D": 'algo = "loha"',
                                              "CLIPMLP": 'algo = "loha"'},
                                     {"unet": {"LoCon", "LoHa"}, "te": {"LoCon", "LoHa"}}),
}


@pytest.fixture
def lycoris_presets(monkeypatch):
    """LyCORIS keeps its presets in class attributes: restore them after each test."""
    from lycoris import LycorisNetwork
    from lycoris.kohya import LycorisNetworkKohya
    for cls in (LycorisNetwork, LycorisNetworkKohya):
        for attr, value in list(vars(cls).items()):
            if attr.isupper():
                monkeypatch.setattr(cls, attr, copy.copy(value))


def _preset_network(base, tmp_path, case, seed=1):
    """A LyCORIS network of ``case`` on copies of the models (kohya wrapper, as kohya_ss trains it), moved off
    its init and saved by LyCORIS."""
    import lycoris.kohya as lycoris_kohya
    algo, algo_map, _ = PRESETS[case]
    preset = tmp_path / f"{case}.toml"
    preset.write_text(PRESET_HEAD + "".join(f"\n[module_algo_map.{m}]\n{body}\n" for m, body in algo_map.items()))
    models = copy.deepcopy(base)
    tes = [models[c] for c in ("te", "te1", "te2") if c in models]
    net = lycoris_kohya.create_network(1.0, 4, 2, None, tes if len(tes) > 1 else tes[0], models["unet"], algo=algo,
                                       preset=str(preset), conv_dim=2, conv_alpha=1)
    net.apply_to(tes if len(tes) > 1 else tes[0], models["unet"], apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path / f"{case}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    return path, models, net


def _te_out(te):
    with torch.no_grad():
        return te(input_ids=torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(4))).last_hidden_state


def _close(got, want, rel=1e-4):
    error = (got - want).abs().max().item()
    assert error <= rel * want.abs().max().item(), f"max error {error:.3g}"


@pytest.mark.parametrize("case", list(PRESETS))
def test_a_preset_mixing_kinds_per_module_applies_as_lycoris_applies_it(tmp_path, lycoris_presets, case):
    sd = tiny_sd()
    path, ly, net = _preset_network(sd, tmp_path, case)
    af = F.read(path)
    kinds = PRESETS[case][2]
    assert {c: set(k) for c, k in af.source["stored_kinds"].items()} == kinds  # the file does mix them
    assert sum(af.source["stored_kinds"]["unet"].values()) == len(net.unet_loras)
    ours = copy.deepcopy(sd)
    attached = F.attach_file(af, ours, "ly")
    assert len(attached["unet"]) == len(net.unet_loras) and len(attached["te"]) == len(net.text_encoder_loras)
    want_unet, want_te = unet_sample(ly["unet"]), _te_out(ly["te"])
    assert (want_unet - unet_sample(sd["unet"])).abs().max() > 1e-2 and (want_te - _te_out(sd["te"])).abs().max() > 1e-2
    _close(unet_sample(ours["unet"]), want_unet)
    _close(_te_out(ours["te"]), want_te)
    net.set_multiplier(0.5)  # linear for every kind here: W0 + 0.5 dW
    F.set_file_weight(ours, "ly", 0.5)
    _close(unet_sample(ours["unet"]), unet_sample(ly["unet"]))
    for model in ours.values():
        A.merge(model)
    _close(unet_sample(ours["unet"]), unet_sample(ly["unet"]))
    _close(_te_out(ours["te"]), _te_out(ly["te"]))


def test_an_sdxl_preset_mixing_kinds_applies_as_lycoris_applies_it(tmp_path, lycoris_presets):
    base = _sdxl()
    path, ly, net = _preset_network(base, tmp_path, "locon-attention-lokr-resnets")
    af = F.read(path)
    assert af.base == "sdxl" and set(af.source["stored_kinds"]["unet"]) == {"LoCon", "LoKr"}
    ours = copy.deepcopy(base)
    F.attach_file(af, ours, "ly")

    def unet(model):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            return model(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]),
                         encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                         added_cond_kwargs={"text_embeds": torch.randn(2, 16, generator=g),
                                            "time_ids": torch.randn(2, 6, generator=g)}).sample

    _close(unet(ours["unet"]), unet(ly["unet"]))
    for te in ("te1", "te2"):
        _close(_te_out(ours[te]), _te_out(ly[te]))


@pytest.mark.parametrize("case", list(PRESETS))
def test_a_mixed_preset_re_exports_to_a_lycoris_file_lycoris_loads(tmp_path, lycoris_presets, capsys, case):
    import lycoris.kohya as lycoris_kohya
    from lycoris.utils.preset import read_preset
    sd = tiny_sd()
    path, ly, _ = _preset_network(sd, tmp_path, case)
    out = tmp_path / "again.safetensors"
    assert main(["export", str(path), "--format", "lycoris", "--dtype", "fp32", "-o", str(out)]) == 0
    back, af = F.read(out), F.read(path)  # the studio re-reads its own export to the same deltas
    assert_deltas_close(_applied(back, sd), _applied(af, sd), rtol=1e-6)
    # every module is written back in the kind the file stored it as (LoCon as lora_down / lora_up), except a LoKr
    # beside LoHa, which stays the LoHa that holds it
    restorable = [c for c, kinds in af.source["stored_kinds"].items() if "LoCon" in kinds and len(kinds) == 2]
    assert "unet" in restorable and all(back.source["stored_kinds"][c] == af.source["stored_kinds"][c] for c in restorable)
    with safe_open(str(path), "pt") as f:
        kinds = {k.partition(".")[0]: k.partition(".")[2] for k in f.keys() if k.endswith(("lora_down.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a"))}
    with safe_open(str(out), "pt") as f:  # (LyCORIS names transformers 5's CLIP without text_model_, the studio with)
        again = {k.partition(".")[0].replace("lora_te_text_model_", "lora_te_"): k.partition(".")[2] for k in f.keys()
                 if k.endswith(("lora_down.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a"))}
    assert sorted(n for n, k in kinds.items() if k == "lora_down.weight") == sorted(n for n, k in again.items() if k == "lora_down.weight")
    F.save(af, tmp_path / "native.safetensors", "native")  # the record survives the studio's own file too
    native = F.read(tmp_path / "native.safetensors")
    assert {c: A.make_config(p.method, p.config) for c, p in native.parts.items()} == \
        {c: A.make_config(p.method, p.config) for c, p in af.parts.items()}
    for component in restorable:  # and reads back to the same canonical tensors, bit for bit
        part = af.parts[component]
        assert back.parts[component].config == part.config
        for k, t in part.tensors.items():
            assert torch.equal(back.parts[component].tensors[k], t), k
    lycoris_kohya.LycorisNetworkKohya.apply_preset(read_preset(str(tmp_path / f"{case}.toml")))
    weights = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in read_file(out)[0].items()}
    again = copy.deepcopy(sd)
    net, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, again["te"], again["unet"], weights_sd=weights)
    net.apply_to(again["te"], again["unet"], apply_text_encoder=True, apply_unet=True)
    assert len(net.unet_loras) == len(back.parts["unet"].modules())
    _close(unet_sample(again["unet"]), unet_sample(ly["unet"]))
    _close(_te_out(again["te"]), _te_out(ly["te"]))
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    stored = F.read(path).source["stored_kinds"]["unet"]
    assert "as stored: " + ", ".join(f"{n} {k}" for k, n in stored.items()) in text


def test_a_mixed_preset_mixes_in_studio_generate(tmp_path, lycoris_presets, capsys):
    """On the mini base, beside a LoHa at its own weight: the images equal those of a file holding the same
    deltas as plain full (diff) modules, and differ from the base's."""
    import numpy as np
    from diffusers import UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel
    mini = str(ROOT / "sample_data" / "mini-sd")
    base = {"unet": UNet2DConditionModel.from_pretrained(mini, subfolder="unet").eval(),
            "te": CLIPTextModel.from_pretrained(mini, subfolder="text_encoder").eval()}
    mixed, _, _ = _preset_network(base, tmp_path, "locon-attention-lokr-resnets")
    loha = tmp_path / "loha.safetensors"
    F.save(F.from_models(_trained(base, "loha", KINDS["loha"], seed=5), "a"), loha, "kohya", dtype="fp32")
    full = tmp_path / "full.safetensors"  # the mixed file's deltas, module by module, as LyCORIS full modules
    models = copy.deepcopy(base)
    F.attach_file(F.read(mixed), models, "m")
    tensors = {}
    for component, model in models.items():
        for path, dW in A.delta_weights(model, "m").items():
            shape = model.get_submodule(path).base.weight.shape
            tensors[f"{kohya_name(component, path)}.diff"] = dW.reshape(shape).contiguous()
    save_file(tensors, str(full))

    def images(name, *adapters):
        out = tmp_path / name
        argv = ["generate", "--prompt", "a red circle", "--steps", "2", "--seed", "4", "--base", mini, "--out", str(out)]
        assert main(argv + [a for spec in adapters for a in ("--adapter", spec)]) == 0, capsys.readouterr().err
        return [np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in sorted(out.glob("*.png"))]

    got = images("mixed", f"{mixed}:0.7", f"{loha}:0.5")
    want = images("full", f"{full}:0.7", f"{loha}:0.5")
    plain = images("base")
    assert len(got) == len(want) == len(plain) > 0
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(got, want))
    assert any(np.abs(a - b).max() > 8 for a, b in zip(got, plain))


def test_hand_made_mixed_modules_keep_their_closed_form_deltas(tmp_path):
    """One UNet component holding LoHa (attention), LoKr with both halves factored (a 3x3 conv) and a Tucker
    LoCon (another 3x3 conv): each module's delta is its own formula (reference/lycoris.md 1-3)."""
    g = torch.Generator().manual_seed(2)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    q, conv1, conv2 = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1",
                       "down_blocks.0.resnets.0.conv2")
    loha = {"hada_w1_a": rnd(32, 2), "hada_w1_b": rnd(2, 32), "hada_w2_a": rnd(32, 2), "hada_w2_b": rnd(2, 32),
            "alpha": torch.tensor(1.0)}
    lokr = {"lokr_w1_a": rnd(4, 1), "lokr_w1_b": rnd(1, 4), "lokr_w2_a": rnd(8, 1), "lokr_w2_b": rnd(1, 72),
            "alpha": torch.tensor(0.5)}
    tucker = {"lora_down.weight": rnd(2, 32, 1, 1), "lora_mid.weight": rnd(2, 2, 3, 3), "lora_up.weight": rnd(32, 2, 1, 1),
              "alpha": torch.tensor(1.0)}
    modules = {q: loha, conv1: lokr, conv2: tucker}
    save_file({f"lora_unet_{p.replace('.', '_')}.{k}": v for p, t in modules.items() for k, v in t.items()},
              str(tmp_path / "mixed.safetensors"))
    af = F.read(tmp_path / "mixed.safetensors")
    assert af.parts["unet"].method == "loha"
    assert af.source["stored_kinds"] == {"unet": {"LoCon": 1, "LoHa": 1, "LoKr": 1}}
    want = {f"unet.{q}": 0.5 * (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"]),
            f"unet.{conv1}": 0.5 * torch.kron(lokr["lokr_w1_a"] @ lokr["lokr_w1_b"], lokr["lokr_w2_a"] @ lokr["lokr_w2_b"]),
            f"unet.{conv2}": 0.5 * torch.einsum("op,pqhw,qi->oihw", tucker["lora_up.weight"].flatten(1),
                                                tucker["lora_mid.weight"], tucker["lora_down.weight"].flatten(1))}
    got = _applied(af, tiny_sd())
    assert_deltas_close({k: v.flatten(1) for k, v in got.items()}, {k: v.flatten(1) for k, v in want.items()}, 1e-6)


@pytest.mark.parametrize("second,named", [
    ({"dora_scale": torch.ones(32, 1), "lora_down.weight": torch.randn(2, 32), "lora_up.weight": torch.randn(32, 2)},
     "not dora beside other kinds"),
    ({"lora_down.weight": torch.randn(2, 32), "lora_up.weight": torch.randn(32, 2), "lora_extra.weight": torch.randn(2)},
     "lora_extra.weight"),
])
def test_a_bad_mixed_component_is_one_error_line(tmp_path, capsys, second, named):
    lokr = {"lokr_w1": torch.randn(4, 4), "lokr_w2": torch.randn(8, 8), "alpha": torch.tensor(1.0)}
    modules = {"down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": lokr,
               "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k": second}
    path = tmp_path / "bad.safetensors"
    save_file({f"lora_unet_{m}.{k}": v for m, t in modules.items() for k, v in t.items()}, str(path))
    line = one_error_line(capsys, ["inspect", str(path)])
    assert named in line and str(path) in line, line


# -- 3. LoKr splits LyCORIS's loader cannot rebuild -------------------------------------------------
def _lycoris_module(shapes: dict, out: int, ins: int, kernel=None):
    """LyCORIS's LokrModule.make_module_from_state_dict on random tensors of ``shapes``, on a Linear (or a conv of
    ``kernel``): the module, or None when it cannot rebuild them (an error, or parameters of other shapes)."""
    from lycoris.modules.lokr import LokrModule
    layer = torch.nn.Linear(ins, out) if kernel is None else torch.nn.Conv2d(ins, out, kernel)
    t = {k: torch.randn(*v) for k, v in shapes.items()}
    args = [t.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")]
    try:
        with torch.no_grad():  # (as LyCORIS's own make_module calls it)
            module = LokrModule.make_module_from_state_dict("m", layer, *args, None, None, torch.tensor(1.0), None)
    except (RuntimeError, AttributeError):
        return None
    same = all(tuple(getattr(module, k).shape) == tuple(v) for k, v in shapes.items())  # (copy_ broadcasts)
    return module if same else None


def _stored(a, b, c, d, K, r1, r2):
    w1 = {"lokr_w1_a": (a, r1), "lokr_w1_b": (r1, c)} if r1 else {"lokr_w1": (a, c)}
    w2 = {"lokr_w2_a": (b, r2), "lokr_w2_b": (r2, d * K)} if r2 else {"lokr_w2": (b, d, 3, 3) if K > 1 else (b, d)}
    return {**w1, **w2}


def test_which_splits_lycoris_rebuilds_is_lycoris_own_answer():
    """The studio's prediction (lokr_shapes.lycoris_rebuilds) against LyCORIS's loader, split by split: every divisor
    pair of a few sizes, both halves whole or factored as LyCORIS's rule says, Linear and 3x3 conv."""
    from studio.adapters.lokr_shapes import lycoris_rebuilds
    checked = {True: 0, False: 0}
    for out, ins in ((32, 32), (48, 32), (64, 16), (24, 40)):
        for a in (x for x in range(1, out + 1) if out % x == 0):
            for c in (x for x in range(1, ins + 1) if ins % x == 0):
                b, d = out // a, ins // c
                for K in (1, 9):
                    for r in (1, 2, 16):  # LyCORIS's rule decides which halves a rank-r module factors
                        r2 = r if r < max(b, d) / 2 else 0
                        r1 = r if r2 and r < max(a, c) / 2 else 0
                        want = _lycoris_module(_stored(a, b, c, d, K, r1, r2), out, ins, (3, 3) if K > 1 else None)
                        got = lycoris_rebuilds(a, b, c, d, (3, 3) if K > 1 else (1, 1), (not r1, not r2))
                        assert got == (want is not None), (out, ins, a, c, K, r1, r2)
                        checked[got] += 1
    assert checked[True] > 50 and checked[False] > 50, checked


Q, K_, V, CONV = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                  "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
                  "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", "down_blocks.0.resnets.0.conv1")


def _unsorted_file(tmp_path):
    """ai-toolkit's pairs: W1 the larger half on a Linear (whole, and with W2 factored) and on a 3x3 conv, beside a
    sorted pair; and the deltas they make (closed forms)."""
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    modules = {Q: {"lokr_w1": rnd(8, 8), "lokr_w2": rnd(4, 4), "alpha": torch.tensor(3.0)},   # (both whole: s = 1)
               K_: {"lokr_w1": rnd(4, 4), "lokr_w2": rnd(8, 8), "alpha": torch.tensor(1.0)},
               V: {"lokr_w1": rnd(8, 8), "lokr_w2_a": rnd(4, 1), "lokr_w2_b": rnd(1, 4), "alpha": torch.tensor(0.5)},
               CONV: {"lokr_w1": rnd(8, 8), "lokr_w2_a": rnd(4, 1), "lokr_w2_b": rnd(1, 36), "alpha": torch.tensor(2.0)}}
    path = tmp_path / "ai-toolkit.safetensors"
    save_file({f"lora_unet_{p.replace('.', '_')}.{k}": v for p, t in modules.items() for k, v in t.items()}, str(path))
    want = {f"unet.{Q}": torch.kron(modules[Q]["lokr_w1"], modules[Q]["lokr_w2"]),
            f"unet.{K_}": torch.kron(modules[K_]["lokr_w1"], modules[K_]["lokr_w2"]),
            f"unet.{V}": 0.5 * torch.kron(modules[V]["lokr_w1"], modules[V]["lokr_w2_a"] @ modules[V]["lokr_w2_b"]),
            f"unet.{CONV}": 2.0 * torch.kron(modules[CONV]["lokr_w1"], modules[CONV]["lokr_w2_a"] @ modules[CONV]["lokr_w2_b"])}
    return path, want


def _lycoris_unet(sd, weights):
    import lycoris.kohya as lycoris_kohya
    from lycoris.utils.preset import read_preset
    lycoris_kohya.LycorisNetworkKohya.apply_preset(read_preset(str(ROOT / "tests" / "data" / "lycoris_preset.toml")))
    models = copy.deepcopy(sd)
    net, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, models["te"], models["unet"], weights_sd=weights)
    net.apply_to(models["te"], models["unet"], apply_text_encoder=False, apply_unet=True)
    return models["unet"], net


def test_an_unsorted_lokr_re_exports_to_a_file_lycoris_loads(tmp_path, lycoris_presets):
    sd = tiny_sd()
    path, want = _unsorted_file(tmp_path)
    with pytest.raises(RuntimeError):  # LyCORIS cannot rebuild the pairs as they are
        _lycoris_unet(sd, read_file(path)[0])
    out = tmp_path / "again.safetensors"
    assert main(["export", str(path), "--format", "lycoris", "--dtype", "fp32", "-o", str(out)]) == 0
    tensors = read_file(out)[0]
    name = {m: f"lora_unet_{m.replace('.', '_')}" for m in (Q, K_, V, CONV)}
    assert tuple(tensors[f"{name[K_]}.lokr_w1"].shape) == (4, 4)                       # rebuilt as it is
    assert tuple(tensors[f"{name[Q]}.lokr_w1"].shape) == (1, 1) and tuple(tensors[f"{name[Q]}.lokr_w2"].shape) == (32, 32)
    assert tuple(tensors[f"{name[CONV]}.lokr_w2_b"].shape) == (8, 288)                 # rank 8 x 1, W2 factored
    assert_deltas_close({k: v.flatten(1) for k, v in _applied(F.read(out), sd).items()},
                        {k: v.flatten(1) for k, v in want.items()}, rtol=1e-6)       # the studio reads it back exactly
    unet, net = _lycoris_unet(sd, tensors)
    assert len(net.unet_loras) == 4
    hand = copy.deepcopy(sd["unet"])
    with torch.no_grad():
        for key, dW in want.items():
            layer = hand.get_submodule(key.removeprefix("unet."))
            layer.weight.add_(dW.reshape(layer.weight.shape))
    _close(unet_sample(unet), unet_sample(hand))
    for lora in net.unet_loras:  # and module by module, LyCORIS's own delta
        module = next(m for m, n in name.items() if n == lora.lora_name)
        got = lora.get_weight(lora.shape).flatten(1)
        assert (got - want[f"unet.{module}"].flatten(1)).norm() <= 1e-6 * want[f"unet.{module}"].norm(), module


def test_a_trained_unbalanced_lokr_exports_to_a_file_lycoris_loads(tmp_path, lycoris_presets):
    """unbalanced_factorization puts W1 the larger half on the output side, which LyCORIS's loader never does."""
    sd = tiny_sd()
    models = copy.deepcopy(sd)
    A.attach(models["unet"], "a", "lokr", A.make_config("lokr", {"rank": 2, "alpha": 1.0, "unbalanced_factorization": True,
                                                                  "factor": 4}), "unet-full")
    with torch.no_grad():
        for p in A.trainable_parameters(models["unet"], "a"):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(6)))
    want = unet_sample(models["unet"])
    F.save(F.from_models(models, "a"), tmp_path / "k.safetensors", "lycoris", dtype="fp32")
    unet, net = _lycoris_unet(sd, read_file(tmp_path / "k.safetensors")[0])
    assert len(net.unet_loras) == len(A.delta_weights(models["unet"], "a"))
    _close(unet_sample(unet), want)


def test_a_simpletuner_file_mixing_kinds_applies_as_lycoris_applies_it(tmp_path, lycoris_presets):
    """SimpleTuner's lycoris_config with a module_algo_map giving attention LoCon and the feed-forward LoKr
    (LyCORIS's generic wrapper, lycoris_ names, UNet only)."""
    from lycoris import LycorisNetwork, create_lycoris
    sd = tiny_sd()
    ly = copy.deepcopy(sd)
    LycorisNetwork.apply_preset({"target_module": ["Attention", "FeedForward"],
                                 "module_algo_map": {"Attention": {"algo": "lora"},
                                                     "FeedForward": {"algo": "lokr", "factor": 8}}})
    net = create_lycoris(ly["unet"], 1.0, 4, 2, algo="lokr", factor=16)
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    net.save_weights(str(path), torch.float32, {})
    af = F.read(path)
    assert af.source["format"] == "lycoris (lycoris_ UNet names)"
    assert af.source["stored_kinds"]["unet"].keys() == {"LoCon", "LoKr"} and len(af.parts["unet"].modules()) == len(net.loras)
    ours = copy.deepcopy(sd)
    F.attach_file(af, ours, "st")
    want = unet_sample(ly["unet"])
    assert (want - unet_sample(sd["unet"])).abs().max() > 1e-2
    _close(unet_sample(ours["unet"]), want)


def test_an_fp16_mixed_preset_stays_fp16_and_applies_its_own_values(tmp_path, lycoris_presets):
    """Moving a module into the host kind copies its values (ones and zeros beside them): the fp16 file reads as
    fp16 and gives the deltas of the same tensors in fp32."""
    sd = tiny_sd()
    path, _, net = _preset_network(sd, tmp_path, "locon-attention-lokr-resnets")
    half, full = tmp_path / "half.safetensors", tmp_path / "full.safetensors"
    net.save_weights(str(half), torch.float16, {})
    save_file({k: v.float() for k, v in read_file(half)[0].items()}, str(full))
    af = F.read(half)
    assert af.source["dtypes"] == ["float16"] and set(af.source["stored_kinds"]["unet"]) == {"LoCon", "LoKr"}
    assert_deltas_close(_applied(af, sd), _applied(F.read(full), sd), rtol=1e-6)


def test_a_locon_module_whose_host_rank_holds_it_whole_is_written_back_as_locon(tmp_path, lycoris_presets):
    """A LoKr with a whole 128 x 32 W2 makes the component's rank 64, so the rank-2 LoCon on to_q (32 x 32) is held
    multiplied out; --format lycoris still writes it as LoCon (a full-rank pair) of the same delta."""
    g = torch.Generator().manual_seed(4)
    ff = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"            # Linear 32 -> 256
    modules = {Q: {"lora_down.weight": torch.randn(2, 32, generator=g), "lora_up.weight": torch.randn(32, 2, generator=g),
                   "alpha": torch.tensor(1.0)},
               ff: {"lokr_w1": torch.randn(2, 1, generator=g), "lokr_w2": torch.randn(128, 32, generator=g),
                    "alpha": torch.tensor(1.0)}}
    path = tmp_path / "mixed.safetensors"
    save_file({f"lora_unet_{p.replace('.', '_')}.{k}": v for p, t in modules.items() for k, v in t.items()}, str(path))
    af = F.read(path)
    assert af.parts["unet"].tensors[f"{Q}.w2_b"].shape[0] == 0  # held whole in the LoKr host
    out = tmp_path / "again.safetensors"
    assert main(["export", str(path), "--format", "lycoris", "--dtype", "fp32", "-o", str(out)]) == 0
    tensors = read_file(out)[0]
    assert tuple(tensors[f"lora_unet_{Q.replace('.', '_')}.lora_down.weight"].shape) == (32, 32)
    sd = tiny_sd()
    want = {f"unet.{Q}": 0.5 * modules[Q]["lora_up.weight"] @ modules[Q]["lora_down.weight"],
            f"unet.{ff}": torch.kron(modules[ff]["lokr_w1"], modules[ff]["lokr_w2"])}
    assert_deltas_close(_applied(F.read(out), sd), want, rtol=1e-5)
    unet, net = _lycoris_unet(sd, tensors)
    hand = copy.deepcopy(sd["unet"])
    with torch.no_grad():
        for key, dW in want.items():
            hand.get_submodule(key.removeprefix("unet.")).weight.add_(dW)
    assert len(net.unet_loras) == 2
    _close(unet_sample(unet), unet_sample(hand))
