"""What an algorithm declares about its modules in files, and the helpers its declarations use.

Every :class:`~higanbana.algorithms.base.Adapter` subclass states, next to its maths:

- ``file_keys`` (every key a module may hold) and ``marker_keys`` (the keys that identify it), with
  :meth:`detect` for what the keys alone cannot say;
- :meth:`check_file_shapes`: whether a module's tensors fit together, without the layer;
- :meth:`describe_rank`: the rank (or block layout) ``info`` shows;
- ``key_flags``: the options that decide whether a key exists (``weight_decompose`` ↔ ``dora_scale``);
- ``peft_type``/``peft_refusal`` and :meth:`peft_export`: the exact PEFT mapping, or why there is none;
- ``loaded_by`` and :meth:`tool_verdicts`: which tools load its modules, and where they deviate;
- ``examples``: the setups ``higanbana selfcheck`` trains.

The ``formats`` package loops over the registry and asks each class; it holds no per-algorithm
branch. So a new algorithm is one file and one registry line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import HiganbanaError

#: the tools ``info`` gives a verdict for (LyCORIS: lycoris-lora's ``create_lycoris_from_weights``)
TOOLS = ("ComfyUI", "A1111", "diffusers", "LyCORIS")
#: a tool leaves the module out / loads it with another result / fails on the whole file (raises)
SKIP, DEVIATE, REJECT = "skip", "deviate", "reject"
#: a module's layer kernel where known: ``()`` a Linear, ``(kh, kw)`` a convolution, None unknown
Kernel = tuple[int, ...] | None

#: a per-tool verdict on one module: ``(kind, reason)``; a tool missing from the mapping loads it as we do
Verdicts = dict[str, tuple[str, str]]


_SEVERITY = {REJECT: 3, SKIP: 2, DEVIATE: 1}


def merge_verdicts(into: Verdicts, new: Mapping[str, tuple[str, str]]) -> Verdicts:
    """Add ``new`` verdicts to ``into``: per tool the more severe wins (reject > skip > deviate), and
    among equals the one already there."""
    for tool, verdict in new.items():
        if tool not in into or _SEVERITY[verdict[0]] > _SEVERITY[into[tool][0]]:
            into[tool] = verdict
    return into


class FileStateError(HiganbanaError, ValueError):
    """A module's tensors cannot be this algorithm's (the message names the key)."""


class LayoutRefused(HiganbanaError, ValueError):
    """A module cannot be written in another layer layout (fused ``qkv`` ↔ split ``to_q/to_k/to_v``)
    exactly; the message says why."""


def row_blocks(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, size)`` of consecutive row blocks of the given sizes."""
    out, start = [], 0
    for size in sizes:
        out.append((start, size))
        start += size
    return out


def slice_rows(
    tensors: Mapping[str, Tensor], sizes: Sequence[int], row_keys: Sequence[str], rows: Mapping[str, int] | None = None
) -> list[dict[str, Tensor]]:
    """One module per block of output rows: the ``row_keys`` tensors cut along their first axis (in
    units of ``rows[key]`` output rows per tensor row, default 1), the others copied whole, an
    output-axis ``dora_scale`` (out, 1) cut with the rows (an input-axis one does not separate)."""
    rows = rows or {}
    out = []
    total = sum(sizes)
    dora = tensors.get("dora_scale")
    if dora is not None and not (dora.dim() == 2 and tuple(dora.shape) == (total, 1)):
        raise LayoutRefused(f"DoRA on the input axis (dora_scale {tuple(dora.shape)}) does not separate by output rows")
    for start, size in row_blocks(sizes):
        member = {}
        for key, value in tensors.items():
            unit = rows.get(key, 1)
            if key in row_keys or key == "dora_scale":
                if start % unit or size % unit:
                    raise LayoutRefused(
                        f"{key} {tuple(value.shape)} covers {unit} output rows per row, which does not divide "
                        f"the block of rows {start}..{start + size}"
                    )
                member[key] = value[start // unit : (start + size) // unit].clone()
            else:
                member[key] = value.clone()
        out.append(member)
    return out


def shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def need(mod: Mapping[str, Tensor], *keys: str) -> list[Tensor]:
    """The tensors of ``keys``, or an error naming the missing ones."""
    missing = [k for k in keys if k not in mod]
    if missing:
        raise FileStateError(f"missing key(s) {', '.join(repr(k) for k in missing)} (has {sorted(mod)})")
    return [mod[k] for k in keys]


def dims(t: Tensor, key: str, low: int, high: int | None = None) -> None:
    """``t`` has between ``low`` and ``high`` (default ``low``) dims."""
    high = low if high is None else high
    if not low <= t.dim() <= high:
        want = f"{low}" if low == high else f"{low} to {high}"
        raise FileStateError(f"tensor {key!r} has shape {shape(t)}; expected {want} dims")


def ones_from(t: Tensor, key: str, start: int) -> None:
    """The dims of ``t`` from ``start`` on are all 1 (a 1×1 kernel)."""
    if any(d != 1 for d in t.shape[start:]):
        raise FileStateError(f"tensor {key!r} has shape {shape(t)}; its dims after {start} must be 1")


def same(a: int, b: int, what: str) -> None:
    if a != b:
        raise FileStateError(f"{what}: {a} ≠ {b}")


def alpha_of(mod: Mapping[str, Tensor], rank: int) -> float:
    """A module's file α: a missing alpha, or 0, reads as the rank (scale 1), as kohya and LyCORIS read it."""
    a = float(mod["alpha"].reshape(-1)[0]) if "alpha" in mod else 0.0
    return float(rank) if a == 0 else a


def dora_axis(mod: Mapping[str, Tensor], options: Mapping[str, object] | None) -> str | None:
    """``"output"``/``"input"`` for a module with ``dora_scale`` (recorded option first, else its shape)."""
    scale = mod.get("dora_scale")
    if scale is None:
        return None
    if options and "wd_on_output" in options:
        return "output" if options["wd_on_output"] else "input"
    return "input" if scale.dim() >= 2 and scale.shape[0] == 1 and scale.shape[1] > 1 else "output"


def copy_verdict(
    tool: str, what: str, expected: Mapping[str, tuple[int, ...] | None], tensors: Mapping[str, Tensor]
) -> Verdicts:
    """A tool that rebuilds a module from the file's shapes and then copies each file tensor into its
    own parameter (``param.copy_(tensor)``): a key it has no parameter for, or a shape that does not
    broadcast to its parameter, raises (``REJECT``); a shape that broadcasts silently gives another
    result (``DEVIATE``). ``expected`` is its parameter shape per key it copies (None: it has no
    parameter for that key), in the order it copies; ``what`` describes its rebuild for the reason."""
    deviation: Verdicts = {}
    for key, want in expected.items():
        if key not in tensors:
            continue
        got = tuple(tensors[key].shape)
        if want is None:
            return {tool: (REJECT, f"{what}: it has no {key} to copy the file's into (raises)")}
        if got == want:
            continue
        try:
            fits = torch.broadcast_shapes(got, want) == torch.Size(want)
        except RuntimeError:
            fits = False
        if not fits:
            return {tool: (REJECT, f"{what}: its {key} is {want}, the file's {got}, and the copy raises")}
        deviation = deviation or {
            tool: (DEVIATE, f"{what}: its {key} is {want}, the file's {got}, which it broadcasts (another result)")
        }
    return deviation
