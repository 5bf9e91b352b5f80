"""Networks to files and back: :func:`save_network`, :func:`load_network`, :func:`network_from_records`.

A file is ``<module name>.<suffix>`` tensors plus ``higanbana.*`` metadata (format version, each
module's algorithm and options, the parts' prefixes), so reloading never guesses. Any file that
:func:`~.reader.read_network_file` accepts — ours, kohya, LyCORIS, PEFT/diffusers — becomes records
here, and a network is built from them the one way every network is built
(``AdapterNetwork(parts, modules=records)``), then loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..algorithms import algorithm_class, check_keys_read
from ..errors import ConfigError, HiganbanaError, nearest
from ..network import AdapterNetwork, ModuleRecord, Part, named_layers
from .detect import base_from_names
from .reader import read_network_file
from .safetensors_io import FORMAT_VERSION, save_tensors

#: dtypes a network is written in (``alpha`` and integer tensors are kept as they are)
FILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def network_tensors(net: AdapterNetwork, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The tensors a file of ``net`` holds, cast to ``dtype`` (``alpha`` and integer tensors kept)."""
    if dtype not in FILE_DTYPES:
        raise ConfigError(f"output dtype {dtype} is not one of float32, float16, bfloat16")
    return {
        k: (v.detach().to(dtype) if v.is_floating_point() and not k.endswith(".alpha") else v.detach())
        for k, v in net.state_tensors().items()
    }


def network_metadata(net: AdapterNetwork) -> dict[str, str]:
    """Our own metadata: format version, per-module records and the parts' prefixes."""
    return {
        "higanbana.format_version": FORMAT_VERSION,
        "higanbana.modules": json.dumps(net.module_records(), sort_keys=True),
        "higanbana.prefix": ",".join(net.parts),
    }


def save_network(
    net: AdapterNetwork,
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``net``'s adapters as safetensors, atomically, with ``higanbana.*`` and the caller's metadata."""
    return save_tensors(network_tensors(net, dtype), path, {**network_metadata(net), **(metadata or {})})


def load_network(
    path: str | os.PathLike,
    model: nn.Module | Sequence[Part],
    prefix: str | None = None,
    *,
    strict: bool = True,
    unsafe_pickle: bool = False,
    network_class: type[AdapterNetwork] = AdapterNetwork,
) -> AdapterNetwork:
    """A network from a file on ``model``: ours (records in the metadata) or a foreign one (detected).

    On a bare model the part's prefix is ``prefix``, else the file's own (``higanbana.prefix``).
    Non-strict loading keeps what fits and lists the rest in ``net.load_report``.
    """
    tensors, records, metadata = read_network_file(path, unsafe_pickle=unsafe_pickle)
    if isinstance(model, nn.Module):
        saved = metadata.get("higanbana.prefix", "")
        parts = [Part(prefix or (saved.split(",")[0] if saved else "lycoris"), model)]
    else:
        parts = list(model)
    return network_from_records(parts, records, tensors, source=str(path), strict=strict, network_class=network_class)


def network_from_records(
    parts: Sequence[Part],
    records: Mapping[str, Mapping[str, Any]],
    tensors: Mapping[str, Tensor],
    *,
    source: str = "state",
    strict: bool = True,
    network_class: type[AdapterNetwork] = AdapterNetwork,
) -> AdapterNetwork:
    """A network of exactly the recorded modules (``{name: {"algo", "options"}}``) on ``parts``, loaded
    with ``tensors`` (``<name>.<suffix>``). A record's ``options`` of ``None`` (a foreign file) are
    derived from its tensors' keys and shapes against the layer.

    Strict: a module the model lacks, a key no module reads or a tensor that does not fit is an error
    naming it. Non-strict: what fits is loaded and the rest listed in ``net.load_report``.
    """
    names, aliases = named_layers(parts)
    records, tensors = _canonical_names(records, tensors, names, aliases)
    absent = [n for n in records if n not in names]
    if absent and strict:
        raise HiganbanaError(
            f"{source}: {len(absent)} module(s) are not in the model, e.g. {absent[0]!r}{nearest(absent[0], names)}"
            f"{base_model_hint(absent, names)}"
        )
    wanted = {n for n in records if n in names}
    if not wanted:
        raise HiganbanaError(
            f"{source}: none of its {len(records)} modules is in the model{base_model_hint(list(records), names)}"
        )
    by_module: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        by_module.setdefault(module, {})[suffix] = value
    plan = []
    for name in (n for n in names if n in wanted):  # in model order
        part, path = names[name]
        record = records[name]
        options = record.get("options")
        if options is None:  # a foreign file: options from the tensors' keys and shapes
            layer = part.module.get_submodule(path)
            try:
                options = algorithm_class(record["algo"]).options_from_state(by_module.get(name, {}), layer)
            except HiganbanaError as exc:
                raise type(exc)(f"{source}: module {name}: {exc}") from exc
        plan.append(ModuleRecord(name, part.prefix, path, record["algo"], dict(options)))
    try:
        net = network_class(parts, modules=plan)
    except HiganbanaError as exc:
        raise type(exc)(f"{source}: {exc}") from exc
    for name, adapter in net.adapters.items():
        try:
            check_keys_read(adapter, by_module.get(name, {}))
        except HiganbanaError as exc:
            raise type(exc)(f"{source}: module {name}: {exc}") from exc
    report = net.load_state_tensors(
        {k: v for k, v in tensors.items() if k.partition(".")[0] in wanted}, source=source, strict=strict
    )
    extra = [k for k in tensors if k.partition(".")[0] not in wanted]
    if extra and strict:
        more = f" … and {len(extra) - 10} more" if len(extra) > 10 else ""
        raise HiganbanaError(f"{source}: keys of no recorded module: {', '.join(extra[:10])}{more}")
    report.unexpected.extend(extra)
    net.load_report = report
    return net


def _canonical_names(
    records: Mapping[str, Any], tensors: Mapping[str, Tensor], names: Mapping[str, Any], aliases: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Rename modules a file names by an alias (e.g. a diffusers path on SDXL) to the names we write."""
    rename = {n: aliases[n] for n in records if n not in names and n in aliases}
    if not rename:
        return dict(records), dict(tensors)
    clash = [n for n, new in rename.items() if new in records]
    if clash:
        raise HiganbanaError(f"module {clash[0]!r} and {rename[clash[0]]!r} name the same layer")
    new_records = {rename.get(n, n): r for n, r in records.items()}
    new_tensors = {}
    for key, value in tensors.items():
        module, dot, suffix = key.partition(".")
        new_tensors[f"{rename.get(module, module)}{dot}{suffix}"] = value
    return new_records, new_tensors


def base_model_hint(absent: Iterable[str], names: Iterable[str]) -> str:
    """Say so when a file's names are SDXL's (SGM, two text encoders) on an SD1/2 model or the reverse."""
    file_base, model_base = base_from_names(absent), base_from_names(names)
    if file_base == "sdxl" and model_base == "sd1 or sd2":
        return " — this looks like an SDXL file on an SD1.x/2.x model"
    if file_base == "sd1 or sd2" and model_base == "sdxl":
        return " — this looks like an SD1.x/2.x file on an SDXL model"
    return ""
