"""``higanbana algorithms | presets | info``: what the package offers, and what a file holds."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _algorithms(args: argparse.Namespace) -> int:
    from ..algorithms import ALIASES, accepted_options, algorithm_class, list_algorithms

    for name in list_algorithms():
        options = ", ".join(sorted(accepted_options(algorithm_class(name))))
        print(f"{name:<6} {options}")
    print("aliases: " + ", ".join(f"{a} → {t}" for a, (t, _) in sorted(ALIASES.items())))
    return 0


def _presets(args: argparse.Namespace) -> int:
    from ..presets import list_presets, load_preset

    for name in list_presets():
        print(f"{name:<22} {load_preset(name).get('description', '')}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..formats.inspect import file_info, format_info

    info = file_info(args.file, unsafe_pickle=args.unsafe_pickle)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 1 if info["non_finite_modules"] else 0  # a damaged file: described, but no reader takes it


def add_algorithms_parser(subparsers: Any) -> argparse.ArgumentParser:
    algos = subparsers.add_parser("algorithms", help="list the algorithms and the options each takes")
    algos.set_defaults(func=_algorithms)
    return algos


def add_presets_parser(subparsers: Any) -> argparse.ArgumentParser:
    presets = subparsers.add_parser("presets", help="list the built-in presets (which layers a network adapts)")
    presets.set_defaults(func=_presets)
    return presets


def add_info_parser(subparsers: Any) -> argparse.ArgumentParser:
    info = subparsers.add_parser("info", help="what an adapter file holds, and which tools load it")
    info.add_argument("file", help="a .safetensors adapter file (ours, kohya, LyCORIS, PEFT/diffusers)")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.add_argument(
        "--unsafe-pickle", action="store_true", help="allow a .pt/.ckpt/.bin pickle (read with weights_only=True)"
    )
    info.set_defaults(func=_info)
    return info
