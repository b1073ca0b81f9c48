"""The core-v2 methods end to end on the mini base: ``studio train --method dora|ia3``, then
``studio generate`` mixed with a LoRA, ``studio export --format kohya`` and ``studio inspect``."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from ui_helpers import ui_library  # noqa: F401  (fixture)

from studio import formats
from studio.cli import main

ROOT = Path(__file__).resolve().parents[1]
MINI = str(ROOT / "sample_data" / "mini-sd")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run per method (10x the learning rate, so 8 steps move the images)."""
    tmp = tmp_path_factory.mktemp("core_v2")
    data = tmp / "stripes"
    data.mkdir()
    for png in sorted((ROOT / "sample_data" / "styles" / "stripes").glob("*.png"))[:6]:
        shutil.copy(png, data)
        shutil.copy(png.with_suffix(".txt"), data)
    runs = {}
    for method, steps, lr in (("dora", 8, "1e-2"), ("ia3", 8, "1e-2"), ("dora-default", 4, None)):
        out = tmp / method
        assert main(["train", str(data), "-o", str(out), "--method", method.split("-")[0], "--steps", str(steps),
                     "--batch-size", "2", *(["--unet-lr", lr] if lr else []), "--sample-every", "0", "--save-every",
                     str(steps), "--set", f"cache_dir={tmp / 'c'}", "--set", "sample_steps=4"]) == 0
        runs[method] = out
    return runs


def _render(tmp_path, capsys, name, *adapters, extra=()):
    out = tmp_path / name
    argv = ["generate", "--prompt", "stripes, a red circle on a blue background", "--steps", "6", "--seed", "2",
            "--out", str(out), *extra]
    for a in adapters:
        argv += ["--adapter", a]
    assert main(argv) == 0, capsys.readouterr().err
    (png,) = sorted(out.glob("*.png"))
    return np.asarray(Image.open(png).convert("RGB")).astype(int), Image.open(png).text["parameters"]


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_trained_adapter_mixes_with_a_lora_in_generate(trained, method, tmp_path, capsys, ui_library):
    native = trained[method] / "stripes.safetensors"
    assert formats.read(native).parts["unet"].method == method
    lora = ui_library["lora"]
    alone, _ = _render(tmp_path, capsys, "lora", f"{lora}:0.7")
    mixed, text = _render(tmp_path, capsys, "mixed", f"{lora}:0.7", f"{native}:1")
    double, _ = _render(tmp_path, capsys, "double", f"{lora}:0.7", f"{native}:2")
    assert np.abs(mixed - alone).mean() > 0.5 and np.abs(double - mixed).mean() > 0.5  # the adapter draws
    assert 'Lora weights: "stripy: 0.7, stripes: 1"' in text
    merged, _ = _render(tmp_path, capsys, "merged", f"{lora}:0.7", f"{native}:1", extra=["--merge"])
    assert np.abs(merged - mixed).max() <= 3  # merged and unmerged mixes are the same picture


def test_dora_exports_lycoris_layout_without_a_base_and_inspects(trained, tmp_path, capsys):
    # at the default learning rate 4 Adam steps move no magnitude by more than ~4e-3, and the mini
    # base's smallest row norm is 0.012: every m stays positive, as the LyCORIS layout needs
    run = trained["dora-default"]
    with safe_open(str(run / "stripes.kohya.safetensors"), "pt") as f:  # what the trainer wrote
        keys = list(f.keys())
    assert any(k.endswith(".dora_scale") for k in keys) and any(k.endswith(".lora_down.weight") for k in keys)
    out = tmp_path / "dora.kohya.safetensors"
    assert main(["export", str(run / "stripes.safetensors"), "--format", "kohya", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["methods"] == {"unet": "dora"} and info["kinds"] == {"unet": "dense"}
    lossy = tmp_path / "dora.plain.safetensors"
    assert main(["export", str(run / "stripes.safetensors"), "--format", "kohya", "--rank", "4", "--base", MINI,
                 "-o", str(lossy)]) == 0
    printed = capsys.readouterr().out
    assert "retained energy" in printed and formats.read(lossy).parts["unet"].method == "lora"


def test_ia3_exports_a_plain_lora_with_its_energy_and_inspects(trained, tmp_path, capsys):
    run = trained["ia3"]
    native = run / "stripes.safetensors"
    out = tmp_path / "ia3.kohya.safetensors"
    assert main(["export", str(native), "--format", "kohya", "-o", str(out)]) == 2  # needs the base
    assert "pass --base" in capsys.readouterr().err
    assert not out.exists()
    assert main(["export", str(native), "--format", "kohya", "--base", MINI, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "keeping 99%" in printed and "retained energy" in printed
    af = formats.read(out)
    assert af.parts["unet"].method == "lora" and float(af.source["header"]["studio.energy_retained_total"]) >= 0.99
    assert main(["inspect", str(native)]) == 0
    text = capsys.readouterr().out
    assert "ia3" in text and "rank none" in text
