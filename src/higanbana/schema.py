"""Typed TOML configs from dataclasses: the validation the trainer and the evaluation share.

A config is a dataclass whose fields are *sections*, each itself a dataclass of typed fields with
defaults (``field(metadata={"choices": (...)})`` restricts a value). :func:`build_sections` checks
a parsed TOML table against it: an unknown section or key names where it was and suggests the
nearest valid one (or the section a misplaced key belongs in), a wrong type or value names
``section.key``. Overrides are ``section.key=value`` with the value read as a TOML literal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from .errors import ConfigError, nearest


def choice(*values: str) -> dict[str, Any]:
    """Field metadata restricting a string field to ``values``."""
    return {"choices": values}


def sections_of(config_cls: type) -> dict[str, type]:
    """``{section name: section dataclass}`` of a config dataclass (fields with a default factory)."""
    return {
        f.name: f.default_factory  # type: ignore[misc]
        for f in dataclasses.fields(config_cls)
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)
    }


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _owner_hint(key: str, sections: dict[str, type]) -> str:
    owners = [name for name, cls in sections.items() if key in field_names(cls)]
    return f" (it belongs in [{owners[0]}])" if owners else ""


def build_sections(config_cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """The section objects of ``data`` (a parsed TOML table), validated; missing sections are left out."""
    sections = sections_of(config_cls)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of sections")
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name not in sections:
            hint = _owner_hint(name, sections) or nearest(name, sections)
            raise ConfigError(f"{where}: unknown section [{name}]{hint}")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{name}] must be a table, got {value!r}")
        values[name] = build_section(sections[name], value, f"{where}: {name}", sections)
    return values


def build_section(cls: type, data: dict[str, Any], where: str, sections: dict[str, type] | None = None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in fields:
            hint = nearest(key, fields) or _owner_hint(key, sections or {})
            raise ConfigError(f"{where}.{key}: unknown key{hint}")
        values[key] = check_value(value, hints[key], fields[key], f"{where}.{key}")
    return cls(**values)


def check_value(value: Any, hint: Any, spec: dataclasses.Field, where: str) -> Any:
    """``value`` checked against a field's type and choices (ints are accepted for floats)."""
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is list and isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    expected = hint if isinstance(hint, type) else None
    if isinstance(hint, types.UnionType):
        expected = tuple(a for a in typing.get_args(hint) if isinstance(a, type))
    ok = isinstance(value, expected) if expected else True
    if ok and isinstance(value, bool) and hint in (int, float):
        ok = False
    if not ok:
        name = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{where}: expected {name}, got {value!r}")
    choices = spec.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}{nearest(str(value), choices)}")
    return value


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def resolve_paths(data: dict[str, Any], root: Path, path_fields: dict[str, tuple[str, ...]]) -> None:
    """Relative paths of the listed ``section: keys`` are made relative to ``root`` (the file's folder)."""
    for section, keys in path_fields.items():
        table = data.get(section)
        if not isinstance(table, dict):
            continue
        for key in keys:
            value = table.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                table[key] = str(root / value)


def apply_override(data: dict[str, Any], item: str) -> None:
    """``section.key=value``; the value is a TOML literal, or a bare string when it is not one."""
    item = item.removeprefix("--")
    key, sep, raw = item.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {item!r}: expected section.key=value (e.g. training.max_train_steps=100)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    section, _, name = key.partition(".")
    table = data.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"override {item!r}: [{section}] is not a table")
    *inner, last = name.split(".")
    for part in inner:
        table = table.setdefault(part, {})
    table[last] = value


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {value!r} to TOML")


def sections_to_toml(sections: dict[str, dict[str, Any]]) -> str:
    """``{section: {key: value}}`` as TOML tables."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)
