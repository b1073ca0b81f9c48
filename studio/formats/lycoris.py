"""LyCORIS's per-module tensors inside kohya files (``lora_unet_*`` / ``lora_te*_`` names).

A method that LyCORIS also implements declares, in its own module,

    LYCORIS_MARKER                 the key suffix that identifies it in a file (DoRA: ``dora_scale``)
    to_lycoris(cfg, state)         {LyCORIS key suffix: tensor} of one module, canonical shapes
    from_lycoris(stored, where)    (config fields, canonical tensors) of one module

and this module does the rest: kohya names, the 4-D layout of convolutions (down (r, in, kh, kw),
up (out, r, 1, 1), per-channel vectors (c, 1, 1, 1)), the file dtype, and turning one file's
modules into one Part (``lowrank.uniform_part``). reference/lycoris.md has the layouts.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from studio.adapters.registry import METHODS, get, make_config
from studio.errors import StudioError
from studio.formats.adapter_file import AdapterFile, Part
from studio.formats.lowrank import DTYPES, kernel_of, stored_downs, uniform_part
from studio.formats.names import kohya_name


def markers() -> dict[str, str]:
    """{key suffix: method} of every registered method with a LyCORIS layout."""
    return {m.LYCORIS_MARKER: name for name, m in METHODS.items() if hasattr(m, "LYCORIS_MARKER")}


def writes(af: AdapterFile) -> bool:
    """Whether every part has a LyCORIS layout (then a kohya export keeps it exactly)."""
    return all(hasattr(get(p.method), "to_lycoris") for p in af.parts.values())


def _conv_layout(key: str, t: torch.Tensor, kernel: tuple[int, int] | None) -> torch.Tensor:
    if kernel is None or key == "alpha":
        return t
    if key.endswith("down.weight") and t.dim() == 2:
        return t.reshape(t.shape[0], -1, *kernel)     # (r, in, kh, kw)
    if t.dim() == 2:
        return t[:, :, None, None]                    # up (out, r, 1, 1), dora_scale (out, 1, 1, 1)
    return t


def to_tensors(af: AdapterFile, dtype: str, layout: str, models: dict[str, nn.Module] | None = None) -> dict:
    models, stored, out = models or {}, stored_downs(af.parts), {}
    for component, part in af.parts.items():
        method, cfg = get(part.method), make_config(part.method, part.config)
        for path, tensors in part.modules().items():
            kernel = kernel_of(component, path, af.base, models.get(component), stored[component].get(path))
            name = kohya_name(component, path, layout)
            for key, t in method.to_lycoris(cfg, tensors).items():
                value = _conv_layout(key, t.float(), kernel).to(DTYPES[dtype])
                if not torch.isfinite(value).all():
                    raise StudioError(f"module '{component}.{path}' does not fit {dtype} (or has NaN values): export "
                                      f"with --dtype fp32")
                out[f"{name}.{key}"] = value.contiguous()
    return out


def part(method: str, modules: dict[str, dict[str, torch.Tensor]], where: str) -> Part:
    """One component's modules {path: {suffix: tensor}} of ``method`` as one Part."""
    entries = {path: get(method).from_lycoris(stored, f"{where}: module '{path}'") for path, stored in modules.items()}
    return uniform_part(method, entries, where)
