"""AdapterNetwork: the adapters of a plan on the layers of one or more models, at run time.

A network covers *parts*: each part is a model (a UNet, a text encoder, any ``nn.Module``) with the
prefix its module names get in files (``lora_unet``, ``lora_te1``, ``lycoris`` …). Every network is
built one way — from a list of :class:`ModuleRecord` (name, part, path, algorithm, options): either
the plan a :class:`NetworkConfig` selects (:func:`.selection.plan_modules`) or, through
``modules=``, the records a file holds (``higanbana.formats.network_files`` reads and writes files;
the network itself knows nothing of them). ``module_records()`` gives back what rebuilds it.
"""

from __future__ import annotations

import os
from collections.abc import ItemsView, Iterable, Iterator, Mapping, Sequence, ValuesView
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..algorithms import Adapter, make_adapter
from ..errors import ConfigError, HiganbanaError, nearest
from .config import NetworkConfig, pattern_matches
from .selection import LayerFilter, ModuleRecord, Part, plan_modules

if TYPE_CHECKING:

    class _AdapterDict(nn.ModuleDict):
        """For the type checker only: an ``nn.ModuleDict`` whose values are adapters."""

        def __getitem__(self, key: str) -> Adapter: ...
        def items(self) -> ItemsView[str, Adapter]: ...
        def values(self) -> ValuesView[Adapter]: ...

else:
    _AdapterDict = nn.ModuleDict  # at run time, a plain nn.ModuleDict


# --------------------------------------------------------------------------- the network
class AdapterNetwork(nn.Module):
    """Adapters on the layers of one or more parts chosen by a :class:`NetworkConfig`.

    ``AdapterNetwork(model, "lokr", rank=8)`` adapts every Linear/Conv of ``model``;
    ``AdapterNetwork(parts, config="attn-mlp", algo="loha", rank=4)`` uses a preset on a list of
    :class:`Part`; ``select=`` (a ``(path, module) -> bool`` function) replaces the config's targets;
    ``modules=`` (records, as a file holds them) builds exactly those modules instead of a config's.
    """

    #: what loading a file did (set only on networks read from files, by ``formats.network_files``)
    load_report: LoadReport

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
        modules: Sequence[ModuleRecord] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        parts = [Part(prefix, model)] if isinstance(model, nn.Module) else list(model)
        if len({p.prefix for p in parts}) != len(parts):
            raise ConfigError("two parts share one prefix")
        if modules is None:
            cfg = NetworkConfig.load(config)
            if algo is not None or options:
                cfg = cfg.with_options(algo, **options)
            modules = plan_modules(parts, cfg, select, per_module_options, per_module_algos)
        else:  # exactly these modules (a file's records): the network holds only the parts they are on
            if algo is not None or select is not None or config is not None or options:
                raise ConfigError("AdapterNetwork: modules= gives every module's algorithm and options; pass no config")
            cfg = NetworkConfig()
            used = {m.prefix for m in modules}
            parts = [p for p in parts if p.prefix in used]
        self.config = cfg
        self.parts = {p.prefix: p for p in parts}
        self.adapters = _AdapterDict()
        self.records: dict[str, ModuleRecord] = {}
        for record in modules:
            if record.prefix not in self.parts:
                raise ConfigError(f"module {record.name}: no part with prefix {record.prefix!r}")
            if record.name in self.adapters:
                raise ConfigError(f"module name {record.name!r} is produced by two layers")
            layer = self.parts[record.prefix].module.get_submodule(record.path)
            try:
                adapter = make_adapter(record.algo, layer, **record.options)
            except HiganbanaError as exc:
                raise type(exc)(f"module {record.name} ({type(layer).__name__} {record.path}): {exc}") from exc
            self.adapters[record.name] = adapter
            self.records[record.name] = replace(record, algo=adapter.algo, options=dict(record.options))

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
                assert ratio is not None  # a None ratio emptied ups above
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
            weight = getattr(layer, "weight", None)
            shapes = {k: tuple(t.shape) for k, t in adapter.state_tensors().items() if t.dim() > 0}
            rows.append(
                {
                    "name": name,
                    "path": record.path,
                    "layer": type(layer).__name__,
                    "weight": tuple(weight.shape) if weight is not None else (),
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


def _more(items: Sequence[str]) -> str:
    return f" … and {len(items) - 10} more" if len(items) > 10 else ""


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (bool, int, float, str, type(None))) else str(v)) for k, v in options.items()}
