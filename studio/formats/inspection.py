"""``inspect_file``: what an adapter file is, as a dict (``--json``) or as text, and whether each tool loads it.

"Will it load?" is decided from the key names alone, by each tool's documented key rules
(reference/formats.md 2-4 and 6, reference/lycoris.md): a key a tool would leave unloaded is named for
that tool. OneTrainer's OMI-named files add InvokeAI's line (the one tool with an OMI path: its
``convert_from_omi``, for SDXL and Flux, chosen by the file's header). Those tools skip such keys with at
most a warning (A1111 at debug level, ComfyUI's "lora key not loaded"), except diffusers' kohya path,
which raises on any key it cannot rename and loads nothing.
The studio itself loads every key of a file it reads (or refuses the file naming the keys).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from studio.adapters.registry import get
from studio.formats import embedding, files, kohya
from studio.formats.adapter_file import AdapterFile
from studio.formats.load import read
from studio.formats.lycoris_file import OMI_FORMAT, SDXL_ARCHITECTURE
from studio.formats.metadata import top_tags, trigger_words
from studio.formats.names import FAMILY_NAMES, in_omi_sdxl_key_set, is_omi, is_sgm


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


def _prompt(af: AdapterFile) -> dict[str, dict]:
    """{"prefix": length, layers, key/value heads, head width} of a file with a prefix (prefix tuning)."""
    key = af.prompt.get("prefix.key")
    if key is None:
        return {}
    layers, heads, length, head_dim = key.shape
    return {"prefix": {"length": length, "layers": layers, "kv_heads": heads, "head_dim": head_dim}}


def _mixtures(af: AdapterFile) -> dict[str, dict]:
    """{component: experts, routing, balance, experts per block} of the parts whose method describes its
    routing (the routed mixtures' ``describe`` hook)."""
    out = {}
    for component, part in af.parts.items():
        hook = getattr(get(part.method), "describe", None)
        if hook is not None:
            out[component] = hook(part.config, part.modules())
    return out


# -- will it load? ---------------------------------------------------------------------------------
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_GLORA = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")
# the tensor names (after the module name) each UI's LyCORIS / LoRA modules consume
A1111_SUFFIXES = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight", *_HADA,
                  *_LOKR, "lokr_t1", "weight", "on_input", "diff", "diff_b", "w_norm", "b_norm", *_GLORA,
                  "oft_blocks", "oft_diag", "alpha", "scale", "bias", "dora_scale")
COMFY_SUFFIXES = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
                  "lora.up.weight", "lora.down.weight", "lora_linear_layer.up.weight", "lora_linear_layer.down.weight",
                  "lora_A.default.weight", "lora_B.default.weight", *_HADA, *_LOKR, *_GLORA, "oft_blocks", "diff",
                  "diff_b", "w_norm", "b_norm", "set_weight", "alpha", "dora_scale", "reshape_weight")
COMFY_PREFIXES = (*KOHYA_PREFIXES, "lycoris_", "diffusion_model.", "text_encoders.", "text_encoder.",
                  "text_encoder_2.", "unet.")
LORA_KEY_WORD = "lora"
"""What diffusers' loader requires in every key of a LoRA file (a key fragment, not a method's name)."""
KOHYA_LORA = ("lora_down.weight", "lora_up.weight", "alpha")
OMI_HINT = ("OMI names (unet.<SGM path>, clip_l. / clip_g.) are none of its key names: studio export FILE --format "
            "kohya -o kohya.safetensors writes the same adapter in kohya names")


def _split(key: str) -> tuple[str, str]:
    """(module name, tensor name): kohya names split at the first dot; dotted (diffusers) names at the
    tensor name a LoRA loader looks for."""
    if key.startswith(KOHYA_PREFIXES + ("lycoris_",)):
        name, _, suffix = key.partition(".")
        return name, suffix
    for suffix in sorted(COMFY_SUFFIXES, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix
    return key.rpartition(".")[0], key.rpartition(".")[2]


def _bare_te(key: str) -> bool:
    """A kohya text-encoder name without ``text_model_`` (as LyCORIS writes it from a transformers-5 CLIPTextModel):
    A1111's, ComfyUI's and sd-scripts' maps of CLIP names all start at text_model."""
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        if key.startswith(prefix):
            return not key[len(prefix):].startswith(("text_model_", "text_projection"))
    return False


def _hints(skipped: list[str], family: str) -> str:
    """Why keys were skipped, as far as their names tell."""
    hints = []
    if any(_bare_te(k) for k in skipped):
        hints.append("text-encoder names lack text_model_: rename lora_te*_encoder_... to lora_te*_text_model_encoder_...")
    if family == "sdxl" and any(k.startswith("lora_te_") for k in skipped):
        hints.append("lora_te_ names no SDXL text encoder here: use lora_te1_")
    if any(_split(k)[1] == "on_input" for k in skipped):
        hints.append("no (IA)^3")
    if any(is_omi(_split(k)[0]) for k in skipped):
        hints.append(OMI_HINT)
    return "; ".join(hints)


def _a1111(keys: list[str], family: str) -> tuple[list[str], str]:
    skipped = [k for k in keys if not k.startswith(KOHYA_PREFIXES) or _split(k)[1] not in A1111_SUFFIXES
               or (family == "sdxl" and k.startswith("lora_te_")) or _bare_te(k)]
    # SDXL's OpenCLIP attention is one MultiheadAttention: A1111 applies its q / k / v LoRA only when all
    # four projections have modules, else it skips the layer without a message
    te2 = {_split(k)[0] for k in keys if k.startswith("lora_te2_")}
    partial = []
    for name in te2:
        if name.endswith(("_q_proj", "_k_proj", "_v_proj")):
            layer = name[:-len("_q_proj")]
            if any(f"{layer}_{p}" not in te2 for p in ("q_proj", "k_proj", "v_proj", "out_proj")):
                partial += [k for k in keys if _split(k)[0] == name]
    hint = "; ".join(filter(None, [_hints(skipped, family), "SDXL TE2 attention layers need q, k, v and out_proj "
                                   "modules" if partial else ""]))
    return skipped + partial, hint


def _comfyui(keys: list[str], family: str) -> tuple[list[str], str]:
    skipped = []
    for k in keys:
        name, suffix = _split(k)
        # unet. is mapped with diffusers paths (the attention's old processor names): not current ones, not SGM (OMI)
        current_diffusers = k.startswith("unet.") and (".to_" in name and ".processor." not in name
                                                       or is_sgm(name[len("unet."):]))
        if not k.startswith(COMFY_PREFIXES) or suffix not in COMFY_SUFFIXES or current_diffusers or _bare_te(k):
            skipped.append(k)
    return skipped, _hints(skipped, family)


def _diffusers(keys: list[str], family: str) -> tuple[list[str], str]:
    if any(is_omi(_split(k)[0]) for k in keys):  # neither its kohya path nor a diffusers module / component name
        lycoris = any(_split(k)[1] not in KOHYA_LORA for k in keys)
        return keys, OMI_HINT + (" (add --rank 32: it loads plain LoRAs only)" if lycoris else "")
    dora = [k for k in keys if "dora_scale" in k]  # dropped with a warning: the rest applies as a plain LoRA
    rest = [k for k in keys if k not in dora]
    if rest and all(k.startswith(KOHYA_PREFIXES) for k in rest):
        unrenamed = [k for k in rest if _split(k)[1] not in KOHYA_LORA]
        if unrenamed:
            return keys, (f"its kohya path raises on {len(unrenamed)} key(s) it cannot rename and loads nothing; "
                          f"studio export FILE --format kohya --rank 32 -o plain.safetensors writes a plain LoRA it loads")
        return dora, "drops DoRA's dora_scale: applies the plain LoRA part only" if dora else ""
    if not all(LORA_KEY_WORD in k for k in rest):
        return keys, "not a LoRA file to diffusers ('Invalid LoRA checkpoint'): export with --format kohya"
    stray = [k for k in rest if not k.startswith(("unet.", "text_encoder.", "text_encoder_2."))]
    return dora + stray, ""


def _kohya(keys: list[str], family: str) -> tuple[list[str], str]:
    """sd-scripts' networks.lora (resuming, merging): lora_down / lora_up / alpha only; its SDXL UNet has
    SGM names and its SD1.x UNet diffusers names."""
    wrong_unet = "lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_"
    if family != "sdxl":
        wrong_unet = "lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_"
    skipped = [k for k in keys if not k.startswith(KOHYA_PREFIXES) or _split(k)[1] not in KOHYA_LORA
               or k.startswith(wrong_unet) or (family == "sdxl" and k.startswith("lora_te_")) or _bare_te(k)]
    hints = [_hints(skipped, family),
             "networks.lora reads plain LoRA modules only" if any(_split(k)[1] not in KOHYA_LORA for k in skipped) else "",
             "its UNet names are " + ("SGM (input_blocks)" if family == "sdxl" else "diffusers (down_blocks)")
             if any(k.startswith(wrong_unet) for k in skipped) else ""]
    return skipped, "; ".join(filter(None, hints))


def _invokeai_omi(keys: list[str], family: str, header: dict[str, str]) -> tuple[list[str], str]:
    """InvokeAI's OMI path: a file is OMI by OneTrainer's header (its omi_format branch); an SDXL one is renamed by
    OMI's SDXL key set to kohya names, a key of any other module dropped, and that renaming keeps the dot only
    before a two-part tensor name (lora_down.weight) or alpha / dora_scale."""
    arch = header.get("modelspec.architecture", "")
    if not (header.get("modelspec.sai_model_spec") and header.get("ot_branch") == "omi_format"
            and arch.endswith("/lora")):
        return keys, ("takes a file as OMI only by the header of OneTrainer's omi_format branch (modelspec.sai_model_spec,"
                      " ot_branch = omi_format, modelspec.architecture = <base>/lora), which this file lacks; what its "
                      "other LoRA probes make of OMI names is not checked here")
    if arch != f"{SDXL_ARCHITECTURE}/lora":
        return keys, f"converts OMI files of SDXL and Flux only (this header says {arch})"
    outside = [k for k in keys if not in_omi_sdxl_key_set(_split(k)[0])]
    one_part = [k for k in keys if "." not in _split(k)[1] and _split(k)[1] not in ("alpha", "dora_scale")]
    notes = ["drops the keys of modules outside OMI's SDXL key set" if outside else "",
             f"its renaming merges one-part tensor names ({', '.join(sorted({_split(k)[1] for k in one_part})[:3])}) "
             f"into the module name: LoHa / LoKr / full modules do not load as such there" if one_part else ""]
    return outside + one_part, "; ".join(filter(None, notes))


# tool -> its key rules; the studio's own line comes from having read the file
TOOLS = {"A1111": _a1111, "Forge": _comfyui, "ComfyUI": _comfyui, "diffusers": _diffusers, "kohya": _kohya}
# what each tool does with an embedding bundled in a LoRA (bundle_emb.<token>.*; A1111's networks.py installs it)
BUNDLE_NOTES = {
    "A1111": "installs the bundled embedding too: write its token in the prompt",
    "Forge": "skips the bundled embedding: load the embedding file beside it",
    "ComfyUI": "skips the bundled embedding ('lora key not loaded'): load the embedding file beside it, "
               "embedding:NAME in the prompt",
    "diffusers": "load_lora_weights refuses the whole file ('Invalid LoRA checkpoint': the bundle_emb keys are "
                 "no kohya LoRA keys) and loads nothing: studio export FILE --format diffusers writes the LoRA "
                 "alone; load_textual_inversion reads the embedding file",
    "kohya": "networks.lora ignores the bundled embedding",
    "InvokeAI": "strips the bundle_emb keys on loading: load the embedding file beside it",
}


def _with_bundle(tool: str, skipped: list[str], note: str, keys: list[str], bundle: list[str]) -> tuple[list, str]:
    """A tool's line for a file with bundled-embedding keys: A1111 loads them, diffusers refuses the whole file
    (its kohya path needs every key to be a LoRA key), the others skip them."""
    if not bundle or tool not in BUNDLE_NOTES:
        return skipped, note
    skipped = keys + bundle if tool == "diffusers" else skipped + ([] if tool == "A1111" else bundle)
    return skipped, "; ".join(filter(None, [BUNDLE_NOTES[tool], note if tool != "diffusers" else ""]))


def compatibility(keys: list[str], family: str, path: str = "FILE", fmt: str = "",
                  header: dict[str, str] | None = None) -> dict[str, dict]:
    """{tool: {"modules": applied, "of": modules, "unloaded": [keys], "note": why}} (image tools on SD files):
    a module counts as applied when a key of it other than its alpha loads; OMI files add InvokeAI's line."""
    bundle = [k for k in keys if embedding.is_bundled(k)]  # an embedding, not a module of the LoRA
    keys = [k for k in keys if k not in bundle]
    modules = {_split(k)[0] for k in keys}
    out = {"studio": {"modules": len(modules), "of": len(modules), "unloaded": [], "note": ""}}
    if family == "lm":
        return out
    tools = dict(TOOLS)
    if fmt == OMI_FORMAT:
        tools["InvokeAI"] = lambda keys, family: _invokeai_omi(keys, family, header or {})
    for tool, rules in tools.items():
        skipped, note = _with_bundle(tool, *rules(keys, family), keys, bundle)
        skipped = sorted(set(skipped))
        applied = {_split(k)[0] for k in keys if k not in skipped and _split(k)[1] != "alpha"}
        if fmt == "native":  # the studio's own layout: no other tool reads it
            note = "the studio's own layout: studio export FILE --format kohya -o out.safetensors writes one it loads"
        out[tool] = {"modules": len(applied), "of": len(modules), "unloaded": skipped,
                     "note": note.replace("FILE", str(path))}
    return out


def _compatibility_lines(compat: dict[str, dict]) -> list[str]:
    lines = ["will it load (each tool's key rules):"]
    for tool, c in compat.items():
        text = f"all {c['of']} modules" if not c["unloaded"] else (
            f"{c['modules']} of {c['of']} modules, {len(c['unloaded'])} key(s) unloaded: "
            + ", ".join(c["unloaded"][:3]) + (f" (+{len(c['unloaded']) - 3} more)" if len(c["unloaded"]) > 3 else ""))
        lines.append(f"  {tool:9s} {text}" + (f" ({c['note']})" if c["note"] else ""))
    return lines


def inspect_file(path: str | os.PathLike) -> dict:
    if embedding.looks_like(files.read_header(path).tensors):  # a token embedding, not a layer adapter
        return embedding.describe(path)
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
        "mixtures": _mixtures(af),
        "stored_kinds": af.source.get("stored_kinds", {}),  # a LyCORIS preset's kinds per module, as the file has them
        "prompt": _prompt(af),
        "dtypes": af.source.get("dtypes", []),
        "tensors": af.source.get("tensor_count"),
        "size_bytes": Path(path).stat().st_size,
        "trigger_words": trigger_words(af.metadata),
        "top_tags": top_tags(af.metadata),
        "hash": {"sha256": digest, "short": digest[:12], "in_metadata": stored,
                 "matches": None if stored is None else stored == digest},
        "metadata": header,
        "compatibility": compatibility(list(files.read_header(path).tensors), af.base, str(path),
                                       af.source["format"], header),
        "embeddings": [{"token": e.token, "vectors": e.count, "encoders": {embedding.KEYS[c]: w for c, w in
                                                                           e.widths.items()}}
                       for e in af.source.get(kohya.EMBEDDINGS, [])],  # bundled (pivotal tuning)
    }


def render_text(info: dict) -> str:
    if info.get("kind") == "embedding":
        return embedding.render_text(info)
    lines = [f"file:      {info['path']} ({info['size_bytes']:,} bytes, {info['tensors']} tensors, "
             f"{'/'.join(info['dtypes'])})",
             f"format:    {info['format']}",
             f"base:      {info['base_name']} ({info['base']})"]
    for component, method in info["methods"].items():
        ranks = ", ".join(str(r) for r in info["ranks"].get(component, []))
        alphas = ", ".join(f"{a:g}" if isinstance(a, (int, float)) else str(a) for a in info["alphas"].get(component, []))
        stored = ", ".join(f"{n} {kind}" for kind, n in info.get("stored_kinds", {}).get(component, {}).items())
        lines.append(f"  {component:5s} {method:6s} {info['modules'][component]:4d} modules, rank {ranks}"
                     + (f", alpha {alphas}" if alphas else "") + (f" (as stored: {stored})" if stored else ""))
        if component in info["mixtures"]:
            lines += _mixture_lines(info["mixtures"][component])
    for kind, p in info.get("prompt", {}).items():
        lines.append(f"  {kind}  {p['length']} virtual tokens x {p['layers']} layers ({p['kv_heads']} key/value "
                     f"heads x {p['head_dim']})")
    for e in info.get("embeddings", []):
        widths = ", ".join(f"{k} {w}" for k, w in e["encoders"].items())
        lines.append(f"  bundled embedding {e['token']} ({e['vectors']} vector{'s' if e['vectors'] != 1 else ''}, "
                     f"{widths} wide): studio generate and A1111 install it from this file; write "
                     f"{e['token']} in the prompt")
    lines.append(f"trigger:   {', '.join(info['trigger_words']) or '-'}")
    lines.append(f"top tags:  {', '.join(f'{t} ({n})' for t, n in info['top_tags']) or '-'}")
    h = info["hash"]
    check = {None: "not in metadata", True: "matches metadata", False: f"metadata says {h['in_metadata']}: stale"}
    lines.append(f"sha256:    {h['sha256']} (short {h['short']}; {check[h['matches']]})")
    lines += _compatibility_lines(info.get("compatibility", {}))
    if info["metadata"]:
        lines.append("metadata:")
        for key in sorted(info["metadata"]):
            value = info["metadata"][key]
            if len(value) > 200:
                value = value[:200] + f"... ({len(value)} chars)"
            lines.append(f"  {key} = {value}")
    return "\n".join(lines)


def _mixture_lines(mix: dict) -> list[str]:
    lines = [f"        experts:  {mix['experts']}, {mix['experts_total']} in all ({mix['profile']})",
             f"        routing:  {mix['routing']}"]
    if mix["balance"]:
        lines.append(f"        balance:  {mix['balance']}")
    lines.append("        experts per block (input side first):")
    width = max(len(b["block"]) for b in mix["per_block"])
    for b in mix["per_block"]:
        lines.append(f"          {b['block']:{width}s}  {'/'.join(map(str, b['experts']))} experts x {b['modules']} modules")
    return lines


def render_json(info: dict) -> str:
    return json.dumps(info, indent=2, sort_keys=True, default=str)
