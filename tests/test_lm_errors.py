"""Bad input on the language-model path: one `error:` line naming the file / line / module, exit code 2."""

import re
from pathlib import Path

import pytest

import studio.adapters as A
from lm_helpers import pirate_jsonl, tiny_gpt2_lm, tiny_lm, tiny_lm_folder  # noqa: F401  (fixtures)
from studio import formats
from cli_helpers import one_error_line
from studio.cli import main

ROOT = Path(__file__).resolve().parents[1]


_error = one_error_line


def _train(data, base, out):
    return ["train", "--task", "lm", str(data), "--base", str(base), "--out", str(out), "--steps", "1"]


def test_bad_data_files(tiny_lm, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    assert f"{empty} is empty" in _error(capsys, _train(empty, tiny_lm, tmp_path / "a"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\ncaf\u00e9 au lait\n".encode("latin-1"))
    line = _error(capsys, _train(latin, tiny_lm, tmp_path / "b"))
    assert f"{latin} is not UTF-8 text (byte 14, line 2): convert it" in line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": "b"\n')
    assert f"{bad} line 3 is not JSON" in _error(capsys, _train(bad, tiny_lm, tmp_path / "c"))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "answer": "b"}\n')
    assert f'{missing} line 2 lacks "response"' in _error(capsys, _train(missing, tiny_lm, tmp_path / "d"))
    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "a", "response": "b"}\n' + '{"prompt": "%s", "response": "b"}\n' % ("frog " * 80))
    line = _error(capsys, _train(long, tiny_lm, tmp_path / "e"))
    assert f"{long} line 2 is " in line and "tokens long but the model's context is 64: shorten that record" in line
    text = tmp_path / "ok.txt"
    text.write_text("A frog is green.\n")
    assert "--block-size 64 or less" in _error(capsys, _train(text, tiny_lm, tmp_path / "f") + ["--block-size", "65"])
    assert not any((tmp_path / d).exists() for d in "abcdef")  # nothing written for a run that never started


def test_image_only_flags_and_a_diffusion_base_are_refused(tiny_lm, tmp_path, capsys):
    data = pirate_jsonl(tmp_path, 4)
    line = _error(capsys, _train(data, tiny_lm, tmp_path / "a") + ["--unet-lr", "1e-3"])
    assert "unknown config key 'unet_lr' in the command line" in line
    line = _error(capsys, _train(data, ROOT / "sample_data" / "mini-sd", tmp_path / "b"))
    assert "is a diffusion pipeline: language-model training needs a causal LM" in line


def _lm_adapter(base_folder: Path, path: Path) -> Path:
    from studio.models import load_causal_lm

    model, _ = load_causal_lm(str(base_folder))
    A.attach(model, "pirate", "lora", A.make_config("lora", {"rank": 2}), ["lm-attn"])
    metadata = formats.training_metadata(base_model_name=base_folder.name, lm_architecture=model.config.model_type)
    formats.save(formats.from_models({"lm": model}, "pirate", metadata=metadata), path, "native")
    return path


def _generate_lm(base, adapter):
    return ["generate", "--task", "lm", "--base", str(base), "--prompt", "Q: What colour is a frog?\\nA:",
            "--adapter", f"{adapter}:1", "--max-new-tokens", "4"]


def test_adapter_of_another_language_model_names_the_module(tiny_lm, tiny_gpt2_lm, tmp_path, capsys):
    adapter = _lm_adapter(tiny_lm, tmp_path / "llama.safetensors")
    line = _error(capsys, _generate_lm(tiny_gpt2_lm, adapter))
    assert re.search(r"does not fit this base .* it adapts 'lm\.model\.layers\.\d\.self_attn\.[qkvo]_proj', which is "
                     r"not a Linear or convolution layer", line) and line.endswith(f"seems made for a language model (llama, {tiny_lm.name})"), line
    wider = tiny_lm_folder(tmp_path / "wide", width=48)
    line = _error(capsys, _generate_lm(wider, adapter))
    assert re.search(r"module 'lm\.model\.layers\.0\.self_attn\.[qkvo]_proj' needs A of shape \(2, 48\) but the "
                     r"file has \(2, 32\)", line), line
    capsys.readouterr()
    assert main(_generate_lm(tiny_lm, adapter)) == 0
    assert capsys.readouterr().out.startswith("Q: What colour is a frog?\nA:")


def test_language_and_diffusion_adapters_refuse_each_others_bases(tiny_lm, tmp_path, capsys):
    from builders import tiny_unet

    lm_adapter = _lm_adapter(tiny_lm, tmp_path / "lm.safetensors")
    unet = tiny_unet()
    A.attach(unet, "style", "lora", A.make_config("lora", {"rank": 2}), "unet-attn")
    sd_adapter = tmp_path / "sd.safetensors"
    formats.save(formats.from_models({"unet": unet}, "style"), sd_adapter, "native")
    line = _error(capsys, _generate_lm(tiny_lm, sd_adapter))
    assert "is a Stable Diffusion adapter: load it on a diffusion base, not on a language model" in line
    line = _error(capsys, ["generate", "--prompt", "a red circle", "--adapter", f"{lm_adapter}:1", "--steps", "1",
                           "--out", str(tmp_path / "images")])
    assert "is a language-model adapter: load it on a language model, not on a diffusion base" in line
    line = _error(capsys, ["export", str(lm_adapter), "--format", "kohya", "-o", str(tmp_path / "k.safetensors")])
    assert "language-model adapters export with --format peft or native" in line


def test_an_ia3_file_on_a_model_of_another_width_names_the_module(tiny_lm, tmp_path, capsys):
    from studio.models import load_causal_lm

    model, _ = load_causal_lm(str(tiny_lm))
    A.attach(model, "v", "ia3", A.make_config("ia3"), ["lm-attn", "lm-mlp"])
    path = tmp_path / "ia3.safetensors"
    formats.save(formats.from_models({"lm": model}, "v"), path, "native")
    line = _error(capsys, _generate_lm(tiny_lm_folder(tmp_path / "wide", width=48), path))
    assert re.search(r"module 'lm\.model\.layers\.0\.(self_attn\.[kv]_proj|mlp\.down_proj)' needs l of shape "
                     r"\(\d+,\) but the file has \(\d+,\)", line), line
    capsys.readouterr()
    assert main(_generate_lm(tiny_lm, path)) == 0
