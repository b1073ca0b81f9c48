"""Prompt-side adapters: what trains on the text side instead of a layer's weights (DESIGN.md, "Kinds of
adapters": new token embeddings, key-value prefixes).

``KINDS`` is the one list of them, beside the layer methods of ``studio.adapters.registry.METHODS``;
``studio train --method`` offers both. Each module has ``NAME``, ``TASK`` (image | lm), ``SUMMARY`` and
``DEFAULT_LR``; a trainer asks ``kind(method)`` instead of comparing names.
"""

from __future__ import annotations

from types import ModuleType

from studio.prompt import ti

KINDS: dict[str, ModuleType] = {m.NAME: m for m in (
    ti,
)}


def kind(method: str) -> ModuleType | None:
    """The prompt-side module of ``method``, or None for a layer method."""
    return KINDS.get(method)


def help_text() -> str:
    return "; ".join(f"{name}: {m.SUMMARY}" for name, m in KINDS.items())
