"""Read any adapter file into ``(tensors, records, metadata)`` that a network can be built from.

Our files carry ``higanbana.modules`` (algorithm and options per module), so nothing is guessed.
Foreign files (kohya, LyCORIS standalone, kohya OFT, PEFT/diffusers names) are renamed to kohya
module names and each module's algorithm is detected from its keys and shapes; its options are
then derived from the tensors against the model's layer (``options: None`` in the record).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import HiganbanaError
from .detect import detect_algo, group_modules, normalize_foreign
from .safetensors_io import FORMAT_VERSION, load_tensors
from .validate import check_file, parse_records

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def read_tensors(
    path: str | os.PathLike, *, unsafe_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a pickle only with ``unsafe_pickle`` (weights only)."""
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return load_tensors(path)
    if not unsafe_pickle:
        raise HiganbanaError(
            f"{path}: pickle files can run code when loaded; pass --unsafe-pickle (unsafe_pickle=True) "
            "to read its tensors anyway (weights only), or convert it to .safetensors"
        )
    if not path.is_file():
        raise HiganbanaError(f"{path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HiganbanaError(f"{path}: not a readable weights-only pickle ({exc})") from exc
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise HiganbanaError(f"{path}: the pickle does not hold a flat dict of tensors")
    return dict(data), {}


def read_network_file(
    path: str | os.PathLike,
    *,
    unsafe_pickle: bool = False,
    allow_non_finite: bool = False,
    prefixes: Mapping[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], dict[str, str]]:
    """``(tensors keyed <name>.<suffix>, {name: {"algo", "options"}}, metadata)`` of a valid adapter file.

    Every reader comes through here, so all agree: a file that fails :func:`validate.check_file`
    (metadata, keys, dtypes, shapes, NaN/Inf) is an :class:`InvalidFileError` naming the module and
    key. ``allow_non_finite`` lets ``info`` describe a file with NaN/Inf values instead of refusing it.
    ``prefixes`` overrides the prefix of a diffusers/PEFT root (a model family's text encoders).
    """
    tensors, metadata = read_tensors(path, unsafe_pickle=unsafe_pickle)
    if not tensors:
        raise HiganbanaError(f"{path}: the file holds no tensors")
    try:
        tensors, records = records_from_tensors(tensors, metadata, prefixes=prefixes)
    except HiganbanaError as exc:
        raise HiganbanaError(f"{path}: {exc}") from exc
    check_file(tensors, records).raise_if_invalid(str(path), allow_non_finite=allow_non_finite)
    return tensors, records, metadata


def records_from_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, prefixes: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """``(tensors keyed <name>.<suffix>, records)``: from ``higanbana.modules`` when present, else detected.

    Only the records are checked here; :func:`validate.check_file` checks them against the tensors.
    """
    if "higanbana.modules" in metadata:
        version = metadata.get("higanbana.format_version", "")
        if version != FORMAT_VERSION:
            raise HiganbanaError(f"higanbana.format_version {version!r} is not {FORMAT_VERSION!r}; upgrade higanbana")
        return tensors, parse_records(metadata["higanbana.modules"])
    tensors, _source = normalize_foreign(tensors, prefixes=prefixes)
    groups = group_modules(tensors)
    return tensors, {name: {"algo": detect_algo(name, suffixes), "options": None} for name, suffixes in groups.items()}
