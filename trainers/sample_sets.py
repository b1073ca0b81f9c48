"""Write the committed sample training sets (deterministic: same bytes on every run).

    python -m trainers.sample_sets [ROOT]     # ROOT defaults to sample_data

ROOT/styles/stripes/    24 images, captions "a red circle on a blue background, zxq style"
ROOT/styles/outline/    24 images, captions "..., qwo style"
ROOT/characters/kbot/   24 images, captions "a kbot robot on a green background"
ROOT/regularization/shapes/  24 plain shapes-world images, captions "a red circle on a blue background"
                        (class images for prior preservation: ``studio train ... --reg-data``)

Each image is a 64x64 PNG with a same-name ``.txt`` caption that contains the trigger word.
The pictures are drawn by :mod:`studio.shapes.styles`, whose detectors judge adapters trained
on these sets; ``benchmarks/sample_sets_vae.py`` checks that the mini base's VAE carries them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

from studio.shapes.styles import sample_images

SETS = {"styles/stripes": ("stripes", 101), "styles/outline": ("outline", 102),
        "characters/kbot": ("kbot", 103), "regularization/shapes": ("plain", 104)}
COUNT = 24


def write_sets(root: str | os.PathLike = "sample_data", count: int = COUNT) -> list[Path]:
    root = Path(root)
    written = []
    for rel, (name, seed) in SETS.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, 0o755)
        images, captions = sample_images(name, seed, count)
        for i, (image, caption) in enumerate(zip(images, captions)):
            Image.fromarray(image).save(tmp / f"{name}_{i:02d}.png", optimize=False)
            (tmp / f"{name}_{i:02d}.txt").write_text(caption + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
        written.append(target)
    return written


if __name__ == "__main__":
    for path in write_sets(sys.argv[1] if len(sys.argv) > 1 else "sample_data"):
        print(path)
