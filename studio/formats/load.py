"""``read(path)``: any adapter file we understand -> AdapterFile, or one StudioError saying why not.

The layout is detected from the header and key names by asking each layout of ``layouts.LAYOUTS`` in
its order: native (``studio.format``), kohya (every key starts ``lora_unet_`` / ``lora_te*_``), lycoris
(``lycoris_`` names, or ComfyUI's own ``diffusion_model.`` / ``text_encoders.`` names as OneTrainer writes
them), diffusers / PEFT (component prefixes or bare diffusers UNet paths). Every key
must be consumed by the chosen reader.
"""

from __future__ import annotations

import os

from studio.errors import StudioError
from studio.formats import embedding, files, kohya
from studio.formats.adapter_file import AdapterFile
from studio.formats.layouts import NAMES, layout
from studio.formats.metadata import descriptive
from studio.formats.refuse import refuse_unsupported


def detect(tensors: dict, metadata: dict[str, str], where: str) -> str:
    if layout("native").looks_like(tensors, metadata):
        return "native"
    if not tensors:
        raise StudioError(f"{where} holds no tensors: re-export it")
    if embedding.looks_like(tensors):
        raise StudioError(f"{where} is a textual-inversion embedding, not a layer adapter: it has no LoRA form to "
                          f"export or bake; use it by its token in a prompt (studio generate --adapter FILE)")
    for name in NAMES:
        if layout(name).read is not None and layout(name).looks_like(tensors, metadata):
            return name
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
    af = layout(fmt).read(tensors, metadata, where)
    af.metadata = descriptive(metadata)
    af.source = {**af.source, "path": where, "format": af.source.get("format", fmt),
                 "header": dict(metadata), "tensor_count": len(tensors)}
    return af


def parse_spec(spec: str) -> tuple[str, float, float | None]:
    """'FILE[:WEIGHT[:TE_WEIGHT]]' (a file name may itself contain ':')."""
    numbers: list[float] = []
    rest = spec
    while len(numbers) < 2 and ":" in rest:
        head, _, tail = rest.rpartition(":")
        try:
            numbers.insert(0, float(tail))
        except ValueError:
            break
        rest = head
    if not rest:
        raise StudioError(f"bad adapter spec {spec!r}: use FILE:WEIGHT or FILE:WEIGHT:TE_WEIGHT")
    weight = numbers[0] if numbers else 1.0
    return rest, weight, numbers[1] if len(numbers) > 1 else None
