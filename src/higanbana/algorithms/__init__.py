"""The LyCORIS-family algorithms, one file each, behind one registry.

``make_adapter("lokr", layer, rank=8, factor=4)`` wraps a layer; unknown algorithms and options
are errors that name the nearest valid one. A new algorithm is one file plus one line below: the
class declares its maths and its file facts (keys, detection, shape checks, rank text, PEFT
mapping, tool verdicts, selfcheck examples; see :mod:`.files`), and every other layer loops over
:func:`algorithm_classes`. A plug-in outside the package calls :func:`register`.
"""

from __future__ import annotations

import importlib
import typing
from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError, nearest
from .base import Adapter
from .factored import FactoredAdapter
from .layer import LayerSpec, layer_spec
from .options import AdapterOptions, FactoredOptions, option_fields

#: algorithm name -> "module:Class" (imported on first use), or a class :func:`register` added
REGISTRY: dict[str, str | type[Adapter]] = {
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
    entry = REGISTRY[key]
    if not isinstance(entry, str):
        return entry
    module, cls = entry.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def algorithm_classes() -> list[type[Adapter]]:
    """Every registered class, in registry order: what the formats layer loops over."""
    return [algorithm_class(name) for name in REGISTRY]


def register(cls: type[Adapter]) -> type[Adapter]:
    """Register an algorithm class under its ``algo`` (a plug-in's one line; usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Adapter)) or not cls.algo:
        raise ConfigError(f"{cls!r} is not an Adapter subclass with an algo name")
    if cls.algo in REGISTRY or cls.algo in ALIASES:
        raise ConfigError(f"algorithm {cls.algo!r} is already registered")
    REGISTRY[cls.algo] = cls
    return cls


def unregister(name: str) -> None:
    """Remove an algorithm :func:`register` added (built-in algorithms stay)."""
    if isinstance(REGISTRY.get(name), str):
        raise ConfigError(f"{name!r} is a built-in algorithm")
    REGISTRY.pop(name, None)


def accepted_options(cls: type[Adapter]) -> set[str]:
    """Every option an algorithm class takes: the fields of its declared ``Options``."""
    return set(option_fields(cls.Options))


def option_types(cls: type[Adapter]) -> dict[str, Any]:
    """``{option: type}`` of an algorithm's declared ``Options`` (e.g. ``int``, ``float | None``)."""
    return typing.get_type_hints(cls.Options)


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
    "AdapterOptions",
    "FactoredAdapter",
    "FactoredOptions",
    "LayerSpec",
    "accepted_options",
    "adapter_from_state",
    "algorithm_class",
    "algorithm_classes",
    "check_keys_read",
    "layer_spec",
    "list_algorithms",
    "make_adapter",
    "option_fields",
    "option_types",
    "register",
    "unregister",
]
