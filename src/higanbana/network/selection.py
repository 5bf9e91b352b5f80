"""Which layers a network adapts, and with which algorithm and options: the *plan*.

:func:`plan_modules` walks each :class:`Part` (a model and the prefix its module names get in
files), applies a :class:`~.config.NetworkConfig`'s targets and rules to every layer, and returns
one :class:`ModuleRecord` per adapted layer — plain data the runtime builds adapters from, the
same data a file's ``higanbana.modules`` records. Module names follow kohya:
``<prefix>_<path with "." → "_">`` (:func:`module_key`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..algorithms import Adapter, algorithm_class, layer_spec
from ..errors import ConfigError, HiganbanaError, RankClampedWarning
from .config import COMMON_OPTIONS, NORM_LAYERS, WEIGHT_LAYERS, NetworkConfig, Rule, pattern_matches

LayerFilter = Callable[[str, nn.Module], bool]


def module_key(prefix: str, path: str) -> str:
    """kohya's module name: ``lora_unet`` + ``down_blocks.0.attn1.to_q`` → ``lora_unet_down_blocks_0_attn1_to_q``."""
    return f"{prefix}_{path.replace('.', '_')}" if path else prefix


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
        out: tuple[str, ...] = (plain,) if self.name_path is not None and plain != self.file_name(path) else ()
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


def named_layers(parts: Sequence[Part]) -> tuple[dict[str, tuple[Part, str]], dict[str, str]]:
    """Every layer an adapter can wrap, by module name: ``({name: (part, path)}, {alias: name})``
    (aliases are the other names foreign files use, :meth:`Part.alias_names`), in model order."""
    names: dict[str, tuple[Part, str]] = {}
    aliases: dict[str, str] = {}
    for part in parts:
        for path, layer in part.module.named_modules():
            if _layer_kind(layer):
                name = part.file_name(path)
                names[name] = (part, path)
                for alias in part.alias_names(path):
                    aliases.setdefault(alias, name)
    return names, aliases


def plan_modules(
    parts: Sequence[Part],
    config: NetworkConfig,
    select: LayerFilter | None = None,
    per_module_options: Mapping[str, Mapping[str, Any]] | None = None,
    per_module_algos: Mapping[str, str] | None = None,
) -> list[ModuleRecord]:
    """One record per layer the config adapts (``select``, a ``(path, module) -> bool`` function,
    replaces the config's targets), with its algorithm and options after every matching rule.

    A rule that matches no adapted module is an error (unless it only names parts left out); a rank
    larger than a layer can use is clamped to its full rank, keeping the scale, with one warning.
    """
    per_module_options = per_module_options or {}
    per_module_algos = per_module_algos or {}
    plan: dict[str, ModuleRecord] = {}
    used_rules: set[int] = set()
    clamped: list[str] = []
    for part in parts:
        if select is not None:
            chosen = [(p, m) for p, m in part.module.named_modules() if _layer_kind(m) and select(p, m)]
        else:
            chosen = list(_select_layers(part, config))
            target = config.targets.get(part.kind)
            if not chosen and target:  # the config means to adapt this part: a target that matches nothing
                wanted = "; ".join(
                    f"{key} {list(values)}"
                    for key, values in (("blocks", target.blocks), ("layers", target.layers), ("names", target.names))
                    if values
                )
                raise ConfigError(
                    f"the {part.kind} targets ({wanted}) match no layer of {part.prefix} "
                    f"({type(part.module).__name__}): check the preset/targets against this model's class names "
                    "and module paths"
                )
        for path, layer in chosen:
            name = part.file_name(path)
            if name in plan:
                raise ConfigError(f"module name {name!r} is produced by two layers")
            algo, opts = _resolve(config, part, path, layer, used_rules)
            if name in per_module_options:
                opts = dict(per_module_options[name])
            algo = per_module_algos.get(name, algo)
            try:
                opts, requested = _clamp_rank(algo, layer, opts)
            except HiganbanaError as exc:
                raise type(exc)(f"module {name} ({type(layer).__name__} {path}): {exc}") from exc
            if requested is not None:
                clamped.append(
                    f"{name} ({type(layer).__name__} {tuple(layer.weight.shape)}: {requested} → {opts['rank']})"
                )
            plan[name] = ModuleRecord(name, part.prefix, path, algo, opts)
    if not plan:
        what = ", ".join(f"{p.prefix} ({type(p.module).__name__}, {p.kind})" for p in parts)
        raise ConfigError(f"the network's rules matched no module of {what}: check the preset/targets")
    kinds = {p.kind for p in parts}  # a rule only for parts this network leaves out is not an error
    unused = [
        i for i, rule in enumerate(config.rules) if i not in used_rules and (not rule.parts or set(rule.parts) & kinds)
    ]
    if unused:
        i = unused[0]
        raise ConfigError(
            f"rules[{i}] ({_describe_rule(config.rules[i])}) matches none of the {len(plan)} adapted "
            "module(s); a rule only changes modules the targets select — check its names/blocks/layers/parts"
        )
    if clamped:
        more = f" and {len(clamped) - 3} more" if len(clamped) > 3 else ""
        warnings.warn(
            f"rank larger than the layer can use, clamped to its full rank (scale α/r kept) for "
            f"{len(clamped)} module(s): {'; '.join(clamped[:3])}{more}",
            RankClampedWarning,
            stacklevel=3,
        )
    return list(plan.values())
