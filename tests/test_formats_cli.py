"""`studio export`, `studio inspect`, `studio bake` end to end through studio.cli.main."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import studio.formats as F
from builders import tiny_clip, tiny_unet
from formats_helpers import copies, train
from studio.cli import main
from studio.formats.commands import parse_spec

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


def test_svf_export_needs_and_uses_the_base_folder(sd, tmp_path, capsys):
    models = train(copies(sd), "svf")
    F.save(F.from_models(models, "a"), tmp_path / "svf.safetensors")
    code, _, err = run(capsys, "export", tmp_path / "svf.safetensors", "-o", tmp_path / "k.safetensors")
    assert code == 2
    assert_one_error_line(err, "--base")
    base = tmp_path / "base"
    sd["unet"].save_pretrained(base / "unet")
    sd["te"].save_pretrained(base / "text_encoder")
    code, stdout, _ = run(capsys, "export", tmp_path / "svf.safetensors", "--base", base, "--rank", "3",
                          "-o", tmp_path / "k.safetensors")
    assert code == 0 and "rank 3" in stdout and "lowest per module:" in stdout
    assert 0 < float(F.read(tmp_path / "k.safetensors").source["header"]["studio.energy_retained_total"]) < 1


def test_bake_spec_parsing():
    assert parse_spec("a.safetensors:0.8") == ("a.safetensors", 0.8, None)
    assert parse_spec("a.safetensors:0.8:-0.5") == ("a.safetensors", 0.8, -0.5)
    assert parse_spec("a.safetensors") == ("a.safetensors", 1.0, None)
    assert parse_spec("C:/x/a:b.safetensors:-1") == ("C:/x/a:b.safetensors", -1.0, None)
