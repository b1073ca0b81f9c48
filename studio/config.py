"""Strict TOML <-> dataclass configs: CLI flags, a TOML file and ``--set key=value`` fill one object.

Unknown keys are errors (with the nearest valid name), values are converted to the field's
type, and the effective config is written back as TOML next to the run's output. A ``dict``
field is the one table: ``key = {a = 1}`` in TOML, ``--set key.a=1``, or ``--key a=1 b=x`` as a
flag, merged key by key over the layers below.

The command-line flags of a config are its fields (``add_flag``), documented by the string
literal under each field (``field_docs``): one place says what an option means.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import re
import sys
import textwrap
import types
import typing
from pathlib import Path

from studio.errors import StudioError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def field_types(cls) -> dict[str, type]:
    """The resolved annotation of each init field."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_dict(annotation) -> bool:
    return annotation is dict or typing.get_origin(annotation) is dict


def parse_value(text: str):
    """A command-line value without a declared type: '4' -> 4, '0.5' -> 0.5, 'true' -> True, else the string."""
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _pairs(items, key: str, source: str) -> dict:
    """``["a=1", "b=x"]`` -> {"a": 1, "b": "x"}."""
    out = {}
    for item in [items] if isinstance(items, str) else items:
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip():
            raise StudioError(f"{key} item {item!r} in {source} is not name=value: write e.g. name=4")
        out[name.strip()] = parse_value(value.strip())
    return out


def _convert(value, annotation, key: str, source: str):
    """Coerce a TOML or command-line value to the annotated type, or say why not."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if _is_dict(annotation):  # a TOML table keeps its types; command-line name=value items are parsed
        return dict(value) if isinstance(value, dict) else _pairs(value, key, source)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, source)
            except StudioError:
                continue
        raise StudioError(f"{key} = {value!r} in {source} is not a {annotation}: fix the value")
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
        converted = [_convert(v, args[0] if args else str, key, source) for v in items]
        return converted if origin is list else tuple(converted)
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError):
        raise StudioError(f"{key} = {value!r} in {source} is not a valid {annotation.__name__}: fix the value") from None
    return value


def _unknown(key: str, known: list[str], source: str) -> StudioError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(known))}"
    return StudioError(f"unknown config key '{key}' in {source}: {hint}")


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StudioError(f"config file {path} does not exist: check the --config path")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise StudioError(f"invalid TOML in {path}: {err}") from None


def parse_set(items: list[str]) -> dict:
    """``["a=1", "b.c=x"]`` -> {"a": "1", "b.c": "x"} (values converted later by type)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise StudioError(f"--set {item!r} is not key=value: write e.g. --set rank=8")
        out[key.strip()] = value.strip()
    return out


def build(cls, *layers: tuple[dict, str]):
    """A ``cls`` instance from dict layers applied in order, each ``(values, source name)``.

    Later layers win, a dict field key by key. A class may still read renamed keys of files it
    wrote earlier: ``cls.LEGACY_KEYS`` (name -> type) are accepted and handed, with the rest, to
    ``cls.upgrade_legacy(values)``, which returns the current keys.
    """
    types = field_types(cls)
    legacy = getattr(cls, "LEGACY_KEYS", {})
    values: dict = {}
    for layer, source in layers:
        for key, value in layer.items():
            head, dot, sub = key.partition(".")
            if dot and _is_dict(types.get(head)):  # --set method_args.svd=exact
                key, value = head, {sub: parse_value(value) if isinstance(value, str) else value}
            annotation = types.get(key, legacy.get(key))
            if annotation is None:
                raise _unknown(key, list(types), source)
            value = _convert(value, annotation, key, source)
            values[key] = {**values[key], **value} if _is_dict(annotation) and key in values else value
    if legacy:
        values = cls.upgrade_legacy(values)
    return cls(**values)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = [f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else json.dumps(k)} = {_toml_value(v)}"
                 for k, v in value.items() if v is not None]
        return "{" + ", ".join(items) + "}"
    return json.dumps(value)


def to_toml(obj) -> str:
    """The dataclass as TOML (scalars, lists and one level of tables; None values are omitted)."""
    lines = [f"{f.name} = {_toml_value(getattr(obj, f.name))}" for f in dataclasses.fields(obj)
             if getattr(obj, f.name) is not None]
    return "\n".join(lines) + "\n"


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, by field name, read from the source with
    ``ast``; a subclass that re-declares a field with a docstring of its own overrides its base's."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (built in a REPL): no help text, not an error
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def first_sentence(doc: str) -> str:
    """The first sentence of a field's docstring: its --help line (the rest is for readers of the code)."""
    text = " ".join(doc.split())
    return re.split(r"(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z0-9(])", text, maxsplit=1)[0].rstrip(".") + "."


def add_flag(parser, name: str, annotation, help: str, aliases: tuple[str, ...] = (), **extra) -> None:
    """The flag ``--<name with dashes>`` of one config field, ``dest`` = the field, absent unless given.

    Values stay strings, converted later by ``build`` exactly like TOML and ``--set`` values (so
    ``--alpha none`` works for an optional field). A bool is ``--x`` / ``--no-x``; a list takes one
    or more values; a dict takes ``name=value`` items.
    """
    flags = (f"--{name.replace('_', '-')}", *aliases)
    kind = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation) \
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) else annotation
    options = dict(dest=name, default=argparse.SUPPRESS, help=help.replace("%", "%%"), **extra)
    if kind is bool:
        parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **options)
    elif _is_dict(kind):
        parser.add_argument(*flags, nargs="+", metavar="NAME=VALUE", **options)
    elif typing.get_origin(kind) in (list, tuple) or kind in (list, tuple):
        parser.add_argument(*flags, nargs="+", metavar=name.upper().removesuffix("S"), **options)
    else:
        parser.add_argument(*flags, **options)
