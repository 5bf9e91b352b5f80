"""``higanbana info FILE``: what an adapter file holds and which tools load it."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from ..algorithms import FactoredAdapter, algorithm_class
from .compat import compatibility
from .detect import base_from_names, dit_base, group_modules
from .metadata import read_base_model
from .reader import read_network_file
from .validate import non_finite_modules

SHOWN_METADATA = (
    "ss_output_name",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "modelspec.architecture",
    "modelspec.title",
    "modelspec.resolution",
    "modelspec.prediction_type",
    "modelspec.date",
    "sshs_model_hash",
    "higanbana.format_version",
)
_PREFIXES = ("lora_unet", "lora_transformer", "lora_te1", "lora_te2", "lora_te3", "lora_te", "lycoris", "oft_unet")


def module_prefix(name: str) -> str:
    """The part a module belongs to: ``lora_unet``, ``lora_te1`` … or the first word of its name."""
    for prefix in _PREFIXES:
        if name.startswith(prefix + "_"):
            return prefix
    return name.split("_")[0]


def module_rank(algo: str, module: dict[str, Tensor]) -> str:
    """The rank (or block layout) of one module, read from its shapes (the algorithm describes it)."""
    return algorithm_class(algo).describe_rank(module)


def file_info(path: str | os.PathLike, *, unsafe_pickle: bool = False) -> dict[str, Any]:
    """Everything ``info`` reports about a file, as plain data (``--json`` prints it as is)."""
    path = Path(path)
    tensors, records, metadata = read_network_file(path, unsafe_pickle=unsafe_pickle, allow_non_finite=True)
    modules = group_modules(tensors)
    algos = Counter(r["algo"] for r in records.values())
    per_prefix = Counter(module_prefix(n) for n in modules)
    ranks: dict[str, Counter] = {}
    alphas: Counter = Counter()
    for name, module in modules.items():
        algo = records[name]["algo"]
        ranks.setdefault(algo, Counter())[module_rank(algo, module)] += 1
        if "alpha" in module and issubclass(algorithm_class(algo), FactoredAdapter):  # OFT's alpha is a constraint
            alphas[float(module["alpha"])] += 1
    dtypes = Counter(
        str(t.dtype).replace("torch.", "")
        for k, t in tensors.items()
        if t.is_floating_point() and not k.endswith("alpha")
    )
    non_finite = non_finite_modules(tensors)
    base = dit_base(modules, metadata) or (
        read_base_model(metadata) if any(k.startswith("ss_") for k in metadata) else base_from_names(modules)
    )
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "format": "higanbana" if "higanbana.modules" in metadata else "foreign",
        "algorithms": dict(algos),
        "modules": len(modules),
        "modules_per_prefix": dict(per_prefix),
        "ranks": {algo: dict(c) for algo, c in ranks.items()},
        "alphas": {str(a): n for a, n in alphas.items()},
        "dtypes": dict(dtypes),
        "parameters": sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha")),
        "base_model": base,
        "base_model_version": metadata.get("ss_base_model_version", ""),
        "trigger_phrase": metadata.get("modelspec.trigger_phrase", ""),
        "metadata": {k: metadata[k] for k in SHOWN_METADATA if k in metadata},
        "non_finite_modules": non_finite,
        "compatibility": [v.as_dict() for v in compatibility(modules, records, base, non_finite, _naming(path))],
    }


def _naming(path: Path) -> str:
    """``"diffusers"`` when a safetensors file's keys are diffusers' (``unet.``, ``transformer.``, …), else
    ``"kohya"`` (read from the header only)."""
    if path.suffix.lower() != ".safetensors":
        return "kohya"
    with safe_open(str(path), framework="pt") as f:
        first = next(iter(f.keys()), "")
    return "diffusers" if first.startswith(("unet.", "transformer.", "text_encoder.", "text_encoder_2.")) else "kohya"


def _size(n: int) -> str:
    if n <= 0:
        return "0 B"
    unit = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**unit:.1f} {('B', 'KiB', 'MiB', 'GiB')[unit]}"


def format_info(info: dict[str, Any]) -> str:
    """The human-readable ``info`` report."""
    lines = [
        f"file         {info['file']} ({_size(info['size_bytes'])}, {info['format']} file)",
        f"algorithms   {', '.join(f'{a} ×{n}' for a, n in info['algorithms'].items())}",
        f"modules      {info['modules']} ({', '.join(f'{p}: {n}' for p, n in info['modules_per_prefix'].items())})",
        "ranks        "
        + "; ".join(f"{algo}: " + ", ".join(f"{r} ×{n}" for r, n in c.items()) for algo, c in info["ranks"].items()),
    ]
    if info["alphas"]:
        lines.append(f"alphas       {', '.join(f'{a} ×{n}' for a, n in info['alphas'].items())}")
    lines += [
        f"dtype        {', '.join(info['dtypes'])}",
        f"parameters   {info['parameters']:,}",
        f"base model   {info['base_model']}"
        + (f" ({info['base_model_version']})" if info["base_model_version"] else ""),
    ]
    if info["trigger_phrase"]:
        lines.append(f"trigger      {info['trigger_phrase']}")
    for key, value in info["metadata"].items():
        lines.append(f"  {key} = {value}")
    if info["non_finite_modules"]:
        bad = info["non_finite_modules"]
        lines.append(
            f"DAMAGED: NaN/Inf values in {len(bad)} module(s): {', '.join(bad[:10])}"
            + (f" … and {len(bad) - 10} more" if len(bad) > 10 else "")
        )
        lines.append("  higanbana refuses this file (merge, load, resize, convert, train)")
    lines.append("")
    lines.append("compatibility")
    width = max(len(v["tool"]) for v in info["compatibility"])
    for verdict in info["compatibility"]:
        lines.append(f"  {verdict['tool'].ljust(width)}  {verdict['status']}")
        lines.extend(f"  {' ' * width}    - {note}" for note in verdict["notes"])
    return "\n".join(lines)
