"""The adapter library: every ``.safetensors`` under the adapters folder, as cards.

A card is what ``studio inspect`` knows about a file (method, ranks, base family, trigger words,
short hash) plus a preview image when one sits beside it (``NAME.preview.png``, ``NAME.png`` or
``NAME.jpg``, as A1111's extra-networks cards). A file that does not read becomes an *error
card* carrying the one-line reason; the rest of the library keeps working.

Cards are keyed by their path relative to the adapters folder without the suffix
(``stripes-lora/stripes``). The client only ever sends such a key back; :meth:`Library.get`
looks it up in the scanned set, so ``../../etc/passwd`` is just an unknown name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError
from studio.formats.inspection import inspect_file

PREVIEW_SUFFIXES = (".preview.png", ".preview.jpg", ".png", ".jpg", ".jpeg")
SKIPPED_FOLDERS = {"checkpoints", "logs", "samples"}
"""Training-run internals: resumable state, TensorBoard logs and sample grids are not adapters."""


@dataclass(frozen=True)
class Card:
    key: str
    """Path relative to the adapters folder, without ``.safetensors``: the name the client sends."""
    path: Path
    method: str = ""
    ranks: str = ""
    family: str = ""
    base: str = ""
    """Family code: 'sd15', 'sdxl', 'sd-custom' or 'lm' (language-model adapters go to the Text tab);
    ``family`` is its label for people ('SD1.5', or 'mini-sd' for an adapter of the embedded base)."""
    triggers: tuple[str, ...] = ()
    hash12: str = ""
    preview: Path | None = None
    error: str | None = None
    """The one-line reason a broken file cannot be used (an error card)."""

    @property
    def caption(self) -> str:
        if self.error:
            return f"⚠ {self.key}: {self.error}"
        words = f" · trigger: {', '.join(self.triggers)}" if self.triggers else ""
        return f"{self.key} · {self.method} · rank {self.ranks} · {self.family}{words}"


def _preview(path: Path) -> Path | None:
    """``NAME.preview.png`` (or .png / .jpg) beside the file; else, for a ``studio train`` output,
    its newest sample grid."""
    stem = path.with_suffix("")
    for suffix in PREVIEW_SUFFIXES:
        candidate = stem.with_name(stem.name + suffix)
        if candidate.is_file():
            return candidate
    samples = sorted((path.parent / "samples").glob("step-*.png"))
    return samples[-1] if samples else None


def _ranks(info: dict) -> str:
    """'8', '4/8', '32-44' (a file truncated per module by energy), or 'none' (methods without a rank:
    SVF, (IA)^3)."""
    values = {r for ranks in info["ranks"].values() for r in ranks}
    numbers = sorted(v for v in values if isinstance(v, int))
    words = ["none"] if len(numbers) < len(values) else []
    if len(numbers) > 2:
        numbers = [f"{numbers[0]}-{numbers[-1]}"]
    return "/".join([str(n) for n in numbers] + words) or "-"


def _base_label(info: dict) -> str:
    """'SD1.5', 'SDXL', or for a custom-size SD model the model it was trained on when the file
    names it (``ss_sd_model_name``: 'mini-sd' for the embedded base) -- a family of one is better
    told by its name."""
    trained_on = info["metadata"].get("ss_sd_model_name", "").strip()
    if info["base"] == "sd-custom" and trained_on:
        return Path(trained_on).name
    return info["base_name"]


def read_card(root: Path, path: Path) -> Card:
    key = path.relative_to(root).with_suffix("").as_posix()
    try:
        info = inspect_file(path)
    except StudioError as err:  # the card shows the library name, not the server's absolute path
        return Card(key, path, preview=_preview(path), error=str(err).replace(str(path), f"{key}.safetensors"))
    except Exception as err:  # a damaged file may fail anywhere in a reader: still one card, one line
        return Card(key, path, preview=_preview(path), error=f"cannot read the file ({type(err).__name__}: {err})")
    methods = sorted(set(info["methods"].values()))
    return Card(key, path, method="+".join(methods), ranks=_ranks(info), family=_base_label(info), base=info["base"],
                triggers=tuple(info["trigger_words"]), hash12=info["hash"]["short"], preview=_preview(path))


class Library:
    """Cards of one adapters folder, re-read only for files whose size or mtime changed."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: dict[Path, tuple[tuple, Card]] = {}
        self.cards: list[Card] = []

    def scan(self) -> list[Card]:
        found = []
        for path in sorted(self.root.rglob("*.safetensors")):
            relative = path.relative_to(self.root).parts
            if any(p.startswith(".") for p in relative) or SKIPPED_FOLDERS & set(relative[:-1]):
                continue
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size, _preview(path))
            cached = self._cache.get(path)
            card = cached[1] if cached and cached[0] == stamp else read_card(self.root, path)
            self._cache[path] = (stamp, card)
            found.append(card)
        self.cards = found
        return found

    @property
    def keys(self) -> list[str]:
        return [c.key for c in self.cards]

    def get(self, key: str) -> Card:
        """The card named ``key``; an unknown name (a path, ``..``) is refused, never opened."""
        for card in self.cards:
            if card.key == key:
                return card
        self.scan()
        for card in self.cards:
            if card.key == key:
                return card
        raise StudioError(f"no adapter named {key!r} in the library {self.root}: pick one from the list "
                          f"(names are looked up, never opened as paths)")

    def usable(self, key: str) -> Card:
        card = self.get(key)
        if card.error:
            raise StudioError(f"adapter {card.key} cannot be used: {card.error}")
        return card
