"""Community LyCORIS files, the rest of issue 16's evidence (test_formats_lycoris_kinds.py has the SD1.5 layout):

1. SDXL-layout files written by ``lycoris-lora``'s kohya wrapper (SGM UNet names, lora_te1_ / lora_te2_) for
   every kind (LoCon with 3x3 convs, LoHa, LoKr in both factor forms, LoRA + DoRA, full), in fp32, fp16 and
   bf16: the studio's UNet and text-encoder outputs equal LyCORIS's own forward at weight 1 and, for the
   linear kinds, 0.5 (1e-4 of the output's scale, fp32 maths);
2. bad files through the CLI: one ``error:`` line, exit 2, nothing written; GLoRA / OFT / BOFT files written
   by LyCORIS itself are refused by name, saying which tools load them;
3. ``studio inspect``'s per-tool compatibility lines name the keys each tool would leave unloaded.
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
from builders import tiny_sdxl_text_encoders, tiny_sdxl_unet
from cli_helpers import one_error_line
from formats_helpers import tiny_sd
from studio.cli import main
from studio.errors import StudioError

PRESET = Path(__file__).parent / "data" / "lycoris_preset.toml"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# name -> (LyCORIS algo, network args, a key the file must hold, studio method, linear in the weight)
KINDS = {
    "locon": ("locon", dict(network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1), "lora_down.weight", "lora",
              True),
    "loha": ("loha", dict(network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1), "hada_w1_a", "loha", True),
    "loha-tucker": ("loha", dict(network_dim=2, network_alpha=1, use_tucker=True), "hada_t1", "loha", True),
    "lokr-full-w1": ("lokr", dict(network_dim=2, network_alpha=1), "lokr_w2_a", "lokr", True),
    "lokr-decompose-both": ("lokr", dict(network_dim=1, network_alpha=3, decompose_both=True, factor=8),
                            "lokr_w1_a", "lokr", True),
    "lokr-both-full": ("lokr", dict(network_dim=4, network_alpha=1), "lokr_w2", "lokr", True),
    "dora": ("lora", dict(network_dim=4, network_alpha=8, conv_dim=2, conv_alpha=1, dora_wd=True), "dora_scale",
             "dora", False),
    "full": ("full", dict(network_dim=4, network_alpha=1), "diff_b", "full", True),
}


def _close(got, want, rel=1e-4):
    """Equal to ``rel`` of the output's scale (fp32)."""
    error = (got - want).abs().max().item()
    assert error <= rel * want.abs().max().item(), f"max error {error:.3g} (scale {want.abs().max().item():.3g})"


# -- 1. SDXL-layout files ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xl():
    torch.manual_seed(0)
    te1, te2 = tiny_sdxl_text_encoders()
    return {"unet": tiny_sdxl_unet().eval(), "te1": te1.eval(), "te2": te2.eval()}


def _xl_unet(unet):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]),
                    encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                    added_cond_kwargs={"text_embeds": torch.randn(2, 16, generator=g),
                                       "time_ids": torch.randn(2, 6, generator=g)}).sample


def _te(te):
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return te(input_ids=ids).last_hidden_state


def _outputs(models):
    return {"unet": _xl_unet(models["unet"]), "te1": _te(models["te1"]), "te2": _te(models["te2"])}


def _lycoris_xl(xl, path, kind, dtype, preset=PRESET):
    """A LyCORIS network of ``kind`` on copies of the SDXL-layout models, moved off its init, its parameters
    rounded to ``dtype`` (so the live network is what the file holds) and saved by LyCORIS in ``dtype``.
    LyCORIS's full module trains the whole weight and saves diff = W - W0 rounded: that file is loaded back
    by LyCORIS's own loader (``create_network_from_weights``), whose network is then what the file means."""
    import lycoris.kohya as lycoris_kohya  # a test dependency: never skipped
    algo, args, key, _, _ = KINDS[kind]
    args = dict(args)
    ly = copy.deepcopy(xl)
    net = lycoris_kohya.create_network(1.0, args.pop("network_dim"), args.pop("network_alpha"), None,
                                       [ly["te1"], ly["te2"]], ly["unet"], algo=algo, preset=str(preset), **args)
    net.apply_to([ly["te1"], ly["te2"]], ly["unet"], apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            p.copy_(p.to(DTYPES[dtype]).float())
    net.save_weights(str(path), DTYPES[dtype], {})
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert any(k.endswith("." + key) for k in keys), f"{kind}: LyCORIS wrote no {key}"
        assert any(k.startswith("lora_unet_down_blocks_") for k in keys)  # a diffusers UNet's own names
        assert {f.get_tensor(k).dtype for k in keys} == {DTYPES[dtype]}
    if kind == "full" and dtype != "fp32":
        from lycoris.utils.preset import read_preset
        lycoris_kohya.LycorisNetworkKohya.apply_preset(read_preset(str(PRESET)))
        ly = copy.deepcopy(xl)
        net, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), None, [ly["te1"], ly["te2"]], ly["unet"])
        net.apply_to([ly["te1"], ly["te2"]], ly["unet"], apply_text_encoder=True, apply_unet=True)
    return ly, net


CASES = [(kind, "fp32") for kind in KINDS] + [("loha", "fp16"), ("lokr-full-w1", "bf16"), ("locon", "bf16"),
                                               ("full", "fp16")]


@pytest.mark.parametrize("kind,dtype", CASES, ids=[f"{k}-{d}" for k, d in CASES])
def test_sdxl_layout_lycoris_files_apply_as_lycoris_applies_them(xl, tmp_path, kind, dtype):
    path = tmp_path / f"{kind}.safetensors"
    ly, net = _lycoris_xl(xl, path, kind, dtype)
    af = F.read(path)
    method, linear = KINDS[kind][3], KINDS[kind][4]
    assert af.base == "sdxl" and {c: p.method for c, p in af.parts.items()} == dict.fromkeys(("unet", "te1", "te2"),
                                                                                              method)
    assert af.source["dtypes"] == [dtype.replace("fp", "float").replace("bf16", "bfloat16")]
    ours = copy.deepcopy(xl)
    attached = F.attach_file(af, ours, "ly")
    assert len(attached["unet"]) == len(net.unet_loras)
    assert len(attached["te1"]) + len(attached["te2"]) == len(net.text_encoder_loras)
    if kind == "locon":  # LoCon's 3x3 convs in the ResNet blocks and the samplers are in the file and applied
        assert {"down_blocks.0.resnets.0.conv1", "down_blocks.0.downsamplers.0.conv",
                "up_blocks.0.upsamplers.0.conv"} <= set(attached["unet"])
    base, want = _outputs(xl), _outputs(ly)
    assert (want["unet"] - base["unet"]).abs().max() > 1e-2  # the network does something
    got = _outputs(ours)
    for c in want:
        _close(got[c], want[c])
    if not linear:  # DoRA: LyCORIS's multiplier is affine (reference/lycoris.md 4), the studio's linear
        return
    net.set_multiplier(0.5)  # LyCORIS's forward at 0.5 is W0 + 0.5 dW for these kinds
    F.set_file_weight(ours, "ly", 0.5)
    want, got = _outputs(ly), _outputs(ours)
    for c in want:
        _close(got[c], want[c])
    for model in ours.values():  # and merged into the weights, as the mixer renders a settled mix
        A.merge(model)
    got = _outputs(ours)
    for c in want:
        _close(got[c], want[c])


# kohya_ss trains SDXL on sd-scripts' own (SGM-named) UNet, so its LyCORIS files name the UNet input_blocks /
# middle_block / output_blocks. The renames below are A1111's (reference/formats.md 2.1) and the LDM UNet's
# ResNet layout, written out here rather than taken from studio.formats.names.
_RESNET = {"norm1": "in_layers_0", "conv1": "in_layers_2", "time_emb_proj": "emb_layers_1", "norm2": "out_layers_0",
           "conv2": "out_layers_3", "conv_shortcut": "skip_connection"}


def _sgm(name: str) -> str:
    import re
    rules = [
        (r"lora_unet_down_blocks_(\d)_attentions_(\d)_", lambda b, a: f"lora_unet_input_blocks_{1 + 3 * b + a}_1_"),
        (r"lora_unet_up_blocks_(\d)_attentions_(\d)_", lambda b, a: f"lora_unet_output_blocks_{3 * b + a}_1_"),
        (r"lora_unet_mid_block_attentions_0_", lambda: "lora_unet_middle_block_1_"),
        (r"lora_unet_down_blocks_(\d)_resnets_(\d)_", lambda b, r: f"lora_unet_input_blocks_{1 + 3 * b + r}_0_"),
        (r"lora_unet_up_blocks_(\d)_resnets_(\d)_", lambda b, r: f"lora_unet_output_blocks_{3 * b + r}_0_"),
        (r"lora_unet_mid_block_resnets_(\d)_", lambda r: f"lora_unet_middle_block_{2 * r}_"),
        (r"lora_unet_down_blocks_(\d)_downsamplers_0_conv", lambda b: f"lora_unet_input_blocks_{3 * (b + 1)}_0_op"),
        (r"lora_unet_up_blocks_(\d)_upsamplers_0_", lambda b: f"lora_unet_output_blocks_{3 * b + 2}_2_"),
    ]
    for pattern, to in rules:
        m = re.match(pattern, name)
        if m:
            rest = name[m.end():]
            if "_resnets_" in pattern:
                module, _, tail = rest.partition(".")
                rest = f"{_RESNET[module]}.{tail}"
            return to(*map(int, m.groups())) + rest
    return name


def _as_sgm_file(path, out):
    tensors, meta = F.files.read(path)
    save_file({_sgm(k): v for k, v in tensors.items()}, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("kind", ["loha", "lokr-full-w1", "dora"])
def test_sgm_named_sdxl_files_as_kohya_ss_writes_them_apply_as_lycoris_applies_them(xl, tmp_path, kind):
    """Attention blocks only (the part of an SGM UNet the studio maps)."""
    preset = tmp_path / "attention.toml"
    preset.write_text(PRESET.read_text().replace('"ResnetBlock2D", "Downsample2D", "Upsample2D"', ""))
    assert "Resnet" not in preset.read_text()
    path = tmp_path / "d.safetensors"
    ly, net = _lycoris_xl(xl, path, kind, "fp32", preset)
    sgm = F.read(_as_sgm_file(path, tmp_path / "sgm.safetensors"))
    assert sgm.source["unet_layout"] == "sgm" and sgm.base == "sdxl"
    ours = copy.deepcopy(xl)
    assert len(F.attach_file(sgm, ours, "ly")["unet"]) == len(net.unet_loras)
    want, got = _outputs(ly), _outputs(ours)
    assert (want["unet"] - _outputs(xl)["unet"]).abs().max() > 1e-2
    for c in want:
        _close(got[c], want[c])


def test_sgm_named_sdxl_resnet_modules_import(xl, tmp_path):
    """kohya_ss's SDXL LoCon / LoHa / LoKr files name ResNet and sampler modules in SGM terms too."""
    path = tmp_path / "d.safetensors"
    ly, net = _lycoris_xl(xl, path, "locon", "fp32")
    ours = copy.deepcopy(xl)
    F.attach_file(F.read(_as_sgm_file(path, tmp_path / "sgm.safetensors")), ours, "ly")
    want, got = _outputs(ly), _outputs(ours)
    for c in want:
        _close(got[c], want[c])


# -- 2. bad files through the CLI: one error line, exit 2, nothing written ---------------------------
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 32 -> 32 (tiny SD and the mini base)
CONV1 = "down_blocks.0.resnets.0.conv1"                           # 3x3, 32 -> 32
MINI = str(Path(__file__).resolve().parents[1] / "sample_data" / "mini-sd")


def _kohya_name(path):
    return "lora_unet_" + path.replace(".", "_")


def _hand_file(tmp_path, modules: dict) -> Path:
    path = tmp_path / "bad.safetensors"
    save_file({f"{_kohya_name(m)}.{k}": v for m, t in modules.items() for k, v in t.items()}, str(path))
    return path


def _loha(r=2, out=32, cols=32):
    g = torch.Generator().manual_seed(0)
    return {"hada_w1_a": torch.randn(out, r, generator=g), "hada_w1_b": torch.randn(r, cols, generator=g),
            "hada_w2_a": torch.randn(out, r, generator=g), "hada_w2_b": torch.randn(r, cols, generator=g),
            "alpha": torch.tensor(1.0)}


def _refused_everywhere(capsys, tmp_path, path) -> list[str]:
    """``studio inspect`` and ``studio export`` (both formats) on ``path``: one error line each, no file."""
    lines = [one_error_line(capsys, ["inspect", str(path)])]
    for fmt in ("kohya", "lycoris"):
        out = tmp_path / f"out-{fmt}.safetensors"
        lines.append(one_error_line(capsys, ["export", str(path), "--format", fmt, "-o", str(out)]))
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing else written, no temp file
    return lines


def _tucker_loha_wrong_core():
    t = _loha(r=4)
    t.update(hada_w1_a=torch.randn(4, 32), hada_w2_a=torch.randn(4, 32), hada_t1=torch.randn(4, 4, 3, 3),
             hada_t2=torch.randn(3, 3, 3, 3))  # t2 of rank 3 beside rank-4 factors
    return t


BAD = {
    "loha-missing-factor": (lambda: {Q: {k: v for k, v in _loha().items() if k != "hada_w2_a"}},
                            [Q, "hada_w2_a"]),
    "tucker-core-wrong-rank": (lambda: {CONV1: _tucker_loha_wrong_core()}, [CONV1, "Tucker core"]),
    "lycoris-and-plain-keys": (lambda: {Q: {**_loha(), "lora_down.weight": torch.randn(2, 32),
                                            "lora_up.weight": torch.randn(32, 2)}}, [Q, "LoHa", "lora_down"]),
    "lokr-and-plain-keys": (lambda: {Q: {"lokr_w1": torch.randn(4, 4), "lokr_w2": torch.randn(8, 8),
                                         "lora_down.weight": torch.randn(2, 32), "lora_up.weight": torch.randn(32, 2)}},
                            [Q, "LoKr"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lycoris_files_are_one_error_line_naming_the_module_and_nothing_is_written(tmp_path, capsys, case):
    make, words = BAD[case]
    path = _hand_file(tmp_path, make())
    for line in _refused_everywhere(capsys, tmp_path, path):
        assert str(path) in line
        for word in words:
            assert word in line or word.replace(".", "_") in line, (word, line)


def test_a_lokr_whose_factors_do_not_multiply_to_the_weight_is_one_error_line_in_generate(tmp_path, capsys):
    # W1 (4, 4) x W2 (8, 4): a (32, 16) delta for the mini base's (32, 32) to_q
    path = _hand_file(tmp_path, {Q: {"lokr_w1": torch.randn(4, 4), "lokr_w2": torch.randn(8, 4),
                                     "alpha": torch.tensor(1.0)}})
    out = tmp_path / "images"
    line = one_error_line(capsys, ["generate", "--prompt", "a red circle", "--adapter", f"{path}:0.8", "--steps", "1",
                                   "--base", MINI, "--out", str(out)])
    assert str(path) in line and Q in line and "(8, 8)" in line
    assert not out.exists() or not any(out.iterdir())
    # converting it against the base it claims refuses too, instead of writing a file no loader can apply
    for argv in (["export", str(path), "--rank", "4", "--base", MINI], ["bake", f"{path}:1", "--rank", "4", "--base", MINI]):
        target = tmp_path / "plain.safetensors"
        line = one_error_line(capsys, [*argv, "-o", str(target)])
        assert f"unet.{Q}" in line and "32 x 16 delta but the base's layer is 32 x 32" in line, line
        assert not target.exists()


@pytest.fixture(scope="module")
def sd():
    return tiny_sd()


@pytest.mark.parametrize("algo,name", [("glora", "GLoRA"), ("diag-oft", "OFT"), ("boft", "BOFT")])
def test_glora_oft_and_boft_files_written_by_lycoris_are_refused_by_name_saying_which_tools_load_them(
        sd, tmp_path, capsys, algo, name):
    import lycoris.kohya as lycoris_kohya  # a test dependency: never skipped
    models = copy.deepcopy(sd)
    net = lycoris_kohya.create_network(1.0, 4, 1, None, models["te"], models["unet"], algo=algo, preset=str(PRESET))
    net.apply_to(models["te"], models["unet"], apply_text_encoder=True, apply_unet=True)
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float16, {})
    for line in _refused_everywhere(capsys, tmp_path, path):
        assert f"is a {name} file" in line and f"{name} is not supported" in line
        assert "ComfyUI" in line and "Forge" in line  # where the file does load


# -- 3. studio inspect: will it load, per tool ------------------------------------------------------
SGM_Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
TE1_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"      # lora_te_ on SDXL: CLIP-L for ComfyUI only
TE2 = "lora_te2_text_model_encoder_layers_0_self_attn_"
BARE_TE = "lora_te_encoder_layers_0_self_attn_q_proj"


def _lora(r=2, out=32, cols=32):
    g = torch.Generator().manual_seed(1)
    return {"lora_down.weight": torch.randn(r, cols, generator=g), "lora_up.weight": torch.randn(out, r, generator=g),
            "alpha": torch.tensor(1.0)}


def _flat(modules: dict) -> dict:
    return {f"{name}.{k}": v for name, t in modules.items() for k, v in t.items()}


# file -> (its modules by kohya name, metadata, {tool: the keys it leaves unloaded} (tools not named: none))
HAND = {
    "dora": ({_kohya_name(Q): {**_lora(), "dora_scale": torch.ones(32, 1)}}, {},
             {"diffusers": [f"{_kohya_name(Q)}.dora_scale"], "kohya": [f"{_kohya_name(Q)}.dora_scale"]}),
    "sdxl-lora_te_": ({SGM_Q: _lora(), TE1_Q: _lora()}, {"ss_base_model_version": "sdxl_base_v1-0"},
                      {"A1111": [f"{TE1_Q}.{k}" for k in ("alpha", "lora_down.weight", "lora_up.weight")],
                       "kohya": [f"{TE1_Q}.{k}" for k in ("alpha", "lora_down.weight", "lora_up.weight")]}),
    "sdxl-te2-without-out_proj": ({SGM_Q: _lora(), **{f"{TE2}{p}_proj": _lora(out=16, cols=16) for p in "qkv"}}, {},
                                  {"A1111": sorted(f"{TE2}{p}_proj.{k}" for p in "qkv"
                                                   for k in ("alpha", "lora_down.weight", "lora_up.weight"))}),
    # as LyCORIS names a transformers-5 CLIPTextModel (no text_model level): the UIs' CLIP maps start at text_model_
    "te-without-text_model": ({_kohya_name(Q): _lora(), BARE_TE: _lora()}, {},
                              dict.fromkeys(("A1111", "Forge", "ComfyUI", "kohya"),
                                            [f"{BARE_TE}.{k}" for k in ("alpha", "lora_down.weight", "lora_up.weight")])),
    "loha": ({_kohya_name(Q): _loha()}, {},
             {"diffusers": sorted(f"{_kohya_name(Q)}.{k}" for k in _loha()),
              "kohya": sorted(f"{_kohya_name(Q)}.{k}" for k in _loha() if k != "alpha")}),
}


@pytest.mark.parametrize("case", list(HAND))
def test_inspect_names_the_keys_each_tool_would_leave_unloaded(tmp_path, capsys, case):
    modules, meta, unloaded = HAND[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(_flat(modules), str(path), metadata=meta)
    assert main(["inspect", str(path), "--json"]) == 0
    compat = json.loads(capsys.readouterr().out)["compatibility"]
    assert set(compat) == {"studio", "A1111", "Forge", "ComfyUI", "diffusers", "kohya"}
    for tool, c in compat.items():
        assert c["unloaded"] == unloaded.get(tool, []), tool
        assert c["of"] == len(modules)
    assert compat["studio"]["modules"] == len(modules)  # the studio applies every module of a file it reads
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out.splitlines()
    lines = {line.split()[0]: line for line in text[text.index("will it load (each tool's key rules):") + 1:]}
    for tool, keys in unloaded.items():
        assert f"{len(keys)} key(s) unloaded: {keys[0]}" in lines[tool]
    for tool in set(compat) - set(unloaded):
        assert lines[tool].split(None, 1)[1] == f"all {len(modules)} modules"
    if case == "loha":  # diffusers loads no LoHa: the line says so and offers the plain-LoRA conversion
        assert "0 of 1 modules" in lines["diffusers"]
        assert f"studio export {path} --format kohya --rank 32" in lines["diffusers"]
        assert "0 of 1 modules" in lines["kohya"]
    if case == "dora":
        assert "drops DoRA's dora_scale" in lines["diffusers"] and "1 of 1 modules" in lines["diffusers"]
    if case == "te-without-text_model":
        assert "1 of 2 modules" in lines["ComfyUI"] and "text_model_" in lines["ComfyUI"]
    if case == "sdxl-te2-without-out_proj":
        assert "need q, k, v and out_proj" in lines["A1111"]


def test_inspect_of_a_native_file_says_only_the_studio_reads_it_and_how_to_export(tmp_path, capsys, sd):
    from formats_helpers import train
    path = tmp_path / "n.safetensors"
    F.save(F.from_models(train(copy.deepcopy(sd), "lora"), "a"), path, "native")
    assert main(["inspect", str(path), "--json"]) == 0
    compat = json.loads(capsys.readouterr().out)["compatibility"]
    assert compat.pop("studio")["unloaded"] == []
    with safe_open(str(path), "pt") as f:
        keys = sorted(f.keys())
    for tool, c in compat.items():
        assert c["modules"] == 0 and c["unloaded"] == keys, tool
        assert f"studio export {path} --format kohya" in c["note"]


def test_the_conversion_the_inspect_line_offers_gives_a_file_every_tool_loads(tmp_path, capsys):
    path = tmp_path / "loha.safetensors"
    save_file(_flat({_kohya_name(Q): _loha()}), str(path))
    plain = tmp_path / "plain.safetensors"
    assert main(["export", str(path), "--format", "kohya", "--rank", "32", "-o", str(plain)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(plain), "--json"]) == 0
    compat = json.loads(capsys.readouterr().out)["compatibility"]
    assert all(c["unloaded"] == [] for c in compat.values()), compat


# -- SD1.5 layout: what test_formats_lycoris_kinds.py / test_formats_dora.py leave out ---------------
def _sd_unet(unet):
    from formats_helpers import unet_sample
    return unet_sample(unet)


def _lycoris_sd(sd, path, algo, **args):
    import lycoris.kohya as lycoris_kohya  # a test dependency: never skipped
    ly = copy.deepcopy(sd)
    net = lycoris_kohya.create_network(1.0, args.pop("network_dim"), args.pop("network_alpha"), None, ly["te"],
                                       ly["unet"], algo=algo, preset=str(PRESET), **args)
    net.apply_to(ly["te"], ly["unet"], apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    net.save_weights(str(path), torch.float32, {})
    return ly, net


def test_a_lycoris_locon_file_on_the_sd15_layout_applies_as_lycoris_applies_it(sd, tmp_path):
    """LoCon (3x3 convs in the ResNets and samplers at conv_dim, Linears at network_dim), weight 1 and 0.5."""
    path = tmp_path / "locon.safetensors"
    ly, net = _lycoris_sd(sd, path, "locon", network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1)
    with safe_open(str(path), "pt") as f:
        assert tuple(f.get_slice(f"{_kohya_name(CONV1)}.lora_down.weight").get_shape()) == (2, 32, 3, 3)
    ours = copy.deepcopy(sd)
    attached = F.attach_file(F.read(path), ours, "ly")
    assert len(attached["unet"]) == len(net.unet_loras) and len(attached["te"]) == len(net.text_encoder_loras)
    assert {CONV1, "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"} <= set(attached["unet"])
    assert (_sd_unet(ly["unet"]) - _sd_unet(sd["unet"])).abs().max() > 1e-2
    for weight in (1.0, 0.5):
        net.set_multiplier(weight)
        F.set_file_weight(ours, "ly", weight)
        _close(_sd_unet(ours["unet"]), _sd_unet(ly["unet"]))
        _close(_te(ours["te"]), _te(ly["te"]))


def test_converting_a_lycoris_dora_file_reports_the_error_it_makes_and_is_exact_at_full_rank(sd, tmp_path):
    """DoRA's delta W' - W0 depends on the base: the conversion needs it, and its reported error is the measured."""
    import math
    path = tmp_path / "dora.safetensors"
    _lycoris_sd(sd, path, "lora", network_dim=4, network_alpha=8, conv_dim=2, conv_alpha=1, dora_wd=True)
    af = F.read(path)
    want = copy.deepcopy(sd)
    F.attach_file(af, want, "d")
    exact = {c: A.delta_weights(m, "d") for c, m in want.items()}

    def measured(plain_path):
        got = copy.deepcopy(sd)
        F.attach_file(F.read(plain_path), got, "p")
        err2 = norm2 = 0.0
        for c, deltas in exact.items():
            plain = A.delta_weights(got[c], "p")
            for p, dW in deltas.items():
                err2 += float((dW - plain[p]).double().square().sum())
                norm2 += float(dW.double().square().sum())
        return math.sqrt(err2 / norm2)

    full = F.save(af, tmp_path / "full.safetensors", "kohya", energy=1.0, dtype="fp32", models=sd)
    assert full.energy == pytest.approx(1.0, abs=1e-9) and measured(tmp_path / "full.safetensors") < 1e-5
    for rank in (1, 3):
        report = F.save(af, tmp_path / f"r{rank}.safetensors", "kohya", rank=rank, dtype="fp32", models=sd)
        assert 0.0 < report.energy < 1.0 and report.relative_error > 1e-3
        assert measured(tmp_path / f"r{rank}.safetensors") == pytest.approx(report.relative_error, rel=1e-3)


@pytest.mark.parametrize("case", ["plain", "dora", "loha", "lokr", "full"])
def test_the_diffusers_line_is_what_diffusers_does(tmp_path, capsys, case):
    """diffusers is installed: its SD1.5 loader's key conversion must agree with the line's rule (raises on a
    LyCORIS kind and loads nothing; drops dora_scale and keeps the rest; loads a plain LoRA whole)."""
    from diffusers import StableDiffusionPipeline
    module = {"plain": _lora(), "dora": {**_lora(), "dora_scale": torch.ones(32, 1)}, "loha": _loha(),
              "lokr": {"lokr_w1": torch.randn(4, 4), "lokr_w2": torch.randn(8, 8), "alpha": torch.tensor(1.0)},
              "full": {"diff": torch.randn(32, 32), "diff_b": torch.randn(32)}}[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(_flat({_kohya_name(Q): module}), str(path))
    assert main(["inspect", str(path), "--json"]) == 0
    line = json.loads(capsys.readouterr().out)["compatibility"]["diffusers"]
    try:
        loaded = StableDiffusionPipeline.lora_state_dict(str(path))[0]
    except ValueError:
        loaded = None
    if line["modules"] == 0:
        assert loaded is None
    else:
        assert loaded is not None and line["modules"] == line["of"]
        assert not any("dora_scale" in k for k in loaded)
        assert line["unloaded"] == sorted(k for k in F.files.read(path)[0] if k.endswith(".dora_scale"))


def test_sdxl_locon_exports_in_sgm_names_and_reimports_exactly(xl, tmp_path):
    """--format kohya on SDXL writes SGM names for every module, ResNets and samplers included (what
    kohya_ss writes, A1111 / ComfyUI map from the checkpoint's own names), and reads back to the same outputs."""
    models = copy.deepcopy(xl)
    A.attach(models["unet"], "a", "lora", A.make_config("lora", {"rank": 2, "conv_rank": 2}), "unet-full")
    with torch.no_grad():
        for p in A.trainable_parameters(models["unet"], "a"):
            p.normal_(0, 0.2)
    want = _xl_unet(models["unet"])
    F.save(F.from_models({"unet": models["unet"]}, "a", base="sdxl"), tmp_path / "k.safetensors", "kohya", dtype="fp32")
    keys = set(F.files.read(tmp_path / "k.safetensors")[0])
    for name in ("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_4_0_skip_connection",
                 "lora_unet_input_blocks_3_0_op", "lora_unet_middle_block_2_out_layers_3",
                 "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_8_0_emb_layers_1",
                 "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"):
        assert f"{name}.lora_down.weight" in keys, name
    assert not any(k.startswith("lora_unet_down_blocks") for k in keys)
    back = copy.deepcopy(xl)
    F.attach_file(F.read(tmp_path / "k.safetensors"), back, "b")
    _close(_xl_unet(back["unet"]), want, 1e-5)
