"""The one list of adapter methods. Adding a method = one module + one line here + its tests.

Everything else (trainer configs and their defaults, ``studio train --method`` choices and help,
the UI's pickers, the demo, ``studio inspect``, export policies) reads ``METHODS`` and each
module's ``TRAITS`` (see ``contract.py``).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

from studio.adapters import (adalora, dora, full, ia3, loha, lokr, lora, lora_xs, loramoe, milora, mola, molora, mora,
                              mov, pissa, svf, svft)
from studio.adapters.contract import check_method
from studio.errors import StudioError

METHODS: dict[str, ModuleType] = {m.NAME: m for m in (
    lora,
    pissa,
    milora,
    svf,
    lora_xs,
    svft,
    adalora,
    dora,
    ia3,
    loha,
    lokr,
    full,
    mora,
    molora,
    mov,
    mola,
    loramoe,
)}

for _module in METHODS.values():
    check_method(_module)

GENERIC_OPTIONS = ("rank", "alpha", "rslora", "dropout", "conv_rank", "conv_alpha")
"""Options the trainers offer as their own flags; a method takes those its Config has."""


def get(method: str) -> ModuleType:
    if method not in METHODS:
        raise StudioError(f"unknown adapter method {method!r}: choose one of {', '.join(METHODS)}")
    return METHODS[method]


def select(choice: str) -> list[str]:
    """The methods a command asked for: 'all', or one registered name (else the registry's error)."""
    if choice != "all" and choice not in METHODS:
        raise StudioError(f"unknown method {choice!r}: choose all or one of {', '.join(METHODS)}")
    return list(METHODS) if choice == "all" else [choice]


def option_names(method: str) -> list[str]:
    return [f.name for f in dataclasses.fields(get(method).Config)]


def make_config(method: str, fields: dict | None = None):
    """Build a method's frozen config from a dict, refusing unknown fields by name."""
    config_type = get(method).Config
    known = set(option_names(method))
    unknown = sorted(set(fields or {}) - known)
    if unknown:
        raise StudioError(f"unknown option(s) {unknown} for method {method!r}: it accepts {sorted(known) or 'none'}")
    return config_type(**(fields or {}))


def config_from_options(method: str, generic: dict, specific: dict | None = None):
    """A method's config from the trainers' generic options (those its Config lacks are dropped:
    SVF has no rank) and method-specific ``--method-args`` (each must be a field of its Config)."""
    known = set(option_names(method))
    fields = {k: v for k, v in generic.items() if k in known and v is not None}
    unknown = sorted(set(specific or {}) - known)
    if unknown:
        raise StudioError(f"unknown --method-args option(s) {unknown} for method {method!r}: it accepts "
                          f"{sorted(known - set(GENERIC_OPTIONS)) or 'none besides the generic flags'}")
    return make_config(method, {**fields, **(specific or {})})


def default_lr(method: str, task: str) -> float:
    return get(method).TRAITS.lr[task]


def help_text() -> str:
    """'lora (LoRA, ...) | pissa (...) | ...' for --help and the UI."""
    return "; ".join(f"{name}: {m.TRAITS.summary}" for name, m in METHODS.items())
