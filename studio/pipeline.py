"""Generate images from a base pipeline with whatever adapters are attached to its components.

The one inference path of the studio: training samples, ``studio generate`` and the UI all
call :func:`generate`, so a sample during training is exactly what the user will get later.
PNGs carry an AUTOMATIC1111-style ``parameters`` text chunk that other tools read.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from studio.errors import StudioError
from studio.formats.files import write_atomic

# user-facing sampler names -> (diffusers scheduler class name, extra config, A1111 label)
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
}


@dataclass(frozen=True)
class Settings:
    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 4.0
    width: int | None = None
    height: int | None = None
    sampler: str = "dpmpp_2m"
    adapters: tuple = field(default_factory=tuple)
    """(name, weight, hash12) of the adapters in the mix, for the PNG parameters."""
    model: str = ""


def set_sampler(pipe, name: str) -> None:
    import diffusers

    if name not in SAMPLERS:
        raise StudioError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    cls_name, extra, _ = SAMPLERS[name]
    if type(pipe.scheduler).__name__ != cls_name or any(pipe.scheduler.config.get(k) != v for k, v in extra.items()):
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)


def default_size(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


MAX_STEPS = 150
MAX_SIZE = 2048
MAX_CFG = 30.0


def size_multiple(pipe) -> int:
    """Pixel sizes must be a multiple of this: VAE factor times the UNet's total downsampling."""
    return int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def within_limits(pipe, s: Settings) -> tuple[Settings, list[str]]:
    """``s`` with steps, CFG and size brought into sane ranges, and one note per change (for the
    user: a CLI ``note:`` line, a UI warning). Sizes round down to the pipeline's size multiple."""
    notes: list[str] = []
    changes: dict = {}
    steps = min(max(int(s.steps), 1), MAX_STEPS)
    if steps != s.steps:
        notes.append(f"steps {s.steps} capped to {steps} (allowed 1..{MAX_STEPS})")
        changes["steps"] = steps
    cfg = min(max(float(s.cfg), 0.0), MAX_CFG)
    if cfg != s.cfg:
        notes.append(f"CFG {s.cfg:g} capped to {cfg:g} (allowed 0..{MAX_CFG:g})")
        changes["cfg"] = cfg
    step, native = size_multiple(pipe), default_size(pipe)
    for key in ("width", "height"):
        value = getattr(s, key)
        if value is None:
            continue
        fixed = min(max(int(value) // step * step, step), MAX_SIZE // step * step)
        if fixed != value:
            notes.append(f"{key} {value} set to {fixed} (a multiple of {step} from {step} to {MAX_SIZE}; "
                         f"this base's native size is {native})")
            changes[key] = fixed
    return dataclasses.replace(s, **changes) if changes else s, notes


def generate(pipe, settings: list[Settings] | Settings) -> list[np.ndarray]:
    """RGB uint8 images, one per Settings; image i is seeded by its own generator."""
    settings = [settings] if isinstance(settings, Settings) else list(settings)
    images = []
    for s in settings:
        set_sampler(pipe, s.sampler)
        size = default_size(pipe)
        generator = torch.Generator(device="cpu").manual_seed(int(s.seed))
        with torch.no_grad():
            out = pipe(s.prompt, negative_prompt=s.negative or None, num_inference_steps=int(s.steps),
                       guidance_scale=float(s.cfg), generator=generator, width=s.width or size,
                       height=s.height or size, output_type="np")
        images.append((np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8))
    return images


def parameters_text(s: Settings, width: int, height: int) -> str:
    """The A1111 ``parameters`` chunk: prompt, negative, then one line of key: value pairs."""
    lines = [s.prompt]
    if s.negative:
        lines.append(f"Negative prompt: {s.negative}")
    pairs = [f"Steps: {s.steps}", f"Sampler: {SAMPLERS[s.sampler][2]}", f"CFG scale: {s.cfg:g}", f"Seed: {s.seed}",
             f"Size: {width}x{height}"]
    if s.model:
        pairs.append(f"Model: {s.model}")
    if s.adapters:
        # a weight is a number, or "W:TE_W" text when the text encoder has its own weight
        pairs.append("Lora weights: \"" + ", ".join(f"{n}: {w if isinstance(w, str) else format(w, 'g')}"
                                                     for n, w, _ in s.adapters) + "\"")
        pairs.append("Lora hashes: \"" + ", ".join(f"{n}: {h}" for n, _, h in s.adapters) + "\"")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def save_png(image: np.ndarray, path: str | Path, parameters: str | None = None) -> Path:
    """Write a PNG atomically (``formats.files.write_atomic``), with a ``parameters`` text chunk."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    write_atomic(path, [buffer.getvalue()])
    return path


def grid(images: list[np.ndarray], cols: int) -> np.ndarray:
    """Images of one size in a grid with 2-px white gutters."""
    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    canvas = np.full((rows * (h + 2) - 2, cols * (w + 2) - 2, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + 2): r * (h + 2) + h, c * (w + 2): c * (w + 2) + w] = image
    return canvas


def labelled_grid(cells: list[list[np.ndarray]], col_labels: list[str], row_labels: list[str],
                  min_cell: int = 128) -> np.ndarray:
    """An X/Y grid as one image: cells[row][col], column labels on top, row labels on the left.
    Small cells are enlarged (nearest neighbour, pixels stay sharp) to ``min_cell`` so labels fit."""
    from PIL import Image, ImageDraw

    h, w = cells[0][0].shape[:2]
    zoom = max(1, -(-min_cell // min(h, w)))
    ch, cw = h * zoom, w * zoom
    font_px, gap = 12, 4
    left = max([len(label) for label in row_labels] + [0]) * 7 + 2 * gap if any(row_labels) else 0
    top = font_px + 2 * gap
    rows, cols = len(cells), len(cells[0])
    canvas = Image.new("RGB", (left + cols * (cw + gap), top + rows * (ch + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(col_labels):
        draw.text((left + c * (cw + gap) + gap, gap), label, fill="black")
    for r, row in enumerate(cells):
        y = top + r * (ch + gap)
        if row_labels[r]:
            draw.text((gap, y + ch // 2 - font_px // 2), row_labels[r], fill="black")
        for c, cell in enumerate(row):
            tile = Image.fromarray(cell).resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (left + c * (cw + gap), y))
    return np.asarray(canvas)
