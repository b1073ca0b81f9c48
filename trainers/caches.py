"""On-disk caches of VAE latents and text-encoder outputs, reused across runs.

Keys: latents by (image file hash, base fingerprint, bucket size, flip); text by (caption,
base fingerprint). A cached latent stores the VAE posterior (mean, std), so each step still
draws its own latent sample, exactly as without the cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch


def default_cache_dir() -> Path:
    return Path(os.environ.get("STUDIO_CACHE", Path.home() / ".cache" / "studio"))


def fingerprint(module: torch.nn.Module, source: str) -> str:
    """A cheap identity of a model's weights: shapes and sums of every tensor, plus its source."""
    h = hashlib.sha256(source.encode())
    with torch.no_grad():
        for name, p in module.state_dict().items():
            h.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    try:
        return load_file(str(path)) if path.is_file() else None
    except Exception:  # a damaged cache entry is recomputed, never fatal
        return None


class TensorCache:
    """Memory + disk cache of small tensor dicts, computed on a miss."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.memory: dict[str, dict[str, torch.Tensor]] = {}

    def _path(self, key: str) -> Path | None:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors" if self.folder else None

    def lookup(self, key: str) -> dict[str, torch.Tensor] | None:
        if key not in self.memory:
            path = self._path(key)
            value = _load(path) if path else None
            if value is None:
                return None
            self.memory[key] = value
        return self.memory[key]

    def store(self, key: str, value: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        value = {k: v.detach().cpu().contiguous() for k, v in value.items()}
        path = self._path(key)
        if path:
            _save(path, value)
        self.memory[key] = value
        return value

    def get(self, key: str, compute) -> dict[str, torch.Tensor]:
        found = self.lookup(key)
        return found if found is not None else self.store(key, compute())
