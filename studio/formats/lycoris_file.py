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
"""

from __future__ import annotations

import json

from studio.adapters.registry import get
from studio.errors import StudioError
from studio.formats import kohya, lycoris
from studio.formats.adapter_file import AdapterFile
from studio.formats.writing import ExportReport, WriteOptions, plain_write

NAME = "lycoris"
PREFIX = "lycoris_"


def looks_like(tensors: dict, metadata: dict[str, str]) -> bool:
    return bool(tensors) and all(k.startswith(PREFIX) for k in tensors)


# where a text encoder's module paths start (CLIPTextModel[WithProjection] / CLIPTextTransformer), with _ for dots
TEXT_ENCODER_STARTS = ("text_model_", "encoder_layers_", "embeddings_", "final_layer_norm", "text_projection")


def read(tensors: dict, metadata: dict[str, str], where: str) -> AdapterFile:
    # The generic wrapper names whatever module it wraps; SimpleTuner wraps the UNet, and ComfyUI reads lycoris_
    # as UNet names only: a wrapped text encoder would silently miss every layer there, so it is refused here
    te = sorted(k for k in tensors if k[len(PREFIX):].startswith(TEXT_ENCODER_STARTS))
    if te:
        raise StudioError(f"{where}: key '{te[0]}' names a text-encoder module under the lycoris_ prefix, which "
                          f"SimpleTuner and ComfyUI use for UNet modules only: rename the text encoder's keys to "
                          f"lora_te_<path> (lora_te1_ / lora_te2_ on SDXL), the kohya names every tool reads")
    renamed = {"lora_unet_" + k[len(PREFIX):]: v for k, v in tensors.items()}
    af = kohya.read(renamed, metadata, where)
    af.source["format"] = "lycoris (lycoris_ UNet names)"
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
