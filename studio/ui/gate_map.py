"""The Generate tab's router heat map: the average gate per expert (columns) per block (rows) of each
routed mixture in the mix, for the last image.

Gathering: every forward of a routed layer leaves its gates averaged over the tokens in
``Adapter.scratch["mean_gate"]`` (``adapters.mixture.route``). While one image renders, a forward hook
per routed layer takes that value (and removes it, so a layer that did not run, e.g. at weight 0,
never shows a value from an earlier image) and keeps the running mean over every forward: each
denoising step, both classifier-free-guidance branches. A block's row is the mean over its modules,
blocks as ``mixture.block_of`` cuts them (the unit MoLA's expert counts use), in data-flow order
(``mixture.depth_key``: down, mid, up), text encoders first because they run first.

The same maps outside the Generate tab: the Text tab (a language model's routed mixtures, the gates
of every forward of one completion: the prompt's, then one per new token) and ``studio generate
--gate-map FILE.png`` (``--task image``: every image of the command; ``--task lm``: the completion),
written by ``write_png`` with the numbers in the PNG's ``studio.gate_map`` text chunk.

Drawing: PIL only. Colours are a fixed 0..1 scale (a gate is a probability), so maps of two files or
two images compare; the ramp is viridis (perceptually uniform, lightness rising with the value).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.adapters.mixture import block_of, depth_key
from studio.errors import StudioError
from studio.formats.names import TEXT_ENCODERS

VIRIDIS = [(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142), (31, 158, 137),
           (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)]
"""matplotlib's viridis at 0, 1/9, ..., 1 (its lightness rises monotonically)."""

SHORT = (("text_model.", ""), ("encoder.layers.", "L"), ("model.layers.", "L"), ("down_blocks.", "down"),
         ("up_blocks.", "up"), ("mid_block", "mid"), ("attentions.", "a"), ("transformer_blocks.", "t"),
         ("resnets.", "r"))
"""Module-path words shortened for the row labels: down_blocks.1.attentions.0.transformer_blocks.0 -> down1 a0 t0."""

S = 2
"""Drawn at twice the size a screen shows it, so the browser's downscale keeps the text crisp."""
CELL_W, CELL_H, PAD, GAP = 30 * S, 16 * S, 6 * S, 10 * S


@dataclass(frozen=True)
class GateMap:
    """One mixture file's map: ``rows`` (block label, mean gate per expert), in data-flow order."""

    title: str
    method: str
    rows: tuple[tuple[str, tuple[float, ...]], ...]
    scope: str = "last image"
    """What the gates were averaged over, for the title: the Generate tab's last image, a command's images,
    a completion."""


def short_block(component: str, block: str) -> str:
    label = block
    for long, short in SHORT:
        label = label.replace(long, short)
    label = label.replace(".", " ").replace("  ", " ").strip() or "(unnumbered)"
    return f"{component} {label}" if component in TEXT_ENCODERS else label


def block_rows(component: str, gates: dict[str, torch.Tensor]) -> list[tuple[str, tuple[float, ...]]]:
    """{module path: mean gate (E,)} -> [(short block label, mean over the block's modules)] in depth order
    (a block's modules share one expert count: MoLA's counts are per block)."""
    blocks: dict[str, list[torch.Tensor]] = {}
    for path in sorted(gates, key=lambda p: depth_key(block_of(p))):
        blocks.setdefault(block_of(path), []).append(gates[path].double())
    return [(short_block(component, b), tuple(torch.stack(g).mean(0).tolist())) for b, g in blocks.items()]


class GateRecorder:
    """The heat maps of one generation: ``freeze_gates.GateRecorder``'s hooks on the routed layers of the
    attached files, their running means turned into one ``GateMap`` per file."""

    def __init__(self, models: dict, files: list, scope: str = "last image"):
        """``files``: (attached name, label, AdapterFile, ...) in mix order (``MixSession.attached()``)."""
        from studio.freeze_gates import GateRecorder as Hooks, routed_components

        self.files = {f.name: (f.label, f.af.parts[routed[0]].method, routed) for f in files
                      if (routed := routed_components(f.af))}
        self.hooks = Hooks(models, {f.name: f.af for f in files if f.name in self.files})
        self.scope = scope

    def close(self) -> None:
        self.hooks.close()

    def maps(self) -> list[GateMap]:
        """One map per file whose router ran, in mix order; text encoders before the UNet (data flow)."""
        out = []
        for name, (label, method, components) in self.files.items():
            rows = []
            for component in sorted(components, key=lambda c: (c not in TEXT_ENCODERS, c)):
                rows += block_rows(component, self.hooks.gates(name, component))
            if rows:
                out.append(GateMap(label, method, tuple(rows), self.scope))
        return out


@contextlib.contextmanager
def recording(session, scope: str = "last image"):
    """``with recording(session) as maps: session.render(...)`` -> ``maps`` holds the render's GateMaps
    (``session``: a ``studio.mixing.MixSession``, image or language model; ``scope`` names the run in the title)."""
    with recording_files(session.base.components, session.attached(), scope) as maps:
        yield maps


@contextlib.contextmanager
def recording_files(models: dict, files: list, scope: str = "last image"):
    """``recording`` for files attached without a session: ``files`` as (name, label, AdapterFile, ...)."""
    maps: list[GateMap] = []
    recorder = GateRecorder(models, files, scope)
    try:
        yield maps
    finally:
        recorder.close()
    maps.extend(recorder.maps())


# -- drawing --------------------------------------------------------------------------------------
def colour(value: float) -> tuple[int, int, int]:
    """The viridis colour of a gate in [0, 1] (clamped), interpolated linearly between the anchors."""
    t = min(max(float(value), 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    f = t - i
    return tuple(round(a + (b - a) * f) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


@dataclass(frozen=True)
class Layout:
    """Where ``draw`` puts things: the grid's top-left corner, the image size."""

    left: int
    top: int
    width: int
    height: int

    def cell(self, row: int, col: int) -> tuple[int, int, int, int]:
        x, y = self.left + col * CELL_W, self.top + row * CELL_H
        return x, y, x + CELL_W - 1, y + CELL_H - 1


def layout(gmap: GateMap) -> Layout:
    from PIL import Image, ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([measure.textlength(label, font=_font(11 * S)) for label, _ in gmap.rows]
                  + [measure.textlength("gate", font=_font(10 * S))])  # the scale's word, left of the bar
    experts = max(len(g) for _, g in gmap.rows)
    title_w = measure.textlength(_title(gmap), font=_font(12 * S))
    left, top = PAD + int(label_w) + 6 * S, PAD + 32 * S
    width = max(left + experts * CELL_W, PAD + int(title_w), left + 130 * S) + PAD
    return Layout(left, top, width, top + len(gmap.rows) * CELL_H + 34 * S + PAD)


def _title(gmap: GateMap) -> str:
    return f"{gmap.title} ({gmap.method}): mean gate, {gmap.scope}"


def draw(gmap: GateMap):
    """The heat map as a PIL image: a title, expert numbers over the columns, short block names left of the
    rows, each cell's gate written in it, and a 0..1 colour scale under the grid. A block with fewer experts
    (MoLA's profiles) leaves its row's extra cells blank."""
    from PIL import Image, ImageDraw

    box = layout(gmap)
    image = Image.new("RGB", (box.width, box.height), "white")
    pen = ImageDraw.Draw(image)
    small, font = _font(10 * S), _font(11 * S)
    pen.text((PAD, PAD), _title(gmap), fill="black", font=_font(12 * S))
    for col in range(max(len(g) for _, g in gmap.rows)):
        x0, _, x1, _ = box.cell(0, col)
        pen.text(((x0 + x1) / 2, box.top - 2 * S), f"e{col + 1}", fill="black", font=small, anchor="mb")
    for row, (label, gates) in enumerate(gmap.rows):
        _, y0, _, y1 = box.cell(row, 0)
        pen.text((box.left - 6 * S, (y0 + y1) / 2), label, fill="black", font=font, anchor="rm")
        for col, g in enumerate(gates):
            x0, y0, x1, y1 = box.cell(row, col)
            pen.rectangle((x0, y0, x1, y1), fill=colour(g))
            # the value in the middle; the cell's border pixels stay the pure colour (tests read them)
            pen.text(((x0 + x1) / 2, (y0 + y1) / 2), f"{g:.2f}"[1:] if g < 1 else "1", font=small, anchor="mm",
                     fill="white" if g < 0.6 else "black")
    scale_top, length = box.top + len(gmap.rows) * CELL_H + 10 * S, 120 * S
    for x in range(length):
        pen.line((box.left + x, scale_top, box.left + x, scale_top + 7 * S), fill=colour(x / (length - 1)))
    for value, anchor in ((0, "lt"), (0.5, "mt"), (1, "rt")):
        pen.text((box.left + value * (length - 1), scale_top + 10 * S), f"{value:g}", fill="black", font=small,
                 anchor=anchor)
    pen.text((box.left - 6 * S, scale_top + 4 * S), "gate", fill="black", font=small, anchor="rm")
    return image


def draw_all(maps: list[GateMap]):
    """The maps of one generation stacked top to bottom (mix order) in one image; None without a map."""
    from PIL import Image

    if not maps:
        return None
    images = [draw(m) for m in maps]
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images) + GAP * (len(images) - 1)),
                      "white")
    y = 0
    for image in images:
        sheet.paste(image, (0, y))
        y += image.height + GAP
    return sheet


# -- a file (studio generate --gate-map) -----------------------------------------------------------------
PNG_KEY = "studio.gate_map"
"""The PNG text chunk holding the maps' numbers: [{title, method, rows: [[block, [gate per expert]]], scope}]."""


def check_png_path(path: str, flag: str = "--gate-map", made: str | None = None) -> Path:
    """The heat map's output file, refused before any work when it cannot be written; ``made``: a folder the
    command creates before writing it (``studio generate --out``), which may be its folder."""
    target = Path(path)
    if made is not None and target.parent.resolve() == Path(made).resolve() and not target.parent.exists():
        return target if target.suffix.lower() == ".png" else check_png_path(path, flag)
    if target.is_dir():
        raise StudioError(f"{path} in {flag} is a folder: give a file name such as {target / 'gates.png'}")
    if target.suffix.lower() != ".png":
        raise StudioError(f"{path} in {flag} is not a .png file name: give e.g. {flag} gates.png")
    if not target.parent.is_dir():
        raise StudioError(f"folder {target.parent} of {path} in {flag} does not exist: create it or give another path")
    if not os.access(target.parent, os.W_OK):
        raise StudioError(f"folder {target.parent} of {path} in {flag} is not writable: give another path")
    return target


def check_routed(files: list, flag: str = "--gate-map") -> None:
    """Refuse a heat map of a mix in which no routed mixture will route (nothing to draw): ``files`` as
    ``MixSession.attached()`` gives them (a file at weight 0 does not run)."""
    from studio.freeze_gates import routed_components

    routed = [f for f in files if routed_components(f.af)]
    if not routed:
        raise StudioError(f"{flag} given but none of the adapters is a routed mixture (molora, mov, mola, loramoe): "
                          f"drop {flag}, or add a mixture file with --adapter")
    if all(f.entry.weight == 0 and not f.entry.te_weight for f in routed):
        raise StudioError(f"{flag} given but every routed mixture is at weight 0, so no router runs: give "
                          f"{Path(routed[0].entry.path).name} a weight, e.g. --adapter {routed[0].entry.path}:1")


def write_png(maps: list[GateMap], target: Path) -> Path:
    """``draw_all(maps)`` at ``target`` (replaced atomically), the numbers in its ``studio.gate_map`` chunk."""
    from PIL import PngImagePlugin

    if not maps:
        raise StudioError(f"no routed mixture ran while generating, so {target} has nothing to show: give the "
                          f"mixture a weight other than 0")
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps([{"title": m.title, "method": m.method, "rows": [list(r) for r in m.rows],
                                        "scope": m.scope} for m in maps]))
    partial = target.with_name(f".{target.name}.partial")
    try:
        draw_all(maps).save(partial, format="PNG", pnginfo=info)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
