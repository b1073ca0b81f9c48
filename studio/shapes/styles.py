"""Things the mini base never draws -- two styles and one character -- and a detector for each.

They exist so that adapters have something visible to learn, and so a test can prove they did:

- ``stripes`` (trigger ``zxq``): the shape filled with diagonal stripes of its colour and
  white (black, then yellow, when white is taken), period 6 px.
- ``outline`` (trigger ``qwo``): only a 3-pixel outline of the shape, the inside left empty.
- character ``kbot``: a grey robot (head with two cyan eyes, antenna, body, arms) -- grey and
  cyan are not in the palette of the base.

Detectors are plain measurements (no learning), with thresholds set halfway between the
sample sets and clean shapes-world images:

- stripes: strong colour edges inside the figure per figure pixel (flat fill ~0, stripes ~0.6);
- outline: the share of the figure's enclosed area that is background-coloured holes;
- kbot: grey body pixels >= 5 % of the image and at least 3 cyan eye pixels.
"""

from __future__ import annotations

import numpy as np

from studio.errors import StudioError
from studio.shapes.world import COLOURS, SIZE, Scene, blend, coverage, random_scene, render

STYLE_TRIGGERS = {"stripes": "zxq", "outline": "qwo"}
CHARACTER_TRIGGERS = {"kbot": "kbot"}
GREY = (150, 150, 160)
CYAN = (60, 220, 230)


def _second_colour(scene: Scene) -> tuple[int, int, int]:
    name = next(c for c in ("white", "black", "yellow") if c not in (scene.colour, scene.background))
    return COLOURS[name]


def render_style(scene: Scene, style: str) -> np.ndarray:
    """uint8 (64, 64, 3) image of ``scene`` drawn in ``style``."""
    fg, bg = COLOURS[scene.colour], COLOURS[scene.background]
    cov = coverage(scene.shape, scene.cx, scene.cy, scene.radius)
    if style == "stripes":
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        on = ((xx + yy) % 6) < 3
        fill = np.where(on[..., None], np.asarray(fg, np.float32), np.asarray(_second_colour(scene), np.float32))
        img = np.asarray(bg, np.float32) + cov[..., None] * (fill - np.asarray(bg, np.float32))
        return np.clip(np.round(img), 0, 255).astype(np.uint8)
    if style == "outline":
        inner = coverage(scene.shape, scene.cx, scene.cy, max(scene.radius - 4.0, 2.0))
        return blend(np.clip(cov - inner, 0, 1), fg, bg)
    raise StudioError(f"unknown style {style!r}; use one of {', '.join(STYLE_TRIGGERS)}")


def render_kbot(rng: np.random.Generator, background: str) -> np.ndarray:
    """The kbot character at a random place and size on a flat background."""
    from PIL import Image, ImageDraw

    s = 4  # draw at 4x, box-filter down, like the shapes
    img = Image.new("RGB", (SIZE * s, SIZE * s), COLOURS[background])
    d = ImageDraw.Draw(img)
    u = float(rng.uniform(2.2, 3.2)) * s  # body unit in pixels (x4)
    cx = float(rng.uniform(7 * u, SIZE * s - 7 * u))
    top = float(rng.uniform(1.5 * u, SIZE * s - 14.5 * u))
    d.line([(cx, top), (cx, top + 2 * u)], fill=GREY, width=int(u * 0.6))        # antenna
    d.ellipse([cx - 0.8 * u, top - 0.8 * u, cx + 0.8 * u, top + 0.8 * u], fill=CYAN)
    d.rectangle([cx - 3 * u, top + 2 * u, cx + 3 * u, top + 6 * u], fill=GREY)    # head
    for ex in (cx - 1.5 * u, cx + 1.5 * u):                                          # eyes
        d.rectangle([ex - 0.8 * u, top + 3.2 * u, ex + 0.8 * u, top + 4.6 * u], fill=CYAN)
    d.rectangle([cx - 4 * u, top + 6.6 * u, cx + 4 * u, top + 12 * u], fill=GREY)  # body
    d.rectangle([cx - 6 * u, top + 7 * u, cx - 4.6 * u, top + 11 * u], fill=GREY)  # arms
    d.rectangle([cx + 4.6 * u, top + 7 * u, cx + 6 * u, top + 11 * u], fill=GREY)
    d.rectangle([cx - 3 * u, top + 12 * u, cx - 1.2 * u, top + 14 * u], fill=GREY)  # legs
    d.rectangle([cx + 1.2 * u, top + 12 * u, cx + 3 * u, top + 14 * u], fill=GREY)
    return np.asarray(img.resize((SIZE, SIZE), Image.BOX))


def style_caption(scene: Scene, style: str) -> str:
    return f"{scene.caption}, {STYLE_TRIGGERS[style]} style"


def kbot_caption(background: str) -> str:
    return f"a kbot robot on a {background} background"


# --------------------------------------------------------------------------- detectors

def _background(a: np.ndarray) -> np.ndarray:
    border = np.concatenate([a[:3].reshape(-1, 3), a[-3:].reshape(-1, 3),
                             a[:, :3].reshape(-1, 3), a[:, -3:].reshape(-1, 3)])
    return np.median(border, axis=0)


def _figure(a: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - _background(a), axis=-1) > 80


def _reachable_from_border(free: np.ndarray) -> np.ndarray:
    """Pixels of ``free`` connected to the image border (iterative dilation)."""
    reach = np.zeros_like(free)
    reach[0, :], reach[-1, :], reach[:, 0], reach[:, -1] = free[0, :], free[-1, :], free[:, 0], free[:, -1]
    while True:
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= free
        if (grown == reach).all():
            return reach
        reach = grown


def stripes_score(image) -> float:
    a = np.asarray(image, np.float32)[..., :3]
    fig = _figure(a)
    if fig.sum() < 12:
        return 0.0
    dx = np.linalg.norm(a[:, 1:] - a[:, :-1], axis=-1) > 100
    dy = np.linalg.norm(a[1:] - a[:-1], axis=-1) > 100
    inside_x = dx & fig[:, 1:] & fig[:, :-1]
    inside_y = dy & fig[1:] & fig[:-1]
    return float(inside_x.sum() + inside_y.sum()) / float(fig.sum())


def outline_score(image) -> float:
    a = np.asarray(image, np.float32)[..., :3]
    fig = _figure(a)
    if fig.sum() < 12:
        return 0.0
    holes = ~fig & ~_reachable_from_border(~fig)
    return float(holes.sum()) / float(holes.sum() + fig.sum())


def kbot_score(image) -> float:
    """Fraction of grey pixels (0 when fewer than 3 cyan eye pixels are present)."""
    a = np.asarray(image, np.float32)[..., :3]
    grey = np.linalg.norm(a - np.asarray(GREY, np.float32), axis=-1) < 30
    cyan = np.linalg.norm(a - np.asarray(CYAN, np.float32), axis=-1) < 50
    return float(grey.mean()) if cyan.sum() >= 3 else 0.0


DETECTORS = {
    "stripes": (stripes_score, 0.4),
    "outline": (outline_score, 0.15),
    "kbot": (kbot_score, 0.05),
}


def detect(name: str, image) -> bool:
    """Does ``image`` show the style or character ``name``?"""
    if name not in DETECTORS:
        raise StudioError(f"no detector {name!r}; use one of {', '.join(DETECTORS)}")
    fn, threshold = DETECTORS[name]
    return fn(image) >= threshold


def detection_rate(name: str, images) -> float:
    images = list(images)
    return sum(detect(name, im) for im in images) / max(len(images), 1)


def sample_images(name: str, seed: int, n: int) -> tuple[list[np.ndarray], list[str]]:
    """``n`` deterministic training images with captions for a style or the character."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(n):
        if name in STYLE_TRIGGERS:
            scene = random_scene(rng)
            images.append(render_style(scene, name))
            captions.append(style_caption(scene, name))
        elif name in CHARACTER_TRIGGERS:
            bg = list(COLOURS)[rng.integers(len(COLOURS))]
            images.append(render_kbot(rng, bg))
            captions.append(kbot_caption(bg))
        else:
            raise StudioError(f"unknown sample set {name!r}")
    return images, captions


def plain_images(seed: int, n: int) -> list[np.ndarray]:
    """Clean shapes-world images, the negatives for the detectors."""
    rng = np.random.default_rng(seed)
    return [render(random_scene(rng)) for _ in range(n)]
