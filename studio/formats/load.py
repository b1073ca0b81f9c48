"""``read(path)``: any adapter file we understand -> AdapterFile, or one StudioError saying why not.

The layout is detected from the header and key names, in this order: native (``studio.format``),
kohya (every key starts ``lora_unet_`` / ``lora_te*_``), diffusers / PEFT (component prefixes or
bare diffusers UNet paths). Every key must be consumed by the chosen reader.
"""

from __future__ import annotations

import os

from studio.errors import StudioError
from studio.formats import diffusers_lora, files, kohya, native
from studio.formats.adapter_file import AdapterFile
from studio.formats.metadata import descriptive
from studio.formats.refuse import refuse_unsupported

READERS = {"native": native.read, "kohya": kohya.read, "diffusers": diffusers_lora.read}


def detect(tensors: dict, metadata: dict[str, str], where: str) -> str:
    if native.looks_like(metadata):
        return "native"
    if not tensors:
        raise StudioError(f"{where} holds no tensors: re-export it")
    if kohya.looks_like(tensors):
        return "kohya"
    if diffusers_lora.looks_like(tensors):
        return "diffusers"
    refuse_unsupported(tensors, where)
    if any(k.startswith(kohya.PREFIXES) for k in tensors):
        others = sorted(k for k in tensors if not k.startswith(kohya.PREFIXES))
        raise StudioError(f"{where} mixes kohya keys with {len(others)} other key(s) such as "
                          f"{', '.join(others[:5])}: nothing was loaded; remove those keys or re-export the file")
    sample = ", ".join(sorted(tensors)[:5])
    raise StudioError(f"{where} is not an adapter layout the studio reads (keys such as {sample}): give a kohya, "
                      f"diffusers/PEFT or studio LoRA .safetensors file")


def read(path: str | os.PathLike) -> AdapterFile:
    """Read, check and convert an adapter file (the path is named in every error)."""
    where = str(path)
    tensors, metadata = files.read(path)
    fmt = detect(tensors, metadata, where)
    af = READERS[fmt](tensors, metadata, where)
    af.metadata = descriptive(metadata)
    af.source = {**af.source, "path": where, "format": af.source.get("format", fmt),
                 "header": dict(metadata), "tensor_count": len(tensors)}
    return af
