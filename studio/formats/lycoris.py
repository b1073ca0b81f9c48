"""LyCORIS's per-module tensors inside kohya files (``lora_unet_*`` / ``lora_te*_`` names).

A method that LyCORIS also implements declares, in its own module,

    LYCORIS_MARKER                 the key suffix(es) that identify it in a file (DoRA: ``dora_scale``;
                                   LoHa: any ``hada_*``); a module carrying them is handed whole to
    from_lycoris(stored, where)    (config fields, canonical tensors) of one module: it checks its own
                                   keys (missing factors, foreign keys, Tucker cores); ``fields["kernel"]``
                                   may tell the kernel the stored tensors show (not a config field)
    to_lycoris(cfg, state[, kernel][, path])   {LyCORIS key suffix: tensor} of one module, canonical shapes
                                   (told the module's kernel, None off convolutions, and its path when it takes them)
    LYCORIS_CONV                   {key: "kernel" | "1x1"}: how a 2-D tensor of that key is stored on a
                                   convolution (reshaped to the kernel, or given 1x1 dims); others stay
    LYCORIS_ARGS                   the kohya ``ss_network_args`` a file of it carries
    uniform(entries, kernels, where)   optional: one component's modules as one config (ranks, factors)

and this module does the rest: kohya names, the 4-D layout of convolutions, the file dtype, and
turning one file's modules into one Part (``lowrank.uniform_part``, with each module's kernel as
the tensors show it or, for the UNet, as its names tell). reference/lycoris.md has the layouts.
"""

from __future__ import annotations

import inspect
import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from studio.adapters.lokr_shapes import paths_rule
from studio.adapters.registry import METHODS, get, make_config
from studio.errors import StudioError
from studio.formats import files
from studio.formats.adapter_file import AdapterFile, Part
from studio.formats.lowrank import uniform_part
from studio.formats.packing import DTYPES, kernel_of, stored_kernels
from studio.formats.metadata import export_metadata
from studio.formats.names import canonical_te_path, is_sgm, kohya_name, sgm_to_diffusers, split_kohya_name
from studio.formats.writing import ExportReport, WriteOptions, sd_dtype_and_layout


def markers() -> dict[str, str]:
    """{key suffix: method} of every registered method with a LyCORIS layout."""
    out = {}
    for name, m in METHODS.items():
        marker = getattr(m, "LYCORIS_MARKER", ())
        out.update(dict.fromkeys((marker,) if isinstance(marker, str) else marker, name))
    return out


def writes(af: AdapterFile) -> bool:
    """Whether every part has a LyCORIS layout (then a kohya export keeps it exactly)."""
    return all(hasattr(get(p.method), "to_lycoris") for p in af.parts.values())


def _conv_layout(rule: str | None, t: torch.Tensor, kernel: tuple[int, int] | None) -> torch.Tensor:
    if kernel is None or t.dim() != 2 or rule is None:
        return t
    if rule == "kernel":
        return t.reshape(t.shape[0], -1, *kernel)     # (r, in, kh, kw), a full delta (out, in, kh, kw), ...
    return t[:, :, None, None]                        # "1x1": up (out, r, 1, 1), dora_scale (out, 1, 1, 1)


def to_tensors(af: AdapterFile, dtype: str, layout: str, models: dict[str, nn.Module] | None = None) -> dict:
    models, stored, out = models or {}, stored_kernels(af.parts), {}
    for component, part in af.parts.items():
        method, cfg = get(part.method), make_config(part.method, part.config)
        for path, tensors in part.modules().items():
            kernel = kernel_of(component, path, af.base, models.get(component), stored[component].get(path))
            name = kohya_name(component, path, layout)
            for key, t in _to_lycoris(method, cfg, tensors, kernel, path).items():
                value = _conv_layout(method.LYCORIS_CONV.get(key), t.float(), kernel).to(DTYPES[dtype])
                if not torch.isfinite(value).all():
                    raise StudioError(f"module '{component}.{path}' does not fit {dtype} (or has NaN values): export "
                                      f"with --dtype fp32")
                out[f"{name}.{key}"] = value.contiguous()
    return out


def _to_lycoris(method, cfg, tensors: dict, kernel: tuple[int, int] | None, path: str) -> dict:
    """The method's ``to_lycoris``, told the module's kernel (LoKr: what LyCORIS rebuilds) and path (a module the
    file stored in another kind) when it asks for them."""
    asks = inspect.signature(method.to_lycoris).parameters
    return method.to_lycoris(cfg, tensors, **{k: v for k, v in (("kernel", kernel), ("path", path)) if k in asks})


def fold_tucker(parts: dict[str, torch.Tensor], where: str, name: str) -> dict[str, torch.Tensor]:
    """A LoCon module with a Tucker core (LyCORIS ``use_tucker`` / the older ``use_cp`` on a k x k conv) as the
    plain LoCon pair the core holds, exactly (reference/lycoris.md 1):

        lora_down D (r, in, 1, 1)   lora_mid M (r, r, kh, kw)   lora_up U (out, r, 1, 1)
        dW[o, i, h, w] = s sum_pq U[o, p] M[p, q, h, w] D[q, i]  =  U x (M D),  s = alpha / r

    so the down kernel (r, in, kh, kw) is M D; LyCORIS runs the core with the layer's stride and padding
    after a 1x1 down (which commutes with the zero padding), as the folded kernel does. ``parts`` without
    lora_mid come back unchanged."""
    if "lora_mid.weight" not in parts:
        return parts
    mid, down, up = parts["lora_mid.weight"], parts.get("lora_down.weight"), parts.get("lora_up.weight")
    if down is None or up is None:
        raise StudioError(f"{where}: module '{name}' has a Tucker core (lora_mid) without both lora_down and "
                          f"lora_up: the file is damaged or incomplete")
    if mid.dim() != 4 or down.dim() not in (2, 4) or down.shape[2:] not in ((), (1, 1)):
        raise StudioError(f"{where}: module '{name}' has lora_mid {tuple(mid.shape)} and lora_down "
                          f"{tuple(down.shape)}: a Tucker LoCon stores the core as (r, r, kh, kw) and lora_down as "
                          f"(r, in, 1, 1): the file is damaged")
    r = down.shape[0]
    if tuple(mid.shape[:2]) != (r, r) or up.dim() < 2 or up.shape[1] != r:
        raise StudioError(f"{where}: module '{name}' has a Tucker core lora_mid of ranks {tuple(mid.shape[:2])} "
                          f"between lora_down rank {r} and lora_up rank {up.shape[1] if up.dim() > 1 else '?'}: the "
                          f"core must be (r, r, kh, kw) with the factors' rank r: the file is damaged")
    folded = torch.einsum("pqhw,qi->pihw", mid.float(), down.float().flatten(1))  # (r, in, kh, kw), in fp32
    rest = {k: v for k, v in parts.items() if k != "lora_mid.weight"}
    return {**rest, "lora_down.weight": folded}


def part(method: str, modules: dict[str, dict[str, torch.Tensor]], where: str, component: str
         ) -> tuple[Part, dict[str, tuple[int | None, float | None]]]:
    """One component's modules {path: {suffix: tensor}} of ``method`` as one Part, and each module's
    (rank, alpha) as stored (None where it has none) for ``inspect``."""
    entries, kernels, stored = {}, {}, {}
    for path, tensors in modules.items():
        fields, canonical = get(method).from_lycoris(tensors, f"{where}: module '{path}'")
        fields = dict(fields)
        seen = fields.pop("kernel", None)
        kernels[path] = seen if seen is not None else kernel_of(component, path, "sd-custom")
        stored[path] = (fields.get("rank"), fields.get("alpha"))
        entries[path] = (fields, canonical)
    return uniform_part(method, entries, where, kernels), stored


def write(af: AdapterFile, path, opts: WriteOptions, fmt: str = "kohya") -> ExportReport:
    """A kohya-named file in LyCORIS's layout (DoRA's dora_scale, LoHa, LoKr, full): exact, no base needed."""
    target = files.check_target(path, opts.overwrite)
    dtype, layout = sd_dtype_and_layout(af, opts, fmt)
    tensors = to_tensors(af, dtype, layout, opts.models)
    ranks = sorted({int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight")}
                   or {r for p in af.parts.values() for r in (p.config.get("rank"), p.config.get("conv_rank")) if r})
    meta = export_metadata(af.metadata, base=af.base, fmt="kohya", stem=Path(path).stem, methods=af.methods,
                           ranks=set(ranks), alpha=None, dtype=dtype, sgm=layout == "sgm")
    meta.update({"ss_network_module": "lycoris.kohya", "studio.format": fmt,
                 "studio.export_method": f"LyCORIS layout ({', '.join(af.methods)}, exact)",
                 "ss_network_args": json.dumps({k: v for p in af.parts.values()
                                                for k, v in get(p.method).LYCORIS_ARGS.items()})})
    if len(ranks) == 1:
        alphas = {float(t) for k, t in tensors.items() if k.endswith(".alpha")}
        meta["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    digest = files.write(target, tensors, meta, overwrite=opts.overwrite)
    return ExportReport(str(target), fmt, dtype, None, ranks, af.module_counts(), 1.0, 0.0, {}, [], digest)


# -- presets that mix kinds in one component (LyCORIS's module_algo_map / name_algo_map) --------------
# kohya_ss and LyCORIS presets can give each module class its own algorithm (LoCon on attention, LoHa or
# LoKr on the ResNet convs). A Part holds one method, so such a component is held in the kind that holds
# the others exactly, module by module (reference/lycoris.md 1-3), each module keeping its own scale s: the
# method of the highest ``HOLD_LEVEL`` present, whose ``hold(parts, where)`` re-expresses a module of a lower
# kind (LoKr and LoHa: the formulas are in their files). The file's kinds are counted in
# ``af.source["stored_kinds"]`` for inspect, and the host config records its LoCon modules (``stored_kinds``),
# which the host's ``to_lycoris`` writes back as LoCon; a LoKr beside LoHa stays LoHa.
LOCON = next(name for name, m in METHODS.items() if getattr(m, "LYCORIS_KIND", None) == "LoCon")
"""The method a plain LoRA / LoCon module reads as."""


def _level(method: str) -> int | None:
    """The method's place among the kinds a preset mixes (None: it cannot be mixed with others)."""
    return 0 if method == LOCON else getattr(get(method), "HOLD_LEVEL", None)


def module_kinds(tensors: dict) -> dict[str, dict[str, str]]:
    """{component: {kohya module name: method}} of a kohya-named file (``LOCON`` for a plain LoRA / LoCon
    module); modules with two methods' keys or with no LoRA keys are left out (the kohya reader refuses them)."""
    by_marker, grouped = markers(), {}
    for key in tensors:
        name, _, suffix = key.partition(".")
        grouped.setdefault(name, set()).add(suffix)
    out: dict[str, dict[str, str]] = {}
    for name, suffixes in grouped.items():
        split = split_kohya_name(name)
        methods = {by_marker[s] for s in suffixes if s in by_marker}
        if split is None or len(methods) > 1 or not (methods or "lora_down.weight" in suffixes):
            continue
        out.setdefault(split[0], {})[name] = methods.pop() if methods else LOCON
    return out


def mixes_kinds(tensors: dict) -> bool:
    return any(len(set(kinds.values())) > 1 for kinds in module_kinds(tensors).values())


def one_kind_per_component(tensors: dict, where: str) -> tuple[dict, dict[str, dict[str, int]], set[str]]:
    """The file's tensors with every module of a mixed component in its host kind (see above),
    {component: {kind name: modules}} as the file stores them (only for mixed components), and the kohya
    names of the LoCon modules moved into another kind."""
    out, stored, locon = dict(tensors), {}, set()
    for component, kinds in module_kinds(tensors).items():
        present = set(kinds.values())
        if len(present) < 2:
            continue
        odd = sorted(m for m in present if _level(m) is None)
        if odd:
            mixable = ", ".join(get(m).LYCORIS_KIND for m in METHODS if _level(m) is not None)
            raise StudioError(f"{where}: its {component} modules mix {' and '.join(sorted(present))}: the studio reads "
                              f"{mixable} modules mixed in one component (LyCORIS presets), not "
                              f"{', '.join(odd)} beside other kinds: re-export the file with one kind per component")
        host = max(present, key=_level)
        for name, kind in kinds.items():
            if kind != host:
                parts = {k.partition(".")[2]: out.pop(k) for k in [k for k in out if k.partition(".")[0] == name]}
                # factors back in the file's dtype when that is exact (copies of its values, ones and zeros; a
                # folded Tucker core is a new product: it stays fp32)
                dtype = None if {"lora_mid.weight", "lokr_t2"} & set(parts) else next(v.dtype for k, v in parts.items() if k != "alpha")
                where_module = f"{where}: module '{name}'"
                moved = get(host).hold(_locon_parts(parts, where_module, name, where) if kind == LOCON else parts,
                                       where_module)
                out.update({f"{name}.{k}": _in(dtype, v) for k, v in moved.items()})
                locon |= {name} if kind == LOCON else set()
        stored[component] = {get(k).LYCORIS_KIND: n for k, n in sorted(Counter(kinds.values()).items())}
    return out, stored, locon


def _in(dtype, t: torch.Tensor) -> torch.Tensor:
    """``t`` in ``dtype`` when that holds it exactly (every factor here; an alpha when representable), else as is."""
    if dtype is None:
        return t
    cast = t.to(dtype)
    return cast if t.dim() or float(cast) == float(t) else t


def record_locon(af: AdapterFile, names: set[str]) -> None:
    """Each part's ``stored_kinds``: its modules the file stored as LoCon (kohya ``names``), which --format lycoris
    writes back as LoCon (the host methods' ``to_lycoris``)."""
    paths = set()
    for name in names:
        component, path = split_kohya_name(name)
        paths.add(canonical_te_path(path) if component != "unet" else sgm_to_diffusers(path) if is_sgm(path) else path)
    for part in af.parts.values():
        mine = [p for p in part.modules() if p in paths]
        if mine:
            part.config = {**part.config, "stored_kinds": ((paths_rule(mine), get(LOCON).LYCORIS_KIND),)}


def _locon_parts(parts: dict, where_module: str, name: str, where: str) -> dict:
    """A LoCon module's tensors, Tucker core folded, checked to be nothing but a LoRA pair and its alpha."""
    parts = fold_tucker(parts, where, name)
    extra = sorted(set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"})
    if extra or "lora_up.weight" not in parts:
        raise StudioError(f"{where_module} has {', '.join(extra) or 'no lora_up.weight'} beside its LoRA factors "
                          f"(a LoCon module holds lora_down, lora_up, alpha and an optional lora_mid): the file is "
                          f"damaged")
    return parts
