"""higanbana: LyCORIS-family fine-tuning for diffusion models, and the paper's evaluation."""

from .algorithms import Adapter, list_algorithms, make_adapter
from .errors import ConfigError, HiganbanaError, UnsupportedLayerError

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
