"""higanbana: LyCORIS-family fine-tuning for diffusion models, and the paper's evaluation.

The algorithm names below are imported on first use (PEP 562), so that ``import higanbana`` — and
with it ``higanbana --help`` — does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ConfigError, HiganbanaError, UnsupportedLayerError

if TYPE_CHECKING:
    from .algorithms import Adapter, list_algorithms, make_adapter

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "ConfigError",
    "HiganbanaError",
    "UnsupportedLayerError",
    "__version__",
    "list_algorithms",
    "make_adapter",
]

_FROM_ALGORITHMS = ("Adapter", "list_algorithms", "make_adapter")


def __getattr__(name: str) -> Any:
    if name in _FROM_ALGORITHMS:
        from . import algorithms

        return getattr(algorithms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
