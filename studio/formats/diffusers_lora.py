"""The diffusers / PEFT layout: diffusers' ``save_lora_weights`` files. diffusers-only: A1111 and
ComfyUI do not load its UNet part for SD1.5 / SDXL, so ``--format kohya`` stays the default.

    unet.<module path>.lora_A.weight (r, in)     unet.<module path>.lora_B.weight (out, r)
    text_encoder.text_model.<path>.lora_A/B.weight       text_encoder_2.<...>  (SDXL)
    header: format = pt, lora_adapter_metadata = JSON of LoraConfig kwargs per component
            ("unet.r", "unet.lora_alpha", "unet.rank_pattern", "unet.target_modules", ...)

    dW = (lora_alpha / r) lora_B @ lora_A    (alpha / sqrt(r) with use_rslora; per-module patterns)
    1x1 convolutions (SD1.5 proj_in / proj_out): lora_A (r, in, 1, 1), lora_B (out, r, 1, 1), as PEFT
    no metadata and no alphas: scale 1 (diffusers' convention)

Reading also accepts the older diffusers layouts: ``.lora.down/.lora.up.weight`` (UNet),
``.lora_linear_layer.down/up.weight`` (text encoders), attention-processor names
(``attn1.processor.to_q_lora.down.weight``) and ``<module>.alpha`` network alphas.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import torch

from studio.errors import StudioError
from studio.formats.adapter_file import AdapterFile, guess_family
from studio.formats.lowrank import check_pair, lora_part
from studio.formats.packing import Packed
from studio.formats.names import DIFFUSERS_PREFIX, TEXT_ENCODERS, canonical_te_path, with_text_model
from studio.formats.refuse import refuse_leftovers, refuse_unsupported
from studio.formats.writing import ExportReport, WriteOptions, plain_write

NAME = "diffusers"

PREFIXES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.")
_PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TE_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_FACTORS = [
    (re.compile(r"(.+)\.lora_A\.weight"), "down"), (re.compile(r"(.+)\.lora_B\.weight"), "up"),
    (re.compile(r"(.+)\.lora\.down\.weight"), "down"), (re.compile(r"(.+)\.lora\.up\.weight"), "up"),
    (re.compile(r"(.+)\.lora_linear_layer\.down\.weight"), "down"),
    (re.compile(r"(.+)\.lora_linear_layer\.up\.weight"), "up"),
]
_OLD = re.compile(r"(.+?)(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")


def to_tensors(packed: Packed) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, config = {}, {}
    for component, modules in packed.modules.items():
        if component not in DIFFUSERS_PREFIX:
            raise StudioError("the diffusers layout holds Stable Diffusion adapters only: export language-model "
                              "adapters with --format peft or native")
        prefix = DIFFUSERS_PREFIX[component]
        for path, (down, up) in modules.items():
            key = with_text_model(path) if component in TEXT_ENCODERS else path
            tensors[f"{prefix}.{key}.lora_A.weight"] = down
            tensors[f"{prefix}.{key}.lora_B.weight"] = up
        ranks = {path: int(down.shape[0]) for path, (down, _) in modules.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        config.update({
            f"{prefix}.r": r, f"{prefix}.lora_alpha": packed.alpha,
            f"{prefix}.rank_pattern": {p: k for p, k in ranks.items() if k != r}, f"{prefix}.alpha_pattern": {},
            f"{prefix}.target_modules": sorted(ranks), f"{prefix}.lora_dropout": 0.0, f"{prefix}.bias": "none",
            f"{prefix}.use_rslora": False, f"{prefix}.use_dora": False,
        })
    return tensors, {"lora_adapter_metadata": json.dumps(config, sort_keys=True)}


def looks_like(tensors: dict, metadata: dict[str, str]) -> bool:
    return bool(tensors) and all(k.split(".", 1)[0] in PREFIXES or k.startswith(_UNET_ROOTS) for k in tensors)


def keeps_exactly(af: AdapterFile) -> bool:
    return False


def write(af: AdapterFile, path, opts: WriteOptions) -> ExportReport:
    return plain_write(af, path, opts, NAME, lambda packed, layout: to_tensors(packed))


def _module_and_role(component: str, rest: str) -> tuple[str, str] | None:
    for pattern, role in _FACTORS:
        m = pattern.fullmatch(rest)
        if m:
            return m.group(1), role
    m = _OLD.fullmatch(rest)
    if m:
        table = _PROCESSOR if component == "unet" else _TE_PROCESSOR
        return f"{m.group(1)}.{table[m.group(3)]}", m.group(4)
    return None


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's rule: a pattern key applies to a module whose name ends with it."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", path):
            return value
    return default


def _scales(config: dict, paths: list[str], where: str) -> dict[str, tuple[float, bool]]:
    if config.get("use_dora"):
        raise StudioError(f"{where} is a DoRA file (use_dora in lora_adapter_metadata): DoRA is not supported; "
                          f"retrain or convert it as a plain LoRA")
    out = {}
    for path in paths:
        r = _pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", r))
        out[path] = (float(alpha), float(r), bool(config.get("use_rslora", False)))
    return out


def read(tensors: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> AdapterFile:
    refuse_unsupported(tensors, where)
    if any(k.startswith("base_model.model.") for k in tensors):
        raise StudioError(f"{where} is a PEFT adapter_model file (base_model.model.* keys): importing PEFT "
                          f"language-model adapters is not supported yet")
    found: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    leftovers = []
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        component, rest = (PREFIXES[head], rest) if head in PREFIXES else ("unet", key)
        is_alpha = rest.endswith(".alpha")
        parsed = _module_and_role(component, rest[:-len(".alpha")] if is_alpha else rest)
        if is_alpha:
            parsed = (parsed[0] if parsed else rest[:-len(".alpha")], "alpha")
        if parsed is None:
            leftovers.append(key)
            continue
        path, role = parsed
        found.setdefault((component, path), {})[role] = value
    refuse_leftovers(leftovers, where, "diffusers")
    incomplete = sorted(f"{c}.{p}" for (c, p), d in found.items() if not {"down", "up"} <= d.keys())
    if incomplete:
        raise StudioError(f"{where}: modules without both LoRA factors: {', '.join(incomplete[:8])}: "
                          f"the file is damaged or incomplete")
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "null"))
    except json.JSONDecodeError:
        raise StudioError(f"{where}: lora_adapter_metadata is not valid JSON: the file is damaged") from None

    components: dict[str, dict[str, tuple]] = {}
    for component in sorted({c for c, _ in found}):
        paths = sorted(p for c, p in found if c == component)
        sub = None
        if isinstance(config, dict):
            sub = {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(component + ".")} or None
        scales = _scales(sub, paths, where) if sub else {}
        for path in paths:
            d = found[(component, path)]
            d["down"], d["up"] = check_pair(where, f"{component}.{path}", d["down"], d["up"])
            r = d["down"].shape[0]
            if path in scales:
                alpha, r_config, rslora = scales[path]
                scale = alpha / math.sqrt(r_config) if rslora else alpha / r_config
            elif "alpha" in d and float(d["alpha"]) != 0:
                scale = float(d["alpha"]) / r
            else:
                scale = 1.0
            canonical = canonical_te_path(path) if component != "unet" else path
            components.setdefault(component, {})[canonical] = (d["down"], d["up"], scale * r)
    parts = {("unet" if c == "unet" else c): lora_part(m) for c, m in components.items()}
    two_encoders = "text_encoder_2" in parts
    unet_family = guess_family({"unet": parts["unet"]}) if "unet" in parts else None
    sdxl = two_encoders or unet_family == "sdxl" or metadata.get("studio.base") == "sdxl"
    renamed = {"unet": "unet", "text_encoder": "te1" if sdxl else "te", "text_encoder_2": "te2"}
    parts = {renamed[c]: p for c, p in parts.items()}
    family = guess_family(parts, metadata.get("studio.base"))
    ranks = {f"{renamed[c]}.{p}": int(m[0].shape[0]) for c, mods in components.items() for p, m in mods.items()}
    source = {"format": "diffusers", "ranks": ranks,
              "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})}
    return AdapterFile(family, parts, source=source)
