"""The adapter core: one delta against the pristine W0 per method, shared by every path.

    W = W0 + sum_i w_i * dW_i

Each method is one module (see ``contract.py`` for what it provides); ``registry.METHODS`` is
the one list of them.
"""

from __future__ import annotations

from studio.adapters import contract, mix
from studio.adapters.layer import AdaptedLayer, AdaptedLinear, Adapter
from studio.adapters.ops import (adapter_config, adapter_state_dict, delta_weights, load_adapter, merge,
                                 set_enabled, set_weight, trainable_parameters, unmerge)
from studio.adapters.registry import METHODS, config_from_options, make_config
from studio.adapters.targets import PRESETS, adapter_names, attach, detach, find_targets
# (the registry imports every method module, which makes each an attribute here: A.lora.Config, ...)
from studio.errors import StudioError

__all__ = [
    "METHODS", "PRESETS", "mix", "contract", "AdaptedLayer", "AdaptedLinear", "Adapter", "StudioError",
    "adapter_config", "adapter_names", "adapter_state_dict", "attach", "config_from_options", "delta_weights",
    "detach", "find_targets", "load_adapter", "make_config", "merge", "set_enabled", "set_weight",
    "trainable_parameters", "unmerge",
]
