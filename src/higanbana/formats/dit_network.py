"""Networks on SD3/SD3.5 and Flux.1 transformers: parts, and files in either layout.

The transformer's modules are named ``lora_transformer_<diffusers path>`` (the split layout: every
algorithm, read by ComfyUI onto the fused weights by offset). ``layout="original"`` writes kohya
sd-scripts' ``lora_unet_<original path>`` names with fused ``qkv``/``linear1`` modules, which
ComfyUI, diffusers and sd-scripts read, where the algorithms allow it exactly (docs/files.md).
Text encoders: ``lora_te1`` (CLIP-L), ``lora_te2`` (SD3's CLIP-G), ``lora_te3`` (T5), as kohya.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..algorithms.files import LayoutRefused
from ..errors import ConfigError, HiganbanaError
from ..network import AdapterNetwork, NetworkConfig, Part
from .dit_layout import DIT_FAMILIES, ORIGINAL_PREFIX, SPLIT_PREFIX, DitLayout, to_original, to_split
from .metadata import kohya_metadata
from .network_files import network_from_records, network_metadata, network_tensors
from .reader import read_network_file
from .safetensors_io import FORMAT_VERSION, save_tensors
from .sd_network import _te_name_path, network_summary
from .validate import parse_records

LAYOUTS = ("auto", "split", "original")
#: kohya's text-encoder prefixes per family, in the pipelines' order (CLIP-L, [CLIP-G,] T5)
TE_PREFIXES = {"flux": ("lora_te1", "lora_te3"), "sd3": ("lora_te1", "lora_te2", "lora_te3")}
#: diffusers/PEFT roots of a family's files → our prefixes
DIFFUSERS_ROOTS = {
    "flux": {"transformer": SPLIT_PREFIX, "text_encoder": "lora_te1", "text_encoder_2": "lora_te3"},
    "sd3": {
        "transformer": SPLIT_PREFIX,
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te2",
        "text_encoder_3": "lora_te3",
    },
}


def family_of(transformer: nn.Module) -> str:
    """``"flux"`` or ``"sd3"`` from a diffusers transformer's class."""
    name = type(transformer).__name__
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("SD3"):
        return "sd3"
    raise ConfigError(f"{name} is neither an SD3 nor a Flux transformer")


def dit_layout(transformer: nn.Module) -> DitLayout:
    """The :class:`DitLayout` of a diffusers SD3 or Flux transformer."""
    return DitLayout(family_of(transformer), _config(transformer))


def _config(transformer: nn.Module) -> dict[str, Any]:
    """A diffusers model's config as a plain dict."""
    return dict(getattr(transformer, "config", {}))


def dit_network_parts(
    transformer: nn.Module | None, text_encoders: Sequence[nn.Module] = (), family: str = ""
) -> list[Part]:
    """The transformer (``lora_transformer``) and its text encoders (kohya's ``lora_te1/2/3``)."""
    family = (family or family_of(transformer)) if transformer is not None else family
    if family not in DIT_FAMILIES:
        raise ConfigError(f"family {family!r}: expected one of {DIT_FAMILIES}")
    parts = [Part(SPLIT_PREFIX, transformer, "unet")] if transformer is not None else []
    prefixes = TE_PREFIXES[family]
    if len(text_encoders) > len(prefixes):
        raise ConfigError(f"{family} has {len(prefixes)} text encoders, got {len(text_encoders)}")
    for prefix, te in zip(prefixes, text_encoders, strict=False):
        # CLIP names carry text_model_ as everywhere; T5's are its own paths (lora_te3_encoder_block_0_…)
        name_path = _te_name_path(te) if "CLIP" in type(te).__name__ else None
        parts.append(Part(prefix, te, "text_encoder", name_path))
    return parts


def dit_network(
    transformer: nn.Module,
    config: NetworkConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    algo: str | None = None,
    *,
    text_encoders: Sequence[nn.Module] = (),
    **options: Any,
) -> AdapterNetwork:
    """A network on a diffusers SD3/Flux transformer; default preset ``<family>-attn-mlp``."""
    family = family_of(transformer)
    return AdapterNetwork(
        dit_network_parts(transformer, text_encoders), algo, config=config or f"{family}-attn-mlp", **options
    )


def dit_file_metadata(family: str, transformer: nn.Module | None, title: str) -> dict[str, str]:
    """sai ``modelspec.*`` keys as kohya writes them for these families (``sai_model_spec.py``)."""
    if family == "flux":
        guidance = bool(transformer is not None and _config(transformer).get("guidance_embeds"))
        arch, impl = ("flux-1-dev" if guidance else "flux-1-schnell"), "https://github.com/black-forest-labs/flux"
    else:
        arch, impl = "stable-diffusion-3", "https://github.com/Stability-AI/sd3-ref"
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.date": _dt.datetime.now().isoformat(),
    }


def dit_kohya_metadata(
    net: AdapterNetwork, family: str, output_name: str, training: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """kohya's ``ss_*`` summary of a network on an SD3/Flux model, with optional training facts."""
    return kohya_metadata(
        base=family,
        output_name=output_name,
        network_module="higanbana.kohya",
        training=training,
        **network_summary(net),
    )


def save_dit_network(
    net: AdapterNetwork,
    path: str | os.PathLike,
    *,
    layout: str = "split",
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, str] | None = None,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Save a network on an SD3/Flux transformer, atomically, in the ``split`` or ``original`` layout
    (``auto``: original when every module stacks exactly — LoRA, full, IA3 — else split).

    The original layout stacks the members of each fused layer exactly (LoRA: concatenated ranks;
    full and IA3: rows) and refuses other algorithms there with the reason; our records go along
    (``higanbana.split_modules``) so that reloading restores every member exactly. ``training`` adds
    kohya-style ``ss_*`` facts.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: expected one of {LAYOUTS}")
    if layout == "auto":  # kohya's names where every module stacks into them, else the split ones
        try:
            return save_dit_network(net, path, layout="original", dtype=dtype, metadata=metadata, training=training)
        except LayoutRefused:
            layout = "split"
    path = Path(path)
    transformer = net.parts[SPLIT_PREFIX].module if SPLIT_PREFIX in net.parts else None
    if transformer is None:
        raise HiganbanaError("the network has no transformer part (lora_transformer)")
    family = family_of(transformer)
    tensors = network_tensors(net, dtype)
    meta = dit_file_metadata(family, transformer, path.stem)
    meta.update(dit_kohya_metadata(net, family, path.stem, training))
    if layout == "split":
        meta.update(network_metadata(net))
    else:
        records = net.module_records()
        tensors, _ = to_original(tensors, records, dit_layout(transformer))
        meta.update(
            {
                "higanbana.format_version": FORMAT_VERSION,
                "higanbana.layout": "original",
                "higanbana.split_modules": json.dumps(records, sort_keys=True),
                "higanbana.prefix": ",".join(net.parts),
            }
        )
    meta.update(metadata or {})
    return save_tensors(tensors, path, meta)


def read_dit_network_file(
    path: str | os.PathLike, transformer: nn.Module, *, unsafe_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """A file's tensors and records under our split names (fused modules split exactly), for this
    transformer's family."""
    family = family_of(transformer)
    tensors, records, metadata = read_network_file(path, unsafe_pickle=unsafe_pickle, prefixes=DIFFUSERS_ROOTS[family])
    if any(name.startswith(f"{ORIGINAL_PREFIX}_") for name in records):
        split_records = None
        if "higanbana.split_modules" in metadata:
            split_records = parse_records(metadata["higanbana.split_modules"])
        try:
            tensors, records = to_split(tensors, records, dit_layout(transformer), split_records=split_records)
        except HiganbanaError as exc:
            raise type(exc)(f"{path}: {exc}") from exc
    return tensors, records


def load_dit_network(
    path: str | os.PathLike,
    transformer: nn.Module,
    text_encoders: Sequence[nn.Module] = (),
    *,
    strict: bool = True,
    unsafe_pickle: bool = False,
) -> AdapterNetwork:
    """A network from a file of either layout (ours, kohya/sd-scripts, ComfyUI-style, diffusers/PEFT,
    SimpleTuner's ``lycoris_``) on a diffusers SD3/Flux transformer: fused modules are split exactly."""
    tensors, records = read_dit_network_file(path, transformer, unsafe_pickle=unsafe_pickle)
    parts = dit_network_parts(transformer, text_encoders)
    return network_from_records(parts, records, tensors, source=str(path), strict=strict)
