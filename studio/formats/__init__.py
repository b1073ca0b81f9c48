"""Adapter files: one canonical in-memory form, one converter module per external layout.

    read(path) -> AdapterFile                      kohya (SD1.5, SDXL in both UNet layouts),
                                                   diffusers / PEFT (+ older lora.up/down), native
    save(af, path, format, rank=, energy=, dtype=, models=)   native | kohya | lycoris | diffusers | peft
    attach_file(af, models, name, weight, te_weight)          through the adapter core
    from_models(models, name, base=, metadata=)   -> AdapterFile of a trained adapter
    bake([(af, w, te_w), ...], rank=)             -> (AdapterFile, energy summary)
    inspect_file(path) -> dict

Modules: ``adapter_file`` (AdapterFile, Part, families), ``names`` (key schemes), ``files``
(safe reading, hashed atomic writing), ``metadata`` (ss_*, modelspec.*, studio.*), ``lowrank``
(any method as a plain LoRA), ``kohya`` / ``lycoris_file`` / ``diffusers_lora`` / ``native`` / ``peft_lm`` (the layouts),
``layouts`` (the table of layouts), ``writing`` (what writers share), ``load`` / ``export`` (dispatch),
``attach``, ``baking``, ``inspection``; the CLI glue is ``studio/file_commands.py``.
"""

from __future__ import annotations

import importlib

# name -> defining module; imported on first use so `studio --help` stays instant (PEP 562)
_EXPORTS = {
    "FAMILIES": "adapter_file", "AdapterFile": "adapter_file", "Part": "adapter_file",
    "attach_file": "attach", "detach_file": "attach", "from_models": "attach", "set_file_weight": "attach",
    "bake": "baking", "FORMATS": "export", "ExportReport": "writing", "plain_lora": "writing", "save": "export",
    "data_hash": "files", "inspect_file": "inspection", "read": "load", "training_metadata": "metadata",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'studio.formats' has no attribute {name!r}")
    return getattr(importlib.import_module(f"studio.formats.{_EXPORTS[name]}"), name)
