"""The studio's own layout: an ``AdapterFile`` saved exactly, for resuming and exact mixing.

    <component>.<module path>.<tensor>        the core's saved tensors (LoRA: A, B; PiSSA / MiLoRA:
                                              A, B, A0, B0; SVF: z, basis_hash), fp32
    prompt.prefix.key, prompt.prefix.value    a prefix (studio/prompt/prefix.py): (L, H_kv, P, d), fp32
    studio.format = native, studio.format_version = 1, studio.base = sd15 | sdxl | sd-custom | lm
    studio.adapter = {"<component>": {"method": ..., "config": {...}}, ...}   (JSON)

Only the studio reads it: PiSSA keeps its initial factors and SVF its gains on the base's
singular vectors, which no other tool understands (export those with --format kohya).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from studio.adapters import METHODS, make_config
from studio.errors import StudioError
from studio.formats import files
from studio.formats.adapter_file import AdapterFile, Part
from studio.formats.metadata import export_metadata
from studio.formats.refuse import refuse_leftovers
from studio.formats.writing import ExportReport, WriteOptions
from studio.prompt import prefix

FORMAT_VERSION = "1"
PROMPT = "prompt."
"""Key prefix of the prompt-side tensors (``AdapterFile.prompt``): ``prompt.prefix.key`` / ``.value``."""


NAME = "native"


def looks_like(tensors: dict, metadata: dict[str, str]) -> bool:
    return metadata.get("studio.format") == "native"


def keeps_exactly(af: AdapterFile) -> bool:
    return True


def write(af: AdapterFile, path, opts: WriteOptions) -> ExportReport:
    target = files.check_target(path, opts.overwrite)
    if not opts.exact:
        raise StudioError("--format native keeps the adapter exactly: --rank / --energy apply to kohya and "
                          "diffusers exports")
    if opts.dtype not in (None, "fp32"):
        raise StudioError("--format native is written in fp32 (exact resume and mixing): use --format kohya "
                          "for a half-precision file")
    tensors, layout = to_tensors(af)
    meta = export_metadata(af.metadata, base=af.base, fmt="native", stem=Path(path).stem,
                           methods=[*af.methods, *(["prefix"] if af.prompt else [])])
    meta.update(layout)
    digest = files.write(target, tensors, meta, overwrite=opts.overwrite)
    return ExportReport(str(target), NAME, "fp32", None, [], af.module_counts(), 1.0, 0.0, {}, [], digest)


def to_tensors(af: AdapterFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    layout = {c: {"method": p.method, "config": p.config} for c, p in af.parts.items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in af.tensors().items()}
    tensors |= {f"{PROMPT}{k}": v.detach().cpu().contiguous() for k, v in af.prompt.items()}  # a prefix, exactly
    return tensors, {"studio.format_version": FORMAT_VERSION, "studio.adapter": json.dumps(layout, sort_keys=True)}


def read(tensors: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> AdapterFile:
    if metadata.get("studio.format_version") != FORMAT_VERSION:
        raise StudioError(f"{where} is a native studio file of version {metadata.get('studio.format_version')!r}; "
                          f"this studio reads version {FORMAT_VERSION}: update the studio")
    try:
        layout = json.loads(metadata["studio.adapter"])
        assert isinstance(layout, dict) and all(isinstance(v, dict) for v in layout.values())
    except (KeyError, json.JSONDecodeError, AssertionError):
        raise StudioError(f"{where}: the studio.adapter header field is missing or damaged: re-export the file") from None
    parts: dict[str, Part] = {}
    for component, spec in layout.items():
        method = spec.get("method")
        if method not in METHODS:
            raise StudioError(f"{where}: component '{component}' uses unknown method {method!r}: "
                              f"this studio knows {', '.join(METHODS)}")
        try:
            config = dataclasses.asdict(make_config(method, spec.get("config") or {}))
        except StudioError as err:
            raise StudioError(f"{where}: {err}") from None
        parts[component] = Part(method, config, {})
    leftovers = []
    prompt = {k[len(PROMPT):]: v.float() for k, v in tensors.items() if k.startswith(PROMPT)}
    if prompt and set(prompt) != set(prefix.KEYS):
        raise StudioError(f"{where}: its prompt-side tensors {sorted(prompt)} are not a prefix "
                          f"({', '.join(prefix.KEYS)}): the file is damaged")
    for key, value in tensors.items():
        if key.startswith(PROMPT):
            continue
        component, _, rest = key.partition(".")
        tensor = rest.rpartition(".")[2]
        if component not in parts or tensor not in METHODS[parts[component].method].SAVED:
            leftovers.append(key)
            continue
        parts[component].tensors[rest] = value if not value.is_floating_point() else value.float()  # hashes stay bytes
    refuse_leftovers(leftovers, where, "native")
    empty = [c for c, p in parts.items() if not p.tensors]
    if empty:
        raise StudioError(f"{where}: components {empty} are declared but have no tensors: the file is damaged")
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    try:
        return AdapterFile(metadata.get("studio.base", ""), parts, source={"format": "native", "dtypes": dtypes},
                           prompt=prompt)
    except StudioError as err:
        raise StudioError(f"{where}: {err}") from None
