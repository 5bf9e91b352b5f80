"""Merge adapter files into a whole SD checkpoint (``higanbana merge``), one tensor at a time.

Each checkpoint tensor whose module has adapters in the files is rebuilt on a lightweight layer
around that tensor (no model is built), merged in float32 at the file's strength and cast to the
output dtype. Several files apply in order, each on the previous result (ComfyUI's sequential
patches, as our stacked networks compose). OpenCLIP's fused ``in_proj`` (SD2's text encoder, SDXL's
second) is merged per q/k/v row slice.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..algorithms import adapter_from_state
from ..errors import HiganbanaError
from ..formats.checkpoint import DIT_KINDS, Checkpoint, open_checkpoint
from ..formats.dit_layout import ORIGINAL_PREFIX, to_split
from ..formats.metadata import read_base_model
from ..formats.network_files import base_model_hint
from ..formats.reader import read_network_file
from ..formats.validate import parse_records
from ..safeio import check_writable

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_PRETTY = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


@dataclass
class MergeReport:
    """What a merge did: modules merged per file, and how many tensors were copied unchanged."""

    out: Path
    kind: str
    merged: dict[str, list[str]] = field(default_factory=dict)  # file -> kohya module names
    merged_tensors: int = 0
    passed_through: int = 0

    def summary(self) -> str:
        lines = [f"{self.out}: {_PRETTY.get(self.kind, self.kind)} checkpoint"]
        for file, names in self.merged.items():
            lines.append(f"  {file}: merged {len(names)} module(s)")
        lines.append(f"  tensors merged: {self.merged_tensors}, passed through: {self.passed_through}")
        return "\n".join(lines)


@dataclass
class _FileAdapters:
    """One adapter file, regrouped by checkpoint module name."""

    path: str
    strength: float
    records: dict[str, dict[str, Any]]
    tensors: dict[str, dict[str, torch.Tensor]]  # name -> {suffix: tensor}


def _layer(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A module around existing tensors (nothing allocated): Linear, ConvNd, or LayerNorm for 1-D norms."""
    shape = tuple(weight.shape)
    if weight.ndim == 1:
        layer: nn.Module = nn.LayerNorm(shape[0], bias=bias is not None, device="meta")
    elif weight.ndim == 2:
        layer = nn.Linear(shape[1], shape[0], bias=bias is not None, device="meta")
    elif weight.ndim in (3, 4, 5):
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[weight.ndim]
        layer = conv(shape[1], shape[0], shape[2:], bias=bias is not None, device="meta")
    else:
        raise HiganbanaError(f"cannot merge into a {weight.ndim}-D weight")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def _check_base(path: str, metadata: dict[str, str], kind: str) -> None:
    if kind in DIT_KINDS:
        return  # module names decide: another family's names match nothing and are reported
    base = read_base_model(metadata) if any(k.startswith("ss_") for k in metadata) else "unknown"
    if base != "unknown" and base != kind and {base, kind} & {"sdxl"}:
        raise HiganbanaError(
            f"{path}: the file was made for {_PRETTY[base]} (ss_base_model_version="
            f"{metadata.get('ss_base_model_version')!r}) but the checkpoint is {_PRETTY.get(kind, kind)}"
        )


def _read_file(path: str, strength: float, ckpt: Checkpoint, unsafe_pickle: bool) -> _FileAdapters:
    tensors, records, metadata = read_network_file(path, unsafe_pickle=unsafe_pickle)
    _check_base(path, metadata, ckpt.kind)
    modules, aliases = ckpt.modules(), ckpt.aliases()
    if ckpt.dit_layout is not None and ckpt.is_folder and any(n.startswith(f"{ORIGINAL_PREFIX}_") for n in records):
        # kohya's fused SD3/Flux modules onto the diffusers transformer's split layers, exactly
        split = parse_records(metadata["higanbana.split_modules"]) if "higanbana.split_modules" in metadata else None
        try:
            tensors, records = to_split(tensors, records, ckpt.dit_layout, split_records=split)
        except HiganbanaError as exc:
            raise HiganbanaError(f"{path}: {exc}") from exc
    rename = {}
    absent = []
    for name in records:
        if name in modules:
            rename[name] = name
        elif name in aliases:
            rename[name] = aliases[name]
        else:
            absent.append(name)
    if absent:
        shown = ", ".join(absent[:5]) + (f" … and {len(absent) - 5} more" if len(absent) > 5 else "")
        raise HiganbanaError(
            f"{path}: {len(absent)} module(s) name nothing in the {_PRETTY.get(ckpt.kind, ckpt.kind)} checkpoint "
            f"{ckpt.path}: {shown}{base_model_hint(absent, modules)}"
        )
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if name not in rename:
            raise HiganbanaError(f"{path}: key {key!r} belongs to no recorded module")
        grouped.setdefault(rename[name], {})[suffix] = value
    new_records = {rename[n]: r for n, r in records.items()}
    return _FileAdapters(str(path), float(strength), new_records, grouped)


def _check_strength(path: str | os.PathLike, strength: object) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise HiganbanaError(f"{path}: strength {strength!r} is not a finite number")
    return float(strength)


def merge(
    base: str | os.PathLike,
    adapters: Sequence[tuple[str | os.PathLike, float]],
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    unsafe_pickle: bool = False,
    kind: str | None = None,
) -> MergeReport:
    """Merge ``adapters`` (``(file, strength)``, applied in order) into the checkpoint ``base`` and
    write ``out`` in the same format (folder or single file)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise HiganbanaError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if not adapters:
        raise HiganbanaError("nothing to merge: give at least one adapter file")
    adapters = [(p, _check_strength(p, s)) for p, s in adapters]
    out = Path(out)
    if out.exists() and not overwrite:
        raise HiganbanaError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    check_writable(out)
    ckpt = open_checkpoint(base, kind)
    files = [_read_file(str(p), s, ckpt, unsafe_pickle) for p, s in adapters]
    report = MergeReport(out, ckpt.kind, {f.path: [] for f in files})
    modules = ckpt.modules()
    # tensor key -> [(module name, param, rows)] for the modules some file adapts
    adapted = {n for f in files for n in f.records}
    by_key: dict[str, list[tuple[str, str, slice | None]]] = {}
    for name in adapted:
        for param, (key, rows) in modules[name].items():
            by_key.setdefault(key, []).append((name, param, rows))
    cache: dict[str, torch.Tensor] = {}  # results computed with a sibling tensor (bias with weight)

    def unit_of(key: str) -> tuple[str | None, str | None, list[str]]:
        """The weight and bias keys sharing ``key``'s modules, and those modules."""
        names = sorted({n for n, _, _ in by_key[key]})
        params = {p: modules[n][p][0] for n in names for p in modules[n]}
        return params.get("weight"), params.get("bias"), names

    def merge_unit(wkey: str | None, bkey: str | None, names: list[str]) -> dict[str, torch.Tensor]:
        if wkey is None:
            raise HiganbanaError(f"module {names[0]}: the checkpoint has a bias but no weight for it")
        sliced = any(modules[n]["weight"][1] is not None for n in names)  # fused q/k/v: written in place
        weight = ckpt.get_tensor(wkey).to(torch.float32, copy=sliced)
        bias = ckpt.get_tensor(bkey).to(torch.float32, copy=sliced) if bkey is not None else None
        for f in files:
            for name in names:
                if name not in f.records:
                    continue
                rows = modules[name]["weight"][1]
                w = weight[rows] if rows is not None else weight
                b = None if bias is None else (bias[rows] if rows is not None else bias)
                layer = _layer(w, b)  # read only: merged_weight() returns a new tensor
                record, suffixes = f.records[name], f.tensors.get(name, {})
                try:
                    adapter = adapter_from_state(record["algo"], layer, record.get("options"), suffixes).eval()
                    with torch.no_grad():
                        new_w = adapter.merged_weight(f.strength).float()
                        new_b = adapter.merged_bias(f.strength)
                except HiganbanaError as exc:
                    raise HiganbanaError(f"{f.path}: module {name}: {exc}") from exc
                except RuntimeError as exc:  # torch's own (e.g. a strength that overflows float32)
                    raise HiganbanaError(f"{f.path}: module {name}: {exc}") from exc
                if rows is None:
                    weight = new_w
                    bias = None if new_b is None else new_b.float()
                else:
                    weight[rows] = new_w
                    if bias is not None and new_b is not None:
                        bias[rows] = new_b.float()
                report.merged[f.path].append(name)
        return {k: v for k, v in ((wkey, weight), (bkey, bias)) if k is not None and v is not None}

    def transform(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key not in by_key:
            report.passed_through += 1
            return tensor
        if key not in cache:
            cache.update(merge_unit(*unit_of(key)))
        report.merged_tensors += 1
        merged = cache.pop(key).to(tensor.dtype if dtype is None else dtype)
        if not bool(torch.isfinite(merged).all()) and bool(torch.isfinite(tensor).all()):
            names = ", ".join(n for n, _, _ in by_key[key][:2])
            raise HiganbanaError(
                f"merging {names} into {key} gives NaN/Inf in {merged.dtype} (a strength or an adapter too "
                "large for the output dtype?); nothing was written"
            )
        return merged

    meta = {"higanbana.merged": ", ".join(f"{Path(p).name}:{s:g}" for p, s in adapters)}
    try:
        ckpt.write_like(out, transform, dtype=dtype, overwrite=overwrite, metadata=meta)
    finally:
        ckpt.close()
    for f in files:  # a module is counted once per file even when its weight and bias were both merged
        report.merged[f.path] = sorted(set(report.merged[f.path]))
    return report
