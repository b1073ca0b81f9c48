"""Adapter algorithms we do not import, recognised by their tensor names and refused by name.

A GLoRA, OFT or (IA)^3 file loaded as if it were a plain LoRA would silently do the wrong thing
(diffusers, for one, drops ``dora_scale`` with a warning), so every reader calls ``refuse_unsupported``
before looking at anything else, and raises on any key it did not consume (``refuse_leftovers``).

LyCORIS's LoHa (``hada_*``), LoKr (``lokr_*``), full (``diff``) and DoRA (``dora_scale``) modules are
read by their methods' own hooks in kohya-named files (``formats.lycoris``; the kohya reader passes
their markers as ``allowed``); elsewhere (other key layouts) they are refused saying so.

Convolution LoRAs (``(r, in, kh, kw)`` / ``(out, r, 1, 1)``: SD1.5's 1x1 ``proj_in`` / ``proj_out``,
kohya's ``conv_dim`` LoCon on 3x3 convs) import; other factor shapes are refused as damaged.
"""

from __future__ import annotations

from studio.errors import StudioError

# (marker in a key, algorithm name, why it cannot become a plain LoRA)
UNSUPPORTED = [
    ("dora_scale", "DoRA", "its magnitude vectors rescale the weight and cannot be dropped"),
    ("lora_magnitude_vector", "DoRA (PEFT)", "its magnitude vectors rescale the weight and cannot be dropped"),
    ("lora_mid", "LyCORIS LoCon with a Tucker core (lora_mid)", "its convolution core has no Linear equivalent"),
    ("oft_", "OFT / BOFT", "it rotates the weight instead of adding a delta"),
    ("boft_", "OFT / BOFT", "it rotates the weight instead of adding a delta"),
    ("on_input", "(IA)^3", "it rescales activations instead of adding a delta"),
    (".w_norm", "LyCORIS norm", "it adapts normalisation layers"),
    (".b_norm", "LyCORIS norm", "it adapts normalisation layers"),
]
_ENDINGS = [(".a1.weight", "GLoRA"), (".b1.weight", "GLoRA")]
# read in kohya names only: (marker, whether it ends the key, algorithm name, the suffix family it is read by)
KOHYA_ONLY = [(".hada_", False, "LyCORIS LoHa", "hada_"), (".lokr_", False, "LyCORIS LoKr", "lokr_"),
              (".diff", True, "LyCORIS full (diff)", "diff"), (".diff_b", True, "LyCORIS full (diff)", "diff")]


def refuse_unsupported(keys, where: str, allowed: tuple[str, ...] = ()) -> None:
    """Refuse the first key of an algorithm we do not import; ``allowed`` markers are read by their
    method's LyCORIS hooks (``formats.lycoris``)."""
    for key in keys:
        for marker, name, why in UNSUPPORTED:
            if marker in key and marker not in allowed:
                raise StudioError(
                    f"{where} is a {name} file (key '{key}'): {name} is not supported because {why}; the "
                    f"studio imports plain LoRA files (lora_down/lora_up or lora_A/lora_B): convert or "
                    f"retrain it as a plain LoRA")
        for ending, name in _ENDINGS:
            if key.endswith(ending):
                raise StudioError(
                    f"{where} is a {name} file (key '{key}'): {name} is not supported; the studio imports "
                    f"plain LoRA files (lora_down/lora_up or lora_A/lora_B): convert or retrain it as a plain LoRA")
        for marker, at_end, name, family in KOHYA_ONLY:
            found = key.endswith(marker) if at_end else marker in key
            if found and not any(a.startswith(family) for a in allowed):
                raise StudioError(
                    f"{where} is a {name} file in a key layout the studio does not read for it (key '{key}'): "
                    f"{name} modules are read from kohya-named files (lora_unet_ / lora_te_ prefixes, as "
                    f"LyCORIS's kohya wrapper writes them): rename the keys, or convert the file with LyCORIS")


def refuse_leftovers(leftovers: list[str], where: str, reader: str) -> None:
    if leftovers:
        shown = ", ".join(sorted(leftovers)[:8]) + (f" (+{len(leftovers) - 8} more)" if len(leftovers) > 8 else "")
        raise StudioError(
            f"{where} has {len(leftovers)} key(s) the {reader} reader does not understand: {shown}: nothing "
            f"was loaded; remove those keys or re-export the file as a plain LoRA")


def refuse_conv_kernel(where: str, name: str, down, up) -> None:
    """Refuse factors that are neither 2-D (Linear) nor a conv pair: down (r, in, kh, kw), up (out, r, 1, 1)."""
    if down.dim() not in (2, 4) or up.dim() != down.dim() or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise StudioError(
            f"{where}: module '{name}' has factors of shapes {tuple(down.shape)} and {tuple(up.shape)}: a LoRA "
            f"stores (r, in) / (out, r), or (r, in, kh, kw) / (out, r, 1, 1) for a convolution: the file is damaged")
