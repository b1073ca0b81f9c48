"""Textual-inversion embedding files, in the layouts A1111, ComfyUI and diffusers load.

    SD1.5 (and the mini base)   {"emb_params": (N, 768)}                       A1111's .safetensors embeddings
    SDXL                        {"clip_l": (N, 768), "clip_g": (N, 1280)}      A1111 / ComfyUI SDXL embeddings
    read also                   {"string_to_param.*": (N, d)}  (A1111's .pt layout, flattened)
                                {"<token>": (d,) or (N, d)}    (diffusers' learned_embeds.safetensors)

A1111 and ComfyUI name an embedding by its file name (``kbot.safetensors`` is written ``kbot`` /
``embedding:kbot`` in a prompt); diffusers takes the token as an argument. The studio writes the token
it trained into the header (``studio.token``) and reads it back from there, else from the file name.

This is a reader and writer beside the layer-adapter layouts of ``layouts.TABLE``, not one of them:
an embedding is no delta of any layer, so it has no kohya / diffusers LoRA form to export to or from.

Bundled in a kohya LoRA (pivotal tuning: one file for A1111), an embedding is stored under its token,
as A1111's ``extensions-builtin/Lora/networks.py`` reads it (the name ends at the first '.'):

    SD1.5 (and the mini base)   bundle_emb.<token>.string_to_param.*  (N, 768)   (A1111's .pt layout)
    SDXL                        bundle_emb.<token>.clip_l (N, 768), bundle_emb.<token>.clip_g (N, 1280)
    read also                   bundle_emb.<token>.emb_params, bundle_emb.<token>.string_to_param.<any>

``bundle_tensors`` writes those keys and ``read_bundle`` reads them back; ``formats.kohya`` calls both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.errors import StudioError
from studio.formats import files

KEYS = {"te": "emb_params", "te1": "clip_l", "te2": "clip_g"}
"""Component (the adapter files' text-encoder names) -> the tensor's key in the file."""
FAMILY = {("te",): "sd15", ("te1", "te2"): "sdxl"}
ARCHITECTURE = {"sd15": "stable-diffusion-v1/textual-inversion",
                "sdxl": "stable-diffusion-xl-v1-base/textual-inversion"}
"""ModelSpec 1.0 architecture ids (``/textual-inversion`` is the spec's adapter suffix)."""
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
STANDARD_WIDTHS = {"sd15": {"te": 768}, "sdxl": {"te1": 768, "te2": 1280}}
BUNDLE = "bundle_emb"
BUNDLE_KEYS = {"te": "string_to_param.*", "te1": "clip_l", "te2": "clip_g"}
"""Component -> the key after ``bundle_emb.<token>.`` (A1111 reads SD1.5's as its .pt layout, SDXL's as clip_l / clip_g)."""


@dataclass
class Embedding:
    token: str
    """What a prompt writes to use it (multi-vector: expanded to ``token token_1 ...``)."""
    vectors: dict[str, torch.Tensor]
    """Component ('te' | 'te1', 'te2') -> (N, d) fp32 rows."""
    metadata: dict[str, str] = field(default_factory=dict)
    where: str = "the embedding"
    """The file it came from (named in errors)."""

    def __post_init__(self) -> None:
        shapes = {c: tuple(v.shape) for c, v in self.vectors.items()}
        counts = {s[0] for s in shapes.values()}
        if tuple(sorted(self.vectors)) not in FAMILY or any(len(s) != 2 for s in shapes.values()) or len(counts) != 1:
            raise StudioError(f"{self.where} is not a textual-inversion embedding (tensors {shapes}): expected "
                              f"emb_params (N, d) or clip_l + clip_g with the same N")

    @property
    def family(self) -> str:
        return FAMILY[tuple(sorted(self.vectors))]

    @property
    def count(self) -> int:
        return len(next(iter(self.vectors.values())))

    @property
    def widths(self) -> dict[str, int]:
        return {c: v.shape[1] for c, v in self.vectors.items()}

    def check_fits(self, widths: dict[str, int], family: str) -> None:
        """Refuse a base whose text encoders are not the ones the vectors were trained for."""
        mine = ", ".join(f"{KEYS[c]} {w}" for c, w in self.widths.items())
        theirs = ", ".join(f"{KEYS[c]} {w}" for c, w in widths.items())
        if set(widths) != set(self.vectors) or widths != self.widths:
            raise StudioError(f"{self.where} is a {FAMILY_NAMES[self.family]} embedding ({mine} wide) but the base is "
                              f"{FAMILY_NAMES[family]} ({theirs} wide): use an embedding trained for this base")


def looks_like(names) -> bool:
    """Whether a file with these tensor names is an embedding (asked before the LoRA layouts)."""
    names = set(names)
    if names in ({"emb_params"}, {"clip_l", "clip_g"}):
        return True
    return len(names) == 1 and (next(iter(names)).startswith("string_to_param") or _diffusers_key(next(iter(names))))


def _diffusers_key(name: str) -> bool:
    """diffusers' textual_inversion example keys its one tensor by the placeholder, ``<cat-toy>``."""
    return name.startswith("<") and name.endswith(">") and "." not in name


def read(path: str | os.PathLike) -> Embedding:
    where = str(path)
    tensors, metadata = files.read(path)
    if not looks_like(tensors):
        raise StudioError(f"{where} is not a textual-inversion embedding (keys {sorted(tensors)[:4]}): give an A1111 / "
                          f"ComfyUI embedding .safetensors (emb_params, or clip_l + clip_g)")
    token = metadata.get("studio.token")
    if set(tensors) == {"clip_l", "clip_g"}:
        vectors = {"te1": tensors["clip_l"], "te2": tensors["clip_g"]}
    else:
        [(key, only)] = tensors.items()
        vectors = {"te": only.reshape(-1, only.shape[-1])}  # diffusers may store one vector as (d,)
        if not token and key != "emb_params" and not key.startswith("string_to_param"):
            token = key  # diffusers' layout: the key is the token
    token = token or Path(path).stem  # A1111's rule: the file name
    return Embedding(token, {c: v.float() for c, v in vectors.items()}, metadata, where)


def write(emb: Embedding, path: str | os.PathLike, overwrite: bool = False, extra: dict | None = None) -> str:
    """Write ``emb`` in A1111's layout (fp32; a few KB); returns the data-section sha256."""
    tensors = {KEYS[c]: v.detach().float().contiguous() for c, v in emb.vectors.items()}
    metadata = {"studio.token": emb.token, "modelspec.sai_model_spec": "1.0.1",
                "modelspec.architecture": ARCHITECTURE[emb.family], "modelspec.implementation": "diffusers",
                "modelspec.title": emb.token, "modelspec.trigger_phrase": emb.token, **(extra or {})}
    return files.write(path, tensors, metadata, overwrite=overwrite)


def training_metadata(path: Path, init_word: str, steps: int, seed: int, base_name: str) -> dict[str, str]:
    """The header of a trained embedding besides the token (kohya's ss_* names where they exist)."""
    return {"studio.init_word": init_word, "ss_steps": str(steps), "ss_seed": str(seed),
            "ss_output_name": Path(path).stem, "ss_sd_model_name": base_name}


def usage(emb: Embedding, path: Path) -> str:
    """What a finished run prints: the file, and how each tool's prompt writes it."""
    widths = ", ".join(f"{KEYS[c]} {w}" for c, w in emb.widths.items())
    stem = Path(path).stem
    return (f"embedding: {path} ({emb.token}, {emb.count} vector{'s' if emb.count > 1 else ''}, {widths} wide)\n"
            f"studio generate / UI: write {emb.token} in the prompt; A1111 / ComfyUI: write {stem} / embedding:{stem}")


def describe(path: str | os.PathLike) -> dict:
    """What ``studio inspect`` shows of an embedding file."""
    emb = read(path)
    digest = files.data_hash(path)
    layout = FAMILY_NAMES[emb.family]
    base = emb.family if emb.widths == STANDARD_WIDTHS[emb.family] else "sd-custom"  # the mini base: 64 wide
    return {"path": str(path), "format": "embedding", "kind": "embedding", "token": emb.token,
            "a1111_name": Path(path).stem, "vectors": emb.count, "base": base,
            "base_name": FAMILY_NAMES[base] if base != "sd-custom" else f"a custom-size SD model ({layout} layout)",
            "trigger_words": [emb.token],
            "methods": {c: "ti" for c in emb.vectors}, "ranks": {},  # what the UI library's cards read
            "encoders": {KEYS[c]: w for c, w in emb.widths.items()}, "size_bytes": Path(path).stat().st_size,
            "hash": {"sha256": digest, "short": digest[:12]}, "metadata": dict(emb.metadata)}


def render_text(info: dict) -> str:
    encoders = ", ".join(f"{k} {w} wide" for k, w in info["encoders"].items())
    lines = [f"file:      {info['path']} ({info['size_bytes']:,} bytes)",
             "format:    textual-inversion embedding (A1111, ComfyUI, diffusers load_textual_inversion)",
             f"base:      {info['base_name']} ({info['base']})",
             f"token:     {info['token']} ({info['vectors']} vector{'s' if info['vectors'] != 1 else ''}; "
             f"A1111 / ComfyUI prompts write the file name: {info['a1111_name']} / embedding:{info['a1111_name']})",
             f"encoders:  {encoders}",
             f"sha256:    {info['hash']['sha256']} (short {info['hash']['short']})"]
    if info["metadata"]:
        lines.append("metadata:")
        lines += [f"  {k} = {info['metadata'][k]}" for k in sorted(info["metadata"])]
    return "\n".join(lines)


# -- embeddings bundled in a kohya LoRA (bundle_emb.<token>.*) -----------------------------------
def is_bundled(key: str) -> bool:
    """A key of an embedding bundled in a LoRA file: ``bundle_emb.<token>.<tensor>``."""
    head, _, rest = key.partition(".")
    token, _, tensor = rest.partition(".")
    return head == BUNDLE and bool(token) and bool(tensor)


def check_bundle_token(token: str, where: str) -> None:
    """A1111 ends a bundled embedding's name at the first '.', so a token with one could not be read back."""
    if "." in token:
        raise StudioError(f"token {token!r} in {where} has a '.', which ends a bundled embedding's name in A1111 "
                          f"(bundle_emb.<token>.*): pick a token without dots, e.g. '<kbot>'")


def bundle_tensors(embeddings: list[Embedding], where: str) -> dict[str, torch.Tensor]:
    """The ``bundle_emb.*`` keys of ``embeddings``: fp32, the very tensors their own files hold."""
    out: dict[str, torch.Tensor] = {}
    for emb in embeddings:
        check_bundle_token(emb.token, where)
        if any(k.startswith(f"{BUNDLE}.{emb.token}.") for k in out):
            raise StudioError(f"two embeddings bundled in {where} are both the token {emb.token!r}: bundle one")
        out |= {f"{BUNDLE}.{emb.token}.{BUNDLE_KEYS[c]}": v.detach().float().contiguous()
                for c, v in emb.vectors.items()}
    return out


def read_bundle(tensors: dict[str, torch.Tensor], where: str) -> list[Embedding]:
    """The embeddings bundled in a LoRA file's tensors, each checked as an embedding file is."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if is_bundled(key):
            token, _, tensor = key[len(BUNDLE) + 1:].partition(".")
            grouped.setdefault(token, {})[tensor] = value
    out = []
    for token, found in grouped.items():
        named = f"{where} (bundle_emb.{token})"
        one = next(iter(found.values())) if len(found) == 1 else None
        if set(found) == {"clip_l", "clip_g"}:
            vectors = {"te1": found["clip_l"], "te2": found["clip_g"]}
        elif one is not None and (next(iter(found)) == "emb_params" or next(iter(found)).startswith("string_to_param.")):
            vectors = {"te": one.reshape(1, -1) if one.dim() == 1 else one}
        else:
            keys = ", ".join(f"{BUNDLE}.{token}.{k}" for k in sorted(found))
            raise StudioError(f"{named}: the bundled embedding's keys {keys} are no embedding: A1111 reads "
                              f"{BUNDLE}.{token}.string_to_param.* (SD1.5) or .clip_l + .clip_g (SDXL); the bundle "
                              f"is damaged: re-export the LoRA, or use the separate embedding file")
        out.append(Embedding(token, {c: v.float() for c, v in vectors.items()}, where=named))
    return out


def check_bundle_fits(embeddings: list[Embedding], widths: dict[str, int | None]) -> None:
    """Refuse a bundle that does not fit the LoRA's base. ``widths``: the base's text encoders -> width, None
    where the file does not tell (a custom-size base without text-encoder modules; generate checks it again)."""
    family = "sdxl" if "te2" in widths else "sd15"
    for emb in embeddings:
        if set(emb.vectors) != set(widths) or any(w is not None and emb.widths[c] != w for c, w in widths.items()):
            emb.check_fits({c: w if w is not None else "?" for c, w in widths.items()}, family)
