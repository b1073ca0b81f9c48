"""The router heat map outside the Generate tab, on a language model (tiny Llama): ``studio generate --task lm
--gate-map FILE.png`` and the Text tab's service. The map's numbers are recomputed by hand from the routed layers'
inputs (softmax(R x + c), the token mean of each forward, then the mean over forwards, then over a block's
modules); the PNG has one row of cells per block in those colours; bad paths are one error line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_error_line
from lm_helpers import tiny_lm  # noqa: F401  (fixture)
from PIL import Image

import studio.adapters as A
from studio import formats
from studio.adapters.mixture import block_of, depth_key
from studio.cli import main
from studio.models import load_causal_lm
from studio.text import complete
from studio.ui import gate_map
from studio.ui.library import Library
from studio.ui.text_service import TextStudio

PROMPT = "Q: What colour is a frog?\nA:"
TOKENS = 5


@pytest.fixture(scope="module")
def library(tiny_lm, tmp_path_factory) -> Path:
    """An LM library: a MoLoRA mixture with decisive routers (tensors moved well off their init) and a LoRA."""
    root = tmp_path_factory.mktemp("lm-gates")
    for name, method, options in (("router3", "molora", {"experts": 3, "rank": 2}), ("plain", "lora", {"rank": 2})):
        model, _ = load_causal_lm(str(tiny_lm))
        A.attach(model, "m", method, A.make_config(method, options), "lm-attn")
        g = torch.Generator().manual_seed(len(name))
        with torch.no_grad():
            for p in A.trainable_parameters(model, "m"):
                p.add_(torch.randn(p.shape, generator=g) * (2.0 if p.dim() == 2 and p.shape[0] == 3 else 0.3))
        formats.save(formats.from_models({"lm": model}, "m"), root / f"{name}.safetensors", "native")
    return root


def hand_rows(tiny_lm, library: Path, weights=(1.0, 0.5)) -> tuple[list, str]:
    """The heat map's rows recomputed from the routers' inputs during the same greedy completion."""
    model, tokenizer = load_causal_lm(str(tiny_lm))
    model.eval()
    formats.attach_file(formats.read(library / "router3.safetensors"), {"lm": model}, "mix", weights[0])
    formats.attach_file(formats.read(library / "plain.safetensors"), {"lm": model}, "plain", weights[1])
    seen: dict[str, list] = {}
    handles = [layer.register_forward_pre_hook(lambda m, args, p=p: seen.setdefault(p, []).append(args[0].detach()))
               for p, layer in A.targets.layers_of(model, "mix").items()]
    text = complete(model, tokenizer, [PROMPT], TOKENS, stop=None)[0]
    for h in handles:
        h.remove()
    tensors = formats.read(library / "router3.safetensors").parts["lm"].modules()
    blocks: dict[str, list] = {}
    for path in sorted(seen, key=lambda p: depth_key(block_of(p))):
        R, c = tensors[path]["R"].double(), tensors[path]["c"].double()
        per_forward = [(x.double() @ R.T + c).softmax(-1).reshape(-1, R.shape[0]).mean(0) for x in seen[path]]
        assert len(per_forward) == TOKENS                                 # the prompt, then one per new token
        blocks.setdefault(block_of(path), []).append(torch.stack(per_forward).mean(0))
    rows = [(gate_map.short_block("lm", b), torch.stack(g).mean(0).tolist()) for b, g in blocks.items()]
    return rows, text


def _png_maps(path: Path) -> list[dict]:
    return json.loads(Image.open(path).text[gate_map.PNG_KEY])


def _check_picture(path: Path, maps: list[dict]) -> None:
    """One row of cells per block, each cell (its corners) in the colour of its recorded gate."""
    (only,) = maps
    gmap = gate_map.GateMap(only["title"], only["method"], tuple((b, tuple(g)) for b, g in only["rows"]),
                            only["scope"])
    image = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(image, np.asarray(gate_map.draw_all([gmap])))
    box = gate_map.layout(gmap)
    for r, (_, gates) in enumerate(gmap.rows):
        for c, g in enumerate(gates):
            x0, y0, x1, y1 = box.cell(r, c)
            assert tuple(image[y0, x0]) == tuple(image[y1, x1]) == gate_map.colour(g)
    x0, y0, _, _ = box.cell(len(gmap.rows), 0)
    assert tuple(image[y0 + 2, x0]) == (255, 255, 255)                    # no row after the last block


def _generate(tiny_lm, library, *extra) -> list[str]:
    return ["generate", "--task", "lm", "--base", str(tiny_lm), "--prompt", PROMPT.replace("\n", "\\n"),
            "--max-new-tokens", str(TOKENS), "--adapter", f"{library / 'router3.safetensors'}:1",
            "--adapter", f"{library / 'plain.safetensors'}:0.5", *extra]


def test_generate_task_lm_writes_the_heat_map_of_the_completion(tiny_lm, library, tmp_path, capsys):
    rows, text = hand_rows(tiny_lm, library)
    png = tmp_path / "gates.png"
    capsys.readouterr()
    assert main(_generate(tiny_lm, library, "--gate-map", str(png))) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(PROMPT + text) and f"wrote {png}" in printed and "router3: 2 blocks x 3 experts" in printed
    (got,) = _png_maps(png)
    assert (got["title"], got["method"], got["scope"]) == ("router3", "molora", "the completion")        # the plain LoRA has no router: no map
    assert [b for b, _ in got["rows"]] == ["L0", "L1"] == [b for b, _ in rows]
    for (_, g), (_, want) in zip(got["rows"], rows):
        assert g == pytest.approx(want, abs=1e-6) and sum(g) == pytest.approx(1, abs=1e-6)
    assert max(max(g) - min(g) for _, g in got["rows"]) > 0.1           # decisive routers: not a uniform map
    _check_picture(png, _png_maps(png))


def test_text_tab_service_gives_the_same_maps_and_none_without_a_mixture(tiny_lm, library):
    rows, text = hand_rows(tiny_lm, library)
    studio = TextStudio(Library(library), {"tiny": str(tiny_lm)})
    completed, maps = studio.complete_with_maps("tiny", PROMPT, [("router3", 1.0), ("plain", 0.5)], TOKENS)
    assert completed == PROMPT + text
    (gmap,) = maps
    assert gmap.title == "router3" and [b for b, _ in gmap.rows] == [b for b, _ in rows]
    for (_, g), (_, want) in zip(gmap.rows, rows):
        assert list(g) == pytest.approx(want, abs=1e-6)
    assert studio.complete_with_maps("tiny", PROMPT, [("plain", 1.0)], TOKENS)[1] == []
    assert studio.complete_with_maps("tiny", PROMPT, [("router3", 0.0)], TOKENS)[1] == []   # no stale gates
    assert studio.complete("tiny", PROMPT, [("router3", 1.0), ("plain", 0.5)], TOKENS) == completed


def test_text_tab_shows_the_map_only_with_a_mixture(tiny_lm, library):
    import gradio as gr

    from studio.ui import text_tab

    studio = TextStudio(Library(library), {"tiny": str(tiny_lm)})
    with gr.Blocks() as demo:
        text_tab.build(studio, lambda fn: fn)
    image = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "lm_gate_maps")
    assert image.visible is False                                         # hidden until a mixture routes
    handler = next(fn for fn in demo.fns.values() if fn.api_name == "complete_text").fn
    base_values = ["tiny", PROMPT, TOKENS, 0.0, 0]
    completed, sheet = handler(*base_values, "router3", 1.0, "plain", 0.5, None, 1.0)
    assert completed.startswith(PROMPT) and sheet is not None and sheet.width > 100
    assert handler(*base_values, "plain", 1.0, None, 1.0, None, 1.0)[1] is None


def test_bad_gate_map_paths_are_one_error_line_and_nothing_is_written(tiny_lm, library, tmp_path, capsys):
    for bad, message in ((tmp_path / "gates.jpg", "is not a .png file name"),
                         (tmp_path / "missing" / "gates.png", "does not exist: create it"),
                         (tmp_path, "is a folder")):
        assert message in one_error_line(capsys, _generate(tiny_lm, library, "--gate-map", str(bad)))
    plain = ["generate", "--task", "lm", "--base", str(tiny_lm), "--prompt", "Q:", "--max-new-tokens", "2",
             "--adapter", f"{library / 'plain.safetensors'}:1", "--gate-map", str(tmp_path / "g.png")]
    assert "none of the adapters is a routed mixture" in one_error_line(capsys, plain)
    off = [*plain[:-4], "--adapter", f"{library / 'router3.safetensors'}:0", *plain[-2:]]
    assert "every routed mixture is at weight 0" in one_error_line(capsys, off)
    assert list(tmp_path.iterdir()) == []


def test_browser_shows_the_heat_map_under_the_text_only_with_a_mixture(tiny_lm, library, tmp_path):
    import re
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    from studio.ui.launch import start

    demo, url = start(library, tmp_path / "outputs", port=None, prevent_thread_lock=True,
                      lm_bases={"tiny": str(tiny_lm)})
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            expect, maps = sync_api.expect, page.locator("#lm_gate_maps")
            expect.set_options(timeout=60_000)
            page.get_by_role("tab", name="Text").click()

            def choose(elem_id: str, value: str) -> None:
                box = page.locator(f"#{elem_id} input")
                box.click()
                box.fill(value)
                box.press("Enter")
                expect(box).to_have_value(value)

            choose("lm_base", "tiny")
            choose("lm_slot0_key", "router3")
            tokens = page.locator("#lm_tokens input")
            tokens.fill(str(TOKENS))  # the tiny Llama's context is 64
            tokens.press("Enter")
            expect(maps).to_be_hidden()
            page.locator("#lm_generate").click()
            expect(page.locator("#lm_text textarea")).to_have_value(re.compile(r"^Q: What colour is a frog\?\nA:.+",
                                                                               re.S))
            expect(maps.locator("img").first).to_be_visible()
            box = maps.locator("img").first.bounding_box()
            assert box["width"] > 100 and box["height"] > 50
            text = page.locator("#lm_text").bounding_box()
            assert maps.bounding_box()["y"] >= text["y"] + text["height"] - 1   # under the text
            choose("lm_slot0_key", "plain")
            page.locator("#lm_generate").click()
            expect(maps).to_be_hidden()
            browser.close()
    finally:
        demo.close()
