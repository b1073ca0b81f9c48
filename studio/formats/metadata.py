"""Header metadata: kohya ``ss_*``, ModelSpec ``modelspec.*``, the tensor hash, ``studio.*`` provenance.

All values are strings; dicts are JSON strings (A1111 parses values starting with ``{``).
Descriptive fields (title, trigger phrase, tag frequency, training parameters) travel with an
``AdapterFile`` in ``metadata``; layout fields (network dim / alpha, architecture, hashes, the
diffusers and native layout keys) are recomputed by every export and never carried over.

``sshs_model_hash`` = ``modelspec.hash_sha256`` without ``0x`` = sha256 of the data section (the
bytes after the 8-byte length and the JSON header), so editing metadata never changes it; it is
the hash A1111 shows in ``Lora hashes:`` (first 12 hex digits).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

SPEC_VERSION = "1.0.1"

LAYOUT_KEYS = {
    "format", "lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256",
    "ss_output_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version", "ss_v2",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
    "modelspec.implementation_version", "studio.format", "studio.format_version", "studio.adapter", "studio.base",
    "studio.adapter_type", "studio.export_method", "studio.export_rank_policy", "studio.energy_retained",
    "studio.energy_retained_total", "studio.dtype", "studio.note",
}

ARCHITECTURE = {
    "sd15": ("stable-diffusion-v1/lora", "sd_v1", "512x512"),
    "sdxl": ("stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0", "1024x1024"),
    "sd-custom": ("stable-diffusion-custom/lora", "sd_custom", None),
    "lm": ("causal-lm/lora", None, None),
}
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"

_TRAINING_KEYS = {
    "title": "modelspec.title", "author": "modelspec.author", "description": "modelspec.description",
    "trigger_phrase": "modelspec.trigger_phrase", "usage_hint": "modelspec.usage_hint",
    "license": "modelspec.license", "prediction_type": "modelspec.prediction_type",
    "training_comment": "ss_training_comment", "steps": "ss_steps", "epochs": "ss_epoch",
    "learning_rate": "ss_learning_rate", "unet_lr": "ss_unet_lr", "text_encoder_lr": "ss_text_encoder_lr",
    "optimizer": "ss_optimizer", "seed": "ss_seed", "num_train_images": "ss_num_train_images",
    "mixed_precision": "ss_mixed_precision", "clip_skip": "ss_clip_skip", "base_model_name": "ss_sd_model_name",
    "base_model_hash": "ss_new_sd_model_hash", "started_at": "ss_training_started_at",
    "finished_at": "ss_training_finished_at",
}


def version() -> str:
    try:
        from importlib.metadata import version as package_version
        return f"adapter-studio/{package_version('adapter-studio')}"
    except Exception:
        return "adapter-studio/unknown"


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def training_metadata(*, tags: list[str] | str | None = None, tag_frequency: dict | None = None,
                      dataset_dirs: dict | None = None, resolution: int | tuple[int, int] | None = None,
                      **fields) -> dict[str, str]:
    """Descriptive header fields from training facts (what the trainer passes to ``from_models``).

    Known names: title, author, description, trigger_phrase, usage_hint, license, prediction_type,
    training_comment, steps, epochs, learning_rate, unet_lr, text_encoder_lr, optimizer, seed,
    num_train_images, mixed_precision, clip_skip, base_model_name, base_model_hash, started_at,
    finished_at, output_name (A1111's alias; default: the file name); ``tag_frequency`` = {dataset folder: {tag: count}}. Keys already in
    a namespace (``ss_``, ``modelspec.``, ``studio.``) pass through; other names become ``studio.<name>``.
    """
    out: dict[str, str] = {}
    if tags is not None:
        out["modelspec.tags"] = tags if isinstance(tags, str) else ",".join(tags)
    if tag_frequency is not None:
        out["ss_tag_frequency"] = json.dumps(tag_frequency)
    if dataset_dirs is not None:
        out["ss_dataset_dirs"] = json.dumps(dataset_dirs)
    if resolution is not None:
        w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
        out["ss_resolution"] = f"({w}, {h})"
        out["modelspec.resolution"] = f"{w}x{h}"
    for name, value in fields.items():
        if value is None:
            continue
        if name in _TRAINING_KEYS:
            out[_TRAINING_KEYS[name]] = _text(value)
        elif name.startswith(("ss_", "modelspec.", "studio.")):
            out[name] = _text(value)
        else:
            out[f"studio.{name}"] = _text(value)
    return out


def descriptive(metadata: dict[str, str]) -> dict[str, str]:
    """The fields an AdapterFile carries: everything but the layout keys."""
    return {k: v for k, v in metadata.items() if k not in LAYOUT_KEYS}


def export_metadata(carried: dict[str, str], *, base: str, fmt: str, stem: str, methods: list[str],
                    ranks: set[int] | None = None, alpha: float | None = None, dtype: str = "fp32",
                    policy: str = "exact", summary: dict | None = None, sgm: bool = False) -> dict[str, str]:
    """Every header field of an exported file except the two hash fields (``files.serialise``)."""
    architecture, version_tag, resolution = ARCHITECTURE[base]
    meta = dict(carried)
    meta["ss_output_name"] = carried.get("studio.output_name", stem)  # A1111's alias: given, else the file name
    meta.setdefault("modelspec.title", stem)
    if resolution:
        meta.setdefault("modelspec.resolution", resolution)
    if base != "lm":
        meta.setdefault("modelspec.prediction_type", "epsilon")
    meta.update({
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": SGM_IMPLEMENTATION if sgm else ("diffusers" if base != "lm" else "transformers"),
        "modelspec.implementation_version": version(),
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "studio.format": fmt,
        "studio.base": base,
        "studio.adapter_type": ",".join(methods),
        "studio.dtype": dtype,
    })
    if fmt in ("kohya", "diffusers"):
        meta.update({
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(next(iter(ranks))) if ranks and len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": str(alpha) if ranks and len(ranks) == 1 else "Dynamic",
            "ss_network_args": carried.get("studio.network_args", "{}"),  # the trainer's block_dims / lr weights
            "ss_v2": "False",
            "studio.export_method": "plain LoRA" + (" (exact)" if policy == "exact" else " (truncated SVD)"),
            "studio.export_rank_policy": policy,
        })
        if version_tag:
            meta["ss_base_model_version"] = version_tag
    if fmt == "diffusers":
        meta["studio.note"] = ("diffusers/PEFT layout: loads in diffusers only; export with --format kohya "
                               "for AUTOMATIC1111, Forge, ComfyUI and kohya")
    if summary is not None:
        meta["studio.energy_retained_total"] = f"{summary['energy']:.6f}"
        meta["studio.energy_retained"] = json.dumps(summary["per_module"])
    return meta


# -- reading ---------------------------------------------------------------------------------
def trigger_words(metadata: dict[str, str]) -> list[str]:
    phrase = metadata.get("modelspec.trigger_phrase", "")
    return [w.strip() for w in phrase.split(",") if w.strip()]


def top_tags(metadata: dict[str, str], n: int = 10) -> list[tuple[str, int]]:
    """Most frequent caption tags over all datasets of ``ss_tag_frequency``."""
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return []
    counts: dict[str, int] = {}
    for tags in frequency.values() if isinstance(frequency, dict) else []:
        if isinstance(tags, dict):
            for tag, count in tags.items():
                if isinstance(count, (int, float)):
                    counts[tag] = counts.get(tag, 0) + int(count)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
