"""SD3/SD3.5 and Flux.1 module names in the two layouts the ecosystem writes, and exact conversion.

We adapt the diffusers transformers (``SD3Transformer2DModel``, ``FluxTransformer2DModel``), whose
attention has split ``to_q/to_k/to_v`` Linears. The original checkpoints (Stability's MMDiT, Black
Forest Labs' Flux) fuse them into one ``qkv`` Linear, and Flux's single-stream ``linear1`` fuses
``to_q/to_k/to_v`` with ``proj_mlp``. kohya sd-scripts trains on the original modules and names
them ``lora_unet_<original path>`` (``lora_unet_double_blocks_0_img_attn_qkv``); ComfyUI reads those
names, and also split diffusers names (``lora_transformer_<path>``, ``transformer.<path>``), which
it applies to row blocks of the fused weight.

:class:`DitLayout` maps every diffusers Linear of a transformer config to its original module and
row block; :func:`to_original` and :func:`to_split` rewrite a file's tensors between the layouts with
the algorithms' exact :meth:`~higanbana.algorithms.base.Adapter.stack_outputs` /
:meth:`~higanbana.algorithms.base.Adapter.split_outputs`, and refuse, naming the module and the
reason, where the algebra does not allow it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..algorithms import algorithm_class
from ..algorithms.files import LayoutRefused
from ..errors import ConfigError, HiganbanaError
from ..network.selection import module_key
from .detect import group_modules

DIT_FAMILIES = ("sd3", "flux")
#: our prefix for the transformer's modules under their diffusers paths (OneTrainer's, mapped by ComfyUI)
SPLIT_PREFIX = "lora_transformer"
#: kohya sd-scripts' prefix for the original modules (``networks/lora_flux.py``, ``lora_sd3.py``)
ORIGINAL_PREFIX = "lora_unet"
#: modules without an original name we can write: ComfyUI's map swaps their scale and shift halves
SWAPPED = "ComfyUI maps this modulation Linear with its scale and shift halves swapped"


@dataclass(frozen=True)
class Slot:
    """Where a diffusers Linear lives in the original model: module path, position among the fused
    layer's members, and the rows of every member (one entry for a one-to-one module)."""

    original: str
    index: int
    sizes: tuple[int, ...]


class DitLayout:
    """Every Linear (and SD3's patch-embedding conv) of a diffusers SD3 or Flux transformer config, by
    diffusers path, with its :class:`Slot` in the original model; ``unmapped`` holds the modules with
    no original name we write, and why."""

    def __init__(self, family: str, config: Mapping[str, Any]) -> None:
        if family not in DIT_FAMILIES:
            raise ConfigError(f"family {family!r}: expected one of {DIT_FAMILIES}")
        self.family = family
        self.slots: dict[str, Slot] = {}
        self.unmapped: dict[str, str] = {}
        heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
        self.hidden = heads * head_dim
        (self._flux if family == "flux" else self._sd3)(config)
        self.members: dict[str, list[str]] = {}
        for path, slot in self.slots.items():
            self.members.setdefault(slot.original, []).append(path)
        for paths in self.members.values():
            paths.sort(key=lambda p: self.slots[p].index)

    # ------------------------------------------------------------------ the maps
    def _one(self, path: str, original: str) -> None:
        self.slots[path] = Slot(original, 0, (0,))

    def _fused(self, paths: list[str], original: str, sizes: tuple[int, ...]) -> None:
        for i, path in enumerate(paths):
            self.slots[path] = Slot(original, i, sizes)

    def _qkv(self, attn: str, names: tuple[str, str, str], original: str) -> None:
        h = self.hidden
        self._fused([f"{attn}.{n}" for n in names], original, (h, h, h))

    def _flux(self, config: Mapping[str, Any]) -> None:
        """diffusers ``FluxTransformer2DModel`` → BFL ``flux/model.py`` names (as ComfyUI's
        ``flux_to_diffusers`` and kohya's ``lora_flux.py`` use them)."""
        h = self.hidden
        mlp = int(h * float(config.get("mlp_ratio", 4.0)))
        for i in range(int(config["num_layers"])):
            d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
            self._qkv(f"{d}.attn", ("to_q", "to_k", "to_v"), f"{o}.img_attn.qkv")
            self._qkv(f"{d}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"), f"{o}.txt_attn.qkv")
            for src, dst in (
                ("attn.to_out.0", "img_attn.proj"),
                ("attn.to_add_out", "txt_attn.proj"),
                ("ff.net.0.proj", "img_mlp.0"),
                ("ff.net.2", "img_mlp.2"),
                ("ff_context.net.0.proj", "txt_mlp.0"),
                ("ff_context.net.2", "txt_mlp.2"),
                ("norm1.linear", "img_mod.lin"),
                ("norm1_context.linear", "txt_mod.lin"),
            ):
                self._one(f"{d}.{src}", f"{o}.{dst}")
        for i in range(int(config["num_single_layers"])):
            d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
            paths = [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"]
            self._fused(paths, f"{o}.linear1", (h, h, h, mlp))
            self._one(f"{d}.proj_out", f"{o}.linear2")
            self._one(f"{d}.norm.linear", f"{o}.modulation.lin")
        top = {
            "x_embedder": "img_in",
            "context_embedder": "txt_in",
            "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
            "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
            "proj_out": "final_layer.linear",
        }
        if config.get("guidance_embeds"):
            top["time_text_embed.guidance_embedder.linear_1"] = "guidance_in.in_layer"
            top["time_text_embed.guidance_embedder.linear_2"] = "guidance_in.out_layer"
        for src, dst in top.items():
            self._one(src, dst)
        self.unmapped["norm_out.linear"] = SWAPPED

    def _sd3(self, config: Mapping[str, Any]) -> None:
        """diffusers ``SD3Transformer2DModel`` → Stability's MMDiT(-X) names (``sd3_models.py`` in
        kohya, ``mmdit_to_diffusers`` in ComfyUI); SD3.5's second attention (``attn2``) included."""
        depth = int(config["num_layers"])
        dual = set(config.get("dual_attention_layers") or ())
        for i in range(depth):
            d, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
            last = i == depth - 1  # its context block is "pre-only": no proj, no MLP
            self._qkv(f"{d}.attn", ("to_q", "to_k", "to_v"), f"{o}.x_block.attn.qkv")
            self._qkv(f"{d}.attn", ("add_q_proj", "add_k_proj", "add_v_proj"), f"{o}.context_block.attn.qkv")
            pairs = [
                ("attn.to_out.0", "x_block.attn.proj"),
                ("ff.net.0.proj", "x_block.mlp.fc1"),
                ("ff.net.2", "x_block.mlp.fc2"),
                ("norm1.linear", "x_block.adaLN_modulation.1"),
            ]
            if not last:
                pairs += [
                    ("attn.to_add_out", "context_block.attn.proj"),
                    ("ff_context.net.0.proj", "context_block.mlp.fc1"),
                    ("ff_context.net.2", "context_block.mlp.fc2"),
                    ("norm1_context.linear", "context_block.adaLN_modulation.1"),
                ]
            else:
                self.unmapped[f"{d}.norm1_context.linear"] = SWAPPED
            if i in dual:
                self._qkv(f"{d}.attn2", ("to_q", "to_k", "to_v"), f"{o}.x_block.attn2.qkv")
                pairs.append(("attn2.to_out.0", "x_block.attn2.proj"))
            for src, dst in pairs:
                self._one(f"{d}.{src}", f"{o}.{dst}")
        for src, dst in {
            "pos_embed.proj": "x_embedder.proj",
            "context_embedder": "context_embedder",
            "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
            "proj_out": "final_layer.linear",
        }.items():
            self._one(src, dst)
        self.unmapped["norm_out.linear"] = SWAPPED

    # ------------------------------------------------------------------ names
    def split_names(self, prefix: str = SPLIT_PREFIX) -> dict[str, str]:
        """{module name in split files: diffusers path}."""
        return {module_key(prefix, p): p for p in [*self.slots, *self.unmapped]}

    def original_names(self, prefix: str = ORIGINAL_PREFIX) -> dict[str, str]:
        """{module name in original-layout files: original path}."""
        return {module_key(prefix, o): o for o in self.members}


def _flat(modules: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    return {f"{name}.{suffix}": t for name, mod in modules.items() for suffix, t in mod.items()}


def to_original(
    tensors: Mapping[str, Tensor],
    records: Mapping[str, Mapping[str, Any]],
    layout: DitLayout,
    *,
    prefix: str = SPLIT_PREFIX,
    original_prefix: str = ORIGINAL_PREFIX,
) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """Split-named modules of the transformer → original names, fused layers stacked exactly.

    Modules of other parts (text encoders) pass through. Returns the tensors and ``{name: {"algo",
    "options": None}}`` records of the written modules (their options are read back from the tensors).
    """
    split = layout.split_names(prefix)
    modules = group_modules(tensors)
    out: dict[str, dict[str, Tensor]] = {}
    out_records: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[str, tuple[str, dict[str, Tensor]]]] = {}
    for name, mod in modules.items():
        if name not in split:
            if name.startswith(f"{prefix}_"):
                raise HiganbanaError(f"module {name}: not a module of this {layout.family} transformer")
            out[name] = mod
            out_records[name] = dict(records.get(name, {"algo": None, "options": None}))
            continue
        path = split[name]
        if path in layout.unmapped:
            raise LayoutRefused(f"module {name}: {layout.unmapped[path]}; save it with split names")
        groups.setdefault(layout.slots[path].original, {})[path] = (name, mod)
    for original, present in groups.items():
        target = module_key(original_prefix, original)
        algos = {records[name]["algo"] for name, _ in present.values()}
        if len(algos) > 1:
            raise LayoutRefused(
                f"module {target}: its members use different algorithms ({', '.join(sorted(algos))}); "
                "one fused module holds one algorithm"
            )
        algo = algos.pop()
        members = layout.members[original]
        if len(members) == 1:
            out[target] = present[members[0]][1]
        else:
            sizes = list(layout.slots[members[0]].sizes)
            try:
                out[target] = algorithm_class(algo).stack_outputs(
                    [present[p][1] if p in present else None for p in members], sizes
                )
            except LayoutRefused as exc:
                names = ", ".join(present[p][0] for p in members if p in present)
                raise LayoutRefused(f"module {target} (from {names}): {exc}; save with split names") from exc
        out_records[target] = {"algo": algo, "options": None}
    return _flat(out), out_records


def to_split(
    tensors: Mapping[str, Tensor],
    records: Mapping[str, Mapping[str, Any]],
    layout: DitLayout,
    *,
    prefix: str = SPLIT_PREFIX,
    original_prefix: str = ORIGINAL_PREFIX,
    split_records: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """Original-named modules → split names, fused modules split exactly by output rows.

    ``split_records`` (the records of our own stacked file) say which members had an adapter and of which
    rank, so a LoRA splits back into exactly the modules that were stacked (while the tensors still fit
    them: a resized file is split by its structure); every member's options are read from its tensors.
    Other modules pass through.
    """
    originals = layout.original_names(original_prefix)
    modules = group_modules(tensors)
    out: dict[str, dict[str, Tensor]] = {}
    out_records: dict[str, dict[str, Any]] = {}
    for name, mod in modules.items():
        if name not in originals:
            if name.startswith(f"{original_prefix}_"):
                raise HiganbanaError(f"module {name}: not a module of this {layout.family} transformer")
            out[name] = mod
            out_records[name] = dict(records[name])
            continue
        algo = records[name]["algo"]
        members = layout.members[originals[name]]
        member_names = [module_key(prefix, p) for p in members]
        if len(members) == 1:
            pieces: list[dict[str, Tensor] | None] = [mod]
        else:
            sizes = layout.slots[members[0]].sizes
            cls = algorithm_class(algo)
            try:
                found: list[dict[str, Tensor] | None] | None = None
                if split_records is not None:  # our stacked file: its members' ranks, when they still fit
                    ranks = [_recorded_rank(split_records.get(m)) for m in member_names]
                    with contextlib.suppress(LayoutRefused):  # e.g. resized since: read the structure
                        found = cls.split_outputs(mod, sizes, ranks)
                pieces = found if found is not None else cls.split_outputs(mod, sizes)
            except LayoutRefused as exc:
                raise LayoutRefused(f"module {name}: {exc}") from exc
        for member, piece in zip(member_names, pieces, strict=True):
            if piece is not None:  # the options are read from the tensors, as for any foreign module
                out[member] = piece
                out_records[member] = {"algo": algo, "options": None}
    return _flat(out), out_records


def _recorded_rank(record: Mapping[str, Any] | None) -> int | None:
    """A member's rank from its record (1 for algorithms without one), None when it has no adapter."""
    if record is None:
        return None
    return int((record.get("options") or {}).get("rank") or 1)
