"""AdapterNetwork: rules → adapters on the layers of one or more models, as one file.

A network covers *parts*: each part is a model (a UNet, a text encoder, any ``nn.Module``) with the
prefix its module names get in a file (``lora_unet``, ``lora_te1``, ``lycoris`` …) and optionally a
function that turns module paths into the paths written in names (SDXL's SGM layout). Which layers
are adapted, and with which algorithm and options, comes from a :class:`NetworkConfig`: plain data
(a dict or TOML, built-in presets in :mod:`higanbana.presets`), never global state, so two networks
with different presets coexist — and can be stacked on one model.

Module names follow kohya: ``<prefix>_<path with "." → "_">``; file keys are ``<name>.<suffix>`` with
the suffixes of docs/design.md §3. ``higanbana.modules`` in the metadata records each module's algorithm
and options, so reloading never guesses.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from .algorithms import (
    Adapter,
    accepted_options,
    algorithm_class,
    check_keys_read,
    layer_spec,
    list_algorithms,
    make_adapter,
)
from .errors import ConfigError, HiganbanaError, RankClampedWarning, nearest
from .formats import FORMAT_VERSION, save_tensors
from .presets import load_preset

LayerFilter = Callable[[str, nn.Module], bool]

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


def module_key(prefix: str, path: str) -> str:
    """kohya's module name: ``lora_unet`` + ``down_blocks.0.attn1.to_q`` → ``lora_unet_down_blocks_0_attn1_to_q``."""
    return f"{prefix}_{path.replace('.', '_')}" if path else prefix


# --------------------------------------------------------------------------- configuration
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


CONFIG_FIELDS = ("preset", "description", "algo", "options", "enable_conv", "train_norm", "rules", *PART_KINDS)


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


# --------------------------------------------------------------------------- parts and records
@dataclass(frozen=True)
class Part:
    """One model a network adapts, and how its module names are written in files."""

    prefix: str
    module: nn.Module
    kind: str = "model"  # "unet", "text_encoder" or "model" (which config section applies)
    name_path: Callable[[str], str] | None = None  # module path → path in file names (e.g. SGM for SDXL)

    def file_name(self, path: str) -> str:
        return module_key(self.prefix, self.name_path(path) if self.name_path else path)

    def alias_names(self, path: str) -> tuple[str, ...]:
        """Other names foreign files use for this module: the plain module path when files name it
        differently (diffusers paths of an SDXL UNet), and SimpleTuner's ``lycoris_`` UNet names."""
        plain = module_key(self.prefix, path)
        out = (plain,) if self.name_path is not None and plain != self.file_name(path) else ()
        if self.kind == "unet":
            out += (module_key("lycoris", path),)
        return out

    def match_paths(self, path: str) -> tuple[str, ...]:
        """The paths patterns are matched against: the module path, and its file-name path if it differs."""
        if self.name_path is None or not path:
            return (path,)
        try:
            other = self.name_path(path)
        except (KeyError, ValueError):  # containers without a counterpart in the other layout
            return (path,)
        return (path,) if other == path else (path, other)


@dataclass
class ModuleRecord:
    """What a network knows of one adapted module."""

    name: str
    prefix: str
    path: str
    algo: str
    options: dict[str, Any]


def _layer_kind(layer: nn.Module) -> str | None:
    if isinstance(layer, Adapter):
        return None
    if isinstance(layer, WEIGHT_LAYERS):
        return "weight"
    if isinstance(layer, NORM_LAYERS):
        return "norm"
    return None


def _select_layers(part: Part, config: NetworkConfig) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(path, layer)`` for every layer of the part that the config adapts."""
    target = config.targets.get(part.kind)
    if not target:
        return
    inside: set[str] = set()  # paths of modules whose layers are all candidates
    excluded: set[str] = set()
    for path, module in part.module.named_modules():
        parent = path.rpartition(".")[0]
        in_block = bool(path) and (parent in inside or (parent == "" and "" in inside))
        paths = part.match_paths(path)
        if parent in excluded or any(pattern_matches(p, q) for p in target.exclude for q in paths):
            excluded.add(path)  # excluding a container excludes everything inside it
            continue
        named = any(pattern_matches(p, q) for p in target.names for q in paths)
        kind = _layer_kind(module)
        if kind is None:
            if type(module).__name__ in target.blocks or named or in_block:
                inside.add(path)
            continue
        if kind == "norm":
            chosen = named or type(module).__name__ in target.layers or (in_block and config.train_norm)
        else:
            chosen = (
                named or in_block or type(module).__name__ in target.layers or type(module).__name__ in target.blocks
            )
            if chosen and not config.enable_conv and _kernel_numel(module) > 1:
                chosen = False
        if chosen:
            yield path, module


def _kernel_numel(layer: nn.Module) -> int:
    return math.prod(getattr(layer, "kernel_size", (1,)))


def _rule_matches(rule: Rule, part: Part, path: str, layer: nn.Module, ancestors: Sequence[nn.Module]) -> bool:
    if rule.parts and part.kind not in rule.parts:
        return False
    paths = part.match_paths(path)
    if any(pattern_matches(p, q) for p in rule.match.exclude for q in paths):
        return False
    if type(layer).__name__ in rule.match.layers:
        return True
    if any(type(a).__name__ in rule.match.blocks for a in ancestors):
        return True
    prefixes = [path] + [path.rsplit(".", n)[0] for n in range(1, path.count(".") + 1)]
    return any(pattern_matches(p, q) for p in rule.match.names for q in (*prefixes, *paths[1:]))


def _ancestors(root: nn.Module, path: str) -> list[nn.Module]:
    out, module = [], root
    parts = path.split(".") if path else []
    for name in parts[:-1]:
        module = module.get_submodule(name)
        out.append(module)
    return out


def _resolve(
    config: NetworkConfig, part: Part, path: str, layer: nn.Module, used: set[int] | None = None
) -> tuple[str, dict[str, Any]]:
    """The algorithm and options of one layer: defaults, then every matching rule in order.

    The indices of the rules that matched are added to ``used``.
    """
    algo, options = config.algo, dict(config.options)
    if _layer_kind(layer) == "norm":
        algo, options = "norm", {k: v for k, v in options.items() if k in COMMON_OPTIONS}
    ancestors = _ancestors(part.module, path)
    for index, rule in enumerate(config.rules):
        if not _rule_matches(rule, part, path, layer, ancestors):
            continue
        if used is not None:
            used.add(index)
        if rule.algo and rule.algo != algo:
            algo, options = rule.algo, {k: v for k, v in options.items() if k in COMMON_OPTIONS}
        options.update(rule.options)
    conv_rank, conv_alpha = options.pop("conv_rank", None), options.pop("conv_alpha", None)
    if _kernel_numel(layer) > 1:
        if conv_rank is not None:
            options["rank"] = conv_rank
        if conv_alpha is not None:
            options["alpha"] = conv_alpha
    return algo, options


def _clamp_rank(algo: str, layer: nn.Module, options: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Options with ``rank`` clamped to what the layer can use (the scale α/r kept); and the request
    when it was clamped. A rank of 100000 on a 320-wide layer would allocate factors of 100000 rows."""
    rank = options.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool):
        return options, None
    cls = algorithm_class(algo)
    full = cls.full_rank(layer_spec(layer, cls.algo), options) if _layer_kind(layer) == "weight" else None
    if full is None or rank <= full:
        return options, None
    options = {**options, "rank": full}
    alpha = options.get("alpha")
    if alpha not in (None, 0):  # α/r (rs-LoRA: α/√r) stays what the user asked for
        ratio = full / rank
        options["alpha"] = float(alpha) * (math.sqrt(ratio) if options.get("rs_lora") else ratio)
    return options, rank


def _describe_rule(rule: Rule) -> str:
    what = [f"{k}={list(v)}" for k in ("blocks", "layers", "names") if (v := getattr(rule.match, k))]
    if rule.parts:
        what.append(f"parts={list(rule.parts)}")
    return ", ".join(what)


# --------------------------------------------------------------------------- the network
class AdapterNetwork(nn.Module):
    """Adapters on the layers of one or more parts chosen by a :class:`NetworkConfig`.

    ``AdapterNetwork(model, "lokr", rank=8)`` adapts every Linear/Conv of ``model``;
    ``AdapterNetwork(parts, config="attn-mlp", algo="loha", rank=4)`` uses a preset on a list of
    :class:`Part`; ``select=`` (a ``(path, module) -> bool`` function) replaces the config's targets.
    """

    def __init__(
        self,
        model: nn.Module | Sequence[Part],
        algo: str | None = None,
        select: LayerFilter | None = None,
        *,
        config: NetworkConfig | Mapping[str, Any] | str | os.PathLike | None = None,
        prefix: str = "lycoris",
        per_module_options: Mapping[str, Mapping[str, Any]] | None = None,
        per_module_algos: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        parts = [Part(prefix, model)] if isinstance(model, nn.Module) else list(model)
        cfg = NetworkConfig.load(config)
        if algo is not None or options:
            cfg = cfg.with_options(algo, **options)
        self.config = cfg
        self.parts = {p.prefix: p for p in parts}
        if len(self.parts) != len(parts):
            raise ConfigError("two parts share one prefix")
        self.adapters = nn.ModuleDict()
        self.records: dict[str, ModuleRecord] = {}
        per_module_options = per_module_options or {}
        per_module_algos = per_module_algos or {}
        used_rules: set[int] = set()
        clamped: list[str] = []
        for part in parts:
            if select is not None:
                chosen = [(p, m) for p, m in part.module.named_modules() if _layer_kind(m) and select(p, m)]
            else:
                chosen = list(_select_layers(part, cfg))
            for path, layer in chosen:
                name = part.file_name(path)
                if name in self.adapters:
                    raise ConfigError(f"module name {name!r} is produced by two layers")
                algo_here, opts = _resolve(cfg, part, path, layer, used_rules)
                if name in per_module_options:
                    opts = dict(per_module_options[name])
                algo_here = per_module_algos.get(name, algo_here)
                try:
                    opts, requested = _clamp_rank(algo_here, layer, opts)
                    self.adapters[name] = make_adapter(algo_here, layer, **opts)
                except HiganbanaError as exc:
                    raise type(exc)(f"module {name} ({type(layer).__name__} {path}): {exc}") from exc
                if requested is not None:
                    clamped.append(
                        f"{name} ({type(layer).__name__} {tuple(layer.weight.shape)}: {requested} → {opts['rank']})"
                    )
                self.records[name] = ModuleRecord(name, part.prefix, path, self.adapters[name].algo, opts)
        if not self.adapters:
            what = ", ".join(f"{p.prefix} ({type(p.module).__name__}, {p.kind})" for p in parts)
            raise ConfigError(f"the network's rules matched no module of {what}: check the preset/targets")
        kinds = {p.kind for p in parts}  # a rule only for parts this network leaves out is not an error
        unused = [
            i for i, rule in enumerate(cfg.rules) if i not in used_rules and (not rule.parts or set(rule.parts) & kinds)
        ]
        if unused:
            i = unused[0]
            raise ConfigError(
                f"rules[{i}] ({_describe_rule(cfg.rules[i])}) matches none of the {len(self.adapters)} adapted "
                "module(s); a rule only changes modules the targets select — check its names/blocks/layers/parts"
            )
        if clamped:
            more = f" and {len(clamped) - 3} more" if len(clamped) > 3 else ""
            warnings.warn(
                f"rank larger than the layer can use, clamped to its full rank (scale α/r kept) for "
                f"{len(clamped)} module(s): {'; '.join(clamped[:3])}{more}",
                RankClampedWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ access
    def __iter__(self) -> Iterator[tuple[str, Adapter]]:
        return iter(self.adapters.items())

    def __len__(self) -> int:
        return len(self.adapters)

    @property
    def prefix(self) -> str:
        """The prefix of a single-part network (the first part's otherwise)."""
        return next(iter(self.parts))

    @property
    def paths(self) -> dict[str, str]:
        return {name: r.path for name, r in self.records.items()}

    @property
    def algos(self) -> dict[str, str]:
        return {name: r.algo for name, r in self.records.items()}

    def select_names(self, pattern: str) -> list[str]:
        """Module names matching a glob / ``re:`` pattern (or a prefix such as ``lora_te``)."""
        names = [n for n in self.adapters if pattern_matches(pattern, n) or n.startswith(pattern + "_")]
        if not names:
            raise ConfigError(f"no module of the network matches {pattern!r}")
        return names

    # ------------------------------------------------------------------ use
    def attach(self) -> AdapterNetwork:
        """Make every wrapped layer run its adapter (stacks on a network attached earlier)."""
        for adapter in self.adapters.values():
            adapter.attach()
        return self

    def detach(self) -> None:
        for adapter in self.adapters.values():
            adapter.detach()

    def set_multiplier(self, multiplier: float | Mapping[str, float]) -> None:
        """One strength for all modules, or ``{pattern or prefix: strength}`` (later entries win)."""
        if isinstance(multiplier, Mapping):
            for pattern, value in multiplier.items():
                for name in self.select_names(pattern):
                    self.adapters[name].multiplier = float(value)
            return
        for adapter in self.adapters.values():
            adapter.multiplier = float(multiplier)

    def set_forward_mode(self, mode: str) -> None:
        for adapter in self.adapters.values():
            adapter.forward_mode = mode

    def merge(self) -> None:
        """Write every adapter into its layer at its current multiplier."""
        for adapter in self.adapters.values():
            adapter.merge_into()

    def unmerge(self) -> None:
        for adapter in self.adapters.values():
            adapter.unmerge()

    def restore(self) -> None:
        """Give the model back exactly as it was: un-merge what is merged, then detach."""
        for adapter in self.adapters.values():
            if adapter.merged:
                adapter.unmerge()
        self.detach()

    # ------------------------------------------------------------------ training
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def param_groups(
        self,
        lr: float,
        *,
        lrs: Mapping[str, float] | None = None,
        loraplus_ratio: float | Mapping[str, float] | None = None,
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups, each with ``params``, ``lr``, ``name``, ``prefix`` and ``loraplus``.

        ``lrs`` maps a part prefix (``lora_unet``, ``lora_te``, ``lora_te1`` …) to its learning rate
        (default ``lr``); a rate of 0 leaves that part out. ``loraplus_ratio`` (global, or per prefix)
        multiplies the rate of each factored algorithm's zero-initialised "up" factors (LoRA's
        ``lora_up``, LoHa's ``hada_w2_a``, LoKr's ``lokr_w2``/``lokr_w2_b``, GLoRA's ``a2``/``b2``): LoRA+.
        """
        lrs = dict(lrs or {})
        for key in lrs:
            if key not in self.parts:
                raise ConfigError(f"learning rate for unknown part {key!r}{nearest(key, self.parts)}")
        ratios = loraplus_ratio if isinstance(loraplus_ratio, Mapping) else dict.fromkeys(self.parts, loraplus_ratio)
        groups: list[dict[str, Any]] = []
        for prefix in self.parts:
            part_lr = float(lrs.get(prefix, lr))
            if part_lr == 0:
                continue
            plain: list[nn.Parameter] = []
            ups: list[nn.Parameter] = []
            for name, adapter in self.adapters.items():
                if self.records[name].prefix != prefix:
                    continue
                for pname, param in adapter.named_parameters():
                    if param.requires_grad:
                        (ups if pname in adapter.up_factors else plain).append(param)
            ratio = ratios.get(prefix)
            if ratio is None or ratio == 1:
                plain, ups = plain + ups, []
            if plain:
                groups.append({"params": plain, "lr": part_lr, "name": prefix, "prefix": prefix, "loraplus": False})
            if ups:
                lr_up = part_lr * float(ratio)
                groups.append(
                    {"params": ups, "lr": lr_up, "name": f"{prefix} (LoRA+ up)", "prefix": prefix, "loraplus": True}
                )
        return groups

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """Scale down every module whose ``‖s·ΔW‖`` exceeds ``max_norm`` (kohya's ``--scale_weight_norms``).

        Returns ``(modules scaled, mean norm, max norm)`` with the norms *after* scaling, as kohya and
        LyCORIS report them. Factored algorithms are scaled through their "up" factors (ΔW is linear
        in each of them); OFT/IA3/full/norm have none and are left alone.
        """
        norms, scaled = [], 0
        for adapter in self.adapters.values():
            if not adapter.up_factors:
                continue
            norm = float((adapter.scale * adapter.delta_weight()).norm())
            if norm > max_norm > 0:
                for pname in adapter.up_factors:
                    param = getattr(adapter, pname, None)
                    if param is not None:
                        param.mul_(max_norm / norm)
                scaled, norm = scaled + 1, max_norm
            norms.append(norm)
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    def drop_parts(self, prefixes: Iterable[str]) -> None:
        """Remove the adapters of these parts (detached first), e.g. to train the UNet only."""
        prefixes = set(prefixes)
        unknown = prefixes - set(self.parts)
        if unknown:
            raise ConfigError(f"unknown part(s) {sorted(unknown)}; the network has {list(self.parts)}")
        for name in [n for n, r in self.records.items() if r.prefix in prefixes]:
            self.adapters[name].detach()
            del self.adapters[name]
            del self.records[name]
        for prefix in prefixes:
            del self.parts[prefix]

    # ------------------------------------------------------------------ inspection
    def describe(self) -> list[dict[str, Any]]:
        """One row per adapted module: name, path, layer type, algorithm, shapes, parameters."""
        rows = []
        for name, adapter in self.adapters.items():
            record, layer = self.records[name], adapter.layer
            shapes = {k: tuple(t.shape) for k, t in adapter.state_tensors().items() if t.dim() > 0}
            rows.append(
                {
                    "name": name,
                    "path": record.path,
                    "layer": type(layer).__name__,
                    "weight": tuple(layer.weight.shape) if getattr(layer, "weight", None) is not None else (),
                    "algo": adapter.algo,
                    "shapes": shapes,
                    "parameters": sum(p.numel() for p in adapter.parameters()),
                }
            )
        return rows

    def describe_table(self) -> str:
        """:meth:`describe` as a text table, with a total line."""
        rows = self.describe()
        head = ("module", "layer", "algo", "weight", "parameters")
        body = [
            (r["name"], r["layer"], r["algo"], "x".join(map(str, r["weight"])), f"{r['parameters']:,}") for r in rows
        ]
        body.append(("total", "", "", "", f"{sum(r['parameters'] for r in rows):,}"))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in (head, *body)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    # ------------------------------------------------------------------ state and files
    def state_tensors(self) -> dict[str, Tensor]:
        return {f"{name}.{suffix}": t for name, a in self.adapters.items() for suffix, t in a.state_tensors().items()}

    def module_records(self) -> dict[str, dict[str, Any]]:
        """Per module: algorithm and the options that rebuild it (for ``higanbana.modules``)."""
        records = {}
        for name, adapter in self.adapters.items():
            opts = {
                k: v for k, v in self.records[name].options.items() if k not in {"dtype", "forward_mode", "multiplier"}
            }
            opts.update(adapter.extra_state_options())
            records[name] = {"algo": adapter.algo, "options": _jsonable(opts)}
        return records

    def file_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The tensors a file holds, cast to ``dtype`` (``alpha`` and integer tensors kept as they are)."""
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ConfigError(f"output dtype {dtype} is not one of float32, float16, bfloat16")
        return {
            k: (v.detach().to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v.detach())
            for k, v in self.state_tensors().items()
        }

    def file_metadata(self) -> dict[str, str]:
        """Our own metadata: format version, per-module records and the parts' prefixes."""
        return {
            "higanbana.format_version": FORMAT_VERSION,
            "higanbana.modules": json.dumps(self.module_records(), sort_keys=True),
            "higanbana.prefix": ",".join(self.parts),
        }

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32, metadata: dict[str, str] | None = None):
        """Write the adapters as safetensors, atomically, with ``higanbana.*`` and the caller's metadata."""
        return save_tensors(self.file_tensors(dtype), path, {**self.file_metadata(), **(metadata or {})})

    def load_state_tensors(
        self, tensors: Mapping[str, Tensor], source: str = "state", strict: bool = True
    ) -> LoadReport:
        """Load ``<name>.<suffix>`` tensors into the adapters.

        Strict: any missing module, unexpected key or shape mismatch is an error naming the keys.
        Non-strict: loads the modules whose tensors fit and reports the rest.
        """
        grouped: dict[str, dict[str, Tensor]] = {}
        report = LoadReport(source)
        for key, value in tensors.items():
            name, _, suffix = key.partition(".")
            if name not in self.adapters:
                report.unexpected.append(key)
                continue
            grouped.setdefault(name, {})[suffix] = value
        for name, adapter in self.adapters.items():
            if name not in grouped:
                report.missing.append(name)
                continue
            try:
                adapter.load_state_tensors(grouped[name])
            except HiganbanaError as exc:  # the algorithm names the key and the shapes
                report.mismatched[name] = str(exc)
            else:
                report.loaded.append(name)
        if strict and not report.ok:
            raise HiganbanaError(report.summary())
        return report

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        model: nn.Module | Sequence[Part],
        prefix: str | None = None,
        *,
        strict: bool = True,
        unsafe_pickle: bool = False,
    ) -> AdapterNetwork:
        """A network from a file on ``model``: ours (records in the metadata) or a foreign one (detected).

        Non-strict loading keeps what fits and lists the rest in ``net.load_report``.
        """
        from .formats.reader import read_network_file  # formats map files to records; imported late

        tensors, records, metadata = read_network_file(path, unsafe_pickle=unsafe_pickle)
        if isinstance(model, nn.Module):
            saved = metadata.get("higanbana.prefix", "")
            parts = [Part(prefix or (saved.split(",")[0] if saved else "lycoris"), model)]
        else:
            parts = list(model)
        return cls.from_records(parts, records, tensors, source=str(path), strict=strict)

    @classmethod
    def from_records(
        cls,
        parts: Sequence[Part],
        records: Mapping[str, Mapping[str, Any]],
        tensors: Mapping[str, Tensor],
        *,
        source: str = "state",
        strict: bool = True,
    ) -> AdapterNetwork:
        """A network of exactly the recorded modules (``{name: {"algo", "options"}}``) on ``parts``."""
        names: dict[str, tuple[Part, str]] = {}
        aliases: dict[str, str] = {}
        for part in parts:
            for path, layer in part.module.named_modules():
                if _layer_kind(layer):
                    name = part.file_name(path)
                    names[name] = (part, path)
                    for alias in part.alias_names(path):
                        aliases.setdefault(alias, name)
        records, tensors = _canonical_names(records, tensors, names, aliases)
        absent = [n for n in records if n not in names]
        if absent and strict:
            hint = nearest(absent[0], names)
            raise HiganbanaError(
                f"{source}: {len(absent)} module(s) are not in the model, e.g. {absent[0]!r}{hint}"
                f"{_base_model_hint(absent, names)}"
            )
        wanted = {n for n in records if n in names}
        if not wanted:
            raise HiganbanaError(
                f"{source}: none of its {len(records)} modules is in the model{_base_model_hint(list(records), names)}"
            )
        by_part: dict[str, set[str]] = {}
        for n in wanted:
            part, path = names[n]
            by_part.setdefault(part.prefix, set()).add(path)
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net.config = NetworkConfig()
        net.parts = {p.prefix: p for p in parts if p.prefix in by_part}
        net.adapters = nn.ModuleDict()
        net.records = {}
        order = {n: i for i, n in enumerate(names)}
        by_module: dict[str, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            module, _, suffix = key.partition(".")
            by_module.setdefault(module, {})[suffix] = value
        for name in sorted(wanted, key=order.__getitem__):
            part, path = names[name]
            record = records[name]
            layer = part.module.get_submodule(path)
            suffixes = by_module.get(name, {})
            try:
                if record.get("options") is None:  # a foreign file: options from the tensors' keys and shapes
                    opts = dict(algorithm_class(record["algo"]).options_from_state(suffixes, layer))
                else:
                    opts = dict(record["options"])
                net.adapters[name] = make_adapter(record["algo"], layer, **opts)
                check_keys_read(net.adapters[name], suffixes)
            except HiganbanaError as exc:
                raise type(exc)(f"{source}: module {name}: {exc}") from exc
            net.records[name] = ModuleRecord(name, part.prefix, path, net.adapters[name].algo, opts)
        report = net.load_state_tensors(
            {k: v for k, v in tensors.items() if k.partition(".")[0] in wanted}, source=source, strict=strict
        )
        extra = [k for k in tensors if k.partition(".")[0] not in wanted]
        if extra and strict:
            raise HiganbanaError(f"{source}: keys of no recorded module: {', '.join(extra[:10])}{_more(extra)}")
        report.unexpected.extend(extra)
        net.load_report = report
        return net


@dataclass
class LoadReport:
    """What loading a file into a network did: loaded modules, and what did not fit, by key."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # modules of the network with no tensors
    unexpected: list[str] = field(default_factory=list)  # file keys naming no module
    mismatched: dict[str, str] = field(default_factory=dict)  # module → why its tensors did not fit

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        lines = [f"{self.source}: loaded {len(self.loaded)} module(s)"]
        if self.missing:
            lines.append(f"  missing (no tensors in the file): {', '.join(self.missing[:10])}{_more(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected keys: {', '.join(self.unexpected[:10])}{_more(self.unexpected)}")
        for name, why in list(self.mismatched.items())[:10]:
            lines.append(f"  {name}: {why}")
        return "\n".join(lines)


def _canonical_names(
    records: Mapping[str, Any], tensors: Mapping[str, Tensor], names: Mapping[str, Any], aliases: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Rename modules a file names by an alias (e.g. a diffusers path on SDXL) to the names we write."""
    rename = {n: aliases[n] for n in records if n not in names and n in aliases}
    if not rename:
        return dict(records), dict(tensors)
    clash = [n for n, new in rename.items() if new in records]
    if clash:
        raise HiganbanaError(f"module {clash[0]!r} and {rename[clash[0]]!r} name the same layer")
    new_records = {rename.get(n, n): r for n, r in records.items()}
    new_tensors = {}
    for key, value in tensors.items():
        module, dot, suffix = key.partition(".")
        new_tensors[f"{rename.get(module, module)}{dot}{suffix}"] = value
    return new_records, new_tensors


def _more(items: Sequence[str]) -> str:
    return f" … and {len(items) - 10} more" if len(items) > 10 else ""


def _base_model_hint(absent: Iterable[str], names: Mapping[str, Any]) -> str:
    """Say so when a file's names are SDXL's (SGM, two text encoders) on an SD1/2 model or the reverse."""
    from .formats.detect import base_from_names

    file_base, model_base = base_from_names(absent), base_from_names(names)
    if file_base == "sdxl" and model_base == "sd1 or sd2":
        return " — this looks like an SDXL file on an SD1.x/2.x model"
    if file_base == "sd1 or sd2" and model_base == "sdxl":
        return " — this looks like an SD1.x/2.x file on an SDXL model"
    return ""


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (bool, int, float, str, type(None))) else str(v)) for k, v in options.items()}


def export_peft(
    net: AdapterNetwork, folder: str | os.PathLike, *, target: str = "peft", part: str | None = None
) -> os.PathLike:
    """Write a network as a PEFT (``adapter_config.json`` + ``adapter_model.safetensors``) or diffusers folder.

    Exact for LoRA, DoRA (output axis), LoHa and LoKr; other algorithms are an error that says why
    (PEFT's OFT/BOFT/GLoRA/IA3 are different algorithms under the same names). PEFT names modules by
    their path in one model, so a network over several parts exports one ``part`` (a prefix) at a time.
    """
    from .formats.peft import save_peft_folder, to_peft

    if part is None:
        if len(net.parts) != 1:
            raise ConfigError(f"PEFT files describe one model; choose part= one of {list(net.parts)}")
        part = next(iter(net.parts))
    if part not in net.parts:
        raise ConfigError(f"unknown part {part!r}{nearest(part, net.parts)}")
    names = [n for n, r in net.records.items() if r.prefix == part]
    tensors = {k: v for k, v in net.file_tensors().items() if k.partition(".")[0] in names}
    records = {n: r for n, r in net.module_records().items() if n in names}
    paths = {n: net.records[n].path for n in names}
    shapes = {n: tuple(net.adapters[n].layer.weight.shape) for n in names}
    config, peft_tensors = to_peft(tensors, records, paths, target=target, shapes=shapes)
    return save_peft_folder(folder, config, peft_tensors)
