"""Metadata that other tools read: kohya's ``ss_*`` keys, ``sshs_*`` hashes and sai ``modelspec.*``.

Every value is a string (safetensors metadata is ``dict[str, str]``). The definitions follow
kohya-ss/sd-scripts (``train_network.py``, ``train_util.precalculate_safetensors_hashes``,
``library/sai_model_spec.py``) and how A1111 classifies a file's base model from its metadata.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save

BASE_MODELS = ("sd1", "sd2", "sdxl")
"""Base model families understood here; ``read_base_model`` also returns ``"unknown"``."""

DIT_BASE_VERSIONS = {"sd3": "sd3", "flux": "flux1"}
"""kohya's ``ss_base_model_version`` of the diffusion transformers (sd-scripts' sd3/flux trainers)."""

SS_METADATA_MINIMUM_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)
"""kohya's minimum set, kept even with ``--no_metadata``."""

MODELSPEC_VERSION = "1.0.1"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"

_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


def _check_base(base: str) -> str:
    if base not in BASE_MODELS:
        raise ValueError(f"unknown base model {base!r}; expected one of {BASE_MODELS}")
    return base


def _to_str(value: Any) -> str:
    """kohya writes ``str(value)``; containers become JSON (as ``ss_tag_frequency`` / ``ss_dataset_dirs`` do)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def base_model_version(base: str, v_parameterization: bool = False) -> str:
    """``ss_base_model_version``: ``sd_v1``, ``sd_v1_v``, ``sd_v2``, ``sd_v2_v``, ``sdxl_base_v1-0``, or
    ``sd3``/``flux1`` for the diffusion transformers."""
    if base in DIT_BASE_VERSIONS:
        return DIT_BASE_VERSIONS[base]
    base = _check_base(base)
    if base == "sdxl":
        if v_parameterization:
            raise ValueError("SDXL base has no v-parameterization version string")
        return "sdxl_base_v1-0"
    version = "sd_v1" if base == "sd1" else "sd_v2"
    return version + "_v" if v_parameterization else version


def kohya_metadata(
    *,
    base: str,
    network_dim: int,
    network_alpha: float,
    algo: str,
    output_name: str,
    network_module: str = "lycoris.kohya",
    network_args: Mapping[str, Any] | None = None,
    v_parameterization: bool = False,
    training: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """kohya's minimum ``ss_*`` set plus ``ss_output_name`` and optional training facts.

    ``network_args`` is written as kohya does: a JSON dump of the ``k=v`` arguments (values as
    strings), always including ``algo``. ``training`` adds facts such as ``{"ss_seed": 1, "steps": 100}``;
    a key without the ``ss_`` prefix gets it, values are stringified (containers as JSON), and a key
    that would overwrite one of the fields built here is an error.
    """
    args = {str(k): _to_str(v) for k, v in (network_args or {}).items()}
    if "algo" in args and args["algo"] != algo:
        raise ValueError(f"network_args algo {args['algo']!r} disagrees with algo {algo!r}")
    args = {"algo": algo, **{k: v for k, v in args.items() if k != "algo"}}
    version = base_model_version(base, v_parameterization)  # (checks the base)
    meta = {
        "ss_v2": str(base == "sd2"),
        "ss_base_model_version": version,
        "ss_network_module": network_module,
        "ss_network_dim": str(int(network_dim)),
        "ss_network_alpha": str(float(network_alpha)),  # kohya's --network_alpha is a float: "8.0"
        "ss_network_args": json.dumps(args),
        "ss_output_name": output_name,
    }
    for key, value in (training or {}).items():
        full = key if key.startswith("ss_") else f"ss_{key}"
        if full in meta:
            raise ValueError(f"training fact {key!r} would overwrite {full}")
        meta[full] = _to_str(value)
    return meta


def modelspec_architecture(base: str, v_parameterization: bool = False, adapter: str = "lora") -> str:
    """``modelspec.architecture`` as kohya writes it, e.g. ``stable-diffusion-xl-v1-base/lora``.

    kohya's trainer writes ``/lora`` for every network module, LyCORIS algorithms included.
    """
    base = _check_base(base)
    if base == "sdxl":
        arch = "stable-diffusion-xl-v1-base"
    elif base == "sd2":
        arch = "stable-diffusion-v2-768-v" if v_parameterization else "stable-diffusion-v2-512"
    else:
        arch = "stable-diffusion-v1"
    return f"{arch}/{adapter}" if adapter else arch


def modelspec_metadata(
    *,
    base: str,
    title: str,
    v_parameterization: bool = False,
    resolution: int | tuple[int, int] | None = None,
    date: _dt.datetime | float | None = None,
    trigger_phrase: str | None = None,
    adapter: str = "lora",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """sai_model_spec 1.0.1 keys for a LoRA-like adapter.

    ``resolution`` defaults to 1024 for SDXL, 768 for SD2 with v-parameterization, else 512.
    ``date`` (a datetime or a POSIX timestamp, default now) is written in ISO format, as kohya does
    with ``datetime.fromtimestamp(t).isoformat()``. ``extra`` adds optional fields such as
    ``author`` / ``description`` / ``license`` / ``tags`` (prefixed with ``modelspec.`` when needed).
    """
    base = _check_base(base)
    if resolution is None:
        resolution = 1024 if base == "sdxl" else 768 if (base == "sd2" and v_parameterization) else 512
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    if date is None:
        date = _dt.datetime.now()
    elif not isinstance(date, _dt.datetime):
        date = _dt.datetime.fromtimestamp(float(date))
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(base, v_parameterization, adapter),
        "modelspec.implementation": IMPL_STABILITY_AI if base == "sdxl" else IMPL_DIFFUSERS,
        "modelspec.title": title,
        "modelspec.resolution": f"{int(width)}x{int(height)}",
        "modelspec.date": date.isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
    if trigger_phrase:
        meta["modelspec.trigger_phrase"] = trigger_phrase
    for key, value in (extra or {}).items():
        full = key if key.startswith("modelspec.") else f"modelspec.{key}"
        if full in meta:
            raise ValueError(f"extra field {key!r} would overwrite {full}")
        meta[full] = (
            ", ".join(map(str, value)) if full == "modelspec.tags" and not isinstance(value, str) else str(value)
        )
    return meta


def model_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya's ``precalculate_safetensors_hashes``.

    The tensors are serialised in memory with only the ``ss_*`` metadata. ``sshs_model_hash`` is the
    sha256 (hex) of the bytes after ``8 + header_len``; ``sshs_legacy_hash`` is the first 8 hex
    digits of ``sha256(bytes[0x100000:0x110000])`` of that whole serialised file (so it depends
    on the ``ss_*`` header too, and is the hash of the empty string for files under 1 MiB).
    Tensors should already be in the dtype they are saved with.
    """
    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = save(payload, metadata=ss_only)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def read_base_model(metadata: Mapping[str, str] | None) -> str:
    """Classify a file's base model from its metadata as A1111 does.

    ``ss_base_model_version`` starting with ``sdxl_`` ⇒ ``"sdxl"``; else ``ss_v2 == "True"`` ⇒ ``"sd2"``;
    else any metadata at all ⇒ ``"sd1"``; no metadata ⇒ ``"unknown"``.
    """
    metadata = metadata or {}
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "sdxl"
    if str(metadata.get("ss_v2", "")) == "True":
        return "sd2"
    if len(metadata):
        return "sd1"
    return "unknown"
