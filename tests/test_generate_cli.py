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
    import studio.text_generate

    seen = []
    monkeypatch.setattr(studio.text_generate, "run_text_generate", lambda args: seen.append(args) or 0)
    assert main(["generate", "--task", "lm", "--prompt", "Q: frog?", "--adapter", "p.safetensors:0.5"]) == 0
    assert seen[0].prompt == "Q: frog?" and seen[0].adapter == ["p.safetensors:0.5"] and seen[0].max_new_tokens == 64


def test_lm_task_without_the_lm_path_is_one_error_line(tmp_path, capsys, monkeypatch):
    import studio.generate_command as command

    monkeypatch.setattr(command.importlib.util, "find_spec", lambda name: None)
    code = main(["generate", "--task", "lm", "--prompt", "x", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("error: the language-model path (studio.text) is not installed in --task lm: use")


def test_a_weight_that_is_not_a_number_is_named(tmp_path, capsys, ui_library):
    from cli_helpers import one_error_line

    lora = ui_library["lora"]
    base = ["generate", "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "w")]
    line = one_error_line(capsys, base + ["--adapter", f"{lora}:abc"])
    assert line.startswith(f"error: weight 'abc' is not a number in --adapter {lora}:abc: write {lora}:0.8")
    line = one_error_line(capsys, base + ["--adapter", f"{lora}:0.8:x2"])
    assert "weight 'x2' is not a number" in line
    # a missing file is still named as missing, and a weight after it as a weight
    assert one_error_line(capsys, base + ["--adapter", "/nowhere/x.safetensors:high"]).startswith(
        "error: weight 'high' is not a number in --adapter /nowhere/x.safetensors:high")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_below_one_are_refused(tmp_path, capsys, steps):
    from cli_helpers import one_error_line

    line = one_error_line(capsys, ["generate", "--prompt", "x", "--steps", steps, "--out", str(tmp_path / "s")])
    assert line == f"error: steps {steps} out of range in --steps: give at least 1 (e.g. --steps 20)"
    assert not (tmp_path / "s").exists()


def test_a_huge_size_is_refused_unless_forced(tmp_path, capsys):
    from cli_helpers import one_error_line

    from studio.generate_command import check_size

    line = one_error_line(capsys, ["generate", "--prompt", "x", "--steps", "2", "--size", "99999x99999",
                                   "--out", str(tmp_path / "big")])
    # the mini base is 64 px: 2048 x 2048 (the renderer's cap) is 1024 x its pixels
    assert line == ("error: size 99999x99999 in --size is more than 4 x this base's native 64 px per side (about "
                    "1,024 x the pixels, and the time, of a native image): give at most 256x256, or add "
                    "--force-size to render it anyway")
    assert not (tmp_path / "big").exists()
    (image,), _, out = _generate(tmp_path, capsys, "--size", "256x64")  # 4 x native is still allowed, no note
    assert image.shape[:2] == (64, 256) and "note:" not in out
    # forced: rendered, with the cost said first (checked without rendering minutes of pixels)
    assert check_size(99999, 64, 64, force=True) == [
        "--force-size: 2048x64 is about 32 x the pixels of this base's native 64x64; expect at least that many "
        "times the time per image"]
    assert check_size(512, 512, 512, force=False) == []


def test_generate_prints_no_library_noise(tmp_path):
    """With the [gpu] extra's bitsandbytes installed (a test dependency), diffusers imports it and its CPU
    backend warned at import about a 4-bit kernel it could not fetch: a line users cannot act on."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "studio", "generate", "--prompt", "a red circle", "--steps", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "bitsandbytes" not in done.stderr and "Failed to load" not in done.stderr, done.stderr
