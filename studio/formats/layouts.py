"""The file layouts: one module per layout, one line each here. Everything else derives from this table
(``read``'s detection, ``save``'s dispatch, the CLI's ``--format`` choices and help).

A layout module (``studio.formats.<module>``) provides

    NAME                                its --format name (the key below)
    looks_like(tensors, metadata)       whether a file is in this layout (asked in the table's order)
    read(tensors, metadata, where)      -> AdapterFile, every key consumed or one StudioError; None = write-only
    write(af, path, WriteOptions)       -> ExportReport (writing.py), atomic, nothing written on an error
    keeps_exactly(af)                   whether a write without --rank / --energy keeps ``af`` exactly (else the
                                        methods' default energy applies)

The modules are imported on first use (they import torch), so ``studio --help`` stays instant.
"""

from __future__ import annotations

import importlib

from studio.errors import StudioError

# --format name -> (module, one line for --help); read's detection asks them in this order
TABLE = {
    "native": ("native", "the studio's own, exact (resuming, mixing)"),
    # (lycoris before kohya: it claims the kohya-named files whose components mix kinds, LyCORIS presets)
    "lycoris": ("lycoris_file", "LoHa / LoKr / LoCon / DoRA / full in LyCORIS's layout, exact (A1111, Forge, "
                                "ComfyUI, LyCORIS)"),
    "kohya": ("kohya", "plain LoRA in kohya names, loads everywhere (LyCORIS kinds keep their layout unless "
                       "--rank / --energy)"),
    "diffusers": ("diffusers_lora", "diffusers / PEFT keys, loads in diffusers only"),
    "peft": ("peft_lm", "language-model adapters: a folder PeftModel.from_pretrained loads"),
}
NAMES = tuple(TABLE)
DEFAULT = "kohya"


def layout(name: str):
    """The layout module of ``name``."""
    if name not in TABLE:
        raise StudioError(f"unknown format {name!r}: choose one of {', '.join(TABLE)}")
    module = importlib.import_module(f"studio.formats.{TABLE[name][0]}")
    assert module.NAME == name, (module.NAME, name)
    return module


def describe() -> str:
    return "; ".join(f"{name}: {why}" for name, (_, why) in TABLE.items())
