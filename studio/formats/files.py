"""Reading and writing .safetensors files defensively.

Reading checks everything a damaged or hostile file can get wrong before any tensor is loaded:
pickle checkpoints offered as adapters (refused, never unpickled), empty and truncated files,
oversized headers, offsets that lie, and NaN / Inf values afterwards.

Writing serialises the tensors once, hashes the data section (the bytes after the header, which
depend only on tensor names, dtypes, shapes and values) into ``sshs_model_hash`` and
``modelspec.hash_sha256``, builds the final header around the same data bytes, and writes
atomically: a temp file in the target's folder, fsync, rename over the target.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from studio.errors import StudioError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
HASH_KEYS = ("sshs_model_hash", "modelspec.hash_sha256")


class Header(NamedTuple):
    tensors: dict[str, dict]      # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    data_start: int               # 8 + header length
    size: int                     # file size in bytes


def read_header(path: str | os.PathLike) -> Header:
    """Parse and check a safetensors header; StudioError naming the file and the fix otherwise."""
    path = Path(path)
    if not path.exists():
        raise StudioError(f"{path}: no such file: check the path")
    if path.is_dir():
        raise StudioError(f"{path} is a folder: give the .safetensors file inside it")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise StudioError(
            f"{path} is a pickle checkpoint ({path.suffix}): adapters are read from .safetensors only and "
            f"never unpickled; convert it to .safetensors with a tool you trust")
    size = path.stat().st_size
    if size == 0:
        raise StudioError(f"{path} is empty (0 bytes): re-download or re-export it")
    with open(path, "rb") as f:
        head = f.read(9)
        # a safetensors header is JSON right after the 8-byte length; pickles start \x80, zips PK
        if head[8:9] != b"{" and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
            raise StudioError(
                f"{path} is a pickle / zip checkpoint, not a .safetensors file: adapters are never "
                f"unpickled; convert it to .safetensors with a tool you trust")
        if len(head) < 8:
            raise StudioError(f"{path} is truncated ({size} bytes, not even a header): re-download or re-export it")
        if head[8:9] not in (b"{", b""):
            raise StudioError(f"{path} is not a .safetensors file (no safetensors header at its start): "
                              f"give a .safetensors adapter")
        (n,) = struct.unpack("<Q", head[:8])
        if n > MAX_HEADER_BYTES:
            raise StudioError(f"{path} is not a valid .safetensors file: its header claims {n} bytes "
                              f"(over the {MAX_HEADER_BYTES} limit): the file is damaged or not an adapter")
        if 8 + n > size:
            raise StudioError(f"{path} is truncated: the header needs {n} bytes but the file has {size - 8}: "
                              f"re-download or re-export it")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StudioError(f"{path} is not a .safetensors file (its header is not JSON): "
                          f"give a .safetensors adapter") from None
    if not isinstance(header, dict):
        raise StudioError(f"{path} is not a .safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise StudioError(f"{path} has a damaged header: __metadata__ must map names to strings")
    _check_offsets(path, header, size - 8 - n)
    return Header(header, metadata, 8 + n, size)


def _check_offsets(path: Path, tensors: dict, data_size: int) -> None:
    spans = []
    for name, info in tensors.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for dim in shape:
                numel *= int(dim)
            expected = numel * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise StudioError(f"{path} has a damaged header entry for tensor '{name}': "
                              f"re-download or re-export it") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or end - begin != expected:
            raise StudioError(f"{path} has a header whose offsets lie (tensor '{name}' claims bytes "
                              f"{begin}..{end} for {expected} bytes of data): the file is damaged")
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise StudioError(f"{path} has a header whose offsets lie (tensor '{name}' starts at byte {begin}, "
                              f"expected {position}): the file is damaged")
        position = end
    if position > data_size:
        raise StudioError(f"{path} is truncated: the header promises {position} bytes of tensor data but "
                          f"only {data_size} are there: re-download or re-export it")
    if position < data_size:
        raise StudioError(f"{path} has {data_size - position} bytes after its last tensor: the file is damaged")


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a checked file; NaN / Inf values are refused by name."""
    from safetensors.torch import load_file

    header = read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # the header was fine, so this is damage inside the data
        raise StudioError(f"{path} cannot be read ({err}): re-download or re-export it") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise StudioError(f"{path}: tensor '{name}' has NaN or infinite values: the adapter diverged "
                              f"or the file is damaged; retrain or re-export it")
    return tensors, header.metadata


def data_hash(path: str | os.PathLike) -> str:
    """sha256 (lowercase hex) of the data section: the kohya / A1111 'addnet' tensor hash."""
    start = read_header(path).data_start
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def serialise(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[list, str]:
    """The file as [header bytes, data section], both hash fields set to the data section's sha256.

    The data section is reused as serialised (a view, no copy): editing the header never changes it.
    """
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = memoryview(blob)[8 + n:]
    digest = hashlib.sha256(data).hexdigest()
    header["__metadata__"] = {"format": "pt", **{k: str(v) for k, v in metadata.items()},
                              "sshs_model_hash": digest, "modelspec.hash_sha256": "0x" + digest}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return [struct.pack("<Q", len(text)) + text, data], digest


def check_target(path: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise StudioError(f"{path}: the output must be a .safetensors file: give a name ending in .safetensors")
    if path.is_dir():
        raise StudioError(f"{path} is a folder: give a file name ending in .safetensors")
    if not path.parent.resolve().is_dir():
        raise StudioError(f"{path}: the folder {path.parent} does not exist: create it first")
    if path.exists() and not overwrite:
        raise StudioError(f"{path} already exists: pass --overwrite to replace it, or choose another name")
    return path


def write_atomic(path: str | os.PathLike, chunks: list) -> None:
    """Temp file in the same folder, fsync, rename: the old file survives any failure midway."""
    path = Path(path)
    folder = path.parent.resolve()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise StudioError(f"{path}: cannot write in {folder} ({err.strerror}): choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            umask = os.umask(0)
            os.umask(umask)
            # mkstemp makes the file private (0600): give it the mode a plain open() would, or the old file's
            os.fchmod(f.fileno(), path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask)
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
          overwrite: bool = False) -> str:
    """Serialise with hashes and write atomically; returns the data-section sha256."""
    path = check_target(path, overwrite)
    chunks, digest = serialise(tensors, metadata)
    write_atomic(path, chunks)
    return digest
