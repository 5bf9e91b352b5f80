"""Networks on Stable Diffusion models: kohya names, SGM names for SDXL, files other tools load.

The UNet's modules are named ``lora_unet_<path>``: diffusers paths on SD1.x/2.x, the original SGM
paths on SDXL (as kohya writes them, docs/design.md §4). Text encoders are ``lora_te_…`` (one) or
``lora_te1_…``/``lora_te2_…`` (SDXL). Saved files carry kohya's ``ss_*`` set, sai ``modelspec.*``,
``sshs_*`` hashes and our ``higanbana.*`` records.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, HiganbanaError
from ..network import AdapterNetwork, NetworkConfig, Part
from .metadata import kohya_metadata, model_hashes, modelspec_metadata, read_base_model
from .network_files import network_from_records, network_metadata, network_tensors
from .reader import read_network_file
from .safetensors_io import save_tensors
from .sdxl_names import SgmNameMap

SD_KINDS = ("sd1", "sd2", "sdxl")


def te_prefixes(kind: str, count: int) -> list[str]:
    """kohya's text-encoder prefixes: ``lora_te`` for one encoder, ``lora_te1``/``lora_te2`` for SDXL."""
    if count == 1:
        return ["lora_te"]
    return [f"lora_te{i + 1}" for i in range(count)]


def sd_network_parts(
    kind: str,
    unet: nn.Module | None,
    text_encoders: Sequence[nn.Module] = (),
) -> list[Part]:
    """The :class:`Part` list of an SD model: the UNet (SGM names on SDXL) and its text encoders."""
    if kind not in SD_KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; expected one of {SD_KINDS}")
    parts = []
    if unet is not None:
        name_path = SgmNameMap(unet.config).to_sgm if kind == "sdxl" else None
        parts.append(Part("lora_unet", unet, "unet", name_path))
    for prefix, te in zip(te_prefixes(kind, len(text_encoders)), text_encoders, strict=True):
        parts.append(Part(prefix, te, "text_encoder", _te_name_path(te)))
    return parts


def _te_name_path(text_encoder: nn.Module):
    """kohya names CLIP modules ``text_model.encoder.layers.…``. transformers 5 flattened
    ``CLIPTextModel`` (its paths start at ``encoder.``) but not ``CLIPTextModelWithProjection``;
    put the ``text_model.`` level back where it is missing so names match every other tool."""
    if hasattr(text_encoder, "text_model") or not hasattr(text_encoder, "encoder"):
        return None
    return lambda path: f"text_model.{path}" if path else path


def _parts_of(model: Any, train_unet: bool = True, train_text_encoder: bool = True) -> list[Part]:
    """Parts from an SDParts-like object (``kind``, ``unet``, ``text_encoders``)."""
    return sd_network_parts(
        model.kind,
        model.unet if train_unet else None,
        list(model.text_encoders) if train_text_encoder else [],
    )


def sd_network(
    model: Any,
    config: NetworkConfig | Mapping[str, Any] | str | os.PathLike | None = "full",
    algo: str | None = None,
    *,
    train_unet: bool = True,
    train_text_encoder: bool = True,
    **options: Any,
) -> AdapterNetwork:
    """A network on an SD model (``SDParts``: ``kind``, ``unet``, ``text_encoders``), default preset ``full``."""
    parts = _parts_of(model, train_unet, train_text_encoder)
    if not parts:
        raise ConfigError("neither the UNet nor the text encoders are to be trained")
    return AdapterNetwork(parts, algo, config=config, **options)


def _summary_dims(net: AdapterNetwork) -> tuple[int, float]:
    """The most common (rank, alpha) of the network's factored modules (kohya's ss_network_dim/alpha)."""
    # rank and alpha are attributes of the factored adapters only, untyped on Adapter
    pairs: list[tuple[Any, Any]] = [
        (a.rank, a.alpha) for a in net.adapters.values() if hasattr(a, "alpha") and hasattr(a, "rank")
    ]
    if not pairs:
        ranks = [getattr(a, "rank", 0) for a in net.adapters.values()]
        rank = Counter(ranks).most_common(1)[0][0] if ranks else 0
        return int(rank or 0), float(rank or 1)
    rank, alpha = Counter(pairs).most_common(1)[0][0]
    return int(rank), float(alpha)


def network_summary(net: AdapterNetwork) -> dict[str, Any]:
    """What kohya's ``ss_*`` summary says of a network: its algorithm (``mixed`` for several), the most
    common rank and α, and the ``network_args`` (the options, the algorithms when several)."""
    algos = sorted({a.algo for a in net.adapters.values()})
    algo = algos[0] if len(algos) == 1 else "mixed"
    dim, alpha = _summary_dims(net)
    args = {k: v for k, v in net.config.options.items() if isinstance(v, (bool, int, float, str))}
    return {
        "algo": algo,
        "network_dim": dim,
        "network_alpha": alpha,
        "network_args": {"algo": algo, **args, **({"algos": ",".join(algos)} if len(algos) > 1 else {})},
    }


def sd_file_metadata(
    net: AdapterNetwork,
    kind: str,
    *,
    output_name: str,
    v_parameterization: bool = False,
    trigger_phrase: str | None = None,
    resolution: int | tuple[int, int] | None = None,
    training: Mapping[str, Any] | None = None,
    network_module: str = "higanbana.kohya",
) -> dict[str, str]:
    """kohya ``ss_*`` and sai ``modelspec.*`` metadata for a network on an SD model of ``kind``."""
    meta = kohya_metadata(
        base=kind,
        output_name=output_name,
        network_module=network_module,
        v_parameterization=v_parameterization,
        training=training,
        **network_summary(net),
    )
    meta.update(
        modelspec_metadata(
            base=kind,
            title=output_name,
            v_parameterization=v_parameterization,
            resolution=resolution,
            trigger_phrase=trigger_phrase,
        )
    )
    return meta


def save_sd_network(
    net: AdapterNetwork,
    path: str | os.PathLike,
    kind: str,
    *,
    dtype: torch.dtype = torch.float32,
    output_name: str | None = None,
    metadata: Mapping[str, str] | None = None,
    **meta_options: Any,
) -> Path:
    """Save with the full metadata set and kohya's ``sshs_model_hash``/``sshs_legacy_hash``, atomically."""
    path = Path(path)
    tensors = network_tensors(net, dtype)
    meta = sd_file_metadata(net, kind, output_name=output_name or path.stem, **meta_options)
    meta.update(metadata or {})
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hashes(tensors, meta)
    meta.update(network_metadata(net))
    return save_tensors(tensors, path, meta)


def load_sd_network(
    path: str | os.PathLike,
    model: Any,
    *,
    strict: bool = True,
    unsafe_pickle: bool = False,
) -> AdapterNetwork:
    """Rebuild a network from a file (ours or foreign) on an SD model, checking the base model first."""
    tensors, records, metadata = read_network_file(path, unsafe_pickle=unsafe_pickle)
    base = read_base_model(metadata) if any(k.startswith("ss_") for k in metadata) else "unknown"
    if base != "unknown" and base != model.kind and {base, model.kind} & {"sdxl"}:
        raise HiganbanaError(
            f"{path}: the file was made for {_pretty(base)} (ss_base_model_version="
            f"{metadata.get('ss_base_model_version')!r}) but the model is {_pretty(model.kind)}"
        )
    parts = _parts_of(model)
    return network_from_records(parts, records, tensors, source=str(path), strict=strict)


def _pretty(kind: str) -> str:
    return {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}.get(kind, kind)
