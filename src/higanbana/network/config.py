"""What a network adapts, as plain data: :class:`NetworkConfig` (targets per part kind, rules, defaults).

A config is a dict or TOML table (built-in presets in :mod:`higanbana.presets`), never global state,
so two networks with different presets coexist. Option names are checked against each algorithm's
declared ``Options`` here; which layers a config selects is :mod:`.selection`'s business.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from ..algorithms import accepted_options, algorithm_class, list_algorithms
from ..errors import ConfigError, nearest
from ..presets import load_preset

#: layers an algorithm can wrap; norms are adapted only when asked for (``train_norm`` or by name)
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm)
PART_KINDS = ("unet", "text_encoder", "model")
#: network-level spellings users know from kohya / LyCORIS
OPTION_ALIASES = {"dim": "rank", "network_dim": "rank", "conv_dim": "conv_rank", "network_alpha": "alpha"}
#: options the network consumes itself (per-layer choice of rank/alpha for convs with kernel > 1)
NETWORK_OPTIONS = ("conv_rank", "conv_alpha")
#: options every algorithm takes (kept when a rule switches the algorithm)
COMMON_OPTIONS = ("dropout", "module_dropout", "forward_mode", "multiplier", "dtype")


def _as_tuple(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: expected a string or a list of strings, got {value!r}")


def pattern_matches(pattern: str, path: str) -> bool:
    """Whether a module path matches one pattern.

    ``re:<regex>`` is a full-match regular expression; a pattern with ``*?[`` is a glob over the
    whole path; a plain name matches the path itself or its last components (``to_k`` matches
    ``…attn1.to_k``, ``ff.net.2`` matches ``…ff.net.2``), as PEFT's ``target_modules`` do.
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(path, pattern)
    return path == pattern or path.endswith("." + pattern)


@dataclass(frozen=True)
class Target:
    """Which layers to adapt: inside blocks of these classes, of these classes, or at these paths."""

    blocks: tuple[str, ...] = ()  # class names: every adaptable layer inside such a module
    layers: tuple[str, ...] = ()  # class names of layers to adapt wherever they are
    names: tuple[str, ...] = ()  # path patterns (see pattern_matches); a container matches as a block
    exclude: tuple[str, ...] = ()  # path patterns never adapted

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> Target:
        _check_keys(data, ("blocks", "layers", "names", "exclude"), where)
        return cls(**{k: _as_tuple(v, f"{where}.{k}") for k, v in data.items()})

    def __bool__(self) -> bool:
        return bool(self.blocks or self.layers or self.names)


@dataclass(frozen=True)
class Rule:
    """An override: layers it matches get this algorithm and/or these options."""

    match: Target
    algo: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    parts: tuple[str, ...] = ()  # part kinds it applies to (empty: all)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> Rule:
        _check_keys(data, ("blocks", "layers", "names", "exclude", "algo", "options", "parts"), where)
        match = Target.from_dict(
            {k: v for k, v in data.items() if k in ("blocks", "layers", "names", "exclude")}, where
        )
        if not match:
            raise ConfigError(f"{where}: a rule needs blocks, layers or names to match")
        options = data.get("options", {})
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where}.options: expected a table of options, got {options!r}")
        parts = _as_tuple(data.get("parts"), f"{where}.parts")
        for part in parts:
            if part not in PART_KINDS:
                raise ConfigError(f"{where}.parts: unknown part {part!r}{nearest(part, PART_KINDS)}")
        return cls(match, data.get("algo"), _normalize_options(options, f"{where}.options"), parts)


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, got {data!r}")
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown field {key!r}{nearest(key, allowed)}")


def _normalize_options(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = OPTION_ALIASES.get(key, key)
        if name in out:
            raise ConfigError(f"{where}: {key!r} repeats {name!r}")
        out[name] = value
    return out


CONFIG_FIELDS = (
    "preset", "description", "family", "algo", "options", "enable_conv", "train_norm", "rules", *PART_KINDS
)  # fmt: skip
#: the model families a config may be written for: the SD UNets, SD3/SD3.5 (MMDiT), Flux.1
FAMILIES = ("sd", "sd3", "flux")


@dataclass(frozen=True)
class NetworkConfig:
    """What a network adapts and how; plain data (see ``docs/networks.md`` and the presets)."""

    algo: str = "lora"
    options: Mapping[str, Any] = field(default_factory=dict)
    targets: Mapping[str, Target] = field(default_factory=dict)  # part kind → target
    rules: tuple[Rule, ...] = ()
    enable_conv: bool = True  # adapt convolutions with a kernel larger than 1
    train_norm: bool = False  # adapt LayerNorm/GroupNorm inside target blocks (algorithm "norm")
    description: str = ""
    family: str = "sd"  # which models' module names the targets are written for (FAMILIES)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config") -> NetworkConfig:
        """Build from a dict/TOML table; ``preset = "name"`` starts from that preset (fields here win)."""
        _check_keys(data, CONFIG_FIELDS, where)
        base: dict[str, Any] = {}
        if "preset" in data:
            base = dict(load_preset(data["preset"]))
            _check_keys(base, CONFIG_FIELDS, f"preset {data['preset']}")
            base.pop("preset", None)
        merged = {**base, **{k: v for k, v in data.items() if k != "preset"}}
        merged["options"] = {**base.get("options", {}), **data.get("options", {})}
        merged["rules"] = [*base.get("rules", []), *data.get("rules", [])]
        targets = {kind: Target.from_dict(merged[kind], f"{where}.{kind}") for kind in PART_KINDS if kind in merged}
        rules = tuple(Rule.from_dict(r, f"{where}.rules[{i}]") for i, r in enumerate(merged["rules"]))
        for key in ("enable_conv", "train_norm"):
            if not isinstance(merged.get(key, False), bool):
                raise ConfigError(f"{where}.{key}: expected true or false, got {merged[key]!r}")
        config = cls(
            algo=merged.get("algo", "lora"),
            options=_normalize_options(merged["options"], f"{where}.options"),
            targets=targets,
            rules=rules,
            enable_conv=merged.get("enable_conv", True),
            train_norm=merged.get("train_norm", False),
            description=merged.get("description", ""),
            family=merged.get("family", "sd"),
        )
        config.validate()
        return config

    @classmethod
    def load(cls, source: NetworkConfig | Mapping[str, Any] | str | os.PathLike | None) -> NetworkConfig:
        """A config from itself, a dict, a preset name or a TOML path (``None``: every Linear/Conv)."""
        if source is None:
            return cls(targets={"model": Target(layers=tuple(t.__name__ for t in WEIGHT_LAYERS))})
        if isinstance(source, NetworkConfig):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        return cls.from_dict({"preset": str(source)}, where=str(source))

    def with_options(self, algo: str | None = None, **options: Any) -> NetworkConfig:
        """A copy with another default algorithm and/or more default options."""
        new = replace(
            self,
            algo=algo or self.algo,
            options={**self.options, **_normalize_options(options, "options")},
        )
        new.validate()
        return new

    def validate(self) -> None:
        """Unknown algorithms and options an algorithm does not take are errors, named."""
        if self.family not in FAMILIES:
            raise ConfigError(
                f"family: expected one of {list(FAMILIES)}, got {self.family!r}{nearest(str(self.family), FAMILIES)}"
            )
        _check_options(self.algo, self.options, "options")
        known = set(NETWORK_OPTIONS).union(*(accepted_options(algorithm_class(a)) for a in list_algorithms()))
        for i, rule in enumerate(self.rules):
            if rule.algo:  # the rule's own options must suit its algorithm
                _check_options(rule.algo, rule.options, f"rules[{i}]")
                continue
            # which algorithm a layer has depends on earlier rules: check names now, fit per layer later
            for name in rule.options:
                if name not in known:
                    raise ConfigError(f"rules[{i}]: no algorithm takes option {name!r}{nearest(name, known)}")


def _check_options(algo: str, options: Mapping[str, Any], where: str) -> None:
    valid = accepted_options(algorithm_class(algo)) | set(NETWORK_OPTIONS)
    for name in options:
        if name not in valid:
            raise ConfigError(f"{where}: algorithm {algo!r} takes no option {name!r}{nearest(name, valid)}")
