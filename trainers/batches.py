"""Aspect-ratio buckets and the order of training batches.

The whole order is a pure function of (seed, epoch): resuming at step N rebuilds exactly the
batches an uninterrupted run would have seen, and N processes each take their slice of the
same global batch (so 2 processes x batch 2 = 1 process x batch 4).
"""

from __future__ import annotations

import math
import random

import numpy as np


def make_buckets(resolution: int, step: int, min_size: int, max_size: int) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of ``step``, with about resolution^2 pixels."""
    buckets = {(resolution, resolution)}
    area = resolution * resolution
    for width in range(min_size, max_size + 1, step):
        height = int(area / width) // step * step
        if min_size <= height <= max_size:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def fit_to_bucket(image: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Resize to cover the bucket (keeping the aspect ratio), then centre-crop to it."""
    from PIL import Image

    width, height = bucket
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    im = Image.fromarray(image)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return np.asarray(im.crop((left, top, left + width, top + height)), dtype=np.uint8)


class BatchOrder:
    """Global batches of item indices, each from one bucket, always full (short buckets wrap)."""

    def __init__(self, item_buckets: list[int], repeats: list[int], batch_size: int, seed: int):
        self.batch_size, self.seed = batch_size, seed
        self.groups: dict[int, list[int]] = {}
        for index, (bucket, count) in enumerate(zip(item_buckets, repeats)):
            self.groups.setdefault(bucket, []).extend([index] * count)
        self.steps_per_epoch = sum(math.ceil(len(g) / batch_size) for g in self.groups.values())

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-order-{epoch}")
        batches = []
        for bucket in sorted(self.groups):
            members = list(self.groups[bucket])
            rng.shuffle(members)
            total = math.ceil(len(members) / self.batch_size) * self.batch_size
            padded = [members[i % len(members)] for i in range(total)]  # wrap: every batch is full
            batches += [padded[i:i + self.batch_size] for i in range(0, total, self.batch_size)]
        rng.shuffle(batches)
        return batches

    def batch(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        return self.epoch(epoch)[within]
