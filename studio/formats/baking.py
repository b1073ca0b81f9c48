"""Bake a weighted mix of adapter files into one plain LoRA.

    dW_mix = sum_i w_i dW_i        per module, over the union of the adapters' modules

Exact mode concatenates the factors (``mix.concat``; rank = sum of ranks); ``rank=R`` keeps the
R largest singular values of each module's mix (``mix.compress``) and reports the Frobenius error,
which equals sqrt(sum of the dropped sigma^2). Text-encoder parts use each adapter's text-encoder
weight when one is given, as the live mix does.
"""

from __future__ import annotations

import json

import torch.nn as nn

from studio.adapters import mix
from studio.errors import StudioError
from studio.formats.adapter_file import AdapterFile, normalise_models
from studio.formats.export import refuse_routed
from studio.formats.lowrank import Policy, exact_factors, lora_part, one_thread, sorted_full, summarise, truncate
from studio.formats.packing import kernel_of, stored_kernels
from studio.formats.names import FAMILY_NAMES, TEXT_ENCODERS


def bake(inputs: list[tuple[AdapterFile, float, float | None]], rank: int | None = None,
         models: dict[str, nn.Module] | None = None) -> tuple[AdapterFile, dict]:
    """[(adapter, weight, te_weight or None), ...] -> (plain-LoRA AdapterFile, energy summary)."""
    if not inputs:
        raise StudioError("bake needs at least one adapter: give FILE:WEIGHT arguments")
    families = {af.base for af, _, _ in inputs}
    if len(families) > 1:
        raise StudioError(f"cannot bake adapters made for different bases "
                          f"({', '.join(FAMILY_NAMES[f] for f in sorted(families))}): bake each base's adapters "
                          f"separately")
    for af, _, _ in inputs:
        refuse_routed(af, "studio bake")
        if af.prompt:  # a prefix is attended, not added: no weighted sum of weights holds it
            raise StudioError(f"{af.source.get('path') or af.name} has a prefix (prefix tuning), which a bake into "
                              f"layer weights cannot keep: bake the layer adapters without it, and use the prefix "
                              f"file beside the bake")
    models = normalise_models(models or {})
    family = next(iter(families))
    stacks: dict[str, dict[str, list]] = {}
    kernels: dict[str, dict[str, tuple]] = {}  # LoCon modules keep their k x k down kernels
    for af, weight, te_weight in inputs:
        stored = stored_kernels(af.parts)
        for component, part in af.parts.items():
            for path in part.modules():
                kernel = kernel_of(component, path, family, models.get(component), stored[component].get(path))
                if kernel is not None and kernel != (1, 1):
                    kernels.setdefault(component, {})[path] = kernel
            w = te_weight if component in TEXT_ENCODERS and te_weight is not None else weight
            for path, (down, up) in exact_factors(part, models.get(component), component).items():
                stack = stacks.setdefault(component, {}).setdefault(path, [])
                if stack and (stack[0][0].shape[1], stack[0][1].shape[0]) != (down.shape[1], up.shape[0]):
                    raise StudioError(f"adapters disagree on the shape of module '{component}.{path}' "
                                      f"({af.source.get('path', af.name)}): they were made for different bases")
                stack.append((down, up, float(w)))
    policy = Policy(rank=rank)
    factors = {}
    with one_thread():
        for component, modules in stacks.items():
            factors[component] = {}
            for path, stack in modules.items():
                down, up = mix.concat([(d, u) for d, u, _ in stack], [w for _, _, w in stack])
                factors[component][path] = truncate(sorted_full(down, up), policy)
    summary = summarise(factors)
    def down(c, p, f):
        kernel = kernels.get(c, {}).get(p)
        return f.down if kernel is None else f.down.reshape(f.down.shape[0], -1, *kernel)

    parts = {c: lora_part({p: (down(c, p, f), f.up, float(f.down.shape[0])) for p, f in mods.items()})
             for c, mods in factors.items()}
    sources = [{"name": af.source.get("path", af.name), "weight": w, "te_weight": tw,
                "sha256": af.source.get("header", {}).get("sshs_model_hash")} for af, w, tw in inputs]
    metadata = {
        "modelspec.title": "bake of " + " + ".join(f"{s['name']}:{s['weight']}" for s in sources),
        "modelspec.merged_from": ", ".join(s["name"] for s in sources),
        "studio.baked_from": json.dumps(sources),
        "studio.bake_policy": policy.describe(),
        "studio.bake_energy_retained": f"{summary['energy']:.6f}",
        "studio.bake_relative_error": f"{summary['relative_error']:.6g}",
    }
    return AdapterFile(families.pop(), parts, metadata=metadata), summary
