"""Read a shapes-world image back: background colour, shape colour, shape -- and score prompts.

No learned parts, so there is nothing to retrain and nothing to drift:

- background: the palette colour most pixels of the 3-pixel border are nearest to;
- foreground: among the pixels clearly away from the background colour (RGB distance > 80),
  the most common nearest palette colour;
- shape: the largest 4-connected blob of pixels that lie past the half-way point from the
  background to the foreground colour (for a ground-truth image that is exactly the shape
  outline) is described by two numbers -- *extent* = area / bounding-box area and
  *solidity* = area / convex-hull area -- and classified: star when solidity < 0.81 (five
  notches), square when extent >= 0.87, circle when extent >= 0.66 (pi/4 = 0.785), else
  triangle (0.5). On ground truth stars reach solidity <= 0.63 and triangles >= 0.90; the
  star threshold sits nearer the triangles because generated stars come out with blunted
  notches (0.76-0.80 seen) while generated triangles stay >= 0.83.

:func:`score` compares readings with captions; :func:`evaluate_pipeline` renders fixed
prompts at fixed seeds with a diffusers pipeline and scores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from studio.errors import StudioError
from studio.shapes.world import COLOURS, all_captions, parse_caption

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], np.float32)  # (6, 3)


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None
    shape: str | None
    extent: float = 0.0
    solidity: float = 0.0
    area: int = 0


def _as_array(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] < 3:
        raise StudioError(f"expected an RGB image (H, W, 3), got shape {a.shape}")
    return a[..., :3].astype(np.float32)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask as arrays of (y, x) pixel coordinates."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, blob = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        out.append(np.asarray(blob))
    return out


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask."""
    out = np.zeros_like(mask)
    blobs = components(mask)
    if blobs:
        best = max(blobs, key=len)
        out[best[:, 0], best[:, 1]] = True
    return out


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the pixel squares of a mask (monotone chain + shoelace)."""
    ys, xs = np.nonzero(mask)
    corners = {(x + dx, y + dy) for x, y in zip(xs.tolist(), ys.tolist()) for dx in (0, 1) for dy in (0, 1)}
    pts = sorted(corners)
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    area = 0.0
    for (x1, y1), (x2, y2) in zip(hull, hull[1:] + hull[:1]):
        area += x1 * y2 - x2 * y1
    return abs(area) / 2.0


def nearest_colour(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour and the distance to it, for (..., 3) pixels."""
    d = np.linalg.norm(pixels[..., None, :] - _PALETTE, axis=-1)  # (..., 6)
    return d.argmin(-1), d.min(-1)


def classify_shape(mask: np.ndarray) -> tuple[str | None, float, float, int]:
    blob = _largest_blob(mask)
    area = int(blob.sum())
    if area < 12:
        return None, 0.0, 0.0, area
    ys, xs = np.nonzero(blob)
    extent = area / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    solidity = area / max(_hull_area(blob), 1.0)
    if solidity < 0.81:
        shape = "star"
    elif extent >= 0.87:
        shape = "square"
    elif extent >= 0.66:
        shape = "circle"
    else:
        shape = "triangle"
    return shape, extent, solidity, area


def read_image(image) -> Reading:
    """What a shapes-world image shows (see the module docstring for the method)."""
    a = _as_array(image)
    idx, dist = nearest_colour(a)
    border = np.concatenate([idx[:3].ravel(), idx[-3:].ravel(), idx[:, :3].ravel(), idx[:, -3:].ravel()])
    bg_i = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    bg = _PALETTE[bg_i]
    away = np.linalg.norm(a - bg, axis=-1) > 80
    candidates = idx[away & (dist < 80)]
    candidates = candidates[candidates != bg_i]
    if candidates.size < 12:
        return Reading(_NAMES[bg_i], None, None)
    fg_i = int(np.bincount(candidates, minlength=len(_NAMES)).argmax())
    fg = _PALETTE[fg_i]
    direction = fg - bg
    t = ((a - bg) @ direction) / float(direction @ direction)  # 0 at bg, 1 at fg
    shape, extent, solidity, area = classify_shape(t > 0.5)
    return Reading(_NAMES[bg_i], _NAMES[fg_i], shape, round(extent, 3), round(solidity, 3), area)


def score(images, prompts: list[str]) -> dict[str, float]:
    """Fractions of images whose reading matches the caption: per attribute and all together."""
    if len(images) != len(prompts) or not prompts:
        raise StudioError("score: need as many images as prompts, at least one")
    hits = {"background": 0, "colour": 0, "both_colours": 0, "shape": 0, "all": 0}
    for image, prompt in zip(images, prompts):
        colour, shape, background = parse_caption(prompt)
        r = read_image(image)
        ok_bg, ok_fg, ok_shape = r.background == background, r.colour == colour, r.shape == shape
        hits["background"] += ok_bg
        hits["colour"] += ok_fg
        hits["both_colours"] += ok_bg and ok_fg
        hits["shape"] += ok_shape
        hits["all"] += ok_bg and ok_fg and ok_shape
    return {k: v / len(prompts) for k, v in hits.items()}


def eval_prompts(n: int = 64, seed: int = 0) -> list[str]:
    """``n`` captions spread over all combinations (a fixed permutation, cycled)."""
    caps = all_captions()
    order = np.random.default_rng(seed).permutation(len(caps))
    return [caps[order[i % len(caps)]] for i in range(n)]


def render_prompts(pipe, prompts: list[str], seed: int = 0, steps: int = 20, guidance: float = 4.0,
                   batch: int = 16) -> list[np.ndarray]:
    """Images for ``prompts``; image i uses generator seed ``seed + i`` whatever the batching."""
    import torch

    out: list[np.ndarray] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator().manual_seed(seed + start + j) for j in range(len(chunk))]
        res = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   height=64, width=64, output_type="np")
        out.extend((np.clip(res.images, 0, 1) * 255).round().astype(np.uint8))
    return out


def evaluate_pipeline(pipe, n: int = 64, seed: int = 0, steps: int = 20,
                      guidance: float = 4.0) -> tuple[dict[str, float], list[str], list[np.ndarray]]:
    prompts = eval_prompts(n, seed)
    images = render_prompts(pipe, prompts, seed=seed, steps=steps, guidance=guidance)
    return score(images, prompts), prompts, images


def grid(images: list[np.ndarray], labels: list[str] | None = None, cols: int = 8, scale: int = 2):
    """A PIL grid of images, each with its (wrapped) label under it."""
    from PIL import Image, ImageDraw

    size = images[0].shape[0] * scale
    label_h = 24 if labels else 0
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * size, rows * (size + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        x, y = (i % cols) * size, (i // cols) * (size + label_h)
        canvas.paste(Image.fromarray(im).resize((size, size), Image.NEAREST), (x, y))
        if labels:
            words = labels[i].replace("a ", "", 1).replace(" background", "").split(" on a ")
            draw.text((x + 2, y + size + 1), words[0][:22], fill=(0, 0, 0))
            draw.text((x + 2, y + size + 12), ("on " + words[-1])[:22], fill=(0, 0, 0))
    return canvas
