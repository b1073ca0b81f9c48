"""The Train tab's form, derived from the trainer's config dataclass (no Gradio here).

Every field of ``DiffusionTrainConfig`` (adapter + run sections and the image options) is one
control, chosen by its type: bool -> checkbox, a fixed set of values -> dropdown, int / float ->
number, a list -> one item per line, the ``method_args`` table -> ``name=value`` lines, any other
string (paths too) -> textbox. Label, help and default come from the field and the docstring
under it -- the ones ``studio train --help`` prints -- so the form and the CLI cannot disagree,
and a field someone adds to the config shows up here (in "Advanced") with nothing to change.

Values go back through the CLI's own parser (``studio.config.build``): the form is one more layer
like a TOML file or ``--set``, so a value is checked and converted exactly as ``studio train``
would. Saving writes ``studio.config.to_toml`` of the built config, a file ``studio train
--config`` reads; loading reads a TOML file with ``read_toml`` over the form's current values.

Three fields are picked from lists instead of typed: the dataset and the regularisation images
(the UI's dataset folders) and the base (the bases ``studio ui`` was started with). The client
sends a name; the server looks it up, never opens what the client typed as a path.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from studio.adapters import registry
from studio.config import field_docs, field_types, first_sentence, read_toml, to_toml
from studio.errors import StudioError

GROUPS = {
    "Basics": ("base", "method", "targets", "rank", "alpha", "unet_lr", "te_lr", "optimizer", "optimizer_args",
               "resolution",
               "batch_size", "steps", "epochs", "trigger", "name"),
    "Method options": ("method_args", "rslora", "dropout", "conv_rank", "conv_alpha", "block_ranks", "block_lrs"),
    "Data and captions": ("reg_data", "prior_loss_weight", "caption_dropout", "shuffle_captions", "keep_tokens",
                          "flip", "buckets"),
    "Validation": ("val_data", "val_split", "val_every", "keep_best"),
    "Samples": ("sample_prompts", "sample_every", "sample_steps", "sample_cfg"),
    "Memory and speed": ("gradient_checkpointing", "base_dtype", "mixed_precision", "grad_accum", "cache_latents",
                         "cache_text", "cache_dir", "vram_budget"),
}
"""Where the common fields go (kohya_ss's order: the basics first). A field named nowhere -- a new
one included -- goes to ADVANCED, so nothing is ever missing from the form."""
ADVANCED = "Advanced"
OPEN = ("Basics",)
"""Accordions open at start; the others are collapsed."""
OWN = ("task", "out", "data")
"""Fields the tab sets itself: the image trainer, the library folder of the run, the dataset picker."""
LOOKUPS = {"data": "datasets", "reg_data": "datasets", "val_data": "datasets", "base": "bases"}
"""Fields picked by name from the server's lists (Picks), never typed as paths."""
CHOICES = re.compile(r"^\s*([\w.-]+(?:\s*\|\s*[\w.-]+)+)\s*(?:[:;(.]|$)")
"""A docstring that opens with 'a | b | c' lists the field's values (``lr_schedule``, ``base_dtype``)."""


def config_class():
    """The dataclass ``studio train`` fills for images; the UI reaches trainers only through the CLI."""
    from studio.cli import train_config_class

    return train_config_class("image")


@dataclass(frozen=True)
class Control:
    name: str
    kind: str
    """checkbox | dropdown | number | textbox | lines (a list) | pairs (a name=value table)."""
    label: str
    info: str
    default: object
    """The field's default as the control shows it (None = empty)."""
    choices: tuple = ()
    integer: bool = False
    group: str = ADVANCED
    lookup: str | None = None
    """'datasets' or 'bases' for a field picked from the server's lists."""


@dataclass(frozen=True)
class Picks:
    """The server's lists, name -> path: dataset folders and bases (None = the embedded base)."""

    datasets: dict
    bases: dict

    def name_of(self, lookup: str, value, key: str, source: str) -> str | None:
        table = getattr(self, lookup)
        if value in (None, ""):
            return next((n for n, p in table.items() if p is None), "")
        for name, path in table.items():
            if path is not None and (str(path) == str(value) or Path(path).resolve() == Path(value).resolve()):
                return name
        what = "dataset folders (start studio ui with --datasets PARENT)" if lookup == "datasets" else \
            "bases (start studio ui with --base NAME=PATH)"
        raise StudioError(f"{key} = {str(value)!r} in {source} is not one of this UI's {what}: pick one from the list")


def _plain(annotation):
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return annotation, False


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _control(f: dataclasses.Field, annotation, doc: str, group: str) -> Control:
    kind, optional = _plain(annotation)
    default = _default(f)
    flag = f"--{f.name.replace('_', '-')}"
    info = f"{first_sentence(doc)} [{flag}]" if doc else flag
    base = dict(name=f.name, label=f.name.replace("_", " "), info=info, group=group, lookup=LOOKUPS.get(f.name))
    listed = CHOICES.match(doc or "")
    if f.name == "method":  # the registry is the one list of methods
        return Control(kind="dropdown", default=default, choices=tuple(registry.METHODS), **base)
    if base["lookup"]:
        return Control(kind="dropdown", default=default, **base)
    if kind is bool:
        return Control(kind="checkbox", default=bool(default), **base)
    if typing.get_origin(kind) is typing.Literal:
        return Control(kind="dropdown", default=default, choices=typing.get_args(kind), **base)
    if listed and kind is str and not optional:
        values = tuple(v.strip() for v in listed.group(1).split("|"))
        if default in values:
            return Control(kind="dropdown", default=default, choices=values, **base)
    if kind in (int, float):
        return Control(kind="number", default=default, integer=kind is int, **base)
    if kind is dict or typing.get_origin(kind) is dict:
        return Control(kind="pairs", default=_pairs_text(default or {}), **base)
    if kind in (list, tuple) or typing.get_origin(kind) in (list, tuple):
        return Control(kind="lines", default="\n".join(map(str, default or [])), **base)
    return Control(kind="textbox", default=default if default is not None else "", **base)


def controls(cls=None) -> list[Control]:
    """The form of ``cls`` (default: the image trainer's config): the named groups in GROUPS order,
    then every other field in field order under ADVANCED."""
    cls = cls or config_class()
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in OWN}
    kinds, docs = field_types(cls), field_docs(cls)
    placed = [(name, group) for group, names in GROUPS.items() for name in names if name in fields]
    named = {name for name, _ in placed}
    placed += [(name, ADVANCED) for name in fields if name not in named]
    return [_control(fields[name], kinds[name], docs.get(name, ""), group) for name, group in placed]


def _pairs_text(table: dict) -> str:
    return "\n".join(f"{k}={v}" for k, v in table.items())


def to_layer(form: list[Control], values: list, picks: Picks) -> dict:
    """The form's values as a config layer: only what is filled in (an empty control means the
    field's default, as a flag not given does), names of picked items turned into their paths."""
    layer = {}
    for control, value in zip(form, values):
        if control.lookup:
            table = getattr(picks, control.lookup)
            if value not in table:
                if value in (None, ""):
                    continue
                raise StudioError(f"unknown {control.label} {value!r}: pick one from the list")
            if table[value] is not None:
                layer[control.name] = str(table[value])
            continue
        if control.kind == "checkbox":
            layer[control.name] = bool(value)
        elif control.kind in ("lines", "pairs"):
            items = [line.strip() for line in str(value or "").splitlines() if line.strip()]
            if items or control.kind == "lines":
                layer[control.name] = items
        elif control.kind == "number":
            if value is not None and str(value).strip() != "":
                layer[control.name] = _number(control, value)
        elif value is not None and value != "":
            layer[control.name] = value
    return layer


def _number(control: Control, value) -> int | float:
    """A number control's value: a number from gr.Number, or the text of an optional one (a text
    box, because gr.Number shows an empty value as 0 and sends 0 back)."""
    try:
        number = float(str(value).strip())
    except ValueError:
        raise StudioError(f"{control.label} {str(value).strip()!r} is not a number: type one, or leave the field "
                          f"empty for the default") from None
    if control.integer:
        if not number.is_integer():
            raise StudioError(f"{control.label} {number:g} is not a whole number: type one, or leave it empty")
        return int(number)
    return number


def from_config(form: list[Control], cfg, picks: Picks, source: str) -> list:
    """The controls' values for a built config (what loading a TOML file shows)."""
    values = []
    for control in form:
        value = getattr(cfg, control.name)
        if control.lookup:
            value = picks.name_of(control.lookup, value, control.name, source)
        elif control.kind == "pairs":
            value = _pairs_text(value)
        elif control.kind == "lines":
            value = "\n".join(map(str, value))
        elif value is None and control.kind == "textbox":
            value = ""
        values.append(value)
    return values


def build_config(layer: dict, source: str = "the Train tab", *more: tuple[dict, str]):
    """The trainer's config from the form's layer (and more layers over it), checked as
    ``studio train`` checks it: the same StudioError for the same mistake."""
    from studio.cli import train_config

    return train_config((layer, source), *more)


def load_toml(path: str | Path, layer: dict):
    """A TOML file read over the form's current values (its keys win), as ``--config`` reads it."""
    return build_config(layer, "the Train tab", (read_toml(path), Path(path).name))


def toml_text(cfg) -> str:
    """The config as the TOML ``studio train --config`` reads (the folder of a UI run left out:
    the next run picks its own)."""
    return to_toml(dataclasses.replace(cfg, out=None))


def method_help(method: str) -> str:
    """The method's own options (its Config fields that are not generic flags) with defaults."""
    config = registry.get(method).Config
    docs = field_docs(config)
    own = [f for f in dataclasses.fields(config) if f.name not in registry.GENERIC_OPTIONS]
    if not own:
        return f"{method} has no options of its own besides the fields above: leave this empty"
    items = [f"{f.name}={_default(f)}" + (f" ({first_sentence(docs[f.name]).rstrip('.')})" if f.name in docs else "")
             for f in own]
    return f"{method} options, one name=value a line: " + "; ".join(items)
