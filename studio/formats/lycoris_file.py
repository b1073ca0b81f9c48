"""The LyCORIS layout as a file format: ``--format lycoris`` and the ``lycoris_``-prefixed files SimpleTuner writes.

Writing: every module in the tensors LyCORIS's kohya wrapper writes (reference/lycoris.md), in kohya
names, exactly (no SVD, no base): LoHa ``hada_*``, LoKr ``lokr_*``, full ``diff`` / ``diff_b``, DoRA's
``dora_scale`` beside its ``lora_down`` / ``lora_up``, and LoCon (a LoRA, with k x k convolutions) as
``lora_down`` (r, in, kh, kw) / ``lora_up`` (out, r, 1, 1). The header says ``ss_network_module =
lycoris.kohya`` with the ``algo`` in ``ss_network_args``. This is what A1111, Forge, ComfyUI and
LyCORIS's own ``create_network_from_weights`` load. A method without such a layout (SVF, (IA)^3) is
refused: it converts to a plain LoRA with ``--format kohya``.

Reading: LyCORIS's generic wrapper (``create_lycoris``: SimpleTuner, ai-toolkit's legacy option) names
UNet modules ``lycoris_<diffusers path with _>``; they are the kohya ``lora_unet_`` names under another
prefix and are read by the kohya reader (every key consumed or the file refused), every kind the kohya
reader takes (LoCon incl. Tucker, LoHa, LoKr, DoRA, full). Text-encoder paths under this prefix are
refused: no tool reads them as a text encoder.

ComfyUI's own names (OneTrainer's COMFY key format; ``names.comfy_to_kohya``): ``diffusion_model.<SGM
path>`` for the UNet, ``text_encoders.clip_l.transformer.<path>`` / ``text_encoders.clip_g.transformer.<path>``
for CLIP-L / OpenCLIP-G, each followed by the tensor names of any kind the kohya reader takes. Every key
is renamed to its kohya name, key by key (a key without a known tensor name or a module ComfyUI would not
map is refused, named as the file has it), then read by the kohya reader; its errors name the file's keys.

OneTrainer's OMI key format (the Open Model Initiative's names; ``names.omi_to_kohya``): ``unet.<SGM path>``,
``clip_l.<path>`` / ``clip_g.<path>`` (``bundle_emb.`` as A1111's), SD1.5 and SDXL, read the same way: each key
renamed to its kohya name (a module OMI's key sets do not name is refused as the file has it), then the kohya
reader. A header saying ``modelspec.architecture = stable-diffusion-xl-v1-base/lora`` makes it an SDXL file.

Kohya-named files whose components mix kinds (LyCORIS presets: ``module_algo_map`` / ``name_algo_map``) are
claimed here too (this layout is asked before kohya's): each mixed component is put in one kind, exactly
(``lycoris.one_kind_per_component``), then read by the kohya reader; so are such files under the other names.
"""

from __future__ import annotations

import json
import re

from studio.adapters.registry import get
from studio.errors import StudioError
from studio.formats import embedding, kohya, lycoris
from studio.formats.adapter_file import AdapterFile
from studio.formats.names import COMFY_PREFIXES, OMI_PREFIXES, comfy_to_kohya, is_omi, omi_to_kohya
from studio.formats.refuse import refuse_leftovers, refuse_unsupported
from studio.formats.writing import ExportReport, WriteOptions, plain_write

NAME = "lycoris"
PREFIX = "lycoris_"
COMFY_FORMAT = "OneTrainer / ComfyUI names"
OMI_FORMAT = "OneTrainer OMI names"
SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"  # modelspec.architecture of an SDXL file, before "/lora"


def _comfy(tensors: dict) -> bool:
    return (any(k.startswith(COMFY_PREFIXES) for k in tensors)
            and all(k.startswith(COMFY_PREFIXES) or embedding.is_bundled(k) for k in tensors))


def _omi(tensors: dict) -> bool:
    """Every key under OMI's prefixes, one at least OMI's own (diffusers' files have unet.<diffusers path> too)."""
    return (any(is_omi(k) for k in tensors)
            and all(k.startswith(OMI_PREFIXES) or embedding.is_bundled(k) for k in tensors))


def looks_like(tensors: dict, metadata: dict[str, str]) -> bool:
    """lycoris_ names, ComfyUI's or OMI's names, or kohya names whose components mix kinds (asked before kohya's
    and diffusers')."""
    return bool(tensors) and (all(k.startswith(PREFIX) for k in tensors) or _comfy(tensors) or _omi(tensors)
                              or (kohya.looks_like(tensors, metadata) and lycoris.mixes_kinds(tensors)))


def _kohya_read(tensors: dict, metadata: dict[str, str], where: str) -> AdapterFile:
    """The kohya reader, after a preset's mixed components are put in one kind each (``lycoris.one_kind_per_component``)."""
    tensors, stored, locon = lycoris.one_kind_per_component(tensors, where)
    af = kohya.read(tensors, metadata, where)
    if stored:
        af.source["stored_kinds"] = stored
        lycoris.record_locon(af, locon)
    return af


# where a text encoder's module paths start (CLIPTextModel[WithProjection] / CLIPTextTransformer), with _ for dots
TEXT_ENCODER_STARTS = ("text_model_", "encoder_layers_", "embeddings_", "final_layer_norm", "text_projection")


def read(tensors: dict, metadata: dict[str, str], where: str) -> AdapterFile:
    if _comfy(tensors):
        return _read_renamed(tensors, metadata, where, comfy_to_kohya, "ComfyUI-names", COMFY_FORMAT)
    if _omi(tensors):
        if metadata.get("modelspec.architecture", "").startswith(SDXL_ARCHITECTURE + "/"):
            metadata = {**metadata, "studio.base": "sdxl"}  # (a hint to the kohya reader only: the header is kept)
        return _read_renamed(tensors, metadata, where, omi_to_kohya, "OMI-names", OMI_FORMAT)
    if not all(k.startswith(PREFIX) for k in tensors):  # kohya names, components mixing kinds
        return _kohya_read(tensors, metadata, where)
    # The generic wrapper names whatever module it wraps; SimpleTuner wraps the UNet, and ComfyUI reads lycoris_
    # as UNet names only: a wrapped text encoder would silently miss every layer there, so it is refused here
    te = sorted(k for k in tensors if k[len(PREFIX):].startswith(TEXT_ENCODER_STARTS))
    if te:
        raise StudioError(f"{where}: key '{te[0]}' names a text-encoder module under the lycoris_ prefix, which "
                          f"SimpleTuner and ComfyUI use for UNet modules only: rename the text encoder's keys to "
                          f"lora_te_<path> (lora_te1_ / lora_te2_ on SDXL), the kohya names every tool reads")
    renamed = {"lora_unet_" + k[len(PREFIX):]: v for k, v in tensors.items()}
    af = _kohya_read(renamed, metadata, where)
    af.source["format"] = "lycoris (lycoris_ UNet names)"
    return af


def _read_renamed(tensors: dict, metadata: dict[str, str], where: str, to_kohya, names_of: str,
                  fmt: str) -> AdapterFile:
    """A file in another spelling of kohya names (``to_kohya``: module -> kohya name or None), renamed key by key
    and read by the kohya reader; its errors are said in the file's own names."""
    allowed = (*lycoris.markers(), kohya.TUCKER)
    refuse_unsupported(tensors, where, allowed=allowed)  # GLoRA, OFT, ... by name, before anything else
    suffixes = sorted({*kohya.SUFFIXES, *allowed}, key=len, reverse=True)  # lora_down.weight before a bare name
    renamed, names, leftovers = {}, {}, []
    for key, value in tensors.items():
        if embedding.is_bundled(key):  # a pivotal-tuning bundle: the kohya reader's own keys
            renamed[key] = value
            continue
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        module = key[:-len(suffix) - 1] if suffix else None
        name = to_kohya(module) if module else None
        if name is None or names.get(name, module) != module:  # (two spellings of one kohya name: not ours to pick)
            leftovers.append(key)
            continue
        renamed[f"{name}.{suffix}"], names[name] = value, module
    refuse_leftovers(leftovers, where, names_of)
    try:
        af = _kohya_read(renamed, metadata, where)
    except StudioError as err:  # said in the file's own names
        pattern = re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r"(?!\w)")
        raise StudioError(pattern.sub(lambda m: names[m.group(0)], str(err))) from None
    af.source["format"] = fmt
    return af


def keeps_exactly(af: AdapterFile) -> bool:
    return True


def _locon(method) -> bool:
    """A method whose plain-LoRA factors are its delta, without the base: LyCORIS's LoCon layout holds it."""
    return method.TRAITS.export == "exact" and not method.TRAITS.needs_base and method.TRAITS.kind == "low-rank"


def write(af: AdapterFile, path, opts: WriteOptions) -> ExportReport:
    if not opts.exact:
        raise StudioError("--format lycoris keeps the adapter exactly in LyCORIS's layout: --rank / --energy make a "
                          "plain LoRA, use --format kohya for that")
    if lycoris.writes(af):
        return lycoris.write(af, path, opts, NAME)
    others = sorted({p.method for p in af.parts.values() if not _locon(get(p.method))})
    if others:
        raise StudioError(f"{', '.join(others)} adapters have no LyCORIS layout: export them as a plain LoRA with "
                          f"--format kohya (add --rank R or --energy E, and --base when asked)")
    conv_ranks = {p.config.get("conv_rank") for p in af.parts.values()} - {None}
    args = {"algo": "locon", **({"conv_dim": str(conv_ranks.pop())} if len(conv_ranks) == 1 else {})}
    extra = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args), "studio.format": NAME,
             "studio.export_method": f"LyCORIS layout (LoCon: {', '.join(af.methods)}, exact)"}
    return plain_write(af, path, opts, NAME, lambda packed, layout: (kohya.to_tensors(packed, layout), {}), extra,
                       header="kohya")
