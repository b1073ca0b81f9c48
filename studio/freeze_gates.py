"""``studio bake --freeze-gates PROMPTS.txt``: a routed mixture baked as the static mix at its average gates.

A routed mixture's delta depends on the input, so no plain LoRA equals it. On a set of prompts its
router has an average gate per expert and layer, g; at fixed gates the mixture is a static adapter
(the method's ``freeze`` hook):

    LoRA experts (MoLoRA, MoLA, LoRAMoE):  dW = sum_i g_i s B_i A_i    one LoRA of rank E r
    MoV:                                    l = sum_i g_i l_i           one (IA)^3 vector

which the ordinary bake then mixes with the other inputs. g averages every forward of rendering the
prompts with the whole mix live (every denoising step, both classifier-free-guidance branches), each
forward's gates first averaged over its tokens (``mixture.route`` leaves them in ``scratch``). The
error is measured, not assumed: the prompts are rendered again with the baked file alone, same seeds,
and compared pixel by pixel with the live mix. Image bases only for now.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import studio.adapters as A
from studio import formats
from studio.errors import StudioError
from studio.formats.adapter_file import AdapterFile
from studio.formats.lowrank import uniform_part
from studio.formats.packing import kernel_of
from studio.formats.names import TEXT_ENCODERS, canonical_te_path

MAX_PROMPTS = 64


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line."""
    file = Path(path)
    if not file.is_file():
        raise StudioError(f"prompts file {path} does not exist in --freeze-gates: give a text file with one prompt "
                          f"per line")
    try:
        prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise StudioError(f"prompts file {path} is not UTF-8 text in --freeze-gates: give one prompt per "
                          f"line") from None
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise StudioError(f"prompts file {path} has {len(prompts)} prompts in --freeze-gates: give 1 to {MAX_PROMPTS} "
                          f"(one per line) that show what the mixture will be used for")
    return prompts


def _freezable(af: AdapterFile) -> bool:
    return any(hasattr(A.registry.get(p.method), "freeze") for p in af.parts.values())


class GateRecorder:
    """Forward hooks on every layer of the mixture adapters: the running mean of their ``mean_gate``."""

    def __init__(self, models: dict, names: dict[str, AdapterFile]):
        self.sums: dict[tuple, torch.Tensor] = {}
        self.counts: dict[tuple, int] = {}
        self.handles = []
        for name, af in names.items():
            for component in af.parts:
                if not hasattr(A.registry.get(af.parts[component].method), "freeze"):
                    continue
                for path, layer in A.targets.layers_of(models[component], name).items():
                    key = (name, component, canonical_te_path(path) if component in TEXT_ENCODERS else path)
                    self.handles.append(layer.register_forward_hook(self._hook(key, layer.adapters[name])))

    def _hook(self, key, adapter):
        def record(module, inputs, output):
            gate = adapter.scratch.pop("mean_gate", None)  # taken: a layer that did not route leaves nothing stale
            if gate is not None:
                self.sums[key] = self.sums.get(key, 0) + gate.double()
                self.counts[key] = self.counts.get(key, 0) + 1
        return record

    def gates(self, name: str, component: str) -> dict[str, torch.Tensor]:
        return {path: (self.sums[k] / self.counts[k]).float() for k in self.sums
                for n, c, path in [k] if n == name and c == component}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _settings(prompts: list[str], steps: int, seed: int):
    from studio.pipeline import Settings

    return [Settings(prompt=p, seed=seed + i, steps=steps) for i, p in enumerate(prompts)]


def freeze(inputs: list[tuple], prompts: list[str], base, steps: int, seed: int = 0):
    """Render ``prompts`` with the mix of ``inputs`` [(AdapterFile, w, te_w)] live on ``base`` (a
    ``studio.models.DiffusionBase``), and return (inputs with each mixture frozen at its average gates,
    the live images, the average gates {file: {component: {path: [g_i]}}})."""
    from studio.pipeline import generate

    if not any(_freezable(af) for af, _, _ in inputs):
        raise StudioError("--freeze-gates given but none of the adapters is a routed mixture: drop --freeze-gates "
                          "(a plain bake is exact)")
    if any(af.base == "lm" for af, _, _ in inputs):
        raise StudioError("--freeze-gates on language-model adapters is not built yet: it renders images (use the "
                          "native mixture file with the language model instead)")
    models = base.components
    names = {f"freeze{i}": af for i, (af, _, _) in enumerate(inputs)}
    attached = []
    try:
        for (name, af), (_, w, te_w) in zip(names.items(), inputs):
            formats.attach_file(af, models, name, w, te_w)
            attached.append(name)
        recorder = GateRecorder(models, names)
        try:
            base.pipe.set_progress_bar_config(disable=True)
            live = generate(base.pipe, _settings(prompts, steps, seed))
        finally:
            recorder.close()
    finally:
        for name in attached:
            formats.detach_file(models, name)
    frozen, gates = [], {}
    for (name, af), (_, w, te_w) in zip(names.items(), inputs):
        if not _freezable(af):
            frozen.append((af, w, te_w))
            continue
        parts, where = {}, af.source.get("path", af.name)
        for component, part in af.parts.items():
            method = A.registry.get(part.method)
            if not hasattr(method, "freeze"):
                parts[component] = part
                continue
            g = recorder.gates(name, component)
            modules = part.modules()
            missing = sorted(set(modules) - set(g))
            if missing:
                raise StudioError(f"the router of module '{missing[0]}' in {where} never ran on the prompts: "
                                  f"the mixture adapts a model the render does not use")
            model = models[component]
            kernels = {p: kernel_of(component, p, af.base, model) for p in modules}
            static, entries = method.freeze(part.config, modules, g, kernels)
            parts[component] = uniform_part(static, entries, where, kernels)
            gates.setdefault(str(where), {})[component] = {p: [round(v, 6) for v in g[p].tolist()] for p in modules}
        frozen.append((AdapterFile(af.base, parts, metadata=dict(af.metadata), source=dict(af.source)), w, te_w))
    return frozen, live, gates


def measure(baked: AdapterFile, base, prompts: list[str], steps: int, seed: int, live: list[np.ndarray]) -> dict:
    """The baked file alone against the live mix on the same prompts and seeds: pixel errors (0-255)."""
    from studio.pipeline import generate

    formats.attach_file(baked, base.components, "frozen")
    try:
        static = generate(base.pipe, _settings(prompts, steps, seed))
    finally:
        formats.detach_file(base.components, "frozen")
    diffs = [np.abs(s.astype(np.float64) - l.astype(np.float64)) for s, l in zip(static, live)]
    errors = [float(d.mean()) for d in diffs]
    return {"prompts": len(prompts), "steps": steps, "seed": seed, "mean_abs_pixel_error": float(np.mean(errors)),
            "max_abs_pixel_error": max(float(d.max()) for d in diffs), "per_prompt": [round(e, 4) for e in errors]}


def metadata(report: dict, gates: dict) -> dict[str, str]:
    return {"studio.freeze_gates": json.dumps(report), "studio.frozen_gates": json.dumps(gates)}
