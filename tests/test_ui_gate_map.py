"""The Generate tab's router heat map (studio/ui/gate_map.py): the gates gathered per block during a generation
against the routers' own per-forward statistics, the picture against its numbers, and the tab showing it only
when a routed mixture is in the mix (the functions the tab calls, and a real browser)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ui_helpers import PROMPT, make_library

import studio.adapters as A
from studio import formats
from studio.adapters.mixture import block_of, depth_key
from studio.ui import gate_map
from studio.ui.generate_tab import show_gate_maps
from studio.ui.service import MixRow, Request, Studio

MINI_ROWS = ["down0", "down0 a0 t0", "down1", "down1 a0 t0", "mid a0", "mid a0 t0", "up1", "up1 a0 t0",
             "up1 a1 t0", "up2", "up2 a0 t0", "up2 a1 t0"]
"""The mini base's UNet blocks (transformer targets) in data-flow order, short names."""


def make_mixture(path: Path, method: str, options: dict, seed: int) -> Path:
    """A native routed mixture on the mini base's UNet, routers and experts moved well off their init
    (decisive routing: the map is not uniform)."""
    from studio.models import load_diffusion_base

    unet = load_diffusion_base().components["unet"]
    torch.manual_seed(seed)  # the routers' init draws from the global generator
    A.attach(unet, "m", method, A.make_config(method, options), "unet-transformer")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in A.trainable_parameters(unet, "m"):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    formats.save(formats.from_models({"unet": unet}, "m"), path, "native")
    A.detach(unet, "m")
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gates") / "adapters"
    make_library(root)
    make_mixture(root / "router3.safetensors", "molora", {"experts": 3, "rank": 2}, 1)
    make_mixture(root / "mola.safetensors", "mola", {"profile": "inverted", "top_k": 2, "rank": 2}, 2)
    return root


@pytest.fixture(scope="module")
def studio(library, tmp_path_factory) -> Studio:
    return Studio(library, tmp_path_factory.mktemp("gates_out"))


def request(*rows, steps=3) -> Request:
    return Request(prompt=PROMPT, seed=4, steps=steps, mix=tuple(MixRow(k, w) for k, w in rows))


def test_gathered_gates_are_the_routers_per_forward_means_per_block_and_sum_to_one(studio):
    req = request(("router3", 1.0), ("stripy", 0.8), ("mola", 0.7))
    session = studio.use_base(req.base)
    session.sync(studio._entries(req.mix))  # attach now, so reference hooks can sit on the routed layers first
    seen: dict[tuple, list] = {}
    handles = []
    for name, label, _, _ in session.attached():
        if label == "stripy":
            continue
        for path, layer in A.targets.layers_of(session.base.components["unet"], name).items():
            def hook(module, inputs, output, key=(label, path), adapter=layer.adapters[name]):
                seen.setdefault(key, []).append(adapter.scratch["mean_gate"].clone())
            handles.append(layer.register_forward_hook(hook))
    try:
        result = studio.generate(req)
    finally:
        for h in handles:
            h.remove()
    maps = {m.title: m for m in result.gate_maps}
    assert list(maps) == ["router3", "mola"]                      # the plain LoRA has no router: no map
    assert (maps["router3"].method, maps["mola"].method) == ("molora", "mola")
    for label, gmap in maps.items():
        assert [row for row, _ in gmap.rows] == MINI_ROWS
        assert min(len(v) for v in seen.values()) >= req.steps   # every denoising step routed
        blocks: dict[str, list] = {}
        for (file, path), gates in seen.items():
            if file == label:
                blocks.setdefault(block_of(path), []).append(torch.stack(gates).double().mean(0))
        want = [torch.stack(blocks[b]).mean(0) for b in sorted(blocks, key=depth_key)]  # over forwards, then modules
        assert len(want) == len(gmap.rows)
        for (_, got), ref in zip(gmap.rows, want):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), ref, atol=1e-6, rtol=0)
            assert abs(sum(got) - 1) < 1e-5                       # soft and top-k renormalised gates: one per block
    assert [len(g) for _, g in maps["mola"].rows] == [2, 2, 2, 4, 4, 4, 6, 6, 6, 8, 8, 8]  # the inverted profile
    spread = [max(g) - min(g) for _, g in maps["router3"].rows]
    assert max(spread) > 0.1                                      # the routers prefer experts: not a uniform map


def test_a_mixture_at_weight_zero_or_no_mixture_gives_no_map(studio):
    studio.generate(request(("router3", 1.0), steps=1))
    assert studio.generate(request(("router3", 0.0), ("stripy", 1.0), steps=1)).gate_maps == []  # no stale gates
    assert studio.generate(request(("stripy", 1.0), steps=1)).gate_maps == []
    assert studio.generate(request(steps=1)).gate_maps == []


def _luminance(rgb) -> float:
    r, g, b = rgb
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_picture_has_a_row_per_block_a_column_per_expert_and_colours_monotone_in_the_gate():
    rows = (("down0", (0.1, 0.6, 0.3)), ("mid a0", (0.8, 0.15, 0.05)), ("up1 a0 t0", (0.45, 0.55)))
    gmap = gate_map.GateMap("router3", "molora", rows)
    image = np.asarray(gate_map.draw(gmap).convert("RGB"))
    box = gate_map.layout(gmap)
    assert image.shape[:2] == (box.height, box.width)
    for r, (_, gates) in enumerate(rows):
        for c, g in enumerate(gates):
            x0, y0, x1, y1 = box.cell(r, c)
            for x, y in ((x0, y0), (x1, y1), (x0, y1)):           # corners: the cell's colour, not its text
                assert tuple(image[y, x]) == gate_map.colour(g), (r, c)
        x0, y0, _, _ = box.cell(r, len(gates))
        assert tuple(image[y0, x0]) == (255, 255, 255)            # a block with fewer experts: blank cell
    # the grid read back from the picture: colour runs down the first column / along the first row
    column = image[box.top:box.top + len(rows) * gate_map.CELL_H + 4, box.left]  # (the scale bar is lower)
    runs = 1 + int(np.any(column[1:] != column[:-1], axis=1).sum())
    assert runs == len(rows) + 1 and tuple(column[-1]) == (255, 255, 255)  # 3 block rows, then white
    line = image[box.top, box.left:box.left + 4 * gate_map.CELL_W]
    assert 1 + int(np.any(line[1:] != line[:-1], axis=1).sum()) == 3 + 1  # 3 expert columns, then white
    # brighter means a larger gate, over the whole scale and in this picture
    ramp = [_luminance(gate_map.colour(v)) for v in np.linspace(0, 1, 101)]
    assert all(b > a for a, b in zip(ramp, ramp[1:]))
    cells = sorted((g, _luminance(image[box.cell(r, c)[1], box.cell(r, c)[0]]))
                   for r, (_, gates) in enumerate(rows) for c, g in enumerate(gates))
    assert [lum for _, lum in cells] == sorted(lum for _, lum in cells)
    assert gate_map.colour(0) == gate_map.VIRIDIS[0] and gate_map.colour(1) == gate_map.VIRIDIS[-1]


def test_generate_tab_shows_one_map_per_mixture_and_hides_it_without_one(studio):
    with_two = studio.generate(request(("mola", 1.0), ("stripy", 1.0), ("router3", 0.5), steps=1))
    assert [(m.title, m.method) for m in with_two.gate_maps] == [("mola", "mola"), ("router3", "molora")]
    shown = show_gate_maps(gate_map.draw_all(with_two.gate_maps))
    first, second = (np.asarray(gate_map.draw(m)) for m in with_two.gate_maps)
    sheet = np.asarray(shown["value"])                              # the two maps stacked, in mix order
    assert shown["visible"] is True and sheet.shape[0] == first.shape[0] + gate_map.GAP + second.shape[0]
    assert np.array_equal(sheet[:first.shape[0], :first.shape[1]], first)
    assert np.array_equal(sheet[-second.shape[0]:, :second.shape[1]], second)
    hidden = show_gate_maps(gate_map.draw_all(studio.generate(request(("stripy", 1.0), steps=1)).gate_maps))
    assert hidden["visible"] is False and hidden["value"] is None


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_browser_shows_the_heat_map_under_the_gallery_only_with_a_mixture(library, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    from studio.ui.launch import start

    demo, url = start(library, tmp_path / "outputs", port=None, prevent_thread_lock=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            expect, maps = sync_api.expect, page.locator("#gate_maps")
            page.locator("#prompt textarea").fill(PROMPT)
            for slot, name in enumerate(("stripy", "router3", "mola")):
                page.locator("#library button.thumbnail-item").filter(has_text=name).first.click()
                page.wait_for_function(f"document.querySelector('#pick input').value === {name!r}")
                page.locator("#add").click()
                expect(page.locator(f"#slot{slot}_key input")).to_have_value(name)
            steps = page.locator("#steps input[type=number]")
            steps.fill("4")
            steps.press("Enter")
            expect(maps).to_be_hidden()
            page.locator("#generate").click()
            expect(page.locator("#parameters textarea")).to_have_value(re.compile('"stripy: 1, router3: 1, mola: 1"'))
            expect(maps.locator("img").first).to_be_visible()
            box = maps.locator("img").first.bounding_box()
            assert box["width"] > 100 and box["height"] > 100
            gallery = page.locator("#output_gallery").bounding_box()
            assert maps.bounding_box()["y"] >= gallery["y"] + gallery["height"] - 1  # under the gallery
            if os.environ.get("STUDIO_UI_SCREENSHOT"):
                page.screenshot(path=os.environ["STUDIO_UI_SCREENSHOT"], full_page=True)
            for slot in (1, 2):
                page.locator(f"#slot{slot}_remove").click()
            page.locator("#generate").click()
            expect(maps).to_be_hidden()
            browser.close()
    finally:
        demo.close()


# -- studio generate --gate-map FILE.png ---------------------------------------------------------------
def _cli(library, out: Path, *extra) -> list[str]:
    return ["generate", "--prompt", PROMPT, "--seed", "4", "--steps", "3", "--out", str(out),
            "--adapter", f"{library / 'router3.safetensors'}:1", "--adapter", f"{library / 'stripy.safetensors'}:0.8",
            "--adapter", f"{library / 'mola.safetensors'}:0.7", *extra]


def test_generate_gate_map_png_has_a_row_per_block_and_the_recorded_mean_gates(studio, library, tmp_path, capsys):
    from PIL import Image

    from studio.cli import main

    png = tmp_path / "renders" / "gates.png"  # in the --out folder the command creates
    assert main(_cli(library, tmp_path / "renders", "--count", "2", "--gate-map", str(png))) == 0
    assert f"wrote {png} (router mean gate per expert and block; router3: 12 blocks x 3 experts, mola: 12 blocks" \
           in capsys.readouterr().out
    got = json.loads(Image.open(png).text[gate_map.PNG_KEY])
    # the Generate tab's maps of each image (checked above against the routers' own statistics): the command's
    # map is their mean, each image having as many forwards per layer
    per_image = [{m.title: m for m in studio.generate(Request(prompt=PROMPT, seed=s, steps=3, mix=(
        MixRow("router3", 1.0), MixRow("stripy", 0.8), MixRow("mola", 0.7)))).gate_maps} for s in (4, 5)]
    assert [(m["title"], m["method"]) for m in got] == [("router3", "molora"), ("mola", "mola")]
    for m in got:
        assert [b for b, _ in m["rows"]] == MINI_ROWS
        for r, (_, gates) in enumerate(m["rows"]):
            want = np.mean([image[m["title"]].rows[r][1] for image in per_image], axis=0)
            np.testing.assert_allclose(gates, want, atol=1e-6, rtol=0)
    assert {m["scope"] for m in got} == {"2 images"}
    maps = [gate_map.GateMap(m["title"], m["method"], tuple((b, tuple(g)) for b, g in m["rows"]), m["scope"])
            for m in got]
    picture = np.asarray(Image.open(png).convert("RGB"))
    assert np.array_equal(picture, np.asarray(gate_map.draw_all(maps)))
    box = gate_map.layout(maps[0])                                 # the first map's grid, at the sheet's top
    for r, (_, gates) in enumerate(maps[0].rows):
        for c, g in enumerate(gates):
            x0, y0, x1, y1 = box.cell(r, c)
            assert tuple(picture[y0, x0]) == tuple(picture[y1, x1]) == gate_map.colour(g)
    assert len(list((tmp_path / "renders").glob("0000*.png"))) == 2


def test_generate_gate_map_bad_input_is_one_error_line_and_writes_nothing(library, tmp_path, capsys):
    from cli_helpers import one_error_line

    out = tmp_path / "renders"
    for bad, message in ((tmp_path / "gates.webp", "is not a .png file name"),
                         (tmp_path / "elsewhere" / "gates.png", "does not exist: create it"),
                         (tmp_path, "is a folder")):
        line = one_error_line(capsys, _cli(library, out, "--gate-map", str(bad)))
        assert message in line and "--gate-map" in line
    plain = ["generate", "--prompt", PROMPT, "--steps", "1", "--out", str(out), "--gate-map", str(tmp_path / "g.png"),
             "--adapter", f"{library / 'stripy.safetensors'}:1"]
    assert "none of the adapters is a routed mixture" in one_error_line(capsys, plain)
    off = [*plain, "--adapter", f"{library / 'router3.safetensors'}:0"]
    assert "every routed mixture is at weight 0" in one_error_line(capsys, off)
    assert list(tmp_path.iterdir()) == []                          # no images, no map, no --out folder
