"""Networks: adapters put on the layers of one or more models by rules, used as one unit.

- :mod:`.config` — :class:`NetworkConfig`, :class:`Target`, :class:`Rule`: what to adapt, as plain
  data (dicts, TOML, the built-in presets), checked against each algorithm's declared options;
- :mod:`.selection` — :class:`Part`, :class:`ModuleRecord`, :func:`plan_modules`: which layers a
  config selects and each one's algorithm and options (the plan), and kohya's module names;
- :mod:`.runtime` — :class:`AdapterNetwork`: builds the adapters of a plan (or of a file's records)
  and runs them: attach, merge, multipliers, optimizer groups, state tensors.

Reading and writing files is :mod:`higanbana.formats` (``save_network``, ``load_network``), which
sits above this package: a network holds no file format.
"""

from .config import (
    COMMON_OPTIONS,
    NETWORK_OPTIONS,
    NORM_LAYERS,
    OPTION_ALIASES,
    PART_KINDS,
    WEIGHT_LAYERS,
    NetworkConfig,
    Rule,
    Target,
    pattern_matches,
)
from .runtime import AdapterNetwork, LoadReport
from .selection import LayerFilter, ModuleRecord, Part, module_key, named_layers, plan_modules

__all__ = [
    "COMMON_OPTIONS",
    "NETWORK_OPTIONS",
    "NORM_LAYERS",
    "OPTION_ALIASES",
    "PART_KINDS",
    "WEIGHT_LAYERS",
    "AdapterNetwork",
    "LayerFilter",
    "LoadReport",
    "ModuleRecord",
    "NetworkConfig",
    "Part",
    "Rule",
    "Target",
    "module_key",
    "named_layers",
    "pattern_matches",
    "plan_modules",
]
