"""Recognise adapter files: which algorithm each module holds, and foreign (PEFT/diffusers/kohya OFT) naming.

Our files are ``<module name>.<suffix>`` with kohya module names (no dots). Foreign files are renamed
to that form by :func:`normalize_foreign`, so one loader handles every source (docs/design.md §4).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..algorithms import algorithm_class, algorithm_classes
from ..algorithms.files import FileStateError
from ..algorithms.glora import glora_layout as glora_layout  # re-exported: a GLoRA module's layout
from ..errors import HiganbanaError
from .safetensors_io import load_tensors

#: kohya module-name prefixes that are already ours
NATIVE_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")

#: default module-path root -> our prefix (``text_encoder`` is ``lora_te1`` when ``text_encoder_2`` is present)
DEFAULT_PREFIXES: dict[str, str] = {
    "base_model.model": "lycoris",
    "unet": "lora_unet",
    "text_encoder": "lora_te",
    "text_encoder_2": "lora_te2",
    "transformer": "lora_transformer",  # SD3/Flux (docs/files.md)
}

#: PEFT/diffusers suffix heads -> our suffix (``None``: keep the head as is)
_FOREIGN_HEADS: dict[str, str | None] = {
    "lora_A": "lora_down.weight",
    "lora_B": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
    **{f"hada_{n}": None for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{n}": None for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}


# --------------------------------------------------------------------------- grouping and detection
def group_modules(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split ``<module>.<suffix>`` keys at the first dot (kohya names have none) into {module: {suffix: tensor}}."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        module, dot, suffix = key.partition(".")
        if not dot or not module or not suffix:
            raise HiganbanaError(f"key {key!r} is not of the form '<module>.<suffix>'")
        groups.setdefault(module, {})[suffix] = value
    return groups


def detect_algo(module: str, suffixes: Mapping[str, Tensor]) -> str:
    """The algorithm of one module from its keys and shapes: the registered class whose ``detect``
    claims them (each algorithm declares its marker keys; see :mod:`higanbana.algorithms.files`)."""
    try:
        found = [cls.algo for cls in algorithm_classes() if cls.detect(suffixes)]
    except FileStateError as exc:
        raise HiganbanaError(f"module {module!r}: {exc}") from None
    if len(found) == 1:
        return found[0]
    if not found:
        raise HiganbanaError(f"module {module!r}: unknown adapter keys {sorted(suffixes)} (no known algorithm matches)")
    raise HiganbanaError(f"module {module!r}: keys of several algorithms ({', '.join(found)}): {sorted(suffixes)}")


def dora_axis(suffixes: Mapping[str, Tensor], out_features: int) -> str | None:
    """``"output"`` for a ``dora_scale`` of shape (out, 1, ..), ``"input"`` for (1, in, ..), ``None`` without one."""
    scale = suffixes.get("dora_scale")
    if scale is None:
        return None
    shape = tuple(scale.shape)
    if len(shape) >= 2 and shape[0] == out_features and shape[1] == 1:
        return "output"
    if len(shape) >= 2 and shape[0] == 1:
        return "input"
    raise HiganbanaError(f"dora_scale has shape {shape}; expected (out={out_features}, 1, ..) or (1, in, ..)")


_FLUX_NAMES = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_transformer_single_transformer_blocks_")
_SD3_NAMES = ("lora_unet_joint_blocks_",)


def dit_base(names: Iterable[str], metadata: Mapping[str, str] | None = None) -> str | None:
    """``"flux"`` or ``"sd3"`` for a file of a diffusion transformer — from ``modelspec.architecture``
    (``flux-1…``/``chroma``, ``stable-diffusion-3…``), else its module names (kohya's original names,
    split names with single-stream blocks) — ``"sd3 or flux"`` when only split double-stream block names
    say it, None for any other file."""
    arch = str((metadata or {}).get("modelspec.architecture", ""))
    if arch.startswith(("flux-1", "chroma")):
        return "flux"
    if arch.startswith("stable-diffusion-3"):
        return "sd3"
    names = list(names)
    if any(n.startswith(_FLUX_NAMES) for n in names):
        return "flux"
    if any(n.startswith(_SD3_NAMES) for n in names):
        return "sd3"
    if any(n.startswith("lora_transformer_") for n in names):
        return "sd3 or flux"
    return None


def base_from_names(names: Iterable[str]) -> str:
    """``"sdxl"`` (SGM UNet names or two text encoders), ``"sd1 or sd2"`` (diffusers UNet names or one
    text encoder) or ``"unknown"``, from kohya module names alone."""
    names = list(names)
    if any(
        n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks", "lora_unet_output_blocks")) for n in names
    ):
        return "sdxl"
    if any(
        n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block", "lora_te_")) for n in names
    ):
        return "sd1 or sd2"
    return "unknown"


# --------------------------------------------------------------------------- foreign names
def _source_of(key: str) -> str | None:
    if key.startswith("lycoris_"):
        return "lycoris"
    if key.startswith(NATIVE_PREFIXES):
        return "kohya"
    if key.startswith("oft_unet_") or key.startswith("oft_te"):
        return "kohya-oft"
    if key.startswith("base_model.model."):
        return "peft"
    if key.startswith(("unet.", "transformer.", "text_encoder.", "text_encoder_2.")):
        return "diffusers"
    return None


def split_foreign_key(key: str) -> tuple[str, str]:
    """``(module path, our suffix)`` of a PEFT/diffusers key, without the root and any adapter-name segment.

    ``base_model.model.a.b.lora_A.default.weight`` -> (``base_model.model.a.b``, ``lora_down.weight``).
    """
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in _FOREIGN_HEADS:
            rest = [p for p in parts[i + 1 :] if p in ("weight", "bias")]
            if "bias" in rest:
                raise HiganbanaError(f"key {key!r}: LoRA bias terms (lora_bias) have no equivalent in our files")
            ours = _FOREIGN_HEADS[part] or part
            return ".".join(parts[:i]), ours
    raise HiganbanaError(
        f"key {key!r}: unknown PEFT/diffusers suffix (known: {', '.join(sorted(_FOREIGN_HEADS))}); "
        "PEFT OFT/BOFT/IA3/GLoRA and embedding LoRA are different algorithms or layers and are not read"
    )


def _magnitude_to_dora_scale(value: Tensor) -> Tensor:
    """PEFT ``lora_magnitude_vector`` ((out,) Linear, (1,out,1..) conv) -> our output-axis (out, 1[, 1..])."""
    return value.reshape(value.numel(), 1, *(1,) * max(value.dim() - 2, 0))


def _split_root(path: str, prefixes: Mapping[str, str]) -> tuple[str, str]:
    """(root, rest) with the longest matching root of ``prefixes``."""
    for root in sorted(prefixes, key=len, reverse=True):
        if path.startswith(root + "."):
            return root, path[len(root) + 1 :]
    raise HiganbanaError(f"module path {path!r} starts with none of the roots {sorted(prefixes)}")


def module_name(prefix: str, path: str) -> str:
    """Our module name for a module path: ``<prefix>_<path with . -> _>``."""
    return f"{prefix}_{path.replace('.', '_')}"


def normalize_foreign(
    tensors: Mapping[str, Tensor],
    *,
    prefixes: Mapping[str, str] | None = None,
    peft_prefix: str | None = None,
    te_prefix: str | None = None,
) -> tuple[dict[str, Tensor], str]:
    """Rename any supported naming to ``<kohya module name>.<suffix>``; returns (tensors, source format).

    Sources: ``"kohya"`` and ``"lycoris"`` (kept), ``"kohya-oft"`` (``oft_`` -> ``lora_``), ``"peft"``
    (``base_model.model.<path>``, prefix ``peft_prefix``, default ``lycoris``) and ``"diffusers"``
    (``unet.``/``transformer.``/``text_encoder.``/``text_encoder_2.`` -> ``lora_unet``/``lora_transformer``/
    ``lora_te``/``lora_te2``;
    ``text_encoder`` becomes ``lora_te1`` when ``text_encoder_2`` keys are present, unless ``te_prefix``
    says otherwise). ``prefixes`` overrides any root -> prefix pair. PEFT's ``lora_A``/``lora_B`` become
    ``lora_down``/``lora_up``, ``lora_magnitude_vector`` an output-axis ``dora_scale`` (out, 1[, 1..]),
    and an adapter-name segment (``.default``) is dropped. PEFT/diffusers files carry no alpha: see
    :func:`load_peft_folder` for the scale. Module paths are not translated (SDXL's SGM names are the
    job of ``sdxl_names``).
    """
    out, source, _paths = normalize_with_paths(tensors, prefixes, peft_prefix, te_prefix)
    return out, source


def normalize_with_paths(
    tensors: Mapping[str, Tensor],
    prefixes: Mapping[str, str] | None,
    peft_prefix: str | None,
    te_prefix: str | None,
) -> tuple[dict[str, Tensor], str, dict[str, str]]:
    """:func:`normalize_foreign` plus {our module name: model path under its root} for PEFT/diffusers."""
    if not tensors:
        raise HiganbanaError("no tensors to read")
    sources: dict[str, str] = {}
    for key in tensors:
        source = _source_of(key)
        if source is None:
            raise HiganbanaError(
                f"key {key!r}: unknown naming (expected lora_unet_/lora_te*_/lycoris_/oft_unet_ module names, "
                "or PEFT base_model.model.<path> / diffusers unet.<path>, transformer.<path>, text_encoder.<path> keys)"
            )
        sources.setdefault(source, key)
    if set(sources) <= {"kohya", "lycoris"}:
        return dict(tensors), "lycoris" if "lycoris" in sources else "kohya", {}
    if len(sources) > 1:
        examples = ", ".join(f"{s}: {k!r}" for s, k in sources.items())
        raise HiganbanaError(f"mixed key naming in one file ({examples})")
    source = next(iter(sources))
    if source == "kohya-oft":
        return {"lora_" + k[len("oft_") :]: v for k, v in tensors.items()}, source, {}

    roots = dict(DEFAULT_PREFIXES)
    if any(k.startswith("text_encoder_2.") for k in tensors):
        roots["text_encoder"] = "lora_te1"
    if te_prefix is not None:
        roots["text_encoder"] = te_prefix
    if peft_prefix is not None:
        roots["base_model.model"] = peft_prefix
    roots.update(prefixes or {})
    out: dict[str, Tensor] = {}
    paths: dict[str, str] = {}
    for key, value in tensors.items():
        path, suffix = split_foreign_key(key)
        root, rest = _split_root(path, roots)
        if suffix == "dora_scale":
            value = _magnitude_to_dora_scale(value)
        module = module_name(roots[root], rest)
        if paths.setdefault(module, rest) != rest:
            raise HiganbanaError(f"module paths {paths[module]!r} and {rest!r} both become {module!r}")
        name = f"{module}.{suffix}"
        if name in out:
            raise HiganbanaError(f"key {key!r} maps to {name!r}, which another key already gave")
        out[name] = value
    return out, source, paths


# --------------------------------------------------------------------------- PEFT configs
def pattern_value(pattern: Mapping[str, Any], path: str) -> Any:
    """The value of the first pattern key matching ``path`` the way PEFT does (``(.*\\.)?(key)$``), or None."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return None


def peft_alphas(config: Mapping[str, Any], module_paths: Iterable[str]) -> dict[str, float]:
    """Our file α per module path from a PEFT ``adapter_config.json``, such that ``α/r`` is PEFT's scale.

    PEFT scales by ``lora_alpha/r`` (``alpha`` for LoHa/LoKr), or ``lora_alpha/√r`` with ``use_rslora``;
    ``rank_pattern``/``alpha_pattern`` override per module. With rs-LoRA we store ``lora_alpha·√r``
    (docs/design.md §3), so a reader computing ``α/r`` gets ``lora_alpha/√r``.
    """
    r0 = int(config.get("r", 8))
    a0 = float(config.get("lora_alpha", config.get("alpha", r0)))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rs = bool(config.get("use_rslora", False))
    out: dict[str, float] = {}
    for path in module_paths:
        r = pattern_value(rank_pattern, path)
        r = r0 if r is None else int(r)
        a = pattern_value(alpha_pattern, path)
        a = a0 if a is None else float(a)
        if a == 0:
            raise HiganbanaError(f"PEFT config: module {path!r} has alpha 0 (scale 0), which our files cannot hold")
        out[path] = a * math.sqrt(r) if rs else a
    return out


def peft_ranks(config: Mapping[str, Any], module_paths: Iterable[str]) -> dict[str, int]:
    """PEFT's rank ``r`` per module path (``rank_pattern`` over ``r``)."""
    r0 = int(config.get("r", 8))
    pattern = config.get("rank_pattern") or {}
    return {p: int(v) if (v := pattern_value(pattern, p)) is not None else r0 for p in module_paths}


def load_peft_folder(
    folder: str | Path, *, prefixes: Mapping[str, str] | None = None, peft_prefix: str | None = None
) -> tuple[dict[str, Tensor], dict]:
    """Read a PEFT ``adapter_config.json`` + ``adapter_model.safetensors`` as our tensors, with ``.alpha`` added.

    Each module gets a 0-d float32 ``alpha`` from :func:`peft_alphas`. LoKr with both blocks full is
    the one case alpha cannot carry: our scale is then 1 while PEFT's is ``α/r``, so the factor
    ``α/r`` is folded into ``lokr_w2`` and ``alpha`` is written as ``r``.
    """
    folder = Path(folder)
    cfg_path, model_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise HiganbanaError(f"{folder}: no adapter_config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise HiganbanaError(f"{cfg_path}: not valid JSON ({exc})") from exc
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in ("LORA", "LOHA", "LOKR"):
        raise HiganbanaError(
            f"{cfg_path}: peft_type {config.get('peft_type')!r} is not read (only LORA, LOHA, LOKR: PEFT's "
            "OFT/BOFT/GLoRA are different algorithms from ours under the same names)"
        )
    raw, _ = load_tensors(model_path)
    tensors, _source, paths = normalize_with_paths(raw, prefixes, peft_prefix, None)
    alphas = peft_alphas(config, paths.values())
    ranks = peft_ranks(config, paths.values())
    groups = group_modules(tensors)
    for name, path in paths.items():
        cls = algorithm_class(detect_algo(name, groups[name]))
        mod, alpha = cls.from_peft(groups[name], alphas[path], ranks[path])
        for suffix, value in mod.items():
            tensors[f"{name}.{suffix}"] = value
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors, config
