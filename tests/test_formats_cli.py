"""`studio export`, `studio inspect`, `studio bake` end to end through studio.cli.main."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import studio.formats as F
from builders import tiny_clip, tiny_pipeline, tiny_sdxl_text_encoders, tiny_sdxl_unet, tiny_unet
from formats_helpers import copies, train
from studio.cli import main
from studio.formats.load import parse_spec
from studio.shapes.tokenizer import load_tokenizer, write_tokenizer

LORA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    return {"unet": tiny_unet(), "te": tiny_clip()}


@pytest.fixture(scope="module")
def adapters(sd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, method, seed in (("a", "lora", 1), ("b", "pissa", 2)):
        models = train(copies(sd), method, seed=seed)
        meta = F.training_metadata(trigger_phrase=f"zq{name}")
        F.save(F.from_models(models, "a", metadata=meta), folder / f"{name}.safetensors")
        out[name] = folder / f"{name}.safetensors"
    return out


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, *needles: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_export_kohya_and_inspect(adapters, tmp_path, capsys):
    out = tmp_path / "a-kohya.safetensors"
    code, stdout, err = run(capsys, "export", adapters["a"], "-o", out)
    assert code == 0 and err == ""
    assert f"wrote {out} (kohya, fp16, rank 2, alpha 2" in stdout and "sha256 " in stdout
    code, stdout, _ = run(capsys, "inspect", out)
    assert code == 0 and "format:    kohya" in stdout and "trigger:   zqa" in stdout
    code, stdout, _ = run(capsys, "inspect", out, "--json")
    info = json.loads(stdout)
    assert code == 0 and info["modules"] == {"unet": 32, "te": 8} and info["hash"]["matches"] is True


def test_export_diffusers_is_labelled(adapters, tmp_path, capsys):
    code, stdout, _ = run(capsys, "export", adapters["b"], "--format", "diffusers", "--dtype", "fp32", "-o",
                          tmp_path / "b.safetensors")
    assert code == 0 and "diffusers only" in stdout and "rank 4" in stdout


def test_export_refuses_to_overwrite_without_the_flag(adapters, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = run(capsys, "export", adapters["a"], "-o", out)
    assert code == 2
    assert_one_error_line(err, "out.safetensors already exists", "--overwrite")
    assert out.read_bytes() == b"keep me"
    code, _, _ = run(capsys, "export", adapters["a"], "-o", out, "--overwrite")
    assert code == 0 and F.read(out).method == "lora"


def _bad_files(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, I am not a safetensors file")
    leftovers = tmp_path / "leftovers.safetensors"
    save_file({f"{LORA}.lora_down.weight": torch.randn(2, 32), f"{LORA}.lora_up.weight": torch.randn(32, 2),
               f"{LORA}.weird": torch.ones(1)}, str(leftovers))
    return {"notes.safetensors": (text, "not a .safetensors file"),
            "missing.safetensors": (tmp_path / "missing.safetensors", "no such file"),
            "leftovers.safetensors": (leftovers, f"{LORA}.weird")}


@pytest.mark.parametrize("command", ["inspect", "export", "bake"])
def test_bad_files_give_one_error_line_and_exit_2(tmp_path, capsys, command):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous export")
    for name, (path, message) in _bad_files(tmp_path).items():
        argv = {"inspect": ["inspect", path], "export": ["export", path, "-o", out, "--overwrite"],
                "bake": ["bake", f"{path}:0.5", "-o", out, "--overwrite"]}[command]
        code, stdout, err = run(capsys, *argv)
        assert code == 2, name
        assert_one_error_line(err, name, message)
        assert out.read_bytes() == b"previous export"  # a failing export never touches OUT


def test_an_interrupted_export_keeps_the_previous_file(adapters, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous export")

    def interrupted(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)
    code, _, err = run(capsys, "export", adapters["a"], "-o", out, "--overwrite")
    assert code == 130 and "interrupted" in err
    assert out.read_bytes() == b"previous export" and os.listdir(tmp_path) == ["out.safetensors"]


def test_bake_exact_and_at_a_rank(adapters, sd, tmp_path, capsys):
    code, stdout, err = run(capsys, "bake", f"{adapters['a']}:0.8", f"{adapters['b']}:-0.3:0.1", "--dtype", "fp32",
                            "-o", tmp_path / "mix.safetensors")
    assert code == 0 and err == "" and "baked 2 adapters (exact): retained energy 1.000000" in stdout
    mix = F.read(tmp_path / "mix.safetensors")
    sources = json.loads(mix.source["header"]["studio.baked_from"])
    assert [(s["weight"], s["te_weight"]) for s in sources] == [(0.8, None), (-0.3, 0.1)]
    code, stdout, _ = run(capsys, "bake", f"{adapters['a']}:0.8", f"{adapters['b']}:-0.3", "--rank", "1",
                          "-o", tmp_path / "mix1.safetensors")
    assert code == 0 and "baked 2 adapters (rank 1): retained energy 0." in stdout and "Frobenius error" in stdout
    assert F.read(tmp_path / "mix1.safetensors").source["ranks"]["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == 1


@pytest.fixture(scope="module")
def base_folder(sd, tmp_path_factory):
    """``sd`` saved as a complete diffusers pipeline folder (what studio.models.load_diffusion_base reads)."""
    folder = tmp_path_factory.mktemp("base")
    pipe = tiny_pipeline(sd["unet"], sd["te"])
    pipe.tokenizer = load_tokenizer(write_tokenizer(folder / "tok", 16))
    pipe.register_modules(tokenizer=pipe.tokenizer)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


def test_svf_export_needs_and_uses_the_base_folder(sd, base_folder, tmp_path, capsys):
    models = train(copies(sd), "svf")
    F.save(F.from_models(models, "a"), tmp_path / "svf.safetensors")
    code, _, err = run(capsys, "export", tmp_path / "svf.safetensors", "-o", tmp_path / "k.safetensors")
    assert code == 2
    assert_one_error_line(err, "--base")
    code, stdout, _ = run(capsys, "export", tmp_path / "svf.safetensors", "--base", base_folder, "--rank", "3",
                          "-o", tmp_path / "k.safetensors")
    assert code == 0 and "rank 3" in stdout and "lowest per module:" in stdout
    assert 0 < float(F.read(tmp_path / "k.safetensors").source["header"]["studio.energy_retained_total"]) < 1
    # bake too loads the base through studio.models
    code, stdout, _ = run(capsys, "bake", f"{tmp_path / 'svf.safetensors'}:0.5", "--base", base_folder,
                          "-o", tmp_path / "baked.safetensors")
    assert code == 0 and "baked 1 adapters (exact)" in stdout


def test_base_errors_are_one_line(sd, base_folder, tmp_path, capsys):
    models = train(copies(sd), "svf")
    F.save(F.from_models(models, "a"), tmp_path / "svf.safetensors")
    partial = tmp_path / "partial"  # unet/ and text_encoder/ only: not a pipeline folder
    sd["unet"].save_pretrained(partial / "unet")
    sd["te"].save_pretrained(partial / "text_encoder")
    for base, needle in ((partial, "model_index.json"), (tmp_path / "nowhere", "does not exist")):
        code, _, err = run(capsys, "export", tmp_path / "svf.safetensors", "--base", base, "-o", tmp_path / "k.safetensors")
        assert code == 2
        assert_one_error_line(err, needle)
    # an SDXL adapter on an SD1.5-shaped base
    te1, te2 = tiny_sdxl_text_encoders()
    xl = train({"unet": tiny_sdxl_unet(), "te1": te1, "te2": te2}, "lora")
    F.save(F.from_models(xl, "a"), tmp_path / "xl.safetensors")
    code, _, err = run(capsys, "export", tmp_path / "xl.safetensors", "--base", base_folder, "-o", tmp_path / "x.safetensors")
    assert code == 2
    assert_one_error_line(err, "adapts te1, te2", "give the base the adapter was trained on")


def test_export_with_a_base_asks_it_which_modules_are_convs(sd, base_folder, tmp_path, capsys):
    from safetensors import safe_open

    models = train(copies(sd), "lora", targets={"unet": ["unet-attn", "proj_in", "proj_out"], "te": "te-attn"})
    F.save(F.from_models(models, "a"), tmp_path / "proj.safetensors")
    code, _, err = run(capsys, "export", tmp_path / "proj.safetensors", "--base", base_folder, "-o", tmp_path / "k.safetensors")
    assert code == 0 and err == ""
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert f.get_slice("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").get_shape() == [2, 32, 1, 1]


def test_bake_spec_parsing():
    assert parse_spec("a.safetensors:0.8") == ("a.safetensors", 0.8, None)
    assert parse_spec("a.safetensors:0.8:-0.5") == ("a.safetensors", 0.8, -0.5)
    assert parse_spec("a.safetensors") == ("a.safetensors", 1.0, None)
    assert parse_spec("C:/x/a:b.safetensors:-1") == ("C:/x/a:b.safetensors", -1.0, None)
