"""Strict TOML <-> dataclass configs: CLI flags, a TOML file and ``--set key=value`` fill one object.

Unknown keys are errors (with the nearest valid name), values are converted to the field's
type, and the effective config is written back as TOML next to the run's output.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from pathlib import Path

from studio.errors import StudioError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _convert(value, annotation, key: str, source: str):
    """Coerce a TOML or command-line value to the annotated type, or say why not."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
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
    """A ``cls`` instance from dict layers applied in order, each ``(values, source name)``."""
    types = _field_types(cls)
    values: dict = {}
    for layer, source in layers:
        for key, value in layer.items():
            if key not in types:
                raise _unknown(key, list(types), source)
            values[key] = _convert(value, types[key], key, source)
    return cls(**values)


def to_toml(obj) -> str:
    """The dataclass as TOML (scalars and lists; None values are omitted)."""
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = list(value)
        lines.append(f"{f.name} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
    return "\n".join(lines) + "\n"
