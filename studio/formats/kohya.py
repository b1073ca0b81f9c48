"""The kohya sd-scripts layout (``networks.lora``): what AUTOMATIC1111, Forge, ComfyUI, diffusers,
kohya and InvokeAI all load.

Per adapted Linear ``N`` (``lora_unet_...``, ``lora_te_...``, SDXL ``lora_te1_`` / ``lora_te2_``):

    N.lora_down.weight  (r_N, in)      N.lora_up.weight  (out, r_N)      N.alpha  ()

    dW_N = (alpha / r_N) * lora_up @ lora_down        alpha missing or 0 means alpha = r_N

A 1x1 convolution (SD1.5's ``proj_in`` / ``proj_out``) stores ``lora_down (r_N, in, 1, 1)`` and
``lora_up (out, r_N, 1, 1)``; reading squeezes the kernel dims, writing restores them for the
modules ``packing.conv_kernels`` marks; k x k LoCon kernels keep their down kernel (r, in, kh, kw).
A Tucker LoCon (LyCORIS's ``use_tucker``, ``lora_mid (r, r, kh, kw)`` between a 1x1 down and up) is
read as that down kernel, the core folded into it exactly (``lycoris.fold_tucker``).

Writing uses one alpha for the file (``packing.pack``) and, on SDXL, SGM UNet names by default
(one layout per file, never mixed). Reading accepts SD1.5 and SDXL in both UNet layouts and turns
the file into plain-LoRA parts (A = lora_down, B = lora_up, alpha -> the LoRA config's alpha).

LyCORIS's modules in the same names (DoRA's ``dora_scale``, LoHa's ``hada_*``, LoKr's ``lokr_*``,
full's ``diff`` / ``diff_b``: any registered method's ``LYCORIS_MARKER``) are handed whole to that
method's ``from_lycoris`` through ``formats.lycoris``, which checks their keys; a module carrying
two methods' markers is refused, and one file component holds one method.

Pivotal tuning's embedding rides along as A1111's bundled keys (``bundle_emb.<token>.*``, the layout in
``formats.embedding``): reading checks them against the LoRA's base and keeps them in
``af.source["embeddings"]`` (the layer parts stay the LoRA alone); writing an AdapterFile whose source
holds embeddings writes them back, so a re-export keeps the bundle.
"""

from __future__ import annotations

import torch

from studio.errors import StudioError
from studio.formats.adapter_file import AdapterFile, guess_family
from studio.formats import embedding, files, lycoris
from studio.formats.lowrank import check_pair, lora_part
from studio.formats.packing import Packed
from studio.formats.names import canonical_te_path, is_sgm, kohya_name, sgm_to_diffusers, split_kohya_name
from studio.formats.refuse import refuse_leftovers, refuse_unsupported
from studio.formats.writing import ExportReport, WriteOptions, plain_write

NAME = "kohya"
PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
EMBEDDINGS = "embeddings"
"""``AdapterFile.source`` key of the bundled embeddings (``embedding.Embedding``), read and written here."""
TUCKER = "lora_mid.weight"  # LyCORIS's Tucker core of a k x k LoCon, folded into lora_down on reading


def scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """alpha in the file's dtype when that is exact (every loader calls .item()), else fp32."""
    t = torch.tensor(value, dtype=dtype)
    return t if float(t) == value else torch.tensor(value, dtype=torch.float32)


def to_tensors(packed: Packed, unet_layout: str = "diffusers") -> dict[str, torch.Tensor]:
    out = {}
    for component, modules in packed.modules.items():
        for path, (down, up) in modules.items():
            name = kohya_name(component, path, unet_layout)
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up
            out[f"{name}.alpha"] = scalar(packed.alpha, down.dtype)
    return out


def looks_like(tensors: dict, metadata: dict[str, str]) -> bool:
    return (any(k.startswith(PREFIXES) for k in tensors)
            and all(k.startswith(PREFIXES) or embedding.is_bundled(k) for k in tensors))


def keeps_exactly(af: AdapterFile) -> bool:
    """Without --rank / --energy, LyCORIS kinds are written in their own (exact) layout in kohya names."""
    return lycoris.writes(af)


def write(af: AdapterFile, path, opts: WriteOptions) -> ExportReport:
    bundled = af.source.get(EMBEDDINGS) or []
    bundle = embedding.bundle_tensors(bundled, str(path))  # checked before anything is written
    embedding.check_bundle_fits(bundled, _text_widths(af.base, af.parts))
    if opts.exact and lycoris.writes(af):
        report = lycoris.write(af, path, opts)
        if not bundle:
            return report
        # LyCORIS's writer knows no bundle: add it to the file just written (one more atomic write)
        tensors, metadata = files.read(report.path)
        return report._replace(sha256=files.write(report.path, tensors | bundle, metadata, overwrite=True))
    return plain_write(af, path, opts, NAME, lambda packed, layout: (to_tensors(packed, layout) | bundle, {}))


def _text_widths(family: str, parts: dict) -> dict[str, int | None]:
    """The widths of the base's text encoders, which a bundled embedding must have: the standard ones of SD1.5 /
    SDXL; on a custom-size base (the mini base) what the LoRA's text-encoder factors say (None: no such factor)."""
    if family in embedding.STANDARD_WIDTHS:
        return embedding.STANDARD_WIDTHS[family]
    components = ["te1", "te2"] if "te1" in parts or "te2" in parts else ["te"]
    return {c: next((int(t.shape[-1]) for k, t in parts[c].tensors.items() if k.endswith("_proj.A")), None)
            if c in parts else None for c in components}


def read(tensors: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> AdapterFile:
    methods_by_marker = lycoris.markers()  # DoRA's dora_scale, LoHa's hada_*, ...: read through the method's own hooks
    bundled = embedding.read_bundle(tensors, where)  # pivotal tuning's token, checked against the base below
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    tensors = {k: v for k, v in tensors.items() if not embedding.is_bundled(k)}
    refuse_unsupported(tensors, where, allowed=(*methods_by_marker, TUCKER))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    leftovers = []
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix not in (*SUFFIXES, TUCKER, *methods_by_marker) or split_kohya_name(name) is None:
            leftovers.append(key)
        else:
            grouped.setdefault(name, {})[suffix] = value
    refuse_leftovers(leftovers, where, "kohya")
    # a Tucker LoCon (plain or under DoRA's dora_scale) is the plain LoCon pair its core holds, exactly
    grouped = {name: lycoris.fold_tucker(parts, where, name) for name, parts in grouped.items()}
    owners = {n: sorted({methods_by_marker[s] for s in d if s in methods_by_marker}) for n, d in grouped.items()}
    several = sorted(n for n, ms in owners.items() if len(ms) > 1)
    if several:
        name = several[0]
        keys = [f"{m} ({', '.join(sorted(s for s in grouped[name] if methods_by_marker.get(s) == m))})"
                for m in owners[name]]
        raise StudioError(f"{where}: module '{name}' mixes the keys of {' and '.join(keys)}: "
                          f"the studio reads one method per module (DoRA on LoHa / LoKr is not supported yet): "
                          f"re-export the file with one method per module")
    # a module with a method's marker is that method's to check (from_lycoris); the rest are plain LoRAs
    incomplete = sorted(n for n, d in grouped.items()
                        if not owners[n] and not {"lora_down.weight", "lora_up.weight"} <= d.keys())
    if incomplete:
        raise StudioError(f"{where}: modules without both lora_down and lora_up: {', '.join(incomplete[:8])}: "
                          f"the file is damaged or incomplete")

    components: dict[str, dict[str, tuple]] = {}
    lycoris_modules: dict[str, dict[str, dict]] = {}  # component -> path -> stored tensors
    methods: dict[str, set] = {}
    layouts, unmapped = set(), []
    for name, parts in sorted(grouped.items()):
        component, path = split_kohya_name(name)
        if component == "unet" and is_sgm(path):
            layouts.add("sgm")
            mapped = sgm_to_diffusers(path)
            if mapped is None:
                unmapped.append(name)
                continue
            path = mapped
        elif component == "unet":
            layouts.add("diffusers")
        else:
            path = canonical_te_path(path)
        if path in components.get(component, {}) or path in lycoris_modules.get(component, {}):
            raise StudioError(f"{where}: two kohya names map to module '{component}.{path}' (one is '{name}'): "
                              f"the file mixes naming layouts; re-export it with one layout")
        method = owners[name][0] if owners[name] else None  # None: plain LoRA
        methods.setdefault(component, set()).add(method)
        if method is not None:
            lycoris_modules.setdefault(component, {})[path] = parts
            continue
        down, up = check_pair(where, name, parts["lora_down.weight"], parts["lora_up.weight"])
        r = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else 0.0
        alpha = alpha if alpha != 0.0 else float(r)
        components.setdefault(component, {})[path] = (down, up, alpha)
    if unmapped:
        raise StudioError(f"{where}: SGM UNet names that name no module of an SDXL UNet: {', '.join(unmapped[:8])}: "
                          f"the file is for another model (a refiner, an SD 2 / SD3 UNet) or damaged")
    if layouts == {"sgm", "diffusers"}:
        raise StudioError(f"{where} mixes SGM (input_blocks) and diffusers (down_blocks) UNet names: loaders "
                          f"disagree on such files (diffusers drops the SGM half); re-export it with one layout")

    mixed = sorted(c for c, ms in methods.items() if len(ms) > 1)
    if mixed:
        kinds = sorted(m or "plain LoRA" for m in methods[mixed[0]])
        raise StudioError(f"{where}: component(s) {mixed} mix {' and '.join(kinds)} modules: the studio keeps one "
                          f"method per component; re-export the file with one method")
    parts = {c: lora_part(mods) for c, mods in components.items()}
    stored = {c: {p: (int(d.shape[0]), alpha) for p, (d, _, alpha) in mods.items()} for c, mods in components.items()}
    for c, mods in lycoris_modules.items():
        parts[c], stored[c] = lycoris.part(next(iter(methods[c])), mods, where, c)
    hint = metadata.get("studio.base")
    if hint is None and metadata.get("ss_base_model_version", "").startswith("sdxl"):
        hint = "sdxl"
    if "te1" in parts and "te2" not in parts and hint != "sdxl" and "te" not in parts:
        if "unet" not in parts or guess_family({"unet": parts["unet"]}) != "sdxl":
            # an SD1.x file written with lora_te1_ (diffusers' convert_state_dict_to_kohya does that)
            parts["te"], stored["te"] = parts.pop("te1"), stored.pop("te1")
    family = guess_family(parts, hint)
    if family == "sdxl" and "te" in parts:
        if "te1" in parts:
            raise StudioError(f"{where} has both lora_te_ and lora_te1_ modules: re-export it with one prefix")
        parts["te1"] = parts.pop("te")  # ComfyUI reads lora_te_ as CLIP-L on SDXL; so do we
        stored["te1"] = stored.pop("te")
    ranks = {f"{c}.{p}": r for c, mods in stored.items() for p, (r, _) in mods.items() if r is not None}
    alphas = {f"{c}.{p}": a if a is not None else float(r) for c, mods in stored.items() for p, (r, a) in mods.items()
              if a is not None or r is not None}
    source = {"format": "kohya", "unet_layout": (layouts or {"none"}).pop(), "ranks": ranks, "alphas": alphas,
              "dtypes": dtypes}
    if bundled:
        embedding.check_bundle_fits(bundled, _text_widths(family, parts))
        source[EMBEDDINGS] = bundled
    return AdapterFile(family, parts, source=source)
