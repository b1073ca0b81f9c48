"""Find the layers to adapt, and attach / detach named adapters on them.

Targets are given as a preset name, a regular expression, an exact module name, or a list of
those. An entry matches module ``n`` when ``n == entry``, ``n`` ends with ``"." + entry``, or
``re.fullmatch(entry, n)`` succeeds. ``nn.Linear``, GPT-2's ``Conv1D`` and every ``nn.Conv2d``
with one group and zero padding (1x1, 3x3, strided: all of a UNet's) are adaptable; grouped
convolutions are skipped by presets and regexes, and refused when an entry names one.
"""

from __future__ import annotations

import re
from types import ModuleType

import torch.nn as nn

from studio.adapters.common import check_shapes
from studio.adapters.layer import AdaptedLayer, AdaptedLinear, Adapter, is_adaptable
from studio.errors import StudioError

_TRANSFORMER = r".*(\.attn[12]\.(to_q|to_k|to_v|to_out\.0)|\.ff\.net\.(0\.proj|2)|attentions\.\d+\.(proj_in|proj_out))"

PRESETS: dict[str, str] = {
    # every attention block of a diffusers UNet2DConditionModel: 128 layers on SD1.5, 560 on SDXL
    "unet-attn": r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    # kohya's default LoRA targets: every Linear / 1x1 conv of the UNet's transformer blocks --
    # the attention above plus the feed-forward and proj_in / proj_out (192 layers on SD1.5)
    "unet-transformer": _TRANSFORMER,
    # kohya's LoCon set: the transformer set plus every ResNet conv1 / conv2 / conv_shortcut and
    # time_emb_proj and the down / up-sampler convolutions (3x3 convs take --conv-rank / --conv-alpha)
    "unet-full": _TRANSFORMER[:-1] + r"|resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)"
                 r"|(downsamplers|upsamplers)\.0\.conv)",
    # CLIPTextModel / CLIPTextModelWithProjection self-attention
    "te-attn": r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    # Llama / Qwen / Mistral attention, GPT-2 attention (Conv1D c_attn, c_proj)
    "lm-attn": r".*(self_attn\.(q_proj|k_proj|v_proj|o_proj)|\battn\.(c_attn|c_proj))",
    # Llama / Qwen / Mistral gated MLP, GPT-2 MLP
    "lm-mlp": r".*mlp\.(gate_proj|up_proj|down_proj|c_fc|c_proj)",
}


_is_adaptable = is_adaptable


def _named_explicitly(entry: str, name: str) -> bool:
    return entry not in PRESETS and (name == entry or name.endswith("." + entry))


def _refuse_conv(name: str, module: nn.Module) -> None:
    raise StudioError(
        f"module '{name}' is a {type(module).__name__} with kernel {tuple(module.kernel_size)}, stride "
        f"{tuple(module.stride)}, padding {module.padding}, groups {module.groups}, padding mode "
        f"{module.padding_mode}: grouped or non-zero-padded convolutions cannot be adapted: target other layers")


def _entry_matches(entry: str, name: str) -> bool:
    if entry in PRESETS:
        return re.fullmatch(PRESETS[entry], name) is not None
    if name == entry or name.endswith("." + entry):
        return True
    try:
        return re.fullmatch(entry, name) is not None
    except re.error:
        return False


def _split(targets: str | list[str]) -> list[str]:
    """'unet-attn,te-attn' is a list of presets; any other string is one entry."""
    if isinstance(targets, str):
        parts = [t.strip() for t in targets.split(",")]
        return parts if all(p in PRESETS for p in parts) else [targets]
    return list(targets)


def find_targets(model: nn.Module, targets: str | list[str]) -> dict[str, nn.Module]:
    """Adaptable modules (or AdaptedLinear wrappers) whose names match the targets, in model order."""
    entries = _split(targets)
    found: dict[str, nn.Module] = {}
    inside_wrapper: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in inside_wrapper):
            continue
        if isinstance(module, AdaptedLinear):
            inside_wrapper.add(name)
        if _is_adaptable(module) and any(_entry_matches(e, name) for e in entries):
            found[name] = module
        elif isinstance(module, nn.modules.conv._ConvNd) and any(_named_explicitly(e, name) for e in entries):
            _refuse_conv(name, module)
    if not found:
        raise StudioError(
            f"targets {entries} match no Linear layer or convolution of {type(model).__name__}: use a preset "
            f"({', '.join(PRESETS)}), a module name, or a regex over names such as "
            f"'{next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)), 'none')}'")
    return found


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    return {m.path: m for m in model.modules() if isinstance(m, AdaptedLinear)}


def attach(model: nn.Module, name: str, method: str, cfg=None, targets: str | list[str] = "unet-attn",
           weight: float = 1.0, saved: dict[str, dict] | None = None, freeze_base: bool = True) -> list[str]:
    """Attach adapter ``name`` of ``method`` on every matching layer; return the module paths.

    ``saved`` maps module path -> saved tensors (see ``ops.load_adapter``); without it every
    layer is initialised by the method's ``init`` (layers the method does not ``accept`` are
    skipped). The base model's own parameters are frozen; new layers take the model's mode.
    """
    from studio.adapters.registry import get

    module_of_method: ModuleType = get(method)
    cfg = cfg if cfg is not None else module_of_method.Config()
    if not isinstance(cfg, module_of_method.Config):
        raise StudioError(f"method {method!r} needs a {module_of_method.__name__}.Config, got {type(cfg).__name__}")
    if name in adapter_names(model):
        raise StudioError(f"an adapter named {name!r} is already attached: detach it first or choose another name")
    layers = find_targets(model, targets) if saved is None else _saved_targets(model, saved)
    prepare = getattr(module_of_method, "prepare", None)
    if prepare is not None:  # a config that depends on the targets (per-block counts), resolved once
        cfg = prepare(cfg, list(layers))
    accepts = getattr(module_of_method, "accepts", None)
    states = {}
    for path, module in layers.items():  # build every state before touching the model
        layer = module if isinstance(module, AdaptedLayer) else AdaptedLayer(module, path)
        W0, site = layer.pristine_weight, layer.site
        layer_cfg = layer_config(cfg, path)  # a per-module rank rule (block ranks) resolved
        if saved is None:
            if layer_cfg is None or (accepts is not None and not accepts(layer_cfg, site)):
                continue
            state = module_of_method.init(layer_cfg, W0, site)
        else:
            if layer_cfg is None:
                raise StudioError(f"the adapter has tensors for module '{path}', which its module_ranks rule gives "
                                  f"rank 0: the file is damaged")
            check_shapes(saved[path], module_of_method.expected_shapes(layer_cfg, site), path)
            state = module_of_method.from_saved(layer_cfg, W0, saved[path], site)
        states[path] = (layer, {k: v.to(W0.device) for k, v in state.items()})
    if not states:
        raise StudioError(f"method {method!r} adapts none of the layers {targets!r} selects: choose other targets "
                          f"(see the method's help)")
    if freeze_base:
        adapter_params = {id(p) for m in model.modules() if isinstance(m, Adapter) for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in adapter_params:
                p.requires_grad_(False)
    for path, (layer, state) in states.items():
        if not isinstance(model.get_submodule(path), AdaptedLayer):
            _set_submodule(model, path, layer)
        adapter = Adapter(module_of_method, cfg, state).train(layer.training)
        adapter.weight = float(weight)
        layer.adapters[name] = adapter
    return list(states)


def layer_config(cfg, path: str):
    """A method config as it applies to the layer at ``path``: configs with a per-module rule
    (``LowRankConfig.at``) resolve it, others apply everywhere. None: no adapter on that layer."""
    at = getattr(cfg, "at", None)
    return cfg if at is None else at(path)


def _saved_targets(model: nn.Module, saved: dict[str, dict]) -> dict[str, nn.Module]:
    layers = {}
    for path in saved:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if module is None or not _is_adaptable(module):
            raise StudioError(
                f"the adapter targets module '{path}', which {type(model).__name__} does not have as a "
                f"Linear or convolution layer: the adapter was trained for another base model")
        layers[path] = module
    return layers


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in adapted_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def layers_of(model: nn.Module, name: str) -> dict[str, AdaptedLinear]:
    layers = {p: m for p, m in adapted_layers(model).items() if name in m.adapters}
    if not layers:
        raise StudioError(f"no adapter named {name!r} is attached (attached: {adapter_names(model) or 'none'})")
    return layers


def detach(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left without adapters get their original module back."""
    for path, layer in layers_of(model, name).items():
        was_merged = list(layer.merged)
        layer.unmerge()
        del layer.adapters[name]
        remaining = [n for n in was_merged if n != name]
        if remaining:
            layer.merge(remaining)
        if len(layer.adapters) == 0:
            _set_submodule(model, path, layer.base)
