"""Export to Hugging Face PEFT (``adapter_config.json`` + ``adapter_model.safetensors``) and diffusers naming.

Only exact mappings are written: each algorithm declares its own (``peft_type``, ``peft_export``;
today LoRA/LoCon without ``lora_mid``, output-axis DoRA, LoHa with Tucker as
``use_effective_conv2d``, and LoKr), and the others say why PEFT cannot hold them
(``peft_refusal``). PEFT's scale is always ``α/r`` with its own ``r`` per module, so each module's
``r``/``alpha`` are chosen to give our scale and PEFT's shapes; anything PEFT would build with other
shapes, or compute differently, is an error. This module builds the shared config around them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..algorithms import Adapter, algorithm_class, algorithm_classes
from ..algorithms.lokr import peft_factorization as peft_factorization  # re-exported: PEFT's LoKr split
from ..errors import HiganbanaError, nearest
from ..network import AdapterNetwork
from ..safeio import atomic_folder
from .detect import detect_algo, group_modules
from .network_files import network_tensors
from .safetensors_io import save_tensors

TARGETS = {"peft": "base_model.model.", "diffusers-unet": "unet.", "diffusers-transformer": "transformer."}
#: the files each target's folder holds
TARGET_FILES = {
    "peft": ("adapter_config.json", "adapter_model.safetensors"),
    "diffusers-unet": ("adapter_config.json", "pytorch_lora_weights.safetensors"),
    "diffusers-transformer": ("adapter_config.json", "pytorch_lora_weights.safetensors"),
}
#: the diffusers targets: the pipeline component whose LoRA the folder holds
DIFFUSERS_ROOTS = ("unet", "transformer")


def peft_refusals() -> dict[str, str]:
    """Why each algorithm without an exact PEFT mapping cannot be exported (each algorithm says)."""
    return {cls.algo: cls.peft_refusal for cls in algorithm_classes() if cls.peft_type is None}


def _check_one_algo(algos: Mapping[str, str]) -> type[Adapter]:
    kinds = sorted(set(algos.values()))
    if len(kinds) > 1:
        examples = ", ".join(f"{a}: {next(n for n, x in algos.items() if x == a)!r}" for a in kinds)
        raise HiganbanaError(f"PEFT holds one adapter type per config, but this file mixes {examples}")
    cls = algorithm_class(kinds[0])
    if cls.peft_type is None:
        raise HiganbanaError(f"{cls.algo} cannot be exported to PEFT: {cls.peft_refusal}")
    return cls


def _patterns(values: Mapping[str, float], default: float) -> dict[str, float]:
    """PEFT ``*_pattern`` entries for modules that differ from ``default``.

    Keys are the escaped paths, longest first: PEFT matches ``(.*\\.)?(key)$`` with the key as a regex
    and takes the first hit, so ``1.0`` must come before ``0``.
    """
    diff = {p: v for p, v in values.items() if v != default}
    return {re.escape(p): diff[p] for p in sorted(diff, key=lambda p: (-len(p), p))}


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def to_peft(
    tensors: Mapping[str, Tensor],
    records: Mapping[str, dict],
    paths: Mapping[str, str],
    *,
    target: str = "peft",
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[dict, dict[str, Tensor]]:
    """Our ``<name>.<suffix>`` tensors -> (PEFT ``adapter_config`` dict, PEFT-keyed tensors).

    ``records[name]`` is ``{"algo", "options"}`` (as ``module_records()``), ``paths[name]`` the module's
    path in the model. ``target="peft"`` writes ``base_model.model.<path>.…`` keys (PeftModel), and
    ``"diffusers-unet"`` ``unet.<path>.…`` (``"diffusers-transformer"``: ``transformer.<path>.…``, SD3/Flux)
    (diffusers' ``pytorch_lora_weights`` layout; LoRA, and LoKr
    which diffusers ≥ 0.42 reads into a LoKrConfig; not LoHa). Per-module ranks and α go to ``rank_pattern`` /
    ``alpha_pattern``. Decisions: our α already includes rs-LoRA (``α/r`` is the scale), so
    ``use_rslora`` is always false; DoRA's magnitude is written as PEFT saves it, ``(out,)`` for
    Linear and ``(1, out, 1, ..)`` for convs; LoKr modules with both blocks full (our scale 1) get
    ``alpha = r``. ``shapes[name]`` (the base weight's shape) matters only for conv LoKr whose
    ``w2`` is factored without Tucker (``lokr_w2_b`` flattens the kernel, so the split of the input
    channels is not in the tensors); without it a Linear layer is assumed, and a wrong guess shows up
    as an error here or as PEFT's size-mismatch error on load, never as a silently different weight.
    """
    if target not in TARGETS:
        raise HiganbanaError(f"unknown PEFT export target {target!r} (choose from {sorted(TARGETS)})")
    groups = group_modules(tensors)
    if not groups:
        raise HiganbanaError("nothing to export: no tensors")
    missing = sorted(n for n in groups if n not in paths)
    if missing:
        raise HiganbanaError(f"no module path for {missing[:3]} (every module needs its path in the model)")
    algos = {
        n: algorithm_class((records.get(n) or {}).get("algo") or detect_algo(n, mod)).algo for n, mod in groups.items()
    }
    cls = _check_one_algo(algos)
    if target.startswith("diffusers") and not _diffusers_reads(cls, target):
        reads = "LoRA" if target == "diffusers-transformer" else "LoRA and LoKr"
        raise HiganbanaError(f"diffusers' load_lora_weights reads {reads} only; export {cls.algo} with target='peft'")
    out, ranks, alphas, extra = cls.peft_export(groups, paths, TARGETS[target], records, shapes or {})
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    lora = cls.peft_type == "LORA"  # PEFT's LoraConfig; LoHa and LoKr share its LycorisConfig fields
    alpha_key = "lora_alpha" if lora else "alpha"
    config: dict[str, Any] = {
        "peft_type": cls.peft_type,
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": int(r0),
        alpha_key: _number(a0),
        "target_modules": sorted(paths[n] for n in groups),
        "rank_pattern": {k: int(v) for k, v in _patterns(ranks, r0).items()},
        "alpha_pattern": {k: _number(v) for k, v in _patterns(alphas, a0).items()},
        "lora_dropout" if lora else "rank_dropout": 0.0,
        **extra,
    }
    if lora:
        config.update(use_rslora=False, bias="none", fan_in_fan_out=False, init_lora_weights=True)
    else:
        config.update(module_dropout=0.0, init_weights=True)
    return config, out


def _diffusers_reads(cls: type[Adapter], target: str) -> bool:
    """Whether diffusers 0.42.1 loads this algorithm's PEFT export for the target's pipelines: LoRA and
    LoKr into SD/SDXL UNets; LoRA only into SD3/Flux transformers (their ``lora_state_dict`` demands
    "lora" in every key: "Invalid LoRA checkpoint")."""
    if target == "diffusers-transformer":
        return cls.peft_type == "LORA"
    return cls.diffusers_export


def save_peft_folder(folder: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``folder``, as one unit.

    diffusers-keyed tensors (``unet.`` or ``transformer.``) go to ``pytorch_lora_weights.safetensors``
    instead, with the config in the ``lora_adapter_metadata`` header entry (keys prefixed with that root)
    as diffusers writes it.
    The folder is written whole and swapped into place (other files of an existing folder are kept),
    so a kill never leaves weights beside the config of another run.
    """
    folder = Path(folder)
    roots = {k.partition(".")[0] for k in tensors}
    diffusers = len(roots) == 1 and next(iter(roots)) in DIFFUSERS_ROOTS
    weights = "pytorch_lora_weights.safetensors" if diffusers else "adapter_model.safetensors"
    with atomic_folder(folder, overwrite=True) as tmp:
        if folder.is_dir():  # keep what else the folder holds (hard links: no copy of large files)
            for entry in folder.iterdir():
                if entry.name not in (weights, "adapter_config.json"):
                    _link_or_copy(entry, tmp / entry.name)
        if diffusers:
            root = next(iter(roots))
            meta = json.dumps({f"{root}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)
            save_tensors(dict(tensors), tmp / weights, {"lora_adapter_metadata": meta})
        else:
            save_tensors(dict(tensors), tmp / weights)
        (tmp / "adapter_config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True), encoding="utf-8")
    return folder


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------- a network as a PEFT folder
@dataclass
class PeftWrite:
    """What :func:`write_peft` wrote: the folder, its files, how many modules, and what it left out."""

    folder: Path
    outputs: list[str]
    modules: int
    dropped: dict[str, str] = field(default_factory=dict)  # module → why PEFT/diffusers cannot hold it
    lossy: list[str] = field(default_factory=list)  # what was lost, in words


def _lossy(what: str, allow_lossy: bool) -> None:
    if not allow_lossy:
        raise HiganbanaError(f"{what}; pass allow_lossy=True (--allow-lossy) to write it anyway")


def write_peft(
    net: AdapterNetwork,
    folder: str | os.PathLike,
    *,
    target: str = "peft",
    part: str | None = None,
    dtype: torch.dtype = torch.float32,
    allow_lossy: bool = False,
    source: str | None = None,
) -> PeftWrite:
    """Write one part of ``net`` as a PEFT folder (``target="peft"``) or diffusers' LoRA folder
    (``"diffusers-unet"``): the one export path, for ``export_peft`` and ``higanbana convert``.

    PEFT names modules by their path in one model, so a folder holds one part: ``part`` (a prefix),
    or by default the UNet (``lora_unet``) or the only part. Anything the folder cannot hold — other
    parts, algorithms without an exact PEFT mapping, DoRA's magnitude in diffusers — is an error
    unless ``allow_lossy``, and then listed in the result. ``source`` names the input in errors.
    """
    if target not in TARGETS:
        raise HiganbanaError(f"unknown PEFT export target {target!r} (choose from {sorted(TARGETS)})")
    where = f"{source}: " if source else ""
    diffusers = target.startswith("diffusers")
    shown = "diffusers" if diffusers else target
    chosen = part
    if chosen is None:
        main = [p for p in ("lora_unet", "lora_transformer") if p in net.parts]
        if main:
            chosen = main[0]
        elif len(net.parts) == 1:
            chosen = next(iter(net.parts))
        else:
            raise HiganbanaError(f"{where}PEFT files describe one model; choose part= one of {list(net.parts)}")
    if chosen not in net.parts:
        raise HiganbanaError(f"{where}no module of part {chosen!r} in the network{nearest(chosen, net.parts)}")
    if diffusers and net.parts[chosen].kind != "unet":
        raise HiganbanaError(f"{where}the diffusers target holds the UNet/transformer only, not part {chosen!r}")
    result = PeftWrite(Path(folder), [], 0)
    others = [n for n, r in net.records.items() if r.prefix != chosen]
    if others and part is None:  # an explicit part= is the user's choice, not a loss
        why = (
            "diffusers target holds the UNet/transformer only"
            if diffusers
            else f"a PEFT folder holds one part ({chosen})"
        )
        result.dropped.update({n: why for n in others})
    names = [n for n, r in net.records.items() if r.prefix == chosen]

    def holds(algo: str) -> bool:  # each algorithm declares its PEFT mapping and whether diffusers reads it
        cls = algorithm_class(algo)
        return cls.peft_type is not None and (target == "peft" or _diffusers_reads(cls, target))

    bad = [n for n in names if not holds(net.records[n].algo)]
    if bad and len(bad) == len(names):
        algo = net.records[bad[0]].algo
        reads = "LoRA" if target == "diffusers-transformer" else "LoRA and LoKr"
        fallback = f"diffusers' load_lora_weights reads {reads} only" if diffusers else ""
        why = peft_refusals().get(algo, fallback)
        raise HiganbanaError(f"{where}{algo} (module {bad[0]}) cannot be written to {shown}: {why or 'no equivalent'}")
    for n in bad:
        result.dropped[n] = f"{net.records[n].algo} has no {shown} equivalent"
    names = [n for n in names if n not in bad]
    if result.dropped:
        first = next(iter(result.dropped))
        choose = f"; choose part= one of {list(net.parts)}" if len(net.parts) > 1 and part is None else ""
        _lossy(
            f"{where}{len(result.dropped)} module(s) cannot be held by {shown}, e.g. {first} "
            f"({result.dropped[first]}){choose}",
            allow_lossy,
        )
        result.lossy.append(f"dropped {len(result.dropped)} module(s)")
    tensors = {k: v for k, v in network_tensors(net, dtype).items() if k.partition(".")[0] in names}
    dora = sorted({k.partition(".")[0] for k in tensors if k.endswith(".dora_scale")})
    if dora and diffusers:
        _lossy(
            f"{where}DoRA module(s) (e.g. {dora[0]}) into diffusers: load_lora_weights drops dora_scale, so the "
            "result is a plain LoRA",
            allow_lossy,
        )
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".dora_scale")}
        result.lossy.append(f"dora_scale dropped from {len(dora)} DoRA module(s)")
    records = {n: r for n, r in net.module_records().items() if n in names}
    paths = {n: net.records[n].path for n in names}
    shapes = {n: tuple(net.adapters[n].layer_weight.shape) for n in names}
    try:
        config, peft_tensors = to_peft(tensors, records, paths, target=target, shapes=shapes)
    except HiganbanaError as exc:
        raise HiganbanaError(f"{where}{exc}") from exc
    result.folder = save_peft_folder(folder, config, peft_tensors)
    result.outputs = [str(result.folder / f) for f in TARGET_FILES[target]]
    result.modules = len(names)
    return result


def export_peft(
    net: AdapterNetwork,
    folder: str | os.PathLike,
    *,
    target: str = "peft",
    part: str | None = None,
    allow_lossy: bool = False,
) -> Path:
    """Write a network as a PEFT (``adapter_config.json`` + ``adapter_model.safetensors``) or diffusers
    folder and return the folder (:func:`write_peft` says what it left out).

    Exact for LoRA, DoRA (output axis), LoHa and LoKr; other algorithms are an error that says why
    (PEFT's OFT/BOFT/GLoRA/IA3 are different algorithms under the same names).
    """
    return write_peft(net, folder, target=target, part=part, allow_lossy=allow_lossy).folder
