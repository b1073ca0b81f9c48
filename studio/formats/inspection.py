"""``inspect_file``: what an adapter file is, as a dict (``--json``) or as text."""

from __future__ import annotations

import json
import os
from pathlib import Path

from studio.adapters.registry import get
from studio.formats import files
from studio.formats.adapter_file import AdapterFile
from studio.formats.load import read
from studio.formats.metadata import top_tags, trigger_words
from studio.formats.names import FAMILY_NAMES


def _ranks(af: AdapterFile) -> dict[str, list]:
    stored = af.source.get("ranks")
    out = {}
    for component, part in af.parts.items():
        mine = sorted({r for k, r in (stored or {}).items() if k.startswith(component + ".")})
        if mine:
            out[component] = mine
        elif not get(part.method).TRAITS.has_rank:
            out[component] = [f"none ({get(part.method).TRAITS.summary})"]
        else:
            out[component] = [part.config.get("rank")]
    return out


def _alphas(af: AdapterFile) -> dict[str, list]:
    stored = af.source.get("alphas")
    out = {}
    for component, part in af.parts.items():
        if stored:
            out[component] = sorted({a for k, a in stored.items() if k.startswith(component + ".")})
        elif "alpha" in part.config:
            alpha = part.config["alpha"]
            out[component] = [alpha if alpha is not None else part.config.get("rank")]
    return out


def inspect_file(path: str | os.PathLike) -> dict:
    af = read(path)
    header = af.source.get("header", {})
    digest = files.data_hash(path)
    stored = header.get("sshs_model_hash")
    fmt = af.source["format"]
    if fmt == "kohya" and af.source.get("unet_layout") == "sgm":
        fmt = "kohya (SGM UNet names)"
    return {
        "path": str(path),
        "format": fmt,
        "base": af.base,
        "base_name": FAMILY_NAMES[af.base],
        "methods": {c: p.method for c, p in af.parts.items()},
        "kinds": {c: get(p.method).TRAITS.kind for c, p in af.parts.items()},
        "options": {c: p.config for c, p in af.parts.items()},
        "ranks": _ranks(af),
        "alphas": _alphas(af),
        "modules": af.module_counts(),
        "dtypes": af.source.get("dtypes", []),
        "tensors": af.source.get("tensor_count"),
        "size_bytes": Path(path).stat().st_size,
        "trigger_words": trigger_words(af.metadata),
        "top_tags": top_tags(af.metadata),
        "hash": {"sha256": digest, "short": digest[:12], "in_metadata": stored,
                 "matches": None if stored is None else stored == digest},
        "metadata": header,
    }


def render_text(info: dict) -> str:
    lines = [f"file:      {info['path']} ({info['size_bytes']:,} bytes, {info['tensors']} tensors, "
             f"{'/'.join(info['dtypes'])})",
             f"format:    {info['format']}",
             f"base:      {info['base_name']} ({info['base']})"]
    for component, method in info["methods"].items():
        ranks = ", ".join(str(r) for r in info["ranks"].get(component, []))
        alphas = ", ".join(f"{a:g}" if isinstance(a, (int, float)) else str(a) for a in info["alphas"].get(component, []))
        lines.append(f"  {component:5s} {method:6s} {info['modules'][component]:4d} modules, rank {ranks}"
                     + (f", alpha {alphas}" if alphas else ""))
    lines.append(f"trigger:   {', '.join(info['trigger_words']) or '-'}")
    lines.append(f"top tags:  {', '.join(f'{t} ({n})' for t, n in info['top_tags']) or '-'}")
    h = info["hash"]
    check = {None: "not in metadata", True: "matches metadata", False: f"metadata says {h['in_metadata']}: stale"}
    lines.append(f"sha256:    {h['sha256']} (short {h['short']}; {check[h['matches']]})")
    if info["metadata"]:
        lines.append("metadata:")
        for key in sorted(info["metadata"]):
            value = info["metadata"][key]
            if len(value) > 200:
                value = value[:200] + f"... ({len(value)} chars)"
            lines.append(f"  {key} = {value}")
    return "\n".join(lines)


def render_json(info: dict) -> str:
    return json.dumps(info, indent=2, sort_keys=True, default=str)
