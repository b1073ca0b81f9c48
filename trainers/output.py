"""The output folder of a run: checked before anything is written, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from studio.errors import StudioError
from studio.formats.files import write_atomic
from trainers import loop


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, [text.encode("utf-8")])


def prepare_output(out: Path, resume: bool, identity: dict) -> Path | None:
    """Check the folder can take this run; return the checkpoint to resume from (or None)."""
    if resume:
        checkpoint = loop.latest_checkpoint(out / "checkpoints")
        if checkpoint is None:
            raise StudioError(f"nothing to resume in {out}: it has no checkpoints/step-* folder; start a new run")
        import json
        saved = json.loads((checkpoint / "meta.json").read_text())
        loop.check_identity(saved, identity, checkpoint)
        return checkpoint
    existing = out / "checkpoints"
    if existing.is_dir() and any(existing.iterdir()):
        raise StudioError(f"{out} already holds a run: add --resume {out} to continue it, or choose another --out")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise StudioError(f"output folder {out} is not writable: choose another --out")
    return None
