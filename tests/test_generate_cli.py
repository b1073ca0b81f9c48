"""``studio generate``: PNGs with A1111 parameters, the mix rules, limits, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from ui_helpers import PROMPT, ui_library  # noqa: F401  (fixture)

from studio.cli import main
from studio.formats.files import data_hash


def _generate(tmp_path, capsys, *extra, name="out"):
    out = tmp_path / name
    code = main(["generate", "--prompt", PROMPT, "--steps", "5", "--seed", "4", "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    files = sorted(out.glob("*.png"))
    return [np.asarray(Image.open(f).convert("RGB")) for f in files], files, captured.out


def test_png_carries_a1111_parameters_with_lora_hashes(tmp_path, capsys, ui_library):
    lora, svf = ui_library["lora"], ui_library["svf"]
    _, files, _ = _generate(tmp_path, capsys, "--adapter", f"{lora}:0.8", "--adapter", f"{svf}:1:0.5",
                            "--count", "2", "--sampler", "euler_a")
    assert [f.name for f in files] == ["00000-4.png", "00001-5.png"]
    text = Image.open(files[1]).text["parameters"]
    assert text.startswith(PROMPT + "\n")
    assert "Steps: 5, Sampler: Euler a, CFG scale: 4, Seed: 5, Size: 64x64, Model: mini-sd" in text
    assert 'Lora weights: "stripy: 0.8, glow: 1:0.5"' in text
    assert f'Lora hashes: "stripy: {data_hash(lora)[:12]}, glow: {data_hash(svf)[:12]}"' in text


def test_mix_rules_weight_zero_is_the_base_and_merge_matches(tmp_path, capsys, ui_library):
    lora, svf = ui_library["lora"], ui_library["svf"]
    (base,), _, _ = _generate(tmp_path, capsys, name="base")
    (zeros,), _, _ = _generate(tmp_path, capsys, "--adapter", f"{lora}:0", "--adapter", f"{svf}:0", name="zeros")
    (mixed,), _, _ = _generate(tmp_path, capsys, "--adapter", f"{lora}:1", "--adapter", f"{svf}:1", name="mixed")
    (merged,), _, _ = _generate(tmp_path, capsys, "--adapter", f"{lora}:1", "--adapter", f"{svf}:1", "--merge",
                                name="merged")
    assert np.array_equal(zeros, base)                      # weight 0 is bit-exactly the base
    assert np.abs(mixed.astype(int) - base).mean() > 2       # the adapters do something
    assert np.abs(merged.astype(int) - mixed).max() <= 3     # merged once = unmerged, up to float rounding


def test_size_is_rounded_with_a_note(tmp_path, capsys):
    # 70 x 36 rounds down to 64 x 32 for any size multiple of 8, 16 or 32
    (image,), _, out = _generate(tmp_path, capsys, "--size", "70x36")
    assert image.shape[:2] == (32, 64)
    assert "note: width 70 set to 64" in out and "note: height 36 set to 32" in out


@pytest.mark.parametrize("argv, message", [
    (["--size", "big"], "error: bad size 'big' in --size: use WxH"),
    (["--adapter", "/nowhere/x.safetensors:1"], "error: adapter file /nowhere/x.safetensors does not exist"),
    (["--sampler", "plms"], "error: unknown sampler 'plms'"),
    (["--count", "0"], "error: count 0 out of range in --count: give 1 to 1000"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, argv, message):
    code = main(["generate", "--prompt", "x", "--steps", "2", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(message) and "\n" not in err


def test_other_family_adapter_is_refused_with_the_reason(tmp_path, capsys, ui_library):
    code = main(["generate", "--prompt", "x", "--steps", "2", "--out", str(tmp_path),
                 "--adapter", str(ui_library["sd15"])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not fit this base" in err and "made for SD1.5" in err and "\n" not in err


def test_lm_task_goes_to_the_language_model_path(tmp_path, monkeypatch):
    import studio.text

    seen = []
    monkeypatch.setattr(studio.text, "run_text_generate", lambda args: seen.append(args) or 0)
    assert main(["generate", "--task", "lm", "--prompt", "Q: frog?", "--adapter", "p.safetensors:0.5"]) == 0
    assert seen[0].prompt == "Q: frog?" and seen[0].adapter == ["p.safetensors:0.5"] and seen[0].max_new_tokens == 64


def test_lm_task_without_the_lm_path_is_one_error_line(tmp_path, capsys, monkeypatch):
    import studio.generate_command as command

    monkeypatch.setattr(command.importlib.util, "find_spec", lambda name: None)
    code = main(["generate", "--task", "lm", "--prompt", "x", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("error: the language-model path (studio.text) is not installed in --task lm: use")
