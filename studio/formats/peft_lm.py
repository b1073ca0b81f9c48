"""Language-model adapters in PEFT's layout: a folder ``peft.PeftModel.from_pretrained`` loads.

    DIR/adapter_model.safetensors   base_model.model.<module path>.lora_A.weight   (r, in)
                                    base_model.model.<module path>.lora_B.weight   (out, r)
    DIR/adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules
                                    (full module paths), rank_pattern (modules whose rank differs from r)

A prefix (prefix tuning) is PEFT's PREFIX_TUNING folder, ``prompt_embeddings`` (P, L 2 H_kv d); LoRA +
prefix is two folders, DIR/lora and DIR/prefix (``write_with_prefix`` says why and how to load them).

Every method goes through ``lowrank`` first, as for kohya files: LoRA exactly, PiSSA / MiLoRA
exactly as a plain LoRA of rank <= 2r (QR of the stacked factors + a small SVD), SVF truncated
to ``rank`` / ``energy`` with the retained energy reported (exact at full rank). ``pack`` then
folds every scale into the factors under one alpha, so PEFT's per-module ``lora_alpha / r_N``
reproduces dW exactly; ranks that differ per module go into ``rank_pattern``. GPT-2's Conv1D
layers store the transposed weight, which PEFT handles with ``fan_in_fan_out`` -- the LoRA
factors themselves are the same (r, in) / (out, r) either way.

The folder is built in a temp folder beside DIR and renamed into place: an interrupted export
leaves an earlier DIR whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from studio.errors import StudioError
from studio.formats import files
from studio.formats.adapter_file import AdapterFile
from studio.formats.lowrank import Policy
from studio.formats.packing import DTYPES, pack
from studio.formats.metadata import export_metadata
from studio.formats.writing import ExportReport, WriteOptions, plain_lora

NAME = "peft"
read = None  # (importing PEFT adapter folders is not supported yet)


def looks_like(tensors: dict, metadata: dict[str, str]) -> bool:
    return False


def keeps_exactly(af: AdapterFile) -> bool:
    return False

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
CONV1D_LEAVES = ("c_attn", "c_proj", "c_fc")  # GPT-2 family: transformers Conv1D stores (in, out)


def check_folder(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.suffix.lower() == ".safetensors":
        raise StudioError(f"{out}: --format peft writes a folder (adapter_model.safetensors + adapter_config.json): "
                          f"give a folder name with -o")
    if out.exists() and not out.is_dir():
        raise StudioError(f"{out} is a file: --format peft writes a folder; choose another -o")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise StudioError(f"{out} already exists and is not empty: pass --overwrite to replace it, or choose another -o")
    if not out.parent.resolve().is_dir():
        raise StudioError(f"{out}: the folder {out.parent} does not exist: create it first")
    return out


def peft_config(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, fan_in_fan_out: bool,
                base_name: str | None) -> dict:
    ranks = {path: int(down.shape[0]) for path, (down, _) in modules.items()}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))  # the most common rank; the others go to rank_pattern
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r, "lora_alpha": alpha, "target_modules": sorted(modules),
        "rank_pattern": {path: k for path, k in sorted(ranks.items()) if k != r}, "alpha_pattern": {},
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": fan_in_fan_out, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None,
    }


def _uses_conv1d(paths, model: nn.Module | None) -> bool:
    if model is not None:
        from studio.adapters.layer import AdaptedLinear, is_conv1d

        found = []
        for path in paths:
            module = model.get_submodule(path)
            module = module.base if isinstance(module, AdaptedLinear) else module
            found.append(is_conv1d(module))
        if len(set(found)) > 1:
            raise StudioError("the adapter adapts both Linear and GPT-2 Conv1D layers: PEFT's fan_in_fan_out is one "
                              "setting per adapter, so export the two sets separately")
        return bool(found and found[0])
    return all(path.rpartition(".")[2] in CONV1D_LEAVES for path in paths)


def write(af: AdapterFile, out: str | os.PathLike, opts: WriteOptions) -> ExportReport:
    """Write ``af`` as a PEFT adapter folder (adapter_model.safetensors + adapter_config.json)."""
    rank, energy, dtype, models, overwrite = opts.rank, opts.energy, opts.dtype, opts.models, opts.overwrite
    if af.prompt:  # prefix tuning, alone or with a layer adapter: see write_with_prefix
        return write_with_prefix(af, out, opts)
    if af.base != "lm" or set(af.parts) != {"lm"}:
        raise StudioError(f"--format peft writes language-model adapters; {af.source.get('path') or af.name} is a "
                          f"Stable Diffusion adapter: export it with --format kohya or diffusers")
    target = check_folder(out, overwrite)
    dtype = dtype or "fp32"
    if dtype not in DTYPES:
        raise StudioError(f"unknown --dtype {dtype!r}: choose fp16, bf16 or fp32")
    model = (models or {}).get("lm")
    factors, summary = plain_lora(af, Policy(rank, energy), models)
    packed = pack(factors, DTYPES[dtype])
    modules = packed.modules["lm"]
    tensors = {}
    for path, (down, up) in modules.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = down.contiguous()  # (r, in)
        tensors[f"{PREFIX}{path}.lora_B.weight"] = up.contiguous()    # (out, r)
    base_name = af.metadata.get("ss_sd_model_name") or None
    config = peft_config(modules, packed.alpha, _uses_conv1d(modules, model), base_name)
    ranks = sorted({int(d.shape[0]) for d, _ in modules.values()})
    policy = Policy(rank, energy)
    meta = export_metadata(af.metadata, base="lm", fmt="peft", stem=target.name, methods=af.methods, ranks=set(ranks),
                           alpha=packed.alpha, dtype=dtype, policy=policy.describe(),
                           summary=summary)

    def fill(tmp: Path) -> ExportReport:
        digest = files.write(tmp / WEIGHTS, tensors, meta)
        files.write_atomic(tmp / CONFIG, [json.dumps(config, indent=2).encode("utf-8")])
        return ExportReport(str(out), NAME, dtype, packed.alpha, ranks, af.module_counts(), summary["energy"],
                            summary["relative_error"], summary["per_module"], packed.notes, digest)

    return _publish_folder(target, fill)


# -- prefix tuning (studio/prompt/prefix.py) ------------------------------------------------------
PREFIX_WEIGHTS = "prompt_embeddings"
"""PEFT's one tensor of a prefix adapter: (P, L 2 H_kv d), the prefixes after any projection."""
LORA_SUBFOLDER, PREFIX_SUBFOLDER = "lora", "prefix"


def prefix_config(key: torch.Tensor, base_name: str | None) -> dict:
    """PEFT's PrefixTuningConfig of a folded prefix: what ``save_pretrained`` writes for one (inference
    mode, ``prefix_projection`` false: a trained MLP was evaluated into the prefixes, as PEFT does)."""
    layers, heads, length, head_dim = key.shape
    return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "num_virtual_tokens": length, "token_dim": heads * head_dim, "num_attention_heads": heads,
            "num_layers": layers, "num_transformer_submodules": 1, "encoder_hidden_size": heads * head_dim,
            "prefix_projection": False, "inference_mode": True, "init_weights": None, "modules_to_save": None,
            "revision": None, "auto_mapping": None}


def write_with_prefix(af: AdapterFile, out: str | os.PathLike, opts: WriteOptions) -> ExportReport:
    """A prefix as PEFT's prefix-tuning folder; with a layer adapter, DIR/lora and DIR/prefix.

    PEFT runs one adapter type per PeftModel (a prompt-learning adapter does not combine with LoRA in
    one model, nor in PeftMixedModel), so LoRA + prefix becomes two adapters, used as: merge the LoRA
    (``PeftModel.from_pretrained(base, DIR/lora).merge_and_unload()``), then load DIR/prefix on the
    merged model; that equals the studio's LoRA + prefix forward (tests/test_prefix_tuning.py)."""
    from studio.prompt import prefix

    if af.base != "lm":
        raise StudioError(f"{af.source.get('path') or af.name} has a prefix but is not a language-model adapter: "
                          f"it cannot be written for PEFT")
    if not opts.exact and not af.parts:
        raise StudioError("--rank / --energy truncate layer adapters; a prefix is written exactly: drop them")
    target = check_folder(out, opts.overwrite)
    dtype = opts.dtype or "fp32"
    if dtype not in DTYPES:
        raise StudioError(f"unknown --dtype {dtype!r}: choose fp16, bf16 or fp32")
    key, value = af.prompt[prefix.KEYS[0]], af.prompt[prefix.KEYS[1]]
    tensors = {PREFIX_WEIGHTS: prefix.to_flat(key, value).to(DTYPES[dtype]).contiguous()}
    base_name = af.metadata.get("ss_sd_model_name") or None
    layers, heads, length, head_dim = key.shape
    note = f"prefix: {length} virtual tokens x {layers} layers ({heads} key/value heads x {head_dim})"
    meta = export_metadata(af.metadata, base="lm", fmt="peft", stem=target.name, methods=[*af.methods, "prefix"],
                           dtype=dtype)

    def fill(folder: Path):
        if not af.parts:
            digest = files.write(folder / WEIGHTS, tensors, meta)
            files.write_atomic(folder / CONFIG, [json.dumps(prefix_config(key, base_name), indent=2).encode("utf-8")])
            return ExportReport(str(out), NAME, dtype, None, [], {}, 1.0, 0.0, {}, [note], digest)
        layer = write(af.replace(prompt={}), folder / LORA_SUBFOLDER, dataclasses.replace(opts, overwrite=True))
        (folder / PREFIX_SUBFOLDER).mkdir()
        files.write(folder / PREFIX_SUBFOLDER / WEIGHTS, tensors, meta)
        files.write_atomic(folder / PREFIX_SUBFOLDER / CONFIG,
                           [json.dumps(prefix_config(key, base_name), indent=2).encode("utf-8")])
        how = (f"LoRA + prefix is two PEFT adapters: {Path(out) / LORA_SUBFOLDER} (merge it: "
               f"PeftModel.from_pretrained(model, ...).merge_and_unload()) then {Path(out) / PREFIX_SUBFOLDER} "
               f"(PeftModel.from_pretrained on the merged model)")
        return layer._replace(path=str(out), notes=[*layer.notes, note, how])

    return _publish_folder(target, fill)


def _publish_folder(target: Path, fill) -> ExportReport:
    """``fill(tmp)`` builds the folder beside ``target``, which then replaces ``target`` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        report = fill(tmp)
        tmp.chmod(0o755)
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
