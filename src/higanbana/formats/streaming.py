"""safetensors files read and written tensor by tensor: the header alone (:func:`read_header`), and a
streaming writer that never holds more than one tensor (:func:`write_streaming`), for whole
checkpoints of several GB."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import HiganbanaError
from ..safeio import atomic_path

#: safetensors dtype names <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    **({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2} if hasattr(torch, "float8_e4m3fn") else {}),
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


def read_header(
    path: str | os.PathLike,
) -> tuple[dict[str, tuple[tuple[int, ...], str, tuple[int, int]]], dict[str, str]]:
    """``({key: (shape, dtype name, (start, end) byte offsets in the file)}, metadata)`` from a
    safetensors header, in data order; no tensor is read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError(f"header size {size} is implausible")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise HiganbanaError(f"{path}: not a readable safetensors file ({exc})") from exc
    metadata = header.pop("__metadata__", None) or {}
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    start = 8 + size
    entries = {}
    for k, v in items:
        begin, end = v["data_offsets"]
        entries[k] = (tuple(v["shape"]), v["dtype"], (start + begin, start + end))
    return entries, dict(metadata)


def _write_bytes(f, data) -> None:
    """One write; a seam so tests can simulate a full disk."""
    f.write(data)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    # numpy's stubs give ndarray __buffer__ only for Python >= 3.12; it has the buffer protocol on 3.11 too
    return memoryview(t.view(torch.uint8).numpy())  # type: ignore[arg-type]


def write_streaming(
    path: str | os.PathLike,
    items: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    progress: Any = None,
) -> Path:
    """Write a safetensors file without holding more than one tensor: header first (offsets from the
    declared shapes and dtypes), then ``produce(key)`` for each key in order.

    The file goes to a temporary name in the same folder and is renamed into place; on any error the
    temporary file is removed and a :class:`HiganbanaError` naming ``path`` is raised.
    """
    path = Path(path)
    items = [(k, tuple(int(d) for d in shape), dtype) for k, shape, dtype in items]
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise HiganbanaError(f"{path}: metadata values must be strings (keys {bad})")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, shape, dtype in items:
        if dtype not in TORCH_TO_ST:
            raise HiganbanaError(f"{path}: tensor {key!r} has dtype {dtype}, which safetensors cannot hold")
        n = 1
        for d in shape:
            n *= d
        size = n * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            _write_bytes(f, struct.pack("<Q", len(blob)))
            _write_bytes(f, blob)
            for key, shape, dtype in items:
                t = produce(key)
                if tuple(t.shape) != shape:
                    raise HiganbanaError(f"tensor {key!r}: produced shape {tuple(t.shape)}, expected {shape}")
                _write_bytes(f, _tensor_bytes(t.to(dtype)))
                del t
                if progress is not None:
                    progress.update(1)
    except HiganbanaError as exc:
        if str(exc).startswith("cannot write"):
            raise
        raise HiganbanaError(f"{path}: {exc}; nothing was written") from exc
    return path
