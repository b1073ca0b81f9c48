"""What every layout's ``write`` shares: the options it is given, the report it returns, and the plain-LoRA
form of an adapter (the one thing kohya, diffusers and PEFT files hold).

    write(af, path, WriteOptions) -> ExportReport          (one function per layout module, see layouts.py)

``plain_write`` is the whole of a plain-LoRA Stable Diffusion write (kohya, diffusers): factors under
the policy, packed into the file dtype, convolutions in their 4-D layout, metadata, atomic write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch.nn as nn

from studio.errors import StudioError
from studio.formats import files
from studio.formats.adapter_file import AdapterFile, normalise_models
from studio.formats.lowrank import Factors, Policy, summarise, to_lowrank
from studio.formats.packing import DTYPES, conv_kernels, pack
from studio.formats.metadata import export_metadata


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


@dataclass(frozen=True)
class WriteOptions:
    rank: int | None = None
    """Keep the R largest singular values per module (plain-LoRA layouts)."""
    energy: float | None = None
    """Keep per module the fewest components retaining this fraction of ||dW||^2."""
    dtype: str | None = None
    """fp16 | bf16 | fp32; None = the layout's default."""
    models: dict[str, nn.Module] = field(default_factory=dict)
    """The base models ({component: model}, normalised), when given."""
    unet_layout: str | None = None
    """SDXL kohya UNet names: sgm | diffusers; None = sgm on SDXL."""
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.rank is not None and self.energy is not None:
            raise StudioError("give --rank or --energy, not both")
        object.__setattr__(self, "models", normalise_models(self.models or {}))

    @property
    def policy(self) -> Policy:
        return Policy(self.rank, self.energy)

    @property
    def exact(self) -> bool:
        return self.rank is None and self.energy is None


def plain_lora(af: AdapterFile, policy: Policy, models: dict[str, nn.Module] | None = None
               ) -> tuple[dict[str, dict[str, Factors]], dict]:
    """Every part as plain-LoRA factors under the policy, with the energy summary."""
    models = normalise_models(models or {})
    factors = {c: to_lowrank(part, policy, models.get(c), c) for c, part in af.parts.items()}
    return factors, summarise(factors)


def sd_dtype_and_layout(af: AdapterFile, opts: WriteOptions, fmt: str) -> tuple[str, str]:
    """The file dtype (default fp16) and SDXL UNet naming of a Stable Diffusion layout, checked."""
    if af.base == "lm":
        raise StudioError(f"{fmt} files hold Stable Diffusion adapters; language-model adapters export with "
                          f"--format peft or native")
    dtype = opts.dtype or "fp16"
    if dtype not in DTYPES:
        raise StudioError(f"unknown --dtype {dtype!r}: choose fp16, bf16 or fp32")
    layout = opts.unet_layout or ("sgm" if af.base == "sdxl" else "diffusers")
    if layout not in ("sgm", "diffusers"):
        raise StudioError(f"unknown UNet layout {layout!r}: choose sgm or diffusers")
    return dtype, layout


def plain_write(af: AdapterFile, path, opts: WriteOptions, fmt: str,
                to_tensors: Callable[[object, str], tuple[dict, dict]], extra: dict[str, str] | None = None,
                header: str | None = None) -> ExportReport:
    """``af`` as a plain LoRA in layout ``fmt``: ``to_tensors(packed, unet_layout) -> (tensors, header fields)``;
    the ``ss_*`` header fields are those of layout ``header`` (default ``fmt``), then ``extra``."""
    header = header or fmt
    target = files.check_target(path, opts.overwrite)
    dtype, layout = sd_dtype_and_layout(af, opts, fmt)
    policy = opts.policy
    factors, summary = plain_lora(af, policy, opts.models)
    # convolutions as 4-D kernels: from the models when given, else the stored LoCon kernels or the family rule
    packed = conv_kernels(pack(factors, DTYPES[dtype]), af.base, opts.models, af.parts)
    tensors, fields = to_tensors(packed, layout)
    ranks = sorted({int(d.shape[0]) for mods in packed.modules.values() for d, _ in mods.values()})
    meta = export_metadata(af.metadata, base=af.base, fmt=header, stem=Path(path).stem, methods=af.methods,
                           ranks=set(ranks), alpha=packed.alpha, dtype=dtype, policy=policy.describe(),
                           summary=None if policy.exact else summary, sgm=header == "kohya" and layout == "sgm")
    if policy.exact:
        meta["studio.energy_retained_total"] = f"{summary['energy']:.6f}"
    meta.update(fields)
    meta.update(extra or {})
    digest = files.write(target, tensors, meta, overwrite=opts.overwrite)
    return ExportReport(str(target), fmt, dtype, packed.alpha, ranks, af.module_counts(), summary["energy"],
                        summary["relative_error"], summary["per_module"], packed.notes, digest)
