"""The procedural shapes world: 64x64 images of one flat shape on a flat background.

Every image is described by a :class:`Scene` (shape, colours, position, size) and is drawn
deterministically from it, so a seed gives the same images and captions on every machine.
Captions have exactly the form ``a {colour} {shape} on a {colour} background``.

Edges are anti-aliased (the shape is drawn at 4x and box-filtered down) so the VAE is not
asked to reproduce staircase edges; every pixel away from an edge carries the exact palette
RGB value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from studio.errors import StudioError

SIZE = 64
"""Image side in pixels."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

_SUPERSAMPLE = 4
_CAPTION = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


@dataclass(frozen=True)
class Scene:
    """One image of the world. ``cx, cy, radius`` are in pixels of the 64x64 image."""

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    radius: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise StudioError(f"unknown shape {self.shape!r}; use one of {', '.join(SHAPES)}")
        for c in (self.colour, self.background):
            if c not in COLOURS:
                raise StudioError(f"unknown colour {c!r}; use one of {', '.join(COLOURS)}")
        if self.colour == self.background:
            raise StudioError("shape and background colour must differ")

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str]:
    """``"a red circle on a blue background"`` -> ``("red", "circle", "blue")``."""
    m = _CAPTION.match(text.strip().lower())
    if not m or m[1] not in COLOURS or m[2] not in SHAPES or m[3] not in COLOURS:
        raise StudioError(f"not a shapes-world caption: {text!r} "
                          "(expected 'a {colour} {shape} on a {colour} background')")
    return m[1], m[2], m[3]


def all_captions() -> list[str]:
    """Every (colour, shape, background) combination: 6 * 4 * 5 = 120 captions."""
    return [caption(c, s, b) for s in SHAPES for c in COLOURS for b in COLOURS if b != c]


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of a shape as a polygon (image coordinates, y down). A circle is a 64-gon."""
    if shape == "circle":
        pts = [(math.cos(2 * math.pi * k / 64), math.sin(2 * math.pi * k / 64)) for k in range(64)]
    elif shape == "square":
        h = 0.82  # about the area of the circle, so size alone does not give the shape away
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":  # equilateral, apex up, inscribed in the unit circle (shifted down)
        pts = [(0.0, -1.0), (math.sqrt(3) / 2, 0.5), (-math.sqrt(3) / 2, 0.5)]
        pts = [(x, y + 0.2) for x, y in pts]
    elif shape == "star":  # five points, inner radius 0.45 of the outer one
        pts = []
        for k in range(10):
            rr = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a) + 0.1))
    else:
        raise StudioError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    return [(cx + r * x, cy + r * y) for x, y in pts]


def coverage(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    """Fraction of each pixel covered by the shape, float32 (size, size) in [0, 1]."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    poly = [(x * s, y * s) for x, y in shape_polygon(shape, cx, cy, r)]
    ImageDraw.Draw(canvas).polygon(poly, fill=255)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def blend(cover: np.ndarray, fg: tuple[int, int, int], bg: tuple[int, int, int]) -> np.ndarray:
    """uint8 (H, W, 3) image: ``bg`` where cover is 0, ``fg`` where it is 1."""
    f = np.asarray(fg, np.float32)
    b = np.asarray(bg, np.float32)
    img = b + cover[..., None] * (f - b)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render(scene: Scene) -> np.ndarray:
    """uint8 (64, 64, 3) RGB image of a scene."""
    cov = coverage(scene.shape, scene.cx, scene.cy, scene.radius)
    return blend(cov, COLOURS[scene.colour], COLOURS[scene.background])


def random_scene(rng: np.random.Generator, shape: str | None = None, colour: str | None = None,
                 background: str | None = None) -> Scene:
    """A random scene; any of shape / colour / background may be fixed by the caller."""
    names = list(COLOURS)
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or names[rng.integers(len(names))]
    if background is None:
        others = [c for c in names if c != colour]
        background = others[rng.integers(len(others))]
    radius = float(rng.uniform(12.0, 22.0))
    margin = radius + 3.0
    cx = float(rng.uniform(margin, SIZE - margin))
    cy = float(rng.uniform(margin, SIZE - margin))
    return Scene(shape, colour, background, cx, cy, radius)


def batch(seed: int, n: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` images (n, 64, 64, 3) uint8 with their captions and scenes; same seed, same batch."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return images, [s.caption for s in scenes], scenes
