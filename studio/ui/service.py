"""``Studio``: what the web UI does, as plain Python (tested without a browser or Gradio).

It owns the loaded base, one :class:`~studio.mixing.MixSession` and one lock: every piece of
work that touches the model (generate, X/Y grid, bake, switching the base) holds the lock, so
two browser tabs can never interleave on the weights. Every user-caused problem is a
``StudioError`` whose message the UI shows as a notification; ``notes`` are warnings for
settings that were capped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from studio.errors import StudioError
from studio.generate_command import next_index
from studio.mixing import MixEntry, MixSession
from studio.ui import gate_map
from studio.ui.library import Library
from studio.ui.security import ADAPTER_SUFFIXES, IMAGE_SUFFIXES, check_upload, safe_filename

MINI_BASE_NAME = "mini-sd (embedded)"
MAX_COUNT = 8
MAX_GRID_CELLS = 36


@dataclass(frozen=True)
class MixRow:
    """One adapter slot of the Generate tab, as the client sent it."""

    key: str
    weight: float = 1.0
    te_weight: float | None = None


@dataclass(frozen=True)
class Request:
    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 4.0
    width: int | None = None
    height: int | None = None
    sampler: str = "dpmpp_2m"
    count: int = 1
    mix: tuple[MixRow, ...] = ()
    base: str = MINI_BASE_NAME


@dataclass
class Result:
    paths: list[Path]
    parameters: list[str]
    notes: list[str] = field(default_factory=list)
    gate_maps: list = field(default_factory=list)
    """The last image's router heat-map data, one ``gate_map.GateMap`` per routed mixture in the mix."""


def parse_values(text: str, what: str) -> list[float]:
    """'0, 0.5, 1' -> [0.0, 0.5, 1.0]."""
    try:
        values = [float(v) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise StudioError(f"bad {what} {text!r}: give numbers separated by commas, e.g. 0, 0.5, 1") from None
    if not values:
        raise StudioError(f"{what} is empty: give numbers separated by commas, e.g. 0, 0.5, 1")
    return values


class Studio:
    def __init__(self, adapters: str | Path, outputs: str | Path, bases: dict[str, str | None] | None = None):
        self.library = Library(adapters)
        self.outputs = Path(outputs).resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.bases = {MINI_BASE_NAME: None, **(bases or {})}
        self.lock = threading.RLock()
        self._base_name: str | None = None
        self.session: MixSession | None = None
        self.library.scan()

    # -- base and mix -------------------------------------------------------------------------
    def use_base(self, name: str) -> MixSession:
        """The session on base ``name`` (looked up among the configured bases), loading it once."""
        from studio.models import load_diffusion_base

        if name not in self.bases:
            raise StudioError(f"unknown base {name!r}: choose one of {', '.join(self.bases)}")
        with self.lock:
            if self._base_name != name:
                self.session = None  # drop the old pipeline before loading the next one
                base = load_diffusion_base(self.bases[name])
                base.pipe.set_progress_bar_config(disable=True)
                self.session, self._base_name = MixSession(base), name
            return self.session

    def _entries(self, mix: tuple[MixRow, ...]) -> list[MixEntry]:
        return [MixEntry(str(self.library.usable(row.key).path), row.weight, row.te_weight)
                for row in mix if row.key]

    def _mixed(self, request: Request) -> MixSession:
        session = self.use_base(request.base)
        session.sync(self._entries(request.mix))
        return session

    def triggers(self, key: str) -> list[str]:
        return list(self.library.usable(key).triggers)

    # -- generate -----------------------------------------------------------------------------
    def _settings(self, session: MixSession, request: Request, seed: int):
        from studio.pipeline import within_limits

        s = session.settings(prompt=request.prompt, negative=request.negative, seed=int(seed), steps=int(request.steps),
                             cfg=float(request.cfg), width=request.width or None, height=request.height or None,
                             sampler=request.sampler)
        return within_limits(session.base.pipe, s)

    def _save(self, image, s, folder: str) -> tuple[Path, str]:
        from studio.pipeline import parameters_text, save_png

        out = self.outputs / folder
        out.mkdir(parents=True, exist_ok=True)
        text = parameters_text(s, image.shape[1], image.shape[0])
        return save_png(image, out / f"{next_index(out):05d}-{s.seed}.png", text), text

    def generate(self, request: Request, progress: Callable[[int, int], None] = lambda i, n: None) -> Result:
        count = int(request.count)
        notes = []
        if not 1 <= count <= MAX_COUNT:
            notes.append(f"image count {count} capped to {min(max(count, 1), MAX_COUNT)} (allowed 1..{MAX_COUNT})")
            count = min(max(count, 1), MAX_COUNT)
        with self.lock:
            session = self._mixed(request)
            result = Result([], [], notes)
            for i in range(count):
                progress(i, count)
                s, capped = self._settings(session, request, request.seed + i)
                if i == 0:
                    result.notes += capped
                with gate_map.recording(session) as maps:  # every image's; the last one's stay
                    image = session.render([s])[0]
                result.gate_maps = maps
                path, text = self._save(image, s, "images")
                result.paths.append(path)
                result.parameters.append(text)
            progress(count, count)
        return result

    def xy_grid(self, request: Request, x_slot: int, x_values: str, y_slot: int | None = None,
                y_values: str = "", progress: Callable[[int, int], None] = lambda i, n: None) -> Result:
        """One labelled image: the mix at fixed seed with slot ``x_slot``'s weight over ``x_values``
        (columns) and optionally slot ``y_slot``'s over ``y_values`` (rows). Slots count from 1."""
        import dataclasses

        from studio.pipeline import labelled_grid, save_png

        rows = list(request.mix)
        xs = parse_values(x_values, "X values")
        ys = parse_values(y_values, "Y values") if y_slot else [None]
        for slot in [x_slot] + ([y_slot] if y_slot else []):
            if not 1 <= slot <= len(rows) or not rows[slot - 1].key:
                raise StudioError(f"X/Y axis slot {slot} has no adapter: add one to the mix and pick its slot")
        if y_slot == x_slot:
            raise StudioError("X and Y axes use the same slot: pick two different slots, or no Y axis")
        if len(xs) * len(ys) > MAX_GRID_CELLS:
            raise StudioError(f"an X/Y grid of {len(xs)}x{len(ys)} is over {MAX_GRID_CELLS} images: give fewer values")

        def name(slot):
            return Path(rows[slot - 1].key).name

        def label(slot, value):
            return f"{name(slot)}: {value:g}"

        cells, notes = [], []
        with self.lock:
            for r, y in enumerate(ys):
                row_cells = []
                for c, x in enumerate(xs):
                    progress(r * len(xs) + c, len(xs) * len(ys))
                    mix = list(rows)
                    # the slider weight of an axis slot moves the UNet and text encoder together
                    mix[x_slot - 1] = dataclasses.replace(mix[x_slot - 1], weight=x, te_weight=None)
                    if y_slot:
                        mix[y_slot - 1] = dataclasses.replace(mix[y_slot - 1], weight=y, te_weight=None)
                    session = self._mixed(dataclasses.replace(request, mix=tuple(mix)))
                    s, capped = self._settings(session, request, request.seed)
                    notes = notes or capped
                    row_cells.append(session.render([s])[0])
                cells.append(row_cells)
            image = labelled_grid(cells, [label(x_slot, x) for x in xs],
                                  [label(y_slot, y) if y_slot else "" for y in ys])
            out = self.outputs / "grids"
            out.mkdir(parents=True, exist_ok=True)
            text = f"X/Y grid, seed {request.seed}: X = {name(x_slot)} {xs}"
            text += f", Y = {name(y_slot)} {ys}" if y_slot else ""
            path = save_png(image, out / f"{next_index(out):05d}-{request.seed}.png", text)
        return Result([path], [text], notes)

    # -- bake, inspect, uploads ---------------------------------------------------------------
    def bake(self, request: Request, name: str, rank: int | None, fmt: str = "kohya", overwrite: bool = False) -> str:
        from studio import formats

        if fmt not in ("kohya", "native", "diffusers"):
            raise StudioError(f"unknown format {fmt!r}: choose kohya, native or diffusers")
        inputs = [(formats.read(self.library.usable(r.key).path), r.weight, r.te_weight) for r in request.mix if r.key]
        target = self.library.root / "baked" / safe_filename(name, ".safetensors")
        target.parent.mkdir(exist_ok=True)
        with self.lock:
            session = self._mixed(request)  # the live mix refuses adapters of another base first
            baked, summary = formats.bake(inputs, rank=int(rank) if rank else None, models=session.base.components)
            report = formats.save(baked, target, fmt, models=session.base.components, overwrite=overwrite)
        self.library.scan()
        mode = f"rank {int(rank)}" if rank else "exact"
        return (f"wrote {target.relative_to(self.library.root)} ({fmt}, {mode}): retained energy "
                f"{summary['energy']:.6f}, relative error {summary['relative_error']:.3g}, sha256 {report.sha256[:12]}")

    def inspect(self, key: str) -> dict:
        from studio.formats.inspection import inspect_file

        card = self.library.get(key)
        if card.error:
            raise StudioError(f"adapter {card.key} cannot be read: {card.error}")
        # the library key, never the server's absolute path, goes back to the client
        return inspect_file(card.path) | {"path": f"{card.key}.safetensors"}

    def add_adapter(self, upload: str | Path) -> str:
        """Copy an uploaded .safetensors into ``uploads/`` after it reads as an adapter."""
        import shutil

        from studio import formats

        path = check_upload(upload, ADAPTER_SUFFIXES)
        formats.read(path)  # refuses anything that is not an adapter, with the reason
        target = self.library.root / "uploads" / safe_filename(path.name, ".safetensors")
        if target.exists():
            raise StudioError(f"an adapter named uploads/{target.stem} is already in the library: rename the file")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        self.library.scan()
        return self.library.get(target.relative_to(self.library.root).with_suffix("").as_posix()).key

    def set_preview(self, key: str, upload: str | Path) -> Path:
        """Store an uploaded image as the card's ``NAME.preview.png`` (re-encoded, at most 256 px)."""
        from PIL import Image, UnidentifiedImageError

        card = self.library.get(key)
        path = check_upload(upload, IMAGE_SUFFIXES, max_bytes=20 << 20)
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((256, 256))
        except (UnidentifiedImageError, OSError) as err:
            raise StudioError(f"upload {path.name} is not a readable image ({err}): give a .png or .jpg") from None
        target = card.path.with_name(card.path.stem + ".preview.png")
        im.save(target)
        self.library.scan()
        return target
