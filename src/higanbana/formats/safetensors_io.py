"""Atomic safetensors writes and checked reads.

Every write goes through :func:`higanbana.safeio.atomic_path` (a temporary beside the target,
flushed, then renamed into place), so a crash never leaves a half-written output. Reads accept
safetensors only (pickles need an explicit unsafe flag) and name the file in every error.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import HiganbanaError
from ..safeio import atomic_path

FORMAT_VERSION = "1"


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` (contiguous CPU copies) and string ``metadata`` to ``path`` atomically."""
    path = Path(path)
    bad = [k for k, v in (metadata or {}).items() if not isinstance(v, str)]
    if bad:
        raise HiganbanaError(f"{path}: metadata values must be strings (keys {bad})")
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(payload, tmp, metadata=metadata)
        except SafetensorError as exc:  # its I/O errors (a full disk) are not OSError
            raise HiganbanaError(f"cannot write {path}: {exc}; nothing was written") from exc
    return path


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file, with errors that name it."""
    path = Path(path)
    if path.is_dir():
        raise HiganbanaError(f"{path}: is a folder, not a .safetensors file")
    if not path.is_file():
        raise HiganbanaError(f"{path}: no such file")
    if path.suffix.lower() in {".pt", ".pth", ".ckpt", ".bin"}:
        raise HiganbanaError(f"{path}: pickle files are not loaded (convert it to .safetensors)")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises several types for truncated/corrupt headers
        raise HiganbanaError(f"{path}: not a readable safetensors file ({exc})") from exc
    return tensors, metadata
