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
``diffusers_to_sgm`` / ``sgm_to_diffusers`` translate the transformer blocks of a UNet with two
layers per block (SD1.5 and SDXL).
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


# -- SDXL SGM <-> diffusers UNet block names (two resnets / attentions per down block) --------
_DIFFUSERS_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)|mid_block\.attentions\.0\.(.+)")
_SGM_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.1\.(.+)|middle_block\.1\.(.+)")
LAYERS_PER_BLOCK = 2


def diffusers_to_sgm(path: str) -> str:
    m = _DIFFUSERS_BLOCK.fullmatch(path)
    if m is None:
        raise StudioError(
            f"UNet module '{path}' is outside the transformer blocks and has no SGM name here: "
            f"export this SDXL adapter with the diffusers UNet layout (unet_layout='diffusers')")
    if m.group(5) is not None:
        return f"middle_block.1.{m.group(5)}"
    kind, block, attention, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if kind == "down_blocks":
        return f"input_blocks.{1 + (LAYERS_PER_BLOCK + 1) * block + attention}.1.{rest}"
    return f"output_blocks.{(LAYERS_PER_BLOCK + 1) * block + attention}.1.{rest}"


def sgm_to_diffusers(path: str) -> str | None:
    """Diffusers path of an SGM transformer-block path; None for SGM modules we cannot map."""
    m = _SGM_BLOCK.fullmatch(path)
    if m is None:
        return None
    if m.group(4) is not None:
        return f"mid_block.attentions.0.{m.group(4)}"
    kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
    if kind == "input_blocks":
        block, attention = divmod(index - 1, LAYERS_PER_BLOCK + 1)
        if index < 1 or attention >= LAYERS_PER_BLOCK:
            return None  # a downsampler slot
        return f"down_blocks.{block}.attentions.{attention}.{rest}"
    block, attention = divmod(index, LAYERS_PER_BLOCK + 1)
    return f"up_blocks.{block}.attentions.{attention}.{rest}"


def is_sgm(path: str) -> bool:
    return path.startswith(("input_blocks.", "middle_block.", "output_blocks."))


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
