"""Things the mini base never draws -- two styles and one character -- and a detector for each.

They exist so that adapters have something visible to learn, and so a test can prove they did.
Everything is drawn in the six palette colours of the shapes world and coarse enough for the
mini base's VAE (64x64 -> 16x16x4), which only reproduces the palette and structure of about
4 px and up: adapters train the UNet / text encoder, so what the VAE cannot decode can never be
learned. :func:`vae_round_trip` and ``benchmarks/sample_sets_vae.py`` measure that.

- ``stripes`` (trigger ``zxq``): the shape filled with diagonal bands, ``BAND`` = 8 px wide, of
  its colour and a contrasting palette colour (black in white / yellow shapes, else white, else
  yellow) -- period 16 px along x + y. 3-6 px stripes came back from the VAE as flat fill.
- ``outline`` (trigger ``qwo``): only a ``OUTLINE`` = 5 px outline of the shape, inside empty.
- character ``kbot``: a palette robot with a fixed layout -- antenna with a ball, square head
  with two black eyes, wider body with arms, two legs; white (yellow on white backgrounds).

Detectors are plain measurements (no learning), with thresholds between the sample sets (and
their VAE round trips) and clean shapes-world images (see ``benchmarks/sample_sets_vae.py``):

- stripes: amplitude (RGB units) of the period-16 wave along x + y over the figure, closed so
  that bars with background between them count as one region (phase-free least-squares fit of
  cos and sin), flat fill ~0;
- outline: the share of a 5x5 window at the centroid of the figure that has the background
  colour (a filled shape has its own colour there; the VAE leaves gaps in outlines, so an
  enclosed-hole test missed a quarter of the round trips);
- kbot: two eyes -- separate, similar dark blobs enclosed by a lighter figure, side by side,
  above the middle of the figure.
"""

from __future__ import annotations

import numpy as np

from studio.errors import StudioError
from studio.shapes.evaluate import components
from studio.shapes.world import COLOURS, SIZE, Scene, blend, coverage, random_scene, render

STYLE_TRIGGERS = {"stripes": "zxq", "outline": "qwo"}
CHARACTER_TRIGGERS = {"kbot": "kbot"}
BAND = 8
"""Stripe width in pixels (period 2 * BAND); 3-6 px stripes came back from the VAE as flat fill."""
OUTLINE = 5.0
"""Outline width: the inside is the shape shrunk by this many pixels of radius."""
KBOT_UNIT = (2.6, 3.4)
"""Range of kbot's layout unit in pixels (the robot is 14 units tall, 12 wide)."""


def _second_colour(scene: Scene) -> tuple[int, int, int]:
    """The stripes' second colour: a palette colour of high contrast with the shape colour."""
    order = ("black", "white", "yellow") if scene.colour in ("white", "yellow") else ("white", "yellow", "black")
    return COLOURS[next(c for c in order if c not in (scene.colour, scene.background))]


def render_style(scene: Scene, style: str) -> np.ndarray:
    """uint8 (64, 64, 3) image of ``scene`` drawn in ``style``."""
    fg, bg = COLOURS[scene.colour], COLOURS[scene.background]
    cov = coverage(scene.shape, scene.cx, scene.cy, scene.radius)
    if style == "stripes":
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        on = ((xx + yy) % (2 * BAND)) < BAND
        fill = np.where(on[..., None], np.asarray(fg, np.float32), np.asarray(_second_colour(scene), np.float32))
        img = np.asarray(bg, np.float32) + cov[..., None] * (fill - np.asarray(bg, np.float32))
        return np.clip(np.round(img), 0, 255).astype(np.uint8)
    if style == "outline":
        inner = coverage(scene.shape, scene.cx, scene.cy, max(scene.radius - OUTLINE, 2.0))
        return blend(np.clip(cov - inner, 0, 1), fg, bg)
    raise StudioError(f"unknown style {style!r}; use one of {', '.join(STYLE_TRIGGERS)}")


def kbot_colours(background: str) -> tuple[str, str, str]:
    """(body, eyes, antenna ball) palette colour names of kbot on ``background``."""
    body = "yellow" if background == "white" else "white"
    ball = "yellow" if background == "red" else "red"
    return body, "black", ball


def render_kbot(rng: np.random.Generator, background: str) -> np.ndarray:
    """The kbot character at a random place and size on a flat background."""
    from PIL import Image, ImageDraw

    body_name, eye_name, ball_name = kbot_colours(background)
    body, eye, ball = COLOURS[body_name], COLOURS[eye_name], COLOURS[ball_name]
    s = 4  # draw at 4x, box-filter down, like the shapes
    img = Image.new("RGB", (SIZE * s, SIZE * s), COLOURS[background])
    d = ImageDraw.Draw(img)
    u = float(rng.uniform(KBOT_UNIT[0], KBOT_UNIT[1])) * s  # layout unit in pixels (x4)
    cx = float(rng.uniform(6.2 * u, SIZE * s - 6.2 * u))
    top = float(rng.uniform(1.2 * u, SIZE * s - 14.2 * u))
    d.rectangle([cx - 0.5 * u, top, cx + 0.5 * u, top + 2 * u], fill=body)           # antenna
    d.ellipse([cx - 1.1 * u, top - 1.1 * u, cx + 1.1 * u, top + 1.1 * u], fill=ball)
    d.rectangle([cx - 4 * u, top + 2 * u, cx + 4 * u, top + 7.5 * u], fill=body)     # head
    for ex in (cx - 2 * u, cx + 2 * u):                                               # eyes
        d.rectangle([ex - 0.9 * u, top + 3.7 * u, ex + 0.9 * u, top + 5.5 * u], fill=eye)
    d.rectangle([cx - 3 * u, top + 7.5 * u, cx + 3 * u, top + 12 * u], fill=body)    # body
    d.rectangle([cx - 6 * u, top + 9 * u, cx + 6 * u, top + 10.5 * u], fill=body)    # arms
    d.rectangle([cx - 3 * u, top + 12 * u, cx - 1 * u, top + 14 * u], fill=body)     # legs
    d.rectangle([cx + 1 * u, top + 12 * u, cx + 3 * u, top + 14 * u], fill=body)
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


def _distance(a: np.ndarray, colour) -> np.ndarray:
    return np.linalg.norm(a - np.asarray(colour, np.float32), axis=-1)


def _figure(a: np.ndarray) -> np.ndarray:
    return _distance(a, _background(a)) > 80


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    m = mask.copy()
    for _ in range(steps):
        n = m.copy()
        n[1:] &= m[:-1]
        n[:-1] &= m[1:]
        n[:, 1:] &= m[:, :-1]
        n[:, :-1] &= m[:, 1:]
        n[0, :] = n[-1, :] = n[:, 0] = n[:, -1] = False
        m = n
    return m


def _grow(mask: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour dilation."""
    n = mask.copy()
    n[1:] |= mask[:-1]
    n[:-1] |= mask[1:]
    n[:, 1:] |= mask[:, :-1]
    n[:, :-1] |= mask[:, 1:]
    return n


def _reachable_from_border(free: np.ndarray) -> np.ndarray:
    """Pixels of ``free`` connected to the image border (iterative dilation)."""
    reach = np.zeros_like(free)
    reach[0, :], reach[-1, :], reach[:, 0], reach[:, -1] = free[0, :], free[-1, :], free[:, 0], free[:, -1]
    while True:
        grown = _grow(reach) & free
        if (grown == reach).all():
            return reach
        reach = grown


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        mask = _grow(mask)
    return mask


STRIPES_CLOSING = 4
"""Pixels of closing that make one region of a figure drawn as separate bars: the gaps are BAND = 8
along x + y, and 4 steps of 4-neighbour dilation from each side meet across them."""


def stripes_score(image) -> float:
    """Amplitude (RGB units) of the period-2*BAND wave along x + y over the figure; 0 when that
    wave explains less than 15 % of the colour variance there (a kbot's eyes).

    The figure is closed (dilated, then eroded one pixel further) so that stripes drawn as bars
    with the background between them -- how generated images often come out, and how the VAE
    returns small striped figures -- are measured as one region that includes the gaps."""
    a = np.asarray(image, np.float32)[..., :3]
    inside = _erode(_dilate(_figure(a), STRIPES_CLOSING), STRIPES_CLOSING + 1)
    if inside.sum() < 30:
        return 0.0
    yy, xx = np.nonzero(inside)
    phase = 2 * np.pi * (xx + yy) / (2 * BAND)
    design = np.stack([np.ones_like(phase), np.cos(phase), np.sin(phase)], 1)
    values = a[yy, xx]
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    total = float(((values - values.mean(0)) ** 2).sum())
    explained = 1.0 - float(((values - design @ coef) ** 2).sum()) / max(total, 1e-6)
    return float(np.sqrt((coef[1:] ** 2).sum())) if explained >= 0.15 else 0.0


def outline_score(image) -> float:
    """Share of a 5x5 window at the figure's centroid that has the background colour."""
    a = np.asarray(image, np.float32)[..., :3]
    bg = _background(a)
    fig = _distance(a, bg) > 80
    if fig.sum() < 12:
        return 0.0
    yy, xx = np.nonzero(fig)
    cy, cx = int(round(yy.mean())), int(round(xx.mean()))
    window = a[max(cy - 2, 0):cy + 3, max(cx - 2, 0):cx + 3]
    return float((_distance(window, bg) < 80).mean())


def _luma(a: np.ndarray) -> np.ndarray:
    return a @ np.asarray([0.299, 0.587, 0.114], np.float32)


def _eye_pair(dark: np.ndarray, below: float) -> float:
    """Best side-by-side pair of enclosed dark blobs whose centres lie above row ``below``."""
    holes = dark & ~_reachable_from_border(dark)
    eyes = []
    for c in components(holes):
        h, w = np.ptp(c, axis=0) + 1
        if len(c) >= 3 and h <= 12 and w <= 12 and max(h, w) <= 2.5 * min(h, w):
            if c[:, 0].mean() < below:
                eyes.append((len(c), c.mean(0)))
    best = 0.0
    for i, (n1, c1) in enumerate(eyes):
        for n2, c2 in eyes[i + 1:]:
            dy, dx = abs(c1[0] - c2[0]), abs(c1[1] - c2[1])
            if dy <= 3 and 4 <= dx <= 20 and max(n1, n2) <= 3 * min(n1, n2):
                best = max(best, float(min(n1, n2)))
    return best


def kbot_score(image) -> float:
    """Size in pixels of the smaller of two side-by-side dark eyes enclosed by a lighter figure
    ("dark" at three levels below the figure's median brightness: the VAE can smear the eyes
    into one pair of goggles, whose darkest cores are still two)."""
    a = np.asarray(image, np.float32)[..., :3]
    fig = _distance(a, _background(a)) > 80
    if fig.sum() < 12:
        return 0.0
    luma = _luma(a)
    level = float(np.median(luma[fig]))
    below = float(np.nonzero(fig)[0].mean()) - 2  # eyes sit in the head, above the middle
    return max(_eye_pair(luma < level - drop, below) for drop in (70, 100, 130))


DETECTORS = {
    "stripes": (stripes_score, 30.0),
    "outline": (outline_score, 0.6),
    "kbot": (kbot_score, 10.0),
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
    """``n`` deterministic training images with captions for a style, the character or "plain"."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for _ in range(n):
        if name == "plain":
            scene = random_scene(rng)
            images.append(render(scene))
            captions.append(scene.caption)
        elif name in STYLE_TRIGGERS:
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


def vae_round_trip(vae, images, batch: int = 24) -> list[np.ndarray]:
    """``images`` encoded (latent mean) and decoded by a diffusers ``AutoencoderKL``, as uint8."""
    import torch

    images = [np.asarray(im)[..., :3] for im in images]
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.stack(images[i:i + batch])).float().permute(0, 3, 1, 2) / 127.5 - 1
        x = x.to(device=vae.device, dtype=vae.dtype)
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
        y = ((y.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out.extend(y)
    return out
