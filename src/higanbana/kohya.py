"""``--network_module higanbana.kohya``: the name users give kohya's sd-scripts; the code is in
:mod:`higanbana.integrations.kohya`.

This alias exists because sd-scripts imports the network module by the very name users put on
their command lines (``importlib.import_module(args.network_module)``) and reads the protocol from
it (``create_network``, ``create_network_from_weights``); that name is also what our files record in
``ss_network_module``. It re-exports the protocol and the module's public names.
"""

from .integrations.kohya import (
    DEFAULT_ALPHA,
    DEFAULT_DIM,
    NETWORK_MODULE,
    KohyaNetwork,
    LoadInfo,
    create_network,
    create_network_from_weights,
    detect_model_kind,
    kohya_parts,
    parse_bool,
    parse_network_args,
)

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_DIM",
    "NETWORK_MODULE",
    "KohyaNetwork",
    "LoadInfo",
    "create_network",
    "create_network_from_weights",
    "detect_model_kind",
    "kohya_parts",
    "parse_bool",
    "parse_network_args",
]
