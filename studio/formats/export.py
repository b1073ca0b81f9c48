"""``save(adapter_file, path, format)``: write an AdapterFile in one of the layouts of ``layouts.TABLE``.

kohya, diffusers and peft files are plain LoRAs (``writing.plain_write``, ``lowrank``): exact for
low-rank methods (PiSSA / MiLoRA at rank <= 2r), exact for SVF and dense methods at full rank,
otherwise truncated to ``rank`` or an ``energy`` threshold with the retained energy reported and
stored. kohya and lycoris files keep LyCORIS kinds (LoHa, LoKr, full, DoRA) exactly in LyCORIS's
layout. Nothing is written until the whole file is built; the write itself is atomic (``files.write``).
"""

from __future__ import annotations

import os

import torch.nn as nn

from studio.adapters.registry import get
from studio.errors import StudioError
from studio.formats.adapter_file import AdapterFile
from studio.formats.layouts import NAMES, layout
from studio.formats.lowrank import Policy
from studio.formats.writing import ExportReport, WriteOptions, plain_lora

FORMATS = NAMES
__all__ = ["FORMATS", "ExportReport", "Policy", "default_energy", "plain_lora", "refuse_routed", "save"]


def save(af: AdapterFile, path: str | os.PathLike, format: str = "native", *, rank: int | None = None,
         energy: float | None = None, dtype: str | None = None, models: dict[str, nn.Module] | None = None,
         unet_layout: str | None = None, overwrite: bool = False) -> ExportReport:
    """Write ``af`` to ``path``. ``models`` (the base) is needed to turn methods that depend on the base weight
    (SVF, DoRA, (IA)^3) into a plain LoRA; when given, it also decides which modules are convolutions."""
    writer = layout(format)
    if format != "native":
        refuse_routed(af, f"--format {format}")
    opts = WriteOptions(rank=rank, energy=energy, dtype=dtype, models=models or {}, unet_layout=unet_layout,
                        overwrite=overwrite)
    return writer.write(af, path, opts)


def default_energy(af: AdapterFile, format: str) -> float | None:
    """The energy a plain-LoRA export keeps when neither rank nor energy is given: the smallest of the
    methods' ``TRAITS.default_energy``; None (exact) when every method is exact, or when the layout keeps
    the adapter exactly (native; LyCORIS kinds in kohya or lycoris files)."""
    if layout(format).keeps_exactly(af):
        return None
    energies = [get(p.method).TRAITS.default_energy for p in af.parts.values()]
    energies = [e for e in energies if e is not None]
    return min(energies) if energies else None


def refuse_routed(af: AdapterFile, target: str) -> None:
    """Refuse, before any work, to turn a routed mixture (a functional method: TRAITS.export "none") into a
    static file: its gates depend on each input, so no fixed weight delta, and no LoRA / LyCORIS file, equals it."""
    routed = sorted({p.method for p in af.parts.values() if get(p.method).TRAITS.export == "none"})
    if routed:
        plain = "a PEFT adapter" if af.base == "lm" else "a kohya file"
        raise StudioError(
            f"{target} refused for the routed mixture of experts ({', '.join(routed)}) in "
            f"{af.source.get('path', af.name)}: "
            f"its router weighs the experts per token, so it has no fixed weight delta and no static file equals it; "
            f"use the native file (studio generate and the UI load it, mixed at a weight), or train --method lora "
            f"for {plain}; studio bake --freeze-gates PROMPTS.txt writes the static mix at its average gates on "
            f"those prompts, with the error measured" + (" (--format native; then studio export --format peft)"
                                                         if af.base == "lm" else ""))
