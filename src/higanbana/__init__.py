"""higanbana: LyCORIS-family fine-tuning for diffusion models, and the paper's evaluation.

The names users reach for first are here: build a network (``AdapterNetwork``, ``sd_network``),
save and load it (``save_network``/``load_network``, ``save_sd_network``/``load_sd_network``),
export it to PEFT (``export_peft``).
"""

from .algorithms import Adapter, list_algorithms, make_adapter
from .errors import ConfigError, HiganbanaError, UnsupportedLayerError
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
