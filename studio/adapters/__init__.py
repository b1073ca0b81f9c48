"""The adapter core: one delta against the pristine W0 per method, shared by every path.

    W = W0 + sum_i w_i * dW_i

Each method is one small module of pure functions (``Config``, ``init``, ``factors``,
``forward_delta``, ``expected_shapes``, ``from_saved``); ``METHODS`` is the whole registry.
"""

from __future__ import annotations

import dataclasses

from studio.adapters import lora, milora, mix, pissa, svf
from studio.adapters.layer import AdaptedLinear, Adapter
from studio.adapters.ops import (adapter_config, adapter_state_dict, delta_weights, load_adapter, merge,
                                 set_enabled, set_weight, trainable_parameters, unmerge)
from studio.adapters.targets import PRESETS, adapter_names, attach, detach, find_targets
from studio.errors import StudioError

METHODS = {
    "lora": lora,
    "pissa": pissa,
    "milora": milora,
    "svf": svf,
}


def make_config(method: str, fields: dict | None = None):
    """Build a method's frozen config from a dict, refusing unknown fields by name."""
    if method not in METHODS:
        raise StudioError(f"unknown adapter method {method!r}: choose one of {', '.join(METHODS)}")
    config_type = METHODS[method].Config
    known = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(fields or {}) - known)
    if unknown:
        raise StudioError(f"unknown option(s) {unknown} for method {method!r}: it accepts {sorted(known) or 'none'}")
    return config_type(**(fields or {}))


__all__ = [
    "METHODS", "PRESETS", "mix", "AdaptedLinear", "Adapter", "StudioError", "adapter_config", "adapter_names",
    "adapter_state_dict", "attach", "delta_weights", "detach", "find_targets", "load_adapter",
    "make_config", "merge", "set_enabled", "set_weight", "trainable_parameters", "unmerge",
]
