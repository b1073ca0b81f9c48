"""Text from a causal LM with a weighted mix of LM adapters, for the UI's Text tab.

The same :class:`~studio.mixing.MixSession` as images: the LM stays loaded, adapters stay
unmerged, a weight change is free. Decoding is ``studio.text.complete`` (the language-model
path's own function), so the Text tab prints what ``studio generate --task lm`` prints.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from studio.errors import StudioError
from studio.mixing import MixEntry, MixSession
from studio.ui.library import Library

MINI_LM_NAME = "mini-lm (embedded)"
MAX_NEW_TOKENS = 256


@dataclass
class LanguageBase:
    """A loaded causal LM in the shape MixSession expects (its components)."""

    model: object
    tokenizer: object
    source: str

    @property
    def components(self) -> dict:
        return {"lm": self.model}


class TextStudio:
    def __init__(self, library: Library, bases: dict[str, str | None] | None = None, lock=None):
        self.library = library
        self.bases = {MINI_LM_NAME: None, **(bases or {})}
        self.lock = lock or threading.RLock()
        self._loaded: str | None = None
        self.session: MixSession | None = None

    def keys(self) -> list[str]:
        return [c.key for c in self.library.scan() if c.base == "lm" and not c.error]

    def use_base(self, name: str) -> MixSession:
        from studio.models import MINI_LM, load_causal_lm

        if name not in self.bases:
            raise StudioError(f"unknown language model {name!r}: choose one of {', '.join(self.bases)}")
        with self.lock:
            if self._loaded != name:
                self.session = None
                model, tokenizer = load_causal_lm(self.bases[name])
                model.eval()
                self.session = MixSession(LanguageBase(model, tokenizer, str(self.bases[name] or MINI_LM)))
                self._loaded = name
            return self.session

    def complete(self, base: str, prompt: str, mix: list[tuple[str, float]], max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0) -> str:
        """The prompt followed by its continuation, with the adapters ``[(library key, weight), ...]``."""
        return self.complete_with_maps(base, prompt, mix, max_new_tokens, temperature, seed)[0]

    def complete_with_maps(self, base: str, prompt: str, mix: list[tuple[str, float]], max_new_tokens: int = 64,
                           temperature: float = 0.0, seed: int = 0) -> tuple[str, list]:
        """``complete`` and the router heat maps of the completion (``gate_map.GateMap`` per routed mixture in
        the mix, the gates of every forward: the prompt's, then one per new token; [] without one)."""
        from studio.text import complete
        from studio.ui import gate_map

        if not prompt:
            raise StudioError("the prompt is empty: type a prompt, e.g. 'Q: What colour is a frog?\\nA:'")
        if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS:
            raise StudioError(f"new tokens must be 1..{MAX_NEW_TOKENS}, got {max_new_tokens}")
        entries = []
        for key, weight in mix:
            card = self.library.usable(key)
            if card.base != "lm":
                raise StudioError(f"adapter {card.key} is a {card.family} adapter: mix it in the Generate tab; the "
                                  f"Text tab takes language-model adapters")
            entries.append(MixEntry(str(card.path), float(weight)))
        with self.lock:
            session = self.use_base(base)
            session.sync(entries)
            lm = session.base
            with gate_map.recording(session, "the completion") as maps:
                text = complete(lm.model, lm.tokenizer, [prompt], int(max_new_tokens), stop=None,
                                temperature=float(temperature), seed=int(seed))[0]
        return prompt + text, maps

