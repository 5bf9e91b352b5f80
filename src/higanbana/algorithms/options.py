"""The declared options of the algorithms: each algorithm's frozen ``Options`` dataclass derives
from :class:`AdapterOptions` (or :class:`FactoredOptions`) and declares every field with
:func:`option` (default and one line of help) — the one schema that construction, the validation
of file records, kohya ``network_args`` parsing and ``higanbana algorithms`` read."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError


def whole_number(algo: str, name: str, value: Any) -> int:
    """``value`` as an int when it is a whole number (``8`` or ``8.0``), else a ConfigError naming the
    option: ``int(2.5)`` would silently train rank 2."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise ConfigError(f"{algo}: option {name}={value!r} must be a whole number")
    return int(value)  # type: ignore[call-overload]  # numbers.Real is not typed SupportsInt; int() is what runs


def finite_number(algo: str, name: str, value: Any) -> float:
    """``value`` as a float when it is a finite number, else a ConfigError naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{algo}: option {name}={value!r} must be a finite number")
    return float(value)


def check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"option {name}={value} must be between 0 and 1")
    return value


def option(default: Any, help: str) -> Any:
    """A declared option: its default and the one line ``higanbana algorithms`` shows."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class AdapterOptions:
    """The options every algorithm takes. Each algorithm declares its own ``Options`` subclass: the
    one schema that construction, validation of file records, kohya ``network_args`` parsing and
    ``higanbana algorithms`` read (names, types, defaults, help)."""

    multiplier: float = option(1.0, "strength m (0: the base layer)")
    dropout: float = option(0.0, "dropout on the adapter branch's output, in training")
    module_dropout: float = option(0.0, "probability of skipping the adapter for a whole step, in training")
    forward_mode: str = option("auto", "auto, merged (one op with W0 + m·s·ΔW) or bypass (op(x, W0) + branch)")
    dtype: torch.dtype | None = option(torch.float32, "dtype of the adapter's parameters")


@dataclass(frozen=True)
class FactoredOptions(AdapterOptions):
    """The options of the algorithms whose ΔW is a product of factors (LoRA, LoHa, LoKr, GLoRA)."""

    rank: int = option(4, "the factors' inner dimension r")
    alpha: float | None = option(None, "scale numerator: s = alpha/r (missing or 0: alpha = r)")
    rs_lora: bool = option(False, "rank-stabilised scale s = alpha/√r")
    use_scalar: bool = option(False, "a learned scalar (init 0) allows a non-zero init of the up factor")
    rank_dropout: float = option(0.0, "zero random rank channels, in training")
    rank_dropout_scale: bool = option(False, "rescale the kept rank channels by 1/(1 - rank_dropout)")
    weight_decompose: bool = option(False, "DoRA: learn the magnitude of W0 + s·ΔW separately")
    wd_on_output: bool = option(True, "DoRA magnitude per output row (false: per input column, legacy)")


def option_fields(options_cls: type) -> dict[str, dataclasses.Field]:
    """``{name: field}`` of an algorithm's ``Options`` dataclass."""
    return {f.name: f for f in dataclasses.fields(options_cls)}
