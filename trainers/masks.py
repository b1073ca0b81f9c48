"""Masked loss: a same-name mask image weights each latent pixel's share of the loss.

``photo.png`` may have ``photo.mask.png`` beside it (any image suffix): a grayscale picture of the
same size, white = learn (weight 1), black = ignore (0), grey = partial (value / 255). Colour
masks are read as their luminance. Images without a mask weigh 1 everywhere; a dataset with no
masks at all never multiplies anything, so it trains exactly as before.

The mask goes through the same bucket resize + centre crop and the same flip as its image, then
is averaged down to the latent grid (each latent pixel covers vae_scale_factor^2 image pixels).
The weighted loss is mean(mask * (pred - target)^2) over channels and pixels, kohya's
convention: an all-white mask gives the unmasked loss bit for bit, an all-black mask gives 0
(and no gradient), and a half-masked image contributes half as much as a full one (the loss is
not renormalised by the mask's area, which would let a tiny mask dominate a batch).

Masks are small and cheap: they are kept in memory at pixel size and their latent-size weights
memoised per (image, flip), so cached latents need no mask cache on disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from studio.errors import StudioError
from trainers import batches

MASK_TAG = ".mask"
"""``<stem>.mask.<suffix>`` is the mask of ``<stem>.<suffix>``."""


def is_mask(path: Path) -> bool:
    return Path(path.stem).suffix.lower() == MASK_TAG


def find_mask(image: Path, suffixes) -> Path | None:
    """The mask file beside ``image`` (same stem + .mask, any image suffix), or None."""
    for suffix in sorted(suffixes):
        for candidate in (image.with_name(f"{image.stem}{MASK_TAG}{suffix}"),
                          image.with_name(f"{image.stem}{MASK_TAG}{suffix.upper()}")):
            if candidate.is_file():
                return candidate
    return None


def load_mask(path: Path, image: Path, size: tuple[int, int]) -> np.ndarray:
    """The mask as (H, W) uint8, EXIF rotation applied; refused unless it is ``size`` (w, h) like its image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            mask = np.asarray(im.convert("L"), dtype=np.uint8).copy()
    except UnidentifiedImageError:
        raise StudioError(f"mask {path} is not an image: save it as a grayscale PNG (white = learn)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise StudioError(f"mask {path} is damaged ({err}): re-export it as a grayscale PNG") from None
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        raise StudioError(f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's {size[0]}x{size[1]} "
                          f"in {path} (image {image}): resize the mask to the image's size")
    return mask


class LatentMasks:
    """Latent-size loss weights of every item that has a mask; None for the others."""

    def __init__(self, masks: list[np.ndarray | None], buckets: list[tuple[int, int]], scale: int):
        self.fitted = [None if m is None else batches.fit_to_bucket(m, b) for m, b in zip(masks, buckets)]
        self.scale = scale
        self.memo: dict[tuple[int, bool], torch.Tensor] = {}

    @property
    def any(self) -> bool:
        return any(m is not None for m in self.fitted)

    def weight(self, index: int, flip: bool) -> torch.Tensor | None:
        """(1, h, w) float32 weights in [0, 1] on the latent grid, or None (= all ones)."""
        mask = self.fitted[index]
        if mask is None:
            return None
        key = (index, flip)
        if key not in self.memo:
            pixels = torch.from_numpy(np.ascontiguousarray(mask[:, ::-1] if flip else mask)).float() / 255.0
            h, w = pixels.shape[0] // self.scale, pixels.shape[1] // self.scale
            self.memo[key] = F.interpolate(pixels[None, None], size=(h, w), mode="area")[0]  # (1, h, w)
        return self.memo[key]

    def batch(self, indices: list[int], flips: list[bool], shape: tuple[int, int]) -> torch.Tensor | None:
        """(G, 1, h, w) weights of a batch, ones where an item has no mask; None when no item has one."""
        weights = [self.weight(i, f) for i, f in zip(indices, flips)]
        if all(w is None for w in weights):
            return None
        return torch.stack([torch.ones(1, *shape) if w is None else w for w in weights])


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(G,) per-sample mean of the (mask-weighted) squared error, computed in fp32."""
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    if weights is not None:
        error = error * weights.to(error.device)
    return error.mean(dim=(1, 2, 3))


def load_all(items, pictures: list[np.ndarray]) -> list[np.ndarray | None]:
    """Every item's mask (None where it has none), each checked against its decoded image's size."""
    return [None if item.mask is None else load_mask(item.mask, item.path, (picture.shape[1], picture.shape[0]))
            for item, picture in zip(items, pictures)]
