"""Between files and live models: attach an AdapterFile through the core, or capture one from models.

``models`` is a dict of component models: ``{"unet": unet, "te": text_encoder}`` (SD1.5 and the
mini base), ``{"unet": unet, "te1": text_encoder, "te2": text_encoder_2}`` (SDXL) or ``{"lm": model}``;
diffusers' names (``text_encoder``, ``text_encoder_2``) are accepted too. Everything is checked
before the first layer is touched, and a failure part-way detaches what was attached, so a model
is never left half-adapted.
"""

from __future__ import annotations

import torch.nn as nn

from studio.adapters import METHODS, adapter_config, adapter_names, adapter_state_dict, detach, load_adapter, make_config, set_weight
from studio.adapters.layer import site_of
from studio.adapters.targets import layer_config
from studio.errors import StudioError
from studio.prompt import prefix
from studio.formats.adapter_file import AdapterFile, Part, guess_family, model_family, normalise_models
from studio.formats.names import FAMILY_NAMES, TEXT_ENCODERS, canonical_te_path, resolve_path

_COMPONENT_NAMES = {"unet": "UNet", "te": "text encoder", "te1": "first text encoder (CLIP-L)",
                    "te2": "second text encoder (OpenCLIP bigG)", "lm": "language model"}


def _where(af: AdapterFile) -> str:
    return af.source.get("path") or f"adapter '{af.name}'"


def _check_family(af: AdapterFile, models: dict[str, nn.Module], where: str) -> None:
    base = model_family(models)
    if af.base == "lm" and base != "lm":
        raise StudioError(f"{where} is a language-model adapter: load it on a language model, not on a "
                          f"diffusion base")
    if af.base != "lm" and base == "lm":
        raise StudioError(f"{where} is a Stable Diffusion adapter: load it on a diffusion base, not on a "
                          f"language model")
    if {af.base, base} == {"sd15", "sdxl"}:
        raise StudioError(f"{where} is an {FAMILY_NAMES[af.base]} adapter but the base is {FAMILY_NAMES[base]}: "
                          f"load it on an {FAMILY_NAMES[af.base]} base")
    missing = [c for c in af.parts if c not in models]
    if missing:
        names = ", ".join(_COMPONENT_NAMES[c] for c in missing)
        raise StudioError(f"{where} adapts the {names} but no such model was given (got {', '.join(models)}): "
                          f"pass the whole base, or an adapter for these components")


def _resolve(af: AdapterFile, models: dict[str, nn.Module], where: str) -> dict[str, dict[str, str]]:
    """{component: {canonical path: model path}}, checking modules and shapes first."""
    base = FAMILY_NAMES[model_family(models)]
    made_for = FAMILY_NAMES[guess_family(af.parts)]
    if af.base == "lm":  # every LM is "a language model": name the one it was trained on when the file says
        trained_on = [af.metadata.get(k) for k in ("studio.lm_architecture", "ss_sd_model_name") if af.metadata.get(k)]
        made_for = f"{made_for} ({', '.join(trained_on)})" if trained_on else made_for
    resolved = {}
    for component, part in af.parts.items():
        model = models[component]
        cfg = make_config(part.method, part.config)
        names = {}
        for path, tensors in part.modules().items():
            name = resolve_path(model, path)
            site = site_of(model.get_submodule(name), name) if name is not None else None
            if site is None:
                raise StudioError(f"{where} does not fit this base ({base}): it adapts '{component}.{path}', which "
                                  f"is not a Linear or convolution layer there; the file seems made for {made_for}")
            layer_cfg = layer_config(cfg, name)
            if layer_cfg is None:
                raise StudioError(f"{where} is damaged: it has tensors for '{component}.{path}', which its block-rank "
                                  f"rule leaves without an adapter")
            try:
                expected = METHODS[part.method].expected_shapes(layer_cfg, site)
            except StudioError as e:  # a method's own refusal of this layer (a LoKr split that does not divide)
                raise StudioError(f"{where} does not fit this base ({base}): {e}") from None
            for key, want in expected.items():
                got = tuple(tensors[key].shape) if key in tensors else None
                if got != tuple(want):
                    raise StudioError(
                        f"{where} does not fit this base ({base}): module '{component}.{path}' needs {key} of "
                        f"shape {tuple(want)} but the file has {got}; the file seems made for {made_for}")
            names[path] = name
        resolved[component] = names
    return resolved


def attach_file(af: AdapterFile, models: dict[str, nn.Module], name: str, weight: float = 1.0,
                te_weight: float | None = None) -> dict[str, list[str]]:
    """Attach ``af`` as adapter ``name`` (UNet / LM at ``weight``, text encoders at ``te_weight``,
    default ``weight``). Returns {component: attached module paths}."""
    models = normalise_models(models)
    where = _where(af)
    _check_family(af, models, where)
    resolved = _resolve(af, models, where)
    if af.prompt:  # a prefix (prefix tuning): checked with the rest, installed after the layer parts
        _check_prefix(af, models, where, weight)
    done: list[nn.Module] = []
    attached = {}
    try:
        for component, part in af.parts.items():
            model = models[component]
            state = {}
            for key, value in part.tensors.items():
                path, _, tensor = key.rpartition(".")
                state[f"{resolved[component][path]}.{tensor}"] = value
            w = te_weight if component in TEXT_ENCODERS and te_weight is not None else weight
            attached[component] = load_adapter(model, name, part.method, part.config, state, weight=w)
            done.append(model)
    except StudioError as err:
        for model in done:
            detach(model, name)
        raise StudioError(f"{where}: {err}") from None
    if af.prompt:
        prefix.install_tensors(models["lm"], af.prompt, where, name)
        attached["prompt"] = ["prefix"]
    return attached


def _check_prefix(af: AdapterFile, models: dict[str, nn.Module], where: str, weight: float) -> None:
    if "lm" not in models:
        raise StudioError(f"{where} has a prefix for a language model: load it on a language model")
    if weight != 1.0:
        raise StudioError(f"{where} at weight {weight:g}: a prefix has no strength to scale (its keys and values "
                          f"are attended as they are): use it at weight 1")
    prefix.check_tensors(models["lm"], af.prompt, where)


def set_file_weight(models: dict[str, nn.Module], name: str, weight: float, te_weight: float | None = None) -> None:
    """Move an attached file's sliders: no re-attach, merged layers re-merge."""
    for component, model in normalise_models(models).items():
        if prefix.installed_name(model) == name and weight != 1.0:
            raise StudioError(f"adapter {name!r} is a prefix, which has no strength to scale: use it at weight 1")
        if name in adapter_names(model):
            set_weight(model, name, te_weight if component in TEXT_ENCODERS and te_weight is not None else weight)


def detach_file(models: dict[str, nn.Module], name: str) -> None:
    for model in normalise_models(models).values():
        if name in adapter_names(model):
            detach(model, name)
        if prefix.installed_name(model) == name:
            prefix.uninstall(model)


def from_models(models: dict[str, nn.Module], name: str, base: str | None = None,
                metadata: dict[str, str] | None = None) -> AdapterFile:
    """Capture attached adapter ``name`` from every component model (what the trainer saves)."""
    models = normalise_models(models)
    parts = {}
    for component, model in models.items():
        if name not in adapter_names(model):
            continue
        cfg = adapter_config(model, name)
        state = adapter_state_dict(model, name)
        if component in TEXT_ENCODERS:
            state = {canonical_te_path(k): v for k, v in state.items()}
        parts[component] = Part(cfg["method"], cfg["config"], state)
    if not parts:
        raise StudioError(f"no adapter named {name!r} is attached to {', '.join(models) or 'any model'}")
    return AdapterFile(base or model_family(models), parts, metadata=dict(metadata or {}))
