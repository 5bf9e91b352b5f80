"""Module-path mapping between diffusers ``UNet2DConditionModel`` and the original SGM/LDM UNet.

kohya sd-scripts names SDXL LoRA modules after the original (SGM) UNet, e.g.
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, while SD1/2 LoRA files use the
diffusers paths (``lora_unet_down_blocks_1_attentions_0_...``). This module converts between the
two layouts. The index arithmetic is derived from the UNet config (``layers_per_block``, the
down/up block types, ``mid_block_type``, embedding types), so it also holds for tiny SDXL-shaped
test UNets, not only for SDXL's own numbers.

Layout (SGM side), with ``L_i`` the resnets of down block ``i``:

* ``input_blocks.0.0`` is ``conv_in``; down block ``i`` then owns ``L_i`` input blocks
  ``K.0`` (resnet) / ``K.1`` (attention, if any), followed by one ``K.0.op`` downsampler input
  block unless it is the last down block.
* ``middle_block.{0,1,2}`` are ``mid_block.resnets.0``, ``mid_block.attentions.0``,
  ``mid_block.resnets.1``.
* up block ``i`` owns ``L'_i + 1`` output blocks ``K.0`` (resnet) / ``K.1`` (attention, if any); the
  upsampler sits in its last output block at ``K.2`` (with attentions) or ``K.1`` (without).
* resnet children: ``norm1``/``conv1`` = ``in_layers.0``/``in_layers.2``, ``time_emb_proj`` =
  ``emb_layers.1``, ``norm2``/``conv2`` = ``out_layers.0``/``out_layers.3``, ``conv_shortcut`` =
  ``skip_connection``; downsampler ``conv`` = ``op``. Everything inside a transformer (``norm``,
  ``proj_in``, ``proj_out``, ``transformer_blocks.N.*``) keeps its name.

Paths may be module paths or parameter keys (``...conv1.weight`` maps to ``...in_layers.2.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import HiganbanaError

__all__ = [
    "NameMappingError",
    "SgmNameMap",
    "diffusers_to_sgm",
    "kohya_unet_name",
    "sgm_to_diffusers",
]

# diffusers resnet child -> SGM ResBlock child
_RESNET_CHILDREN = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_CHILDREN_INV = {v: k for k, v in _RESNET_CHILDREN.items()}


class NameMappingError(HiganbanaError, ValueError):
    """A module path has no counterpart in the other UNet layout."""


def _cfg_get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _as_config(unet_config: Any) -> Any:
    """Accept a config dict / FrozenDict, a config object, or a model that has ``.config``."""
    if not isinstance(unet_config, Mapping) and hasattr(unet_config, "config"):
        return unet_config.config
    return unet_config


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type  # CrossAttnDownBlock2D, AttnUpBlock2D, ...


class SgmNameMap:
    """Both-way unit table (block-level prefixes) for one UNet config."""

    def __init__(self, unet_config: Any) -> None:
        cfg = _as_config(unet_config)
        down_types = tuple(_cfg_get(cfg, "down_block_types") or ())
        up_types = tuple(_cfg_get(cfg, "up_block_types") or ())
        if not down_types or len(down_types) != len(up_types):
            raise NameMappingError(
                f"UNet config needs matching down_block_types/up_block_types, got {down_types!r} / {up_types!r}"
            )
        n = len(down_types)
        lpb = _cfg_get(cfg, "layers_per_block", 2)
        lpb = [int(lpb)] * n if isinstance(lpb, int) else [int(x) for x in lpb]
        if len(lpb) != n:
            raise NameMappingError(f"layers_per_block {lpb!r} does not match {n} down blocks")

        # unit: diffusers prefix -> (sgm prefix, is_resnet)
        units: dict[str, tuple[str, bool]] = {}

        def add(d: str, s: str, resnet: bool = False) -> None:
            units[d] = (s, resnet)

        add("conv_in", "input_blocks.0.0")
        add("time_embedding.linear_1", "time_embed.0")
        add("time_embedding.linear_2", "time_embed.2")
        if _cfg_get(cfg, "addition_embed_type") == "text_time":
            add("add_embedding.linear_1", "label_emb.0.0")
            add("add_embedding.linear_2", "label_emb.0.2")
        elif _cfg_get(cfg, "class_embed_type") in ("timestep", "projection"):
            add("class_embedding.linear_1", "label_emb.0.0")
            add("class_embedding.linear_2", "label_emb.0.2")
        add("conv_norm_out", "out.0")
        add("conv_out", "out.2")

        k = 1
        for i, btype in enumerate(down_types):
            attn = _has_attention(btype)
            for j in range(lpb[i]):
                add(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", resnet=True)
                if attn:
                    add(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1")
                k += 1
            if i < n - 1:
                add(f"down_blocks.{i}.downsamplers.0", f"input_blocks.{k}.0")
                add(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{k}.0.op")
                k += 1

        mid_type = _cfg_get(cfg, "mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid_type == "UNetMidBlock2DCrossAttn":
            add("mid_block.resnets.0", "middle_block.0", resnet=True)
            add("mid_block.attentions.0", "middle_block.1")
            add("mid_block.resnets.1", "middle_block.2", resnet=True)
        elif mid_type is not None:
            raise NameMappingError(
                f"mid_block_type {mid_type!r} has no known SGM layout (expected UNetMidBlock2DCrossAttn)"
            )

        rev_lpb = list(reversed(lpb))
        k = 0
        for i, btype in enumerate(up_types):
            attn = _has_attention(btype)
            for j in range(rev_lpb[i] + 1):
                add(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", resnet=True)
                if attn:
                    add(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1")
                k += 1
            if i < n - 1:
                add(f"up_blocks.{i}.upsamplers.0", f"output_blocks.{k - 1}.{2 if attn else 1}")

        self._to_sgm = units
        self._to_diffusers = {s: (d, r) for d, (s, r) in units.items()}

    @staticmethod
    def _split(path: str, table: Mapping[str, tuple[str, bool]]) -> tuple[str, str] | None:
        """Longest unit prefix of ``path`` on a dot boundary, and the remaining tail (may be '')."""
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head in table:
                return head, ".".join(parts[cut:])
        return None

    def to_sgm(self, path: str) -> str:
        hit = self._split(path, self._to_sgm)
        if hit is None:
            raise NameMappingError(f"cannot map diffusers UNet path {path!r} to an SGM path")
        head, tail = hit
        sgm, resnet = self._to_sgm[head]
        if resnet and tail:
            child, _, rest = tail.partition(".")
            if child not in _RESNET_CHILDREN:
                raise NameMappingError(
                    f"cannot map diffusers UNet path {path!r} to an SGM path: resnet child {child!r} "
                    f"is not one of {sorted(_RESNET_CHILDREN)}"
                )
            tail = _RESNET_CHILDREN[child] + (f".{rest}" if rest else "")
        return f"{sgm}.{tail}" if tail else sgm

    def to_diffusers(self, path: str) -> str:
        hit = self._split(path, self._to_diffusers)
        if hit is None:
            raise NameMappingError(f"cannot map SGM UNet path {path!r} to a diffusers path")
        head, tail = hit
        diff, resnet = self._to_diffusers[head]
        if resnet and tail:
            parts = tail.split(".")
            n = next((n for n in (2, 1) if ".".join(parts[:n]) in _RESNET_CHILDREN_INV), 0)
            if not n:
                raise NameMappingError(
                    f"cannot map SGM UNet path {path!r} to a diffusers path: resnet child {tail!r} "
                    f"does not start with one of {sorted(_RESNET_CHILDREN_INV)}"
                )
            tail = ".".join([_RESNET_CHILDREN_INV[".".join(parts[:n])], *parts[n:]])
        return f"{diff}.{tail}" if tail else diff


def diffusers_to_sgm(path: str, unet_config: Any) -> str:
    """Map a diffusers UNet module (or parameter) path to the original SGM/LDM path.

    ``unet_config`` is the UNet's config (dict, FrozenDict, or the model itself). Raises
    :class:`NameMappingError` naming ``path`` when it has no SGM counterpart.
    """
    return SgmNameMap(unet_config).to_sgm(path)


def sgm_to_diffusers(path: str, unet_config: Any) -> str:
    """Inverse of :func:`diffusers_to_sgm`."""
    return SgmNameMap(unet_config).to_diffusers(path)


def kohya_unet_name(path: str, unet_config: Any, sdxl: bool) -> str:
    """kohya LoRA module name for a diffusers UNet module path.

    SDXL files use the SGM path, SD1/2 files the diffusers path; both as ``lora_unet_`` + path with
    ``.`` replaced by ``_``.
    """
    name = diffusers_to_sgm(path, unet_config) if sdxl else path
    return "lora_unet_" + name.replace(".", "_")
