"""One validation of adapter files, shared by every reader: ``info``, ``merge``, loading, ``resize``,
``convert`` and the trainer's warm start all call :func:`check_file`, so they agree on what a file is.

Checked without the model (the model's own checks follow when a module is built on its layer):

- **Metadata.** ``higanbana.modules`` is a JSON object ``{module: {"algo": str, "options": {...} | null}}``
  with known algorithms, options the algorithm takes (of the right type), one record per module
  of the file and no record without tensors; the recorded algorithm is the one the keys show.
- **Keys.** Each module holds the keys its algorithm needs, and no key it does not read (a key a
  reader would silently ignore is an error, not a warning): the algorithm's ``file_keys`` and
  ``key_flags``.
- **dtypes.** Factors are floating point; only ``alpha`` and IA3's ``on_input`` may be integers.
- **Shapes.** The factors of a module fit together (the algorithm's ``check_file_shapes``: inner
  ranks agree, ranks ≥ 1, Tucker cores square, OFT blocks square, BOFT blocks even with a
  power-of-two count), DoRA magnitudes lie on one axis, ``alpha`` is a scalar — the shape checks
  against the layer come when it is built.
- **Values.** Every floating tensor is finite. NaN/Inf is reported separately (``non_finite``):
  every reader refuses such a file, ``info`` describes it and says so.

``alpha`` semantics: a missing alpha, or 0, reads as the rank (scale 1), as kohya and
LyCORIS read it (ComfyUI and A1111 read it as scale 0; ``info`` says so).
"""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..algorithms import Adapter, accepted_options, algorithm_class, option_types
from ..algorithms.files import FileStateError
from ..errors import ConfigError, HiganbanaError
from .detect import detect_algo, group_modules

#: keys that may be integers (or bool); every other tensor must be floating point
NON_FLOAT_KEYS = ("alpha", "on_input")


class InvalidFileError(HiganbanaError):
    """An adapter file that no reader accepts; ``problems`` lists every reason, each naming a module and key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = list(problems)
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        super().__init__(f"{source}: invalid adapter file: {problems[0]}{more}")


@dataclass
class FileCheck:
    """What :func:`check_file` found: structural problems, and modules with NaN/Inf values."""

    problems: list[str] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)

    def raise_if_invalid(self, source: str, *, allow_non_finite: bool = False) -> None:
        problems = list(self.problems)
        if self.non_finite and not allow_non_finite:
            shown = ", ".join(self.non_finite[:3]) + (
                f" … and {len(self.non_finite) - 3} more" if len(self.non_finite) > 3 else ""
            )
            problems.append(
                f"NaN/Inf values in {len(self.non_finite)} module(s) ({shown}): the file is damaged "
                "(merging or loading it would put NaN into the model)"
            )
        if problems:
            raise InvalidFileError(source, problems)


# --------------------------------------------------------------------------- metadata records
def parse_records(raw: str) -> dict[str, dict[str, Any]]:
    """``higanbana.modules`` as ``{name: {"algo": str, "options": dict | None}}``, or an error saying why not."""
    try:
        records = json.loads(raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise HiganbanaError(f"metadata higanbana.modules is not valid JSON ({exc})") from None
    if not isinstance(records, dict):
        raise HiganbanaError(f"metadata higanbana.modules must be a JSON object, got {type(records).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for name, record in records.items():
        where = f"metadata higanbana.modules[{name!r}]"
        if not isinstance(record, dict) or not isinstance(record.get("algo"), str):
            raise HiganbanaError(f"{where} must be an object with a string 'algo', got {record!r}")
        unknown = set(record) - {"algo", "options"}
        if unknown:
            raise HiganbanaError(f"{where} has unknown field(s) {sorted(unknown)}")
        try:
            cls = algorithm_class(record["algo"])
        except ConfigError as exc:
            raise HiganbanaError(f"{where}: {exc}") from None
        options = record.get("options")
        if options is not None:
            if not isinstance(options, dict):
                raise HiganbanaError(f"{where}.options must be an object or null, got {options!r}")
            valid = accepted_options(cls)
            for key, value in options.items():
                if key not in valid:
                    raise HiganbanaError(f"{where}.options: {cls.algo} takes no option {key!r}")
                _check_option_type(cls, key, value, f"{where}.options.{key}")
        out[name] = {"algo": record["algo"], "options": options}
    return out


def _check_option_type(cls: type, key: str, value: Any, where: str) -> None:
    hint = option_types(cls).get(key)
    if hint is None:
        return
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return
    if isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int):
        ok = int in allowed or float in allowed
    elif isinstance(value, float):
        ok = float in allowed and math.isfinite(value)
    elif isinstance(value, str):
        ok = str in allowed or torch.dtype in allowed
    else:
        ok = False
    if not ok:
        names = " or ".join(getattr(a, "__name__", str(a)) for a in allowed)
        raise HiganbanaError(f"{where} is {value!r}; expected {names}")


# --------------------------------------------------------------------------- one module
def _check_dora(scale: Tensor, out: int | None, inp: int | None) -> None:
    shape = tuple(scale.shape)
    if len(shape) < 2:
        raise FileStateError(f"tensor 'dora_scale' has shape {shape}; expected (out, 1, ..) or (1, in, 1..)")
    output = shape[1] == 1 and all(d == 1 for d in shape[2:]) and (out is None or shape[0] == out)
    inputs = shape[0] == 1 and all(d == 1 for d in shape[2:]) and (inp is None or shape[1] == inp)
    if not (output or inputs):
        expected = f"({out if out is not None else 'out'}, 1, ..) or (1, {inp if inp is not None else 'in'}, 1..)"
        raise FileStateError(f"tensor 'dora_scale' has shape {shape}; expected {expected}")


def _check_flags(cls: type[Adapter], mod: Mapping[str, Tensor], options: Mapping[str, Any] | None) -> None:
    """Options of our records that decide which keys a module holds (the class's ``key_flags``) agree
    with its keys — an option left out has its default, false: a key the options do not build would be
    silently ignored."""
    if options is None:  # a foreign file: the options are derived from the keys
        return
    for option, key in cls.key_flags:
        value = bool(options.get(option, False))
        if value != (key in mod):
            raise FileStateError(
                f"options say {option}={value} but the module {'has' if key in mod else 'has no'} {key!r}"
            )


def check_module(name: str, algo: str, mod: Mapping[str, Tensor], options: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`HiganbanaError` naming the module and key when its tensors cannot be the algorithm's."""
    try:
        _check_module(algo, mod, options)
    except FileStateError as exc:
        raise HiganbanaError(f"module {name}: {exc}") from None


def _check_module(algo: str, mod: Mapping[str, Tensor], options: Mapping[str, Any] | None) -> None:
    cls = algorithm_class(algo)
    unknown = sorted(set(mod) - cls.file_keys)
    if unknown:
        raise FileStateError(
            f"unexpected key(s) {', '.join(repr(k) for k in unknown)} for {cls.algo} (no reader would use them)"
        )
    if "dora_scale" in mod and not getattr(cls, "supports_dora", False):
        raise FileStateError(f"'dora_scale' on {cls.algo}")
    for key, t in mod.items():
        if key in NON_FLOAT_KEYS:
            if t.is_complex():
                raise FileStateError(f"tensor {key!r} has dtype {t.dtype}; expected a real number")
            if key == "alpha" and t.numel() != 1:
                raise FileStateError(f"tensor 'alpha' has shape {tuple(t.shape)}; expected one value (a scalar)")
            continue
        if not t.is_floating_point():
            dtype = str(t.dtype).replace("torch.", "")
            raise FileStateError(f"tensor {key!r} has dtype {dtype}; adapter factors are floating point")
        if t.numel() == 0:
            raise FileStateError(f"tensor {key!r} is empty (shape {tuple(t.shape)})")
    out, inp = cls.check_file_shapes(mod)
    if "dora_scale" in mod:
        _check_dora(mod["dora_scale"], out, inp)
    _check_flags(cls, mod, options)


def non_finite_modules(tensors: Mapping[str, Tensor]) -> list[str]:
    """Modules (``<name>`` of ``<name>.<suffix>``) holding a NaN or Inf value, sorted."""
    bad = set()
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.add(key.partition(".")[0])
    return sorted(bad)


def check_file(tensors: Mapping[str, Tensor], records: Mapping[str, Mapping[str, Any]]) -> FileCheck:
    """Every problem of a file's ``<module>.<suffix>`` tensors and their records (see the module docstring)."""
    result = FileCheck()
    try:
        groups = group_modules(tensors)
    except HiganbanaError as exc:
        result.problems.append(str(exc))
        return result
    for name in sorted(set(records) - set(groups)):
        result.problems.append(f"module {name}: recorded in higanbana.modules but the file has no tensors for it")
    for name, mod in groups.items():
        record = records.get(name)
        if record is None:
            result.problems.append(f"module {name}: has tensors but no record in higanbana.modules")
            continue
        try:
            detected = detect_algo(name, mod)
            if algorithm_class(record["algo"]).algo != detected:
                raise FileStateError(f"recorded as {record['algo']!r} but its keys are {detected}'s ({sorted(mod)})")
            _check_module(record["algo"], mod, record.get("options"))
        except FileStateError as exc:
            result.problems.append(f"module {name}: {exc}")
        except HiganbanaError as exc:
            text = str(exc)
            result.problems.append(text if text.startswith("module ") else f"module {name}: {text}")
    result.non_finite = non_finite_modules(tensors)
    return result
