"""Adapter algorithms we do not import, recognised by their tensor names and refused by name.

A GLoRA, OFT or (IA)^3 file loaded as if it were a plain LoRA would silently do the wrong thing
(diffusers, for one, drops ``dora_scale`` with a warning), so every reader calls ``refuse_unsupported``
before looking at anything else, and raises on any key it did not consume (``refuse_leftovers``).

LyCORIS's LoHa (``hada_*``), LoKr (``lokr_*``), full (``diff``) and DoRA (``dora_scale``) modules are
read by their methods' own hooks in kohya-named files (``formats.lycoris``; the kohya reader passes
their markers as ``allowed``), and so is a Tucker LoCon's core (``lora_mid``, folded into its down
kernel); elsewhere (other key layouts) they are refused saying so.

Convolution LoRAs (``(r, in, kh, kw)`` / ``(out, r, 1, 1)``: SD1.5's 1x1 ``proj_in`` / ``proj_out``,
kohya's ``conv_dim`` LoCon on 3x3 convs) import; other factor shapes are refused as damaged.
"""

from __future__ import annotations

from studio.errors import StudioError

# (marker in a key, algorithm name, why it cannot become a plain LoRA, which tools load it: reference/lycoris.md,
# reference/formats.md 6)
UNSUPPORTED = [
    ("dora_scale", "DoRA", "its magnitude vectors rescale the weight and cannot be dropped",
     "ComfyUI, Forge and A1111 load it in kohya names"),
    ("lora_magnitude_vector", "DoRA (PEFT)", "its magnitude vectors rescale the weight and cannot be dropped",
     "diffusers and PEFT load it"),
    ("oft_", "OFT / BOFT", "it rotates the weight instead of adding a delta", "ComfyUI, Forge and A1111 load it"),
    ("boft_", "OFT / BOFT", "it rotates the weight instead of adding a delta", "PEFT loads it"),
    ("on_input", "(IA)^3", "it rescales activations instead of adding a delta",
     "A1111 and InvokeAI load it (ComfyUI does not)"),
    (".w_norm", "LyCORIS norm", "it adapts normalisation layers", "A1111, Forge, ComfyUI and InvokeAI load it"),
    (".b_norm", "LyCORIS norm", "it adapts normalisation layers", "A1111, Forge, ComfyUI and InvokeAI load it"),
]
_ENDINGS = [(".a1.weight", "GLoRA", "ComfyUI and Forge load it (A1111 only GLoRA's older layout)"),
            (".b1.weight", "GLoRA", "ComfyUI and Forge load it (A1111 only GLoRA's older layout)")]
STUDIO_READS = "the studio imports LoRA / LoCon (also with a Tucker core), LoHa, LoKr, DoRA and full (diff) files"
# read in kohya names only: (marker, whether it ends the key, algorithm name, the suffix family it is read by)
KOHYA_ONLY = [(".hada_", False, "LyCORIS LoHa", "hada_"), (".lokr_", False, "LyCORIS LoKr", "lokr_"),
              (".lora_mid.", False, "LyCORIS LoCon with a Tucker core (lora_mid)", "lora_mid"),
              (".diff", True, "LyCORIS full (diff)", "diff"), (".diff_b", True, "LyCORIS full (diff)", "diff")]


def _named(name: str, key: str, keys) -> str:
    """LyCORIS writes diag-OFT and BOFT under one key, oft_blocks: 3-D (n, b, b) is OFT, 4-D BOFT."""
    if name == "OFT / BOFT" and hasattr(keys, "get") and getattr(keys.get(key), "dim", None):
        return {3: "OFT", 4: "BOFT"}.get(keys[key].dim(), name)
    return name


def refuse_unsupported(keys, where: str, allowed: tuple[str, ...] = ()) -> None:
    """Refuse the first key of an algorithm we do not import, saying which tools load it; ``allowed``
    markers are read by their method's LyCORIS hooks (``formats.lycoris``). ``keys`` may be the tensors."""
    for key in keys:
        for marker, name, why, tools in UNSUPPORTED:
            if marker in key and marker not in allowed:
                name = _named(name, key, keys)
                raise StudioError(
                    f"{where} is a {name} file (key '{key}'): {name} is not "
                    f"supported because {why}; {tools}; {STUDIO_READS}: load it in one of those tools, or "
                    f"convert or retrain it as a plain LoRA")
        for ending, name, tools in _ENDINGS:
            if key.endswith(ending):
                raise StudioError(
                    f"{where} is a {name} file (key '{key}'): {name} is not supported; {tools}; {STUDIO_READS}: "
                    f"load it in one of those tools, or convert or retrain it as a plain LoRA")
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
