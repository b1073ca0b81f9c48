"""Validation loss on held-out images, the run's loss record, and ``--keep-best``.

Held-out images come from ``--val-data DIR`` (captioned like the data) or ``--val-split F``: the
fraction F of the dataset's images, picked by the seed alone (the same images in every run and
on resume), removed from training. Every ``--val-every N`` steps and at the end, each held-out
image is scored at ``VAL_FRACTIONS`` of the schedule with noise fixed per (image, timestep): its
latent is the VAE posterior mean (no sampling), its caption the plain caption with the trigger
(no dropout, shuffle or flip), the models are in eval mode without gradients, and the score is
the plain (mask-weighted) MSE against the prediction target, without min-SNR weighting, so the
numbers of two runs compare whatever their loss options. Between two validations only the
adapter changes, so a lower value is a better adapter on unseen images.

The record: ``OUT/losses.jsonl``, one JSON object per optimizer step, appended as the run goes::

    {"step": 12, "loss": 0.0312, "lr": 0.0001}
    {"step": 13, "loss": 0.0298, "lr": 0.0001, "val_loss": 0.0451}

``step`` counts finished optimizer steps (1-based, as the progress bar shows); ``loss`` is the
step's training loss (averaged over gradient accumulation); ``val_loss`` is present on the steps
that ran a validation. A reader should skip a last line that does not parse (a run killed while
writing it). On ``--resume`` from the checkpoint of step S the file is rewritten keeping the
records up to S, so it always describes one uninterrupted run. TensorBoard gets the same value
as the scalar ``val_loss`` (beside ``loss`` and ``lr``).

``--keep-best`` writes ``OUT/<name>-best.safetensors`` (atomically, the studio's exact layout)
whenever a validation beats every earlier one; ties keep the earlier adapter.
"""

from __future__ import annotations

import json
import math
import random
from contextlib import contextmanager
from pathlib import Path

import torch

from studio.errors import StudioError
from studio.formats.files import write_atomic
from trainers import data_images, loop, masks

VAL_FRACTIONS = (0.125, 0.375, 0.625, 0.875)
"""Where on the noise schedule (0 = clean, 1 = pure noise) every held-out image is scored."""
RECORD = "losses.jsonl"


def held_out(items: list, fraction: float, seed: int, data: str) -> tuple[list, list]:
    """(training items, held-out items): round(fraction * n) images, at least one, picked by the seed."""
    count = max(1, round(fraction * len(items)))
    if count >= len(items):
        raise StudioError(f"--val-split {fraction:g} leaves no training images in {data} ({len(items)} images, "
                          f"{count} held out): lower --val-split, add images, or give --val-data DIR")
    chosen = set(random.Random(f"{seed}-val-split").sample(range(len(items)), count))
    return ([it for i, it in enumerate(items) if i not in chosen], [it for i, it in enumerate(items) if i in chosen])


def select(cfg, items: list) -> tuple[list, list]:
    """The run's training and validation items (no validation: all items train)."""
    if cfg.val_data:
        return items, data_images.scan(cfg.val_data)
    if cfg.val_split:
        return held_out(items, cfg.val_split, cfg.seed, cfg.data)
    return items, []


@contextmanager
def evaluating(models):
    """Eval mode and no gradients inside; afterwards every module gets its own mode back
    (``train(mode)`` on a parent would set all its children alike, and an adapter may train
    inside a frozen eval model)."""
    models = [m for m in models if m is not None]
    modes = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


class Validator:
    """Scores the held-out images ``indices`` (into the trainer's item list) in fixed batches."""

    def __init__(self, indices: list[int], captions: list[str], buckets: list, batch_size: int, seed: int,
                 num_train_timesteps: int):
        by_bucket: dict = {}
        for index, caption, bucket in zip(indices, captions, buckets):
            by_bucket.setdefault(bucket, []).append((index, caption))
        self.chunks = [members[i:i + batch_size] for _, members in sorted(by_bucket.items())
                       for i in range(0, len(members), batch_size)]
        self.seed = seed
        self.timesteps = [min(int(f * num_train_timesteps), num_train_timesteps - 1) for f in VAL_FRACTIONS]

    def noise(self, index: int, k: int, shape) -> torch.Tensor:
        return torch.randn(shape, generator=loop.step_generator(self.seed, 0, f"val/{index}/{k}"))

    def loss(self, posteriors, denoise, latent_masks: masks.LatentMasks, scaling: float, device) -> float:
        """Mean masked MSE over every held-out image and VAL_FRACTIONS timestep (call under ``evaluating``).

        ``posteriors(indices, flips)`` gives (G, 2C, h, w) VAE means and stds; ``denoise(latents,
        noise, timesteps, captions)`` gives (prediction, target) of the adapted UNet."""
        total, count = 0.0, 0
        for chunk in self.chunks:
            indices, captions = [i for i, _ in chunk], [c for _, c in chunk]
            mean = posteriors(indices, [False] * len(indices)).cpu().float().chunk(2, dim=1)[0]
            latents = (mean * scaling).to(device)  # (G, C, h, w)
            weights = latent_masks.batch(indices, [False] * len(indices), tuple(latents.shape[-2:]))
            for k, t in enumerate(self.timesteps):
                noise = torch.stack([self.noise(i, k, latents.shape[1:]) for i in indices]).to(device)
                timesteps = torch.full((len(indices),), t, dtype=torch.long, device=device)
                pred, target = denoise(latents, noise, timesteps, captions)
                per_sample = masks.weighted_mse(pred, target, weights)
                total += float(per_sample.double().sum())
                count += len(indices)
        return total / count


class LossLog:
    """``OUT/losses.jsonl`` (format in the module docstring) and the best validation loss so far."""

    def __init__(self, out: Path, start: int):
        self.path = out / RECORD
        kept = [r for r in read_records(self.path) if r["step"] <= start] if start else []
        write_atomic(self.path, [(json.dumps(r) + "\n").encode() for r in kept])
        self.best = min((r["val_loss"] for r in kept if "val_loss" in r), default=math.inf)

    def improved(self, val_loss: float) -> bool:
        """True (and remembered) when ``val_loss`` beats every earlier validation."""
        if val_loss < self.best:
            self.best = val_loss
            return True
        return False

    def write(self, step: int, loss: float, lr: float, val_loss: float | None = None) -> None:
        record = {"step": step, "loss": loss, "lr": lr}
        if val_loss is not None:
            record["val_loss"] = val_loss
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()  # the UI polls this file


def read_records(path: Path) -> list[dict]:
    """The parsed records of a loss file; a torn or foreign line is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records
