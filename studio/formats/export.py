"""``save(adapter_file, path, format)``: write an AdapterFile as native, kohya, diffusers or (LM) peft.

kohya and diffusers files are plain LoRAs (``lowrank``): exact for low-rank methods (PiSSA /
MiLoRA at rank <= 2r), exact for SVF and dense methods at full rank, otherwise truncated to
``rank`` or an ``energy`` threshold with the retained energy reported and stored. Nothing is written until the whole file
is built; the write itself is atomic (``files.write``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch.nn as nn

from studio.adapters.registry import get
from studio.errors import StudioError
from studio.formats import diffusers_lora, files, kohya, lycoris, native
from studio.formats.adapter_file import AdapterFile, normalise_models
from studio.formats.lowrank import DTYPES, Factors, Policy, conv_kernels, pack, summarise, to_lowrank
from studio.formats.metadata import export_metadata

FORMATS = ("kohya", "diffusers", "native", "peft")


class ExportReport(NamedTuple):
    path: str
    format: str
    dtype: str
    alpha: float | None
    ranks: list[int]                 # distinct ranks in the file
    modules: dict[str, int]          # component -> module count
    energy: float                    # retained fraction of sum ||dW||_F^2 (1.0 when exact)
    relative_error: float            # ||dW - dW_file||_F / ||dW||_F over all modules
    per_module: dict[str, float]     # '<component>.<path>' -> retained energy
    notes: list[str]                 # what was adjusted (fp16 rescaling, ...)
    sha256: str                      # data-section hash (= sshs_model_hash)


def plain_lora(af: AdapterFile, policy: Policy, models: dict[str, nn.Module] | None = None
               ) -> tuple[dict[str, dict[str, Factors]], dict]:
    """Every part as plain-LoRA factors under the policy, with the energy summary."""
    models = normalise_models(models or {})
    factors = {c: to_lowrank(part, policy, models.get(c), c) for c, part in af.parts.items()}
    return factors, summarise(factors)


def save(af: AdapterFile, path: str | os.PathLike, format: str = "native", *, rank: int | None = None,
         energy: float | None = None, dtype: str | None = None, models: dict[str, nn.Module] | None = None,
         unet_layout: str | None = None, overwrite: bool = False) -> ExportReport:
    """Write ``af`` to ``path``. ``models`` (the base) is needed to turn methods that depend on the base weight
    (SVF, DoRA, (IA)^3) into a plain LoRA; when given, it also decides which modules are convolutions."""
    if format == "peft":  # language models: a folder of adapter_model.safetensors + adapter_config.json
        from studio.formats.peft_lm import save_peft

        if rank is not None and energy is not None:
            raise StudioError("give --rank or --energy, not both")
        modules, alpha, summary, digest, notes = save_peft(af, path, plain_lora, rank=rank, energy=energy,
                                                           dtype=dtype, models=models, overwrite=overwrite)
        ranks = sorted({int(d.shape[0]) for d, _ in modules.values()})
        return ExportReport(str(path), format, dtype or "fp32", alpha, ranks, af.module_counts(), summary["energy"],
                            summary["relative_error"], summary["per_module"], notes, digest)
    if format not in FORMATS:
        raise StudioError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
    if rank is not None and energy is not None:
        raise StudioError("give --rank or --energy, not both")
    target = files.check_target(path, overwrite)
    stem = Path(path).stem
    if format == "native":
        if rank is not None or energy is not None:
            raise StudioError("--format native keeps the adapter exactly: --rank / --energy apply to kohya and "
                              "diffusers exports")
        if dtype not in (None, "fp32"):
            raise StudioError("--format native is written in fp32 (exact resume and mixing): use --format kohya "
                              "for a half-precision file")
        tensors, layout = native.to_tensors(af)
        meta = export_metadata(af.metadata, base=af.base, fmt="native", stem=stem, methods=af.methods)
        meta.update(layout)
        digest = files.write(target, tensors, meta, overwrite=overwrite)
        return ExportReport(str(target), format, "fp32", None, [], af.module_counts(), 1.0, 0.0, {}, [], digest)

    if af.base == "lm":
        raise StudioError(f"{format} files hold Stable Diffusion adapters; language-model adapters export with "
                          f"--format peft or native")
    dtype = dtype or "fp16"
    if dtype not in DTYPES:
        raise StudioError(f"unknown --dtype {dtype!r}: choose fp16, bf16 or fp32")
    layout = unet_layout or ("sgm" if af.base == "sdxl" else "diffusers")
    if layout not in ("sgm", "diffusers"):
        raise StudioError(f"unknown UNet layout {layout!r}: choose sgm or diffusers")
    if format == "kohya" and rank is None and energy is None and lycoris.writes(af):
        return _save_lycoris(af, target, stem, dtype, layout, models, overwrite)
    policy = Policy(rank, energy)
    factors, summary = plain_lora(af, policy, models)
    # convolutions as 4-D kernels: from the models when given, else the stored LoCon kernels or the family rule
    packed = conv_kernels(pack(factors, DTYPES[dtype]), af.base, normalise_models(models or {}), af.parts)
    if format == "kohya":
        tensors, extra = kohya.to_tensors(packed, layout), {}
    else:
        tensors, extra = diffusers_lora.to_tensors(packed)
    ranks = sorted({int(d.shape[0]) for mods in packed.modules.values() for d, _ in mods.values()})
    meta = export_metadata(af.metadata, base=af.base, fmt=format, stem=stem, methods=af.methods, ranks=set(ranks),
                           alpha=packed.alpha, dtype=dtype, policy=policy.describe(),
                           summary=None if policy.exact else summary,
                           sgm=format == "kohya" and layout == "sgm")
    if policy.exact:
        meta["studio.energy_retained_total"] = f"{summary['energy']:.6f}"
    meta.update(extra)
    digest = files.write(target, tensors, meta, overwrite=overwrite)
    return ExportReport(str(target), format, dtype, packed.alpha, ranks, af.module_counts(), summary["energy"],
                        summary["relative_error"], summary["per_module"], packed.notes, digest)


def default_energy(af: AdapterFile, format: str) -> float | None:
    """The energy a plain-LoRA export keeps when neither rank nor energy is given: the smallest of the
    methods' ``TRAITS.default_energy``; None (exact) when every method is exact, or when the file keeps
    its LyCORIS layout (a kohya export of DoRA)."""
    if format == "native" or (format == "kohya" and lycoris.writes(af)):
        return None
    energies = [get(p.method).TRAITS.default_energy for p in af.parts.values()]
    energies = [e for e in energies if e is not None]
    return min(energies) if energies else None


def _save_lycoris(af: AdapterFile, target, stem: str, dtype: str, layout: str, models, overwrite: bool) -> ExportReport:
    """A kohya file in LyCORIS's layout (DoRA's dora_scale, LoHa, LoKr, full): exact, no base needed."""
    tensors = lycoris.to_tensors(af, dtype, layout, normalise_models(models or {}))
    ranks = sorted({int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight")}
                   or {r for p in af.parts.values() for r in (p.config.get("rank"), p.config.get("conv_rank")) if r})
    meta = export_metadata(af.metadata, base=af.base, fmt="kohya", stem=stem, methods=af.methods, ranks=set(ranks),
                           alpha=None, dtype=dtype, sgm=layout == "sgm")
    meta.update({"ss_network_module": "lycoris.kohya", "studio.export_method": f"LyCORIS layout ({', '.join(af.methods)}, exact)",
                 "ss_network_args": json.dumps({k: v for p in af.parts.values()
                                                for k, v in get(p.method).LYCORIS_ARGS.items()})})
    if len(ranks) == 1:
        alphas = {float(t) for k, t in tensors.items() if k.endswith(".alpha")}
        meta["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    digest = files.write(target, tensors, meta, overwrite=overwrite)
    return ExportReport(str(target), "kohya", dtype, None, ranks, af.module_counts(), 1.0, 0.0, {}, [], digest)
