"""The web UI driven through gradio_client against a launched app on the mini base."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gradio_client.exceptions import AppError
from PIL import Image
from ui_helpers import MINI, PROMPT, slots, ui_app, ui_generate, ui_library  # noqa: F401  (fixtures)

from studio.cli import main


def test_two_methods_mixed_differ_from_the_base_and_equal_studio_generate(ui_app, ui_library, tmp_path, capsys):
    _, _, client = ui_app
    base, _ = ui_generate(client)
    mixed, parameters = ui_generate(client, ("stripy", 0.9), ("glow", 0.7, 0.4))
    assert 'Lora weights: "stripy: 0.9, glow: 0.7:0.4"' in parameters
    assert np.abs(mixed.astype(int) - base).mean() > 2
    code = main(["generate", "--prompt", PROMPT, "--steps", "6", "--seed", "3", "--out", str(tmp_path),
                 "--adapter", f"{ui_library['lora']}:0.9", "--adapter", f"{ui_library['svf']}:0.7:0.4"])
    assert code == 0, capsys.readouterr().err
    cli = np.asarray(Image.open(next(tmp_path.glob("*.png"))).convert("RGB"))
    assert np.array_equal(mixed, cli)


def test_weights_one_zero_equal_adapter_one_alone_and_all_zero_equal_the_base(ui_app):
    _, _, client = ui_app
    alone, _ = ui_generate(client, ("stripy", 1.0))
    one_zero, _ = ui_generate(client, ("stripy", 1.0), ("glow", 0.0))
    zeros, _ = ui_generate(client, ("stripy", 0.0), ("glow", 0.0))
    base, _ = ui_generate(client)
    assert np.array_equal(one_zero, alone)
    assert np.array_equal(zeros, base)
    assert not np.array_equal(alone, base)


def test_xy_grid_is_one_labelled_image(ui_app):
    _, _, client = ui_app
    path = client.predict(MINI, PROMPT, "", 3, False, 4, 4.0, 0, 0, "dpmpp_2m", 1, 1, "0, 1", 2, "0, 1",
                          *slots(("stripy", 1.0), ("glow", 1.0)), api_name="/xy_grid")
    grid = np.asarray(Image.open(path).convert("RGB"))
    # 2 x 2 cells of 64 px enlarged to 128, with a label row on top and a label column on the left
    assert grid.shape[0] > 2 * 128 and grid.shape[1] > 2 * 128
    assert grid.shape[0] < 2 * 128 + 60


def test_library_shows_a_broken_file_as_an_error_card_and_still_works(ui_app):
    _, _, client = ui_app
    cards, *_ = client.predict(api_name="/refresh_library")
    captions = [c["caption"] for c in cards]
    assert any(c.startswith("⚠ broken: ") and "not a .safetensors file" in c for c in captions)
    assert any(c.startswith("stripy · lora · rank 4") and "trigger: stripy" in c for c in captions)
    with pytest.raises(AppError, match="adapter broken cannot be used: .*not a .safetensors file"):
        ui_generate(client, ("broken", 1.0))
    image, _ = ui_generate(client, ("stripy", 1.0))  # the app keeps working
    assert image.shape == (64, 64, 3)


def test_other_family_adapter_is_refused_with_the_reason(ui_app):
    _, _, client = ui_app
    with pytest.raises(AppError, match="does not fit this base .*made for SD1.5"):
        ui_generate(client, ("other/sd15-style", 1.0))


def test_adding_an_adapter_inserts_its_trigger_words(ui_app):
    _, _, client = ui_app
    prompt, *rest = client.predict("glow", PROMPT, *slots(("stripy", 1.0)), api_name="/add_adapter")
    assert prompt == f"glowing, {PROMPT}"
    with pytest.raises(AppError, match="pick an adapter first"):
        client.predict("", PROMPT, *slots(), api_name="/add_adapter")


def test_client_names_are_looked_up_never_opened(ui_app, ui_library):
    _, _, client = ui_app
    for name in ("../../etc/passwd", str(ui_library["lora"]), "stripy.safetensors"):
        with pytest.raises(AppError, match="no adapter named .* in the library"):
            ui_generate(client, (name, 1.0))


def test_bake_then_inspect_the_baked_file(ui_app):
    _, _, client = ui_app
    report = client.predict("mix of two", 0, "native", True, MINI, PROMPT, "", 0, False, 4, 4.0, 0, 0, "ddim", 1,
                            *slots(("stripy", 0.5), ("glow", 1.0)), api_name="/bake")
    assert report.startswith("wrote baked/mix_of_two.safetensors (native, exact): retained energy 1.000000")
    text, info = client.predict("baked/mix_of_two", api_name="/inspect")
    info = json.loads(info) if isinstance(info, str) else info
    assert text.startswith("file:      baked/mix_of_two.safetensors") and "format:    native" in text
    assert info["file"] == "baked/mix_of_two.safetensors" and info["methods"] == {"te": "lora", "unet": "lora"}


def test_out_of_range_settings_are_capped_with_a_message(ui_app):
    demo, _, _ = ui_app
    from studio.ui.service import Request

    studio = demo.studio_service
    result = studio.generate(Request(PROMPT, steps=0, width=8, height=8, count=99, base=MINI))
    assert len(result.paths) == 8
    assert result.notes[0] == "image count 99 capped to 8 (allowed 1..8)"
    assert "steps 0 capped to 1 (allowed 1..150)" in result.notes
    from studio.pipeline import size_multiple

    m = size_multiple(studio.session.base.pipe)  # the smallest size the base renders
    assert f"width 8 set to {m} (a multiple of {m} from {m} to 2048; this base's native size is 64)" in result.notes
    assert Image.open(result.paths[0]).size == (m, m)
