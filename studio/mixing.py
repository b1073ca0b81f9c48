"""A mixing session: which adapter files are attached to a loaded base, at which weights.

One plain class shared by ``studio generate`` and the web UI, so both produce the same pixels
for the same settings. Adapters stay *unmerged* while mixing: ``sync`` with new weights only
moves the weights (``formats.set_file_weight`` -> ``adapters.ops.set_weight``), no re-attach,
no re-merge. ``render(..., merge=True)`` folds the mix into the base weights once for a batch
and restores the pristine weights afterwards (bit-exactly, the core's backup rule).

Each file is attached under a session name derived from its path, so the same file given twice
is refused with a message instead of being silently doubled.

A textual-inversion embedding in the list is no layer adapter: its token is taught to the
tokenizers (``studio.prompt.ti.Installed``) and a prompt uses it by writing the token; its weight is
not applied (A1111 and ComfyUI have none either: weigh it in the prompt, ``(<kbot>:1.2)`` there).
A kohya LoRA with bundled embeddings (pivotal tuning's ``bundle_emb.*`` keys) is both: its LoRA is
attached at its weight and its tokens are installed beside the embedding files, as A1111 does.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from studio import adapters as A
from studio import formats
from studio.errors import StudioError
from studio.formats import embedding, kohya
from studio.formats.files import data_hash, read_header
from studio.formats.metadata import trigger_words
from studio.pipeline import Settings, generate
from studio.prompt import ti


@dataclass(frozen=True)
class MixEntry:
    """One adapter file in the mix, as the user asked for it."""

    path: str
    """The adapter .safetensors file."""
    weight: float = 1.0
    """UNet weight (and text-encoder weight unless ``te_weight`` is given)."""
    te_weight: float | None = None
    """Separate text-encoder weight; None = same as ``weight``."""


@dataclass
class _Attached:
    entry: MixEntry
    af: object
    label: str        # the name written into PNG parameters (file stem)
    hash12: str       # A1111 short tensor hash
    stamp: tuple      # (mtime_ns, size) of the file when it was read
    triggers: list[str] = field(default_factory=list)


class AttachedFile(NamedTuple):
    """One layer-adapter file of the mix, as ``MixSession.attached`` gives it to readers of the live layers."""

    name: str         # the session name its layers know it by (``targets.layers_of(model, name)``)
    label: str        # the file stem (PNG parameters, heat-map titles)
    af: object        # the AdapterFile as read (its parts and methods)
    entry: MixEntry   # the file and its weights, as asked for


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def _session_name(path: Path) -> str:
    """A module-name-safe, path-unique adapter name (two files with one stem do not collide)."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)[:40]
    return f"{stem}_{digest}"


class MixSession:
    """Adapters attached to one base. ``base`` is a ``studio.models.DiffusionBase``."""

    def __init__(self, base, warn=None):
        self.base = base
        self._attached: dict[str, _Attached] = {}   # session name -> record, in mix order
        self._embeddings: dict[str, tuple] = {}     # session name -> (stamp, [Embedding]), in mix order
        self._bundled: dict[str, object] = {}       # session name -> AdapterFile read for its bundle, for _attach
        self._installed = ti.Installed(getattr(base, "pipe", None))  # (a language model has no pipe, no embeddings)
        self._warned: set = set()
        self.warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))

    # -- the mix ------------------------------------------------------------------------------
    @property
    def entries(self) -> list[MixEntry]:
        return [a.entry for a in self._attached.values()]

    def labels(self) -> list[tuple[str, float, str]]:
        """(name, weight, hash12) per adapter, for the PNG ``parameters`` chunk."""
        def weight(e: MixEntry):
            return e.weight if e.te_weight is None else f"{e.weight:g}:{e.te_weight:g}"
        return [(a.label, weight(a.entry), a.hash12) for a in self._attached.values()]

    def attached(self) -> list[AttachedFile]:
        """The layer-adapter files attached now, in mix order (embedding files are not layer adapters)."""
        return [AttachedFile(name, a.label, a.af, a.entry) for name, a in self._attached.items()]

    def triggers(self, path: str | os.PathLike) -> list[str]:
        record = self._attached.get(_session_name(Path(path).resolve()))
        return list(record.triggers) if record else []

    def sync(self, entries: list[MixEntry]) -> None:
        """Make the attached set exactly ``entries``: detach what left, attach what is new (or changed
        on disk), and set every weight. A weight change alone costs nothing."""
        wanted: dict[str, MixEntry] = {}
        for entry in entries:
            path = Path(entry.path).resolve()
            name = _session_name(path)
            if name in wanted:
                raise StudioError(f"adapter {path.name} is in the mix twice: remove one of them, or give it a "
                                  f"larger weight")
            wanted[name] = MixEntry(str(path), float(entry.weight), None if entry.te_weight is None
                                    else float(entry.te_weight))
        wanted = self._sync_embeddings(wanted)
        components = self.base.components
        for name in list(self._attached):
            record = self._attached[name]
            path = Path(record.entry.path)
            if name not in wanted or not path.is_file() or _stamp(path) != record.stamp:
                formats.detach_file(components, name)
                del self._attached[name]
        for name, entry in wanted.items():
            if name not in self._attached:
                self._attach(name, entry)
            else:
                formats.set_file_weight(components, name, entry.weight, entry.te_weight)
                self._attached[name].entry = entry
        # keep the requested order (PNG parameters list adapters as the user did)
        self._attached = {name: self._attached[name] for name in wanted}

    def _sync_embeddings(self, wanted: dict[str, MixEntry]) -> dict[str, MixEntry]:
        """Install the embedding files of ``wanted`` (all of them again when the set changed);
        returns the layer-adapter entries."""
        embeddings, adapters, bundles = {}, {}, {}
        for name, entry in wanted.items():
            path = Path(entry.path)
            keys = read_header(path).tensors if path.is_file() else {}
            (embeddings if embedding.looks_like(keys) else adapters)[name] = entry
            if any(embedding.is_bundled(k) for k in keys):
                bundles[name] = entry  # a LoRA carrying its token (pivotal tuning)
        stamps = {name: _stamp(Path(e.path)) for name, e in (embeddings | bundles).items()}
        if embeddings and self._installed.pipe is None:
            names = ", ".join(Path(e.path).name for e in embeddings.values())
            raise StudioError(f"{names}: textual-inversion embeddings apply to Stable Diffusion bases, not to a "
                              f"language model: remove it from this mix")
        self._bundled = {name: formats.read(e.path) for name, e in bundles.items()  # read once: _attach reuses it
                         if name not in self._attached or stamps[name] != self._attached[name].stamp}
        if stamps != {name: stamp for name, (stamp, _) in self._embeddings.items()}:
            loaded = {name: [embedding.read(e.path)] if name in embeddings else self._bundle_of(name, e.path)
                      for name, e in wanted.items() if name in stamps}
            self._embeddings = {}  # a refused set leaves none installed, and the next sync tries again
            self._installed.sync([emb for embs in loaded.values() for emb in embs])  # checks all before installing
            self._embeddings = {name: (stamps[name], embs) for name, embs in loaded.items()}
        return adapters

    def _bundle_of(self, name: str, path: str) -> list:
        af = self._bundled.get(name) or self._attached[name].af
        if self._installed.pipe is None:
            raise StudioError(f"{path} bundles a textual-inversion embedding, which applies to Stable Diffusion "
                              f"bases, not to a language model: remove it from this mix")
        return af.source.get(kohya.EMBEDDINGS, [])

    @property
    def tokens(self) -> list[str]:
        """The tokens of the embeddings in the mix."""
        return [emb.token for _, embs in self._embeddings.values() for emb in embs]

    def _attach(self, name: str, entry: MixEntry) -> None:
        path = Path(entry.path)
        if not path.is_file():
            raise StudioError(f"adapter file {path} does not exist: check the path")
        stamp = _stamp(path)
        af = self._bundled.pop(name, None) or formats.read(path)
        formats.attach_file(af, self.base.components, name, entry.weight, entry.te_weight)
        self._attached[name] = _Attached(entry, af, path.stem, data_hash(path)[:12], stamp,
                                         trigger_words(af.metadata))

    def clear(self) -> None:
        self.sync([])

    def _warn_unused_tokens(self, settings: list[Settings]) -> None:
        for token in self.tokens:
            prompts = tuple((s.prompt, s.negative) for s in settings)
            if not any(ti.in_prompt(token, *pair) for pair in prompts) and (token, prompts) not in self._warned:
                self._warned.add((token, prompts))  # once per prompt, not once per image of a batch
                self.warn(f"the embedding token {token} appears in no prompt, so it changes nothing: write it in "
                          f"the prompt, e.g. \"a photo of {token}\"")

    # -- rendering ----------------------------------------------------------------------------
    def settings(self, **fields) -> Settings:
        """A Settings carrying this mix's adapter labels and the base name."""
        return Settings(adapters=tuple(self.labels()), model=Path(self.base.source).name, **fields)

    @contextlib.contextmanager
    def merged(self):
        """Fold the mix into the base weights once (fp32 math, cast back) for a batch of renders;
        the pristine weights come back bit-exactly on exit, whatever happened inside."""
        models = list(self.base.components.values())
        try:
            for model in models:
                A.merge(model)
            yield self
        finally:
            for model in models:
                A.unmerge(model)

    def render(self, settings: list[Settings], merge: bool = False) -> list[np.ndarray]:
        """Images for ``settings`` with the current mix (unmerged, or merged once for the call)."""
        self._warn_unused_tokens(settings)
        if not merge or not self._attached:
            return generate(self.base.pipe, settings)
        with self.merged():
            return generate(self.base.pipe, settings)
