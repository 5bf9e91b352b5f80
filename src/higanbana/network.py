"""AdapterNetwork: one algorithm's adapters on the chosen layers of a model, saved as one file.

This is the foundation the files issue builds on (rules, presets, SD naming, kohya metadata).
Module names follow kohya: ``<prefix>_<module path with "." → "_">``; file keys are
``<name>.<suffix>`` with the suffixes of DESIGN.md §3. ``higanbana.modules`` in the metadata
records each module's algorithm and options, so reloading never guesses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .algorithms import Adapter, make_adapter
from .errors import ConfigError, HiganbanaError
from .formats import FORMAT_VERSION, load_tensors, save_tensors

LayerFilter = Callable[[str, nn.Module], bool]


def module_key(prefix: str, path: str) -> str:
    """kohya's module name: ``lora_unet`` + ``down_blocks.0.attn1.to_q`` → ``lora_unet_down_blocks_0_attn1_to_q``."""
    return f"{prefix}_{path.replace('.', '_')}" if path else prefix


class AdapterNetwork(nn.Module):
    """Adapters of one algorithm on every layer of ``model`` accepted by ``select``."""

    def __init__(
        self,
        model: nn.Module,
        algo: str,
        select: LayerFilter,
        *,
        prefix: str = "lycoris",
        per_module_options: dict[str, dict[str, Any]] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.adapters = nn.ModuleDict()
        self.paths: dict[str, str] = {}
        self.algos: dict[str, str] = {}
        self.options: dict[str, dict[str, Any]] = {}
        per_module_options = per_module_options or {}
        for path, layer in model.named_modules():
            if isinstance(layer, Adapter) or not select(path, layer):
                continue
            name = module_key(prefix, path)
            opts = {**options, **per_module_options.get(name, {})}
            self.adapters[name] = make_adapter(algo, layer, **opts)
            self.paths[name], self.algos[name], self.options[name] = path, algo, opts
        if not self.adapters:
            raise ConfigError(f"{algo}: the layer selection matched no module of {type(model).__name__}")

    def __iter__(self) -> Iterator[tuple[str, Adapter]]:
        return iter(self.adapters.items())

    def attach(self) -> AdapterNetwork:
        for adapter in self.adapters.values():
            adapter.attach()
        return self

    def detach(self) -> None:
        for adapter in self.adapters.values():
            adapter.detach()

    def set_multiplier(self, multiplier: float) -> None:
        for adapter in self.adapters.values():
            adapter.multiplier = float(multiplier)

    def set_forward_mode(self, mode: str) -> None:
        for adapter in self.adapters.values():
            adapter.forward_mode = mode

    def merge(self) -> None:
        for adapter in self.adapters.values():
            adapter.merge_into()

    def unmerge(self) -> None:
        for adapter in self.adapters.values():
            adapter.unmerge()

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -------------------------------------------------------------- state and files
    def state_tensors(self) -> dict[str, Tensor]:
        return {f"{name}.{suffix}": t for name, a in self.adapters.items() for suffix, t in a.state_tensors().items()}

    def module_records(self) -> dict[str, dict[str, Any]]:
        """Per module: algorithm and the options that rebuild it (for ``higanbana.modules``)."""
        records = {}
        for name, adapter in self.adapters.items():
            opts = {k: v for k, v in self.options[name].items() if k not in {"dtype", "forward_mode", "multiplier"}}
            opts.update(adapter.extra_state_options())
            records[name] = {"algo": adapter.algo, "options": _jsonable(opts)}
        return records

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32, metadata: dict[str, str] | None = None):
        """Write the adapters as safetensors (``alpha`` stays float32) with ``higanbana.*`` metadata."""
        tensors = {
            k: (v.to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v)
            for k, v in self.state_tensors().items()
        }
        meta = {
            "higanbana.format_version": FORMAT_VERSION,
            "higanbana.modules": json.dumps(self.module_records(), sort_keys=True),
            "higanbana.prefix": self.prefix,
            **(metadata or {}),
        }
        return save_tensors(tensors, path, meta)

    def load_state_tensors(self, tensors: dict[str, Tensor], source: str = "state") -> None:
        """Load ``<name>.<suffix>`` tensors into the adapters; errors name the key."""
        grouped: dict[str, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            name, _, suffix = key.partition(".")
            if name not in self.adapters:
                raise HiganbanaError(f"{source}: key {key!r} names no module of this network")
            grouped.setdefault(name, {})[suffix] = value
        for name, adapter in self.adapters.items():
            if name not in grouped:
                raise HiganbanaError(f"{source}: no tensors for module {name!r}")
            try:
                adapter.load_state_tensors(grouped[name])
            except (KeyError, ValueError) as exc:
                raise HiganbanaError(f"{source}: module {name!r}: {exc}") from exc

    @classmethod
    def from_file(cls, path: str | os.PathLike, model: nn.Module, prefix: str | None = None) -> AdapterNetwork:
        """Rebuild a network saved by :meth:`save` on ``model`` (algorithms from the metadata)."""
        tensors, metadata = load_tensors(path)
        if "higanbana.modules" not in metadata:
            raise HiganbanaError(f"{path}: no higanbana.modules metadata (foreign files come with the files issue)")
        records = json.loads(metadata["higanbana.modules"])
        prefix = prefix or metadata.get("higanbana.prefix", "lycoris")
        paths = {module_key(prefix, p): p for p, _ in model.named_modules()}
        missing = [n for n in records if n not in paths]
        if missing:
            raise HiganbanaError(f"{path}: module {missing[0]!r} is not in {type(model).__name__}")
        algos = {r["algo"] for r in records.values()}
        if len(algos) != 1:
            raise HiganbanaError(f"{path}: mixed algorithms {sorted(algos)} need the files issue's loader")
        wanted = {paths[n] for n in records}
        per_module = {n: r["options"] for n, r in records.items()}
        net = cls(model, algos.pop(), lambda p, _m: p in wanted, prefix=prefix, per_module_options=per_module)
        net.load_state_tensors(tensors, source=str(path))
        return net


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (bool, int, float, str, type(None))) else str(v)) for k, v in options.items()}
