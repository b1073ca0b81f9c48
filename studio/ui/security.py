"""Safe by default: who may connect, which files the app serves, what may be uploaded.

- Binds 127.0.0.1. Any other host needs a password (``--auth USER:PASS`` or ``STUDIO_UI_AUTH``);
  without one ``studio ui`` refuses to start.
- The only folders reachable through ``/gradio_api/file=`` are the adapters, outputs and sample
  dataset folders (Gradio's ``allowed_paths``); the base-model folders and the repository itself
  are in ``blocked_paths``, which wins over everything else in Gradio.
- Uploads: Gradio's ``max_file_size`` plus a server-side check of suffix, size and content here
  (the browser's ``file_types`` filter is only a convenience).
- Names from the client are looked up in the library (``library.Library.get``), never joined
  onto a path; a name for a new file is reduced to a plain file name by ``safe_filename``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

from studio.errors import StudioError

AUTH_ENV = "STUDIO_UI_AUTH"
LOOPBACK_NAMES = {"localhost"}
MAX_UPLOAD_BYTES = 1 << 30
"""1 GiB: an SDXL LoRA at rank 128 in fp32 is ~0.9 GB; nothing we accept is larger."""
ADAPTER_SUFFIXES = (".safetensors",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None, where: str) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise StudioError(f"bad credentials in {where}: give USER:PASS with a non-empty user and password")
    return user, password


def check_bind(host: str, auth: str | None, environ: dict | None = None) -> tuple[str, str] | None:
    """The (user, password) to require, or None on loopback without one. Refuses a non-loopback
    host without credentials: a LAN-visible app could otherwise render, train and read adapters
    for anyone who finds the port."""
    environ = os.environ if environ is None else environ
    credentials = parse_auth(auth, "--auth") or parse_auth(environ.get(AUTH_ENV), AUTH_ENV)
    if credentials is None and not is_loopback(host):
        raise StudioError(f"refusing to serve on {host} without a password in studio ui: pass --auth USER:PASS "
                          f"(or set {AUTH_ENV}=USER:PASS), or bind --host 127.0.0.1")
    return credentials


def file_access(reachable: list[Path], blocked: list[Path]) -> tuple[list[str], list[str]]:
    """Gradio's (allowed_paths, blocked_paths), absolute and resolved (symlinks followed)."""
    allowed = [str(Path(p).resolve()) for p in reachable]
    blocked_resolved = [str(Path(p).resolve()) for p in blocked]
    # a reachable folder inside a blocked one (outputs inside the repo) stays reachable: Gradio
    # checks blocked first, so only block what does not contain a reachable folder
    kept = [b for b in blocked_resolved if not any(Path(a).is_relative_to(b) for a in allowed)]
    return allowed, kept


def check_upload(path: str | os.PathLike, suffixes: tuple[str, ...], max_bytes: int = MAX_UPLOAD_BYTES) -> Path:
    """An uploaded temp file, checked for suffix and size (content is checked by whoever reads it)."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise StudioError(f"upload {path.name} refused: only {', '.join(suffixes)} files are accepted here")
    size = path.stat().st_size
    if size > max_bytes:
        raise StudioError(f"upload {path.name} refused: {size / 2**20:.0f} MiB is over the {max_bytes / 2**20:.0f} "
                          f"MiB limit")
    return path


def safe_filename(name: str, suffix: str) -> str:
    """A plain file name from client text: no folders, no leading dots, only [A-Za-z0-9._-]."""
    stem = Path(str(name).replace("\\", "/")).name
    stem = stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:80]
    if not stem:
        raise StudioError(f"bad file name {name!r}: use letters, digits, '.', '_' or '-'")
    return stem + suffix
