"""Wider procedural images for training the VAE -- so it can draw what the base never does.

The diffusion model only ever sees the shapes world, but adapters later teach it stripes,
outlines and a grey robot. They cannot teach the VAE decoder anything, so the VAE must already
reconstruct textures and colours outside the palette. A VAE trained on the shapes world alone
turned grey into orange and stripes into flat fill (measured). These images mix arbitrary RGB
colours, several overlapping polygons / ellipses / rectangles, and fills that are flat, striped
(any angle and period), dotted, checkered or outlined. They deliberately are *not* the sample
sets' styles or character: the VAE learns generic image statistics, not our test figures.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from studio.shapes.world import SIZE

_S = 4  # supersampling, as in world.py


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _texture(rng: np.random.Generator, a: tuple[int, int, int], b: tuple[int, int, int]) -> np.ndarray:
    """A float (64, 64, 3) texture of two colours: flat half of the time."""
    kind = rng.choice(5, p=[0.5, 0.2, 0.1, 0.1, 0.1])
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if kind == 0:  # flat
        m = np.zeros((SIZE, SIZE), bool)
    elif kind == 1:  # stripes, any angle and period
        ang, period = rng.uniform(0, math.pi), rng.uniform(4.0, 12.0)
        m = ((xx * math.cos(ang) + yy * math.sin(ang)) % period) < period / 2
    elif kind == 2:  # dots
        period, r = rng.uniform(5.0, 12.0), rng.uniform(0.2, 0.4)
        m = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (r * period) ** 2
    elif kind == 3:  # checker
        period = rng.uniform(3.0, 10.0)
        m = ((xx // period + yy // period) % 2) == 0
    else:  # smooth gradient
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / SIZE
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return np.asarray(a, np.float32) + t[..., None] * (np.asarray(b, np.float32) - np.asarray(a, np.float32))
    return np.where(m[..., None], np.asarray(a, np.float32), np.asarray(b, np.float32))


def _figure_mask(rng: np.random.Generator) -> Image.Image:
    n = SIZE * _S
    mask = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(mask)
    cx, cy = rng.uniform(0, n, 2)
    r = rng.uniform(3, 26) * _S
    kind = rng.integers(4)
    width = int(rng.uniform(1.5, 5.0) * _S) if rng.random() < 0.3 else 0  # outline only
    if kind == 0:
        box = [cx - r, cy - r * rng.uniform(0.4, 1.2), cx + r, cy + r * rng.uniform(0.4, 1.2)]
        d.ellipse(box, fill=None if width else 255, outline=255 if width else None, width=width or 1)
    elif kind == 1:
        box = [cx - r * rng.uniform(0.3, 1), cy - r * rng.uniform(0.3, 1), cx + r, cy + r]
        d.rectangle(box, fill=None if width else 255, outline=255 if width else None, width=width or 1)
    else:  # random polygon (convex or star-like)
        k = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, k))
        radii = r * rng.uniform(0.35, 1.0, k)
        pts = [(cx + rr * math.cos(t), cy + rr * math.sin(t)) for t, rr in zip(angles, radii)]
        if width:
            d.line(pts + pts[:1], fill=255, width=width)
        else:
            d.polygon(pts, fill=255)
    return mask


def wild_image(rng: np.random.Generator) -> np.ndarray:
    """uint8 (64, 64, 3): a background with 1-4 figures, flat, textured or outlined."""
    canvas = _texture(rng, _colour(rng), _colour(rng))
    for _ in range(int(rng.integers(1, 5))):
        cover = np.asarray(_figure_mask(rng).resize((SIZE, SIZE), Image.BOX), np.float32) / 255.0
        canvas += cover[..., None] * (_texture(rng, _colour(rng), _colour(rng)) - canvas)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def wild_batch(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([wild_image(rng) for _ in range(n)])
