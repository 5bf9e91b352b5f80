"""The LyCORIS-family algorithms, one file each, behind one registry.

``make_adapter("lokr", layer, rank=8, factor=4)`` wraps a layer; unknown algorithms and options
are errors that name the nearest valid one. A new algorithm is one file plus one line below.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError, nearest
from .base import Adapter, FactoredAdapter, LayerSpec, layer_spec

#: algorithm name -> "module:Class" (imported on first use)
REGISTRY: dict[str, str] = {
    "lora": "lora:LoRA",
    "loha": "loha:LoHa",
    "lokr": "lokr:LoKr",
    "ia3": "ia3:IA3",
    "glora": "glora:GLoRA",
    "oft": "oft:OFT",
    "boft": "boft:BOFT",
    "full": "full:Full",
    "norm": "norm:Norm",
}

#: other names users know, with the options they imply
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "locon": ("lora", {}),
    "dora": ("lora", {"weight_decompose": True}),
    "diag-oft": ("oft", {}),
    "native": ("full", {}),
}


def list_algorithms() -> list[str]:
    return sorted(REGISTRY)


def algorithm_class(name: str) -> type[Adapter]:
    """The Adapter class registered under ``name`` (aliases allowed)."""
    key = ALIASES.get(name, (name, {}))[0]
    if key not in REGISTRY:
        raise ConfigError(f"unknown algorithm {name!r}{nearest(name, [*REGISTRY, *ALIASES])}")
    module, cls = REGISTRY[key].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def accepted_options(cls: type[Adapter]) -> set[str]:
    """Every keyword an algorithm class accepts, through its base classes."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is nn.Module or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                names.add(p.name)
    return names


def make_adapter(algo: str, layer: nn.Module, **options: Any) -> Adapter:
    """Wrap ``layer`` with algorithm ``algo``; options are checked by name first."""
    cls = algorithm_class(algo)
    implied = ALIASES.get(algo, (algo, {}))[1]
    valid = accepted_options(cls)
    for name in options:
        if name not in valid:
            raise ConfigError(f"{cls.algo}: unknown option {name!r}{nearest(name, valid)}")
    return cls(layer, **{**implied, **options})


def check_keys_read(adapter: Adapter, tensors: dict[str, Tensor]) -> None:
    """A saved key the adapter does not hold is an error, never silently ignored (e.g. ``dora_scale``
    in a file whose options say ``weight_decompose = false``)."""
    unread = sorted(set(tensors) - set(adapter.state_tensors()))
    if unread:
        raise ConfigError(f"{adapter.algo}: key(s) {unread} are not read by a module built with these options")


def adapter_from_state(
    algo: str, layer: nn.Module, options: dict[str, Any] | None, tensors: dict[str, Tensor]
) -> Adapter:
    """An adapter on ``layer`` holding a module's saved ``tensors`` (``{suffix: tensor}``); ``options``
    ``None`` (a foreign file) derives them from the tensors' keys and shapes."""
    opts = dict(algorithm_class(algo).options_from_state(tensors, layer) if options is None else options)
    adapter = make_adapter(algo, layer, **opts)
    check_keys_read(adapter, tensors)
    adapter.load_state_tensors(tensors)
    return adapter


__all__ = [
    "ALIASES",
    "REGISTRY",
    "Adapter",
    "FactoredAdapter",
    "LayerSpec",
    "accepted_options",
    "adapter_from_state",
    "algorithm_class",
    "check_keys_read",
    "layer_spec",
    "list_algorithms",
    "make_adapter",
]
