"""Module names: the canonical scheme and its translations to kohya and diffusers names.

Canonical names (what ``AdapterFile`` stores and the adapter core attaches by):

    <component>.<module path>.<tensor>          e.g. unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.A

Components: ``unet`` and ``te`` (SD1.5-style bases, the mini base included), ``unet``, ``te1`` and
``te2`` (SDXL), ``lm`` (causal language models). Module paths are the diffusers / transformers
module paths, except that text-encoder paths never carry the ``text_model.`` prefix:
transformers 5 dropped it from ``CLIPTextModel`` but kept it in ``CLIPTextModelWithProjection``,
so the canonical form leaves it out and ``resolve_path`` finds the module either way.

kohya names are ``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` + the module path
with every ``.`` turned into ``_`` (text encoders keep ``text_model``, as A1111 expects). On SDXL
kohya writes the UNet with SGM (``input_blocks`` / ``middle_block`` / ``output_blocks``) names;
``diffusers_to_sgm`` / ``sgm_to_diffusers`` translate every module of a UNet with two layers per
block (transformer blocks, resnets, samplers, the embeddings and the in / out convolutions).
"""

from __future__ import annotations

import re

import torch.nn as nn

from studio.errors import StudioError

FAMILIES: dict[str, tuple[str, ...]] = {
    "sd15": ("unet", "te"),        # Stable Diffusion 1.x
    "sdxl": ("unet", "te1", "te2"),  # SDXL base: CLIP-L + OpenCLIP bigG
    "sd-custom": ("unet", "te"),   # SD architecture with other sizes (the embedded mini base)
    "lm": ("lm",),                 # causal language models
}
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "sd-custom": "a custom-size SD model", "lm": "a language model"}
TEXT_ENCODERS = ("te", "te1", "te2")

KOHYA_PREFIX = {"unet": "lora_unet", "te": "lora_te", "te1": "lora_te1", "te2": "lora_te2"}
DIFFUSERS_PREFIX = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}

# names of modules that themselves contain "_", so "a_b_c" can be split back into a path
_JOINED = {
    # diffusers UNet
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "add_time_proj", "class_embedding",
    # SGM / LDM UNet
    "input_blocks", "output_blocks", "middle_block", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "time_embed", "label_emb",
    # CLIP text encoders
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection",
    "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding",
}


def join_underscored(name: str) -> str:
    """'down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0' -> the dotted module path."""
    tokens = name.split("_")
    parts, i = [], 0
    while i < len(tokens):
        for width in (3, 2, 1):
            candidate = "_".join(tokens[i:i + width])
            if width == 1 or candidate in _JOINED:
                parts.append(candidate)
                i += width
                break
    return ".".join(parts)


def underscored(path: str) -> str:
    return path.replace(".", "_")


# -- text-encoder paths ------------------------------------------------------------------------
_INSIDE_TEXT_MODEL = ("encoder.", "embeddings.", "final_layer_norm")


def canonical_te_path(path: str) -> str:
    return path[len("text_model."):] if path.startswith("text_model.") else path


def with_text_model(path: str) -> str:
    """The path as kohya / old diffusers files name it (inside ``text_model``)."""
    return "text_model." + path if path.startswith(_INSIDE_TEXT_MODEL) else path


def resolve_path(model: nn.Module, path: str) -> str | None:
    """The model's own name for a canonical module path, or None if it has no such module."""
    for candidate in (path, "text_model." + path, canonical_te_path(path)):
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    return None


# -- SDXL SGM <-> diffusers UNet names ---------------------------------------------------------
# SGM (the LDM code SDXL ships in) numbers each half of the UNet as one sequence of slots:
#   input_blocks.0.0 = conv_in; then per down block i, L resnet slots k = 1 + (L + 1) i + j holding
#   the resnet (.0) and its attention (.1), and one downsampler slot k = (L + 1)(i + 1) (.0.op);
#   middle_block.0 / .2 = the mid resnets, .1 = the mid attention;
#   output_blocks k = (L + 1) i + j for the L + 1 resnets of up block i (.0), their attention (.1) and,
#   in the last slot, the upsampler after them (.2.conv, or .1.conv in a block without attention).
# Inside a resnet SGM's in_layers / emb_layers / out_layers / skip_connection are diffusers' norm1, conv1,
# time_emb_proj, norm2, conv2 and conv_shortcut. diffusers' own checkpoint conversion is the reference
# (tests/test_formats_names.py checks these maps against it, every module of an SDXL UNet).
LAYERS_PER_BLOCK = 2
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
        "label_emb.0.2": "add_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}
_DIFFUSERS_PART = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
                             r"|mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_SGM_PART = re.compile(r"(input_blocks|output_blocks|middle_block)\.(\d+)(?:\.(\d+))?\.(.+)")


def _swap_prefix(path: str, table: dict[str, str]) -> str | None:
    """``path`` with a key of ``table`` as its leading module(s) replaced by its value, else None."""
    for old, new in table.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return None


def _resnet_part(rest: str, to_sgm: bool) -> str | None:
    return _swap_prefix(rest, {v: k for k, v in _RESNET.items()} if to_sgm else _RESNET)


def diffusers_to_sgm(path: str) -> str:
    """SGM name of a diffusers UNet module path (SDXL: an upsampler follows its block's attention)."""
    found = _swap_prefix(path, {v: k for k, v in _TOP.items()})
    m = _DIFFUSERS_PART.fullmatch(path) if found is None else None
    if m is not None and m.group(6) is not None:  # the mid block
        kind, index, rest = m.group(6), int(m.group(7)), m.group(8)
        found = f"middle_block.1.{rest}" if kind == "attentions" else _join(f"middle_block.{2 * index}",
                                                                          _resnet_part(rest, True))
    elif m is not None:
        half, block, kind, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        first = 1 + (LAYERS_PER_BLOCK + 1) * block if half == "down_blocks" else (LAYERS_PER_BLOCK + 1) * block
        where = "input_blocks" if half == "down_blocks" else "output_blocks"
        if kind == "resnets":
            found = _join(f"{where}.{first + index}.0", _resnet_part(rest, True))
        elif kind == "attentions":
            found = f"{where}.{first + index}.1.{rest}"
        elif kind == "downsamplers" and rest == "conv":
            found = f"input_blocks.{(LAYERS_PER_BLOCK + 1) * (block + 1)}.0.op"
        elif kind == "upsamplers" and rest == "conv":
            found = f"output_blocks.{first + LAYERS_PER_BLOCK}.2.conv"
    if found is None:
        raise StudioError(f"UNet module '{path}' has no SGM name here: export this SDXL adapter with the diffusers "
                          f"UNet layout (--unet-layout diffusers)")
    return found


def sgm_to_diffusers(path: str) -> str | None:
    """Diffusers path of an SGM UNet module path; None for one we cannot map."""
    found = _swap_prefix(path, _TOP)
    m = _SGM_PART.fullmatch(path) if found is None else None
    if m is None:
        return found
    where, slot, part, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if where == "middle_block":  # middle_block.N.<rest>: no part index
        rest = path[len(f"middle_block.{slot}."):]
        if slot == 1:
            return f"mid_block.attentions.0.{rest}"
        return _join(f"mid_block.resnets.{slot // 2}", _resnet_part(rest, False)) if slot in (0, 2) else None
    if part is None:
        return None
    if where == "input_blocks":
        block, j = divmod(slot - 1, LAYERS_PER_BLOCK + 1)
        if slot < 1:
            return None
        if j == LAYERS_PER_BLOCK:  # the downsampler slot
            return f"down_blocks.{block}.downsamplers.0.conv" if (part, rest) == ("0", "op") else None
        half = "down_blocks"
    else:
        block, j = divmod(slot, LAYERS_PER_BLOCK + 1)
        if rest == "conv" and part in ("1", "2"):
            return f"up_blocks.{block}.upsamplers.0.conv" if j == LAYERS_PER_BLOCK else None
        half = "up_blocks"
    if part == "0":
        return _join(f"{half}.{block}.resnets.{j}", _resnet_part(rest, False))
    return f"{half}.{block}.attentions.{j}.{rest}" if part == "1" else None


def _join(head: str, tail: str | None) -> str | None:
    return None if tail is None else f"{head}.{tail}"


def is_sgm(path: str) -> bool:
    return path.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out."))


# -- kohya names -------------------------------------------------------------------------------
def kohya_name(component: str, path: str, unet_layout: str = "diffusers") -> str:
    if component == "unet":
        return f"lora_unet_{underscored(diffusers_to_sgm(path) if unet_layout == 'sgm' else path)}"
    if component in TEXT_ENCODERS:
        return f"{KOHYA_PREFIX[component]}_{underscored(with_text_model(path))}"
    raise StudioError(f"component '{component}' has no kohya name: kohya files hold Stable Diffusion adapters only")


def split_kohya_name(name: str) -> tuple[str, str] | None:
    """'lora_te1_text_model_encoder_layers_0_self_attn_q_proj' -> ('te1', 'text_model.encoder...')."""
    for component in ("te1", "te2", "te", "unet"):  # longest prefixes first
        prefix = KOHYA_PREFIX[component] + "_"
        if name.startswith(prefix):
            return component, join_underscored(name[len(prefix):])
    return None


# -- ComfyUI's own names (OneTrainer's COMFY key format) ---------------------------------------
# ComfyUI's generic LoRA names are its models' state-dict keys without ".weight" (comfy/lora.py
# model_lora_keys_unet / model_lora_keys_clip): the UNet under diffusion_model. with SGM (LDM) paths,
# SD1.5 and SDXL alike; CLIP-L and OpenCLIP-G under text_encoders.clip_l.transformer. /
# text_encoders.clip_g.transformer. with transformers' paths (text_model.encoder.layers.N...,
# text_projection). OneTrainer's COMFY output writes these names (reference/lycoris.md 10). Each is a
# kohya name with another spelling; on SD1.x the clip_l names become lora_te_ (kohya.read decides).
COMFY_UNET = "diffusion_model."
COMFY_TEXT = {"text_encoders.clip_l.transformer.": "te1", "text_encoders.clip_g.transformer.": "te2"}
COMFY_PREFIXES = (COMFY_UNET, *COMFY_TEXT)


def comfy_to_kohya(module: str) -> str | None:
    """'diffusion_model.input_blocks.1.1.proj_in' -> 'lora_unet_input_blocks_1_1_proj_in';
    'text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1' -> 'lora_te1_text_model_encoder_...';
    None for a name ComfyUI would not map to an SD1.5 / SDXL layer (diffusers paths under diffusion_model.)."""
    if module.startswith(COMFY_UNET):
        path = module[len(COMFY_UNET):]
        return f"{KOHYA_PREFIX['unet']}_{underscored(path)}" if is_sgm(path) else None
    for prefix, component in COMFY_TEXT.items():
        if module.startswith(prefix) and module[len(prefix):].startswith(("text_model.", "text_projection")):
            return f"{KOHYA_PREFIX[component]}_{underscored(module[len(prefix):])}"
    return None


# -- OMI names (OneTrainer's OMI key format, omi_model_standards.convert.lora) ------------------
# The Open Model Initiative's LoRA names: the UNet under unet. with SGM (LDM) paths, CLIP-L under clip_l. and
# OpenCLIP-G under clip_g. with transformers' paths (text_model.encoder.layers.N..., text_projection), the tensor
# names of the kind after them (OneTrainer's convert_to_omi of its dotted names). The standard's key sets
# (convert_sd_lora / convert_sdxl_lora) name a resnet's conv1 / conv2 / time_emb_proj / conv_shortcut (no norms),
# every module of an attention block (SD1.5; SDXL lists its Linear layers), the samplers (upsamplers at
# output_blocks.N.2.conv on SD1.5 too), conv_in, the time / label embeddings, out.0 and out.2; each is a kohya
# name with another spelling. swap_chunks (Flux's final adaLN modulation halves) and filter_is_last appear in no
# SD1.5 / SDXL key set: the tensors are stored as kohya stores them.
OMI_UNET = "unet."
OMI_TEXT = {"clip_l.": "te1", "clip_g.": "te2"}
OMI_PREFIXES = (OMI_UNET, *OMI_TEXT)
_OMI_RESNET_LAYERS = {"conv1", "conv2", "time_emb_proj", "conv_shortcut"}


def _omi_unet_path(path: str) -> str | None:
    """The diffusers path of an OMI UNet module (an SGM path), None for one the standard does not name."""
    mapped = sgm_to_diffusers(path) if is_sgm(path) else None
    try:
        if mapped is None or diffusers_to_sgm(mapped) != path:  # (OMI's only SGM spelling: upsamplers at .2.conv)
            return None
    except StudioError:  # (a path with no SGM name: not OMI's)
        return None
    resnet = re.fullmatch(r".+\.resnets\.\d+\.(.+)", mapped)
    return None if resnet and resnet.group(1) not in _OMI_RESNET_LAYERS else mapped


def is_omi(module: str) -> bool:
    """Whether a module name is OMI's rather than diffusers' (which also writes unet.<path>: diffusers paths)."""
    return module.startswith(tuple(OMI_TEXT)) or (module.startswith(OMI_UNET) and is_sgm(module[len(OMI_UNET):]))


def omi_to_kohya(module: str) -> str | None:
    """'unet.input_blocks.1.1.proj_in' -> 'lora_unet_input_blocks_1_1_proj_in'; 'clip_g.text_projection' ->
    'lora_te2_text_projection'; None for a name OMI's key sets do not have."""
    if module.startswith(OMI_UNET):
        path = module[len(OMI_UNET):]
        return f"{KOHYA_PREFIX['unet']}_{underscored(path)}" if _omi_unet_path(path) else None
    for prefix, component in OMI_TEXT.items():
        if module.startswith(prefix) and module[len(prefix):].startswith(("text_model.", "text_projection")):
            return f"{KOHYA_PREFIX[component]}_{underscored(module[len(prefix):])}"
    return None


# the SDXL key set's modules (convert_sdxl_lora), beyond a UNet block's resnets, samplers and the top-level layers:
# an attention block's Linear layers and a CLIP's encoder layers and text projection (what InvokeAI converts)
_OMI_SDXL_ATTENTION = re.compile(r"proj_in|proj_out"
                                 r"|transformer_blocks\.\d+\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))")
_OMI_SDXL_CLIP = re.compile(r"text_projection|text_model\.encoder\.layers\.\d+\.(mlp\.fc[12]|self_attn\.(q|k|v|out)_proj)")


def in_omi_sdxl_key_set(module: str) -> bool:
    """Whether OMI's SDXL key set lists this module (the SD1.5 set also takes every module of an attention block and
    anything under clip_l.)."""
    if module.startswith(OMI_UNET):
        mapped = _omi_unet_path(module[len(OMI_UNET):])
        attention = re.fullmatch(r".+\.attentions\.\d+\.(.+)", mapped or "")
        return mapped is not None and (attention is None or bool(_OMI_SDXL_ATTENTION.fullmatch(attention.group(1))))
    prefix = next((p for p in OMI_TEXT if module.startswith(p)), None)
    return prefix is not None and bool(_OMI_SDXL_CLIP.fullmatch(module[len(prefix):]))
