"""higanbana: LyCORIS-family fine-tuning for diffusion models, and the paper's evaluation.

The names users reach for first are here: build a network (``AdapterNetwork``, ``sd_network``),
save and load it (``save_network``/``load_network``, ``save_sd_network``/``load_sd_network``),
export it to PEFT (``export_peft``). They are imported on first use (PEP 562), so that
``import higanbana`` — and with it ``higanbana --help`` — does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, HiganbanaError, UnsupportedLayerError

if TYPE_CHECKING:
    from .algorithms import Adapter, list_algorithms, make_adapter
    from .formats import export_peft, load_network, save_network
    from .formats.sd_network import load_sd_network, save_sd_network, sd_network
    from .network import AdapterNetwork, NetworkConfig, Part

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterNetwork",
    "ConfigError",
    "HiganbanaError",
    "NetworkConfig",
    "Part",
    "UnsupportedLayerError",
    "__version__",
    "export_peft",
    "list_algorithms",
    "load_network",
    "load_sd_network",
    "make_adapter",
    "save_network",
    "save_sd_network",
    "sd_network",
]

#: public name → the module that defines it
_LAZY = {
    "Adapter": ".algorithms",
    "list_algorithms": ".algorithms",
    "make_adapter": ".algorithms",
    "AdapterNetwork": ".network",
    "NetworkConfig": ".network",
    "Part": ".network",
    "export_peft": ".formats",
    "load_network": ".formats",
    "save_network": ".formats",
    "load_sd_network": ".formats.sd_network",
    "save_sd_network": ".formats.sd_network",
    "sd_network": ".formats.sd_network",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
