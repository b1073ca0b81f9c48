"""Prompt-side adapters: what is learned on the text side instead of inside a layer's weight.

    ti.py       textual inversion (Gal et al. 2022): new token embeddings for a concept's word
                (``studio train DATA --method ti --token '<kbot>' --init-word robot``)
    prefix.py   prefix tuning (Li & Liang 2021): per-layer key / value prefixes fed to a causal
                LM as past key / values (``studio train --task lm --method prefix``, ``--with-prefix``)

``studio.adapters.registry.METHODS`` is the one list of *layer* methods (a delta on a target
Linear / Conv). ``METHODS`` below is the one list of prompt-side methods: a name here is a valid
``studio train --method`` for its task and means "no layer adapter, only this"; the trainers
and the CLI read membership and ``task`` from here and never compare names. Pure torch: this
package imports nothing of ours but ``studio.errors``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class PromptMethod:
    task: str
    """The trainer it runs in: image | lm (`studio train --task`)."""
    summary: str
    """One line for `studio train --help`."""
    module: str = ""
    """The module under studio.prompt that trains and applies it, for trainers that call it through ``kind``."""


METHODS: dict[str, PromptMethod] = {
    "ti": PromptMethod("image", "textual inversion (arXiv 2208.01618): new token embeddings for --token, no layer "
                                "adapter (--init-word WORD, --vectors N); an A1111 / ComfyUI embedding file", "ti"),
    "prefix": PromptMethod("lm", "prefix tuning (Li & Liang 2021): learned per-layer key/value prefixes, no layer "
                                 "adapter (--prefix-length P, --prefix-projection H)"),
}


def kind(method: str) -> ModuleType | None:
    """The module of a prompt-side ``method`` that has one (``PromptMethod.module``), else None."""
    entry = METHODS.get(method)
    return importlib.import_module(f"studio.prompt.{entry.module}") if entry and entry.module else None


def help_text() -> str:
    return "; ".join(f"{name}: {m.summary}" for name, m in METHODS.items())
