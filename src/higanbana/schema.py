"""Typed TOML configs from dataclasses: the validation the trainer and the evaluation share.

A config is a dataclass whose fields are *sections*, each itself a dataclass of typed fields with
defaults (``field(metadata={"choices": (...)})`` restricts a value). :func:`build_sections` checks
a parsed TOML table against it: an unknown section or key names where it was and suggests the
nearest valid one (or the section a misplaced key belongs in), a wrong type or value names
``section.key``. Overrides are ``section.key=value`` with the value read as a TOML literal.

Numbers are checked once, here, for every config: a float anywhere in a config (a field, or inside
a table or list such as ``network.options``) must be finite — TOML's ``nan`` and ``inf`` are
refused — and every int or float field declares its range in its metadata (:func:`limits` and the
shorthands :func:`positive`, :func:`at_least`, :func:`fraction`, :func:`unbounded`, :data:`SEED`),
so a new field cannot forget it (a test walks every schema). A range may allow sentinel values
(``special``, e.g. ``-1`` for "same as another field") and may be lifted by a boolean opt-in field
of the same section (``unless``, e.g. ``optimizer.allow_nonpositive_lr``).
"""

from __future__ import annotations

import dataclasses
import json
import math
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


def _number(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(value)


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field (or, with ``items``, every item of a list field) may take."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded
    high_open: bool = False  # high itself is excluded
    special: tuple[float, ...] = ()  # sentinels allowed outside the range (documented per field)
    unless: str = ""  # a boolean field of the same section that lifts the range when true
    items: bool = False  # the range applies to each item of a list
    length: int | None = None  # a list field's exact length
    hint: str = ""  # appended to the error

    def contains(self, value: float) -> bool:
        if value in self.special:
            return True
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            text = f"in {'(' if self.low_open else '['}{_number(lo)}, {_number(hi)}{')' if self.high_open else ']'}"
        elif lo is not None:
            text = f"greater than {_number(lo)}" if self.low_open else f"at least {_number(lo)}"
        elif hi is not None:
            text = f"less than {_number(hi)}" if self.high_open else f"at most {_number(hi)}"
        else:
            text = "a finite number"
        if self.special:
            text += " (or " + " or ".join(_number(v) for v in self.special) + ")"
        return text


def limits(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    special: tuple[float, ...] = (),
    unless: str = "",
    items: bool = False,
    length: int | None = None,
    hint: str = "",
) -> dict[str, Any]:
    """Field metadata: the field's range (every int and float field declares one; see the module doc)."""
    return {"range": Range(low, high, low_open, high_open, tuple(special), unless, items, length, hint)}


def positive(**kw: Any) -> dict[str, Any]:
    """Metadata: greater than 0."""
    return limits(0, low_open=True, **kw)


def at_least(low: float, **kw: Any) -> dict[str, Any]:
    """Metadata: at least ``low``."""
    return limits(low, **kw)


def fraction(**kw: Any) -> dict[str, Any]:
    """Metadata: in [0, 1]."""
    return limits(0, 1, **kw)


def unbounded() -> dict[str, Any]:
    """Metadata of a number that may take any finite value (a deliberate choice, not a forgotten range)."""
    return limits()


#: seeds: what numpy, random and torch all accept
SEED_MAX = 2**32 - 1
SEED = limits(0, SEED_MAX)


def non_finite(value: Any, where: str) -> tuple[str, float] | None:
    """``(where[.key][i], value)`` of the first NaN/Inf float inside ``value`` (nested tables and lists), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, value)
    if isinstance(value, dict):
        for key, item in value.items():
            found = non_finite(item, f"{where}.{key}")
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = non_finite(item, f"{where}[{i}]")
            if found:
                return found
    return None


def check_finite(value: Any, where: str) -> None:
    """Refuse NaN and Inf anywhere in ``value`` (a ConfigError naming the key and the value)."""
    found = non_finite(value, where)
    if found is not None:
        raise ConfigError(f"{found[0]} must be a finite number, got {found[1]!r} (NaN and Inf are refused)")


def check_range(value: Any, spec: Range, where: str, owner: Any = None, section: str = "") -> None:
    """``value`` against ``spec``: a ConfigError ``where must be …, got …`` (with the opt-in's name)."""
    if spec.unless and owner is not None and getattr(owner, spec.unless, False) is True:
        return
    is_list = spec.items and isinstance(value, list | tuple)
    if is_list and spec.length is not None and len(value) != spec.length:
        raise ConfigError(f"{where} must be a list of {spec.length} numbers, got {value!r}")
    for item in value if is_list else [value]:
        if isinstance(item, bool) or not isinstance(item, int | float):
            if is_list:
                raise ConfigError(f"{where} must hold numbers only, got {value!r}")
            continue  # the type check names it
        if not spec.contains(item):
            text = f"{where}: every item must be" if is_list else f"{where} must be"
            extra = f"; {spec.hint}" if spec.hint else ""
            if spec.unless:
                opt_in = f"{section}.{spec.unless}" if section else spec.unless
                extra += f" (set {opt_in} = true to allow it)"
            shown = _number(item) if isinstance(item, float) else repr(item)
            raise ConfigError(f"{text} {spec.describe()}, got {shown}{extra}")


def check_fields(obj: Any, where: str) -> None:
    """Every field of a section dataclass: finite numbers anywhere, declared ranges (see the module doc).

    ``where`` is ``"<file>: <section>"``; errors name ``<file>: <section>.<key>``.
    """
    section = where.rsplit(": ", 1)[-1]
    for spec in dataclasses.fields(obj):
        value = getattr(obj, spec.name)
        key = f"{where}.{spec.name}"
        check_finite(value, key)
        limit = spec.metadata.get("range")
        if limit is not None:
            check_range(value, limit, key, obj, section)


def numeric_fields_without_range(cls: type) -> list[str]:
    """Fields of ``cls`` holding numbers (int, float, or a list of them) that declare no range."""
    hints = typing.get_type_hints(cls)
    out = []
    for spec in dataclasses.fields(cls):
        hint = hints[spec.name]
        numeric = hint in (int, float) or (
            isinstance(hint, types.UnionType) and {int, float} & set(typing.get_args(hint))
        )
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if hint is list and isinstance(default, list) and default and all(isinstance(v, int | float) for v in default):
            numeric = True
        if numeric and "range" not in spec.metadata:
            out.append(spec.name)
    return out


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
    obj = cls(**values)
    check_fields(obj, where)
    return obj


def check_value(value: Any, hint: Any, spec: dataclasses.Field, where: str) -> Any:
    """``value`` checked against a field's type and choices (ints are accepted for floats); floats,
    here and inside tables and lists, must be finite."""
    check_finite(value, where)
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
        shown = ", ".join(c if c else "'' (empty)" for c in choices)
        raise ConfigError(f"{where}: {value!r} is not one of {shown}{nearest(str(value), choices)}")
    return value


def read_text(path: str | os.PathLike, what: str = "config file", *, encoding: str = "utf-8") -> str:
    """The text of ``path``, or a one-line ConfigError ``PATH: …`` saying why it cannot be read
    (missing, a folder, not readable, not UTF-8 text)."""
    path = Path(path)
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} (it does not exist)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a {what}") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read the {what}: permission denied") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: the {what} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
        ) from None
    except OSError as exc:
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder, not a {what}") from None
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None


def load_toml(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a table; every reason it cannot be read is one ConfigError naming the file."""
    return parse_toml(read_text(path, what), path)


def parse_toml(text: str, source: str | os.PathLike) -> dict[str, Any]:
    """TOML text (already read from ``source``) as a table, or one ConfigError naming ``source``."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None


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
