"""A folder of images with same-name .txt captions: scanning, checking, loading, captions.

Layout: ``DATA_DIR/*.png|jpg|...`` with ``name.txt`` beside each image, or kohya's
``DATA_DIR/<repeats>_<name>/`` sub-folders (the images of such a folder are seen ``repeats``
times per epoch; its ``<name>`` is the caption of images that have no .txt). ``name.mask.png``
beside an image is its loss mask (trainers/masks.py), never a training image. Every image is
opened and decoded before training starts, so a damaged file fails the run at once, naming
the file, before anything is written.
"""

from __future__ import annotations

import hashlib
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studio.errors import StudioError
from trainers import masks

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str
    repeats: int = 1
    caption_file: Path | None = None
    mask: Path | None = None


def read_caption(path: Path) -> str:
    """A caption file's text; non-UTF-8 bytes are replaced (with a warning), never fatal."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        warnings.warn(f"caption {path} is not UTF-8: undecodable bytes were replaced; save it as UTF-8", stacklevel=2)
    return " ".join(text.split())


def _folder_items(folder: Path, repeats: int, default_caption: str | None) -> list[ImageItem]:
    items = []
    for path in sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not masks.is_mask(p)):
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            caption = read_caption(caption_file)
        else:
            caption_file = None
            caption = default_caption or ""
        items.append(ImageItem(path, caption, repeats, caption_file, masks.find_mask(path, IMAGE_SUFFIXES)))
    return items


def scan(data_dir: str | Path) -> list[ImageItem]:
    """All images of a dataset folder (kohya ``<repeats>_<name>`` sub-folders included)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise StudioError(f"dataset folder {root} does not exist: give a folder of images with .txt captions")
    items = _folder_items(root, 1, None)
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        match = KOHYA_FOLDER.match(sub.name)
        if match:
            items += _folder_items(sub, int(match.group(1)), match.group(2).replace("_", " "))
    if not items:
        raise StudioError(f"no images in {root}: put .png/.jpg files (with same-name .txt captions) in it, "
                          f"or in kohya-style sub-folders such as {root}/10_mystyle")
    return items


def load_image(path: Path) -> np.ndarray:
    """Any common image as RGB uint8 (H, W, 3): EXIF rotation applied, alpha over white,
    CMYK / grayscale / palette / 16-bit converted. Raises StudioError naming a bad file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if path.stat().st_size == 0:
        raise StudioError(f"image {path} is an empty file: delete it or replace it with the real image")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.float64)
                scale = 65535.0 if a.max() > 255 else 255.0
                im = Image.fromarray((a / scale * 255).round().clip(0, 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "P", "PA"):
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except UnidentifiedImageError:
        raise StudioError(f"{path} is not an image (or a format Pillow cannot read): delete it or re-export it as PNG") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise StudioError(f"image {path} is damaged ({err}): re-export it or remove it from the dataset") from None


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def with_trigger(caption: str, trigger: str | None) -> str:
    """Prepend the trigger word where the caption lacks it."""
    if not trigger or re.search(rf"(^|\W){re.escape(trigger)}(\W|$)", caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def augment_caption(caption: str, rng: random.Random, shuffle: bool, keep_tokens: int, dropout: float) -> str:
    """Caption dropout (-> "") and comma-tag shuffle keeping the first ``keep_tokens`` tags."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if shuffle:
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        head, tail = tags[:keep_tokens], tags[keep_tokens:]
        rng.shuffle(tail)
        caption = ", ".join(head + tail)
    return caption


@dataclass
class Report:
    """What ``studio train DATA --check`` finds."""
    images: int = 0
    captions: int = 0
    missing: list[str] | None = None
    empty: list[str] | None = None
    unreadable: list[str] | None = None
    too_small: list[str] | None = None
    too_long: list[str] | None = None
    duplicates: list[list[str]] | None = None

    @property
    def problems(self) -> int:
        return sum(len(getattr(self, k) or []) for k in ("missing", "empty", "unreadable", "too_small", "too_long",
                                                          "duplicates"))


def check(data_dir: str | Path, min_size: int, tokenizer=None) -> Report:
    """Lint a dataset without training: every problem listed, nothing raised for bad images."""
    items = scan(data_dir)
    report = Report(images=len(items), missing=[], empty=[], unreadable=[], too_small=[], too_long=[], duplicates=[])
    by_hash: dict[str, list[str]] = {}
    for item in items:
        if item.caption_file is None:
            report.missing.append(str(item.path))
        else:
            report.captions += 1
            if not item.caption:
                report.empty.append(str(item.caption_file))
        try:
            image = load_image(item.path)
            if min(image.shape[:2]) < min_size:
                report.too_small.append(f"{item.path} ({image.shape[1]}x{image.shape[0]} < {min_size})")
        except StudioError as err:
            report.unreadable.append(str(err))
            continue
        by_hash.setdefault(file_hash(item.path), []).append(str(item.path))
        if tokenizer is not None and item.caption:
            n = len(tokenizer(item.caption).input_ids)
            if n > tokenizer.model_max_length:
                report.too_long.append(f"{item.caption_file} ({n} tokens > {tokenizer.model_max_length})")
    report.duplicates = [paths for paths in by_hash.values() if len(paths) > 1]
    return report


def format_report(report: Report, data_dir: str | Path) -> str:
    lines = [f"{data_dir}: {report.images} images, {report.captions} captions"]
    for key, title in [("missing", "images without a .txt caption"), ("empty", "empty captions"),
                       ("unreadable", "unreadable images"), ("too_small", "images below the bucket minimum"),
                       ("too_long", "captions longer than the text encoder's limit (truncated)"),
                       ("duplicates", "duplicate images")]:
        found = getattr(report, key)
        if found:
            lines.append(f"  {len(found)} {title}:")
            lines += [f"    {', '.join(f) if isinstance(f, list) else f}" for f in found]
    lines.append("  no problems found" if report.problems == 0 else f"  {report.problems} problem(s)")
    return "\n".join(lines)
