"""Whole SD checkpoints, tensor by tensor: open, map keys to kohya module names, stream-write.

A checkpoint is a diffusers folder (``model_index.json``; ``unet/``, ``text_encoder/``,
``text_encoder_2/`` weights) or one original-layout (LDM/SGM) ``.safetensors`` file as A1111 and
ComfyUI load it — or the same for SD3/SD3.5 and Flux.1: a diffusers folder (``transformer/`` and the
text encoders) or an original MMDiT/BFL transformer file, whose fused ``qkv``/``linear1`` weights hold
the split modules as row blocks (so files of either layout merge into either; see ``dit_layout``).
Nothing is loaded whole: headers are parsed, tensors are read one at a time by
offset (plain reads, no memory map), and :func:`write_streaming` writes the header first and then
each tensor's bytes, so a merge needs memory for a few copies of the largest tensor, whatever the
checkpoint's size.

Tensor keys: the file's own keys for a single file; ``<component file>/<key>`` for a folder, e.g.
``unet/diffusion_pytorch_model.safetensors/conv_in.weight``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from ..errors import HiganbanaError
from ..models.dit import dit_kind_of
from ..models.sd import detect_kind
from ..safeio import atomic_folder
from .dit_layout import ORIGINAL_PREFIX, SPLIT_PREFIX, DitLayout
from .sdxl_names import NameMappingError, SgmNameMap
from .streaming import ST_DTYPES, read_header, write_streaming

KINDS = ("sd1", "sd2", "sdxl")
DIT_KINDS = ("sd3", "flux")
#: SD3/Flux folder text encoders -> kohya prefix, per family
_DIT_TE_COMPONENTS = {
    "flux": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te3"},
    "sd3": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"},
}


#: single-file text-encoder key prefixes -> (kohya prefix, layout)
_TE_PREFIXES = {
    "sd1": [("cond_stage_model.transformer.", "lora_te", "hf")],
    "sd2": [("cond_stage_model.model.", "lora_te", "openclip")],
    "sdxl": [
        ("conditioner.embedders.0.transformer.", "lora_te1", "hf"),
        ("conditioner.embedders.1.model.", "lora_te2", "openclip"),
    ],
}
_UNET_PREFIX = "model.diffusion_model."
#: OpenCLIP resblock children -> transformers CLIP module paths
_OPENCLIP_CHILDREN = {
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
}
_FOLDER_COMPONENTS = {"unet": "lora_unet", "text_encoder": None, "text_encoder_2": "lora_te2"}


# ----------------------------------------------------------------------------- UNet structure
def infer_unet_config(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """A diffusers-style UNet config (the fields :class:`SgmNameMap` needs, and a few more) from the
    SGM keys of a UNet (``input_blocks.…``, without ``model.diffusion_model.``)."""
    shapes = shapes or {}
    keys = list(keys)

    def blocks(prefix: str) -> dict[int, set[str]]:
        out: dict[int, set[str]] = {}
        for k in keys:
            if k.startswith(prefix):
                idx, _, rest = k[len(prefix) :].partition(".")
                if idx.isdigit():
                    out.setdefault(int(idx), set()).add(rest)
        return out

    def is_attn(rest: set[str], sub: str) -> bool:
        return any(r.startswith(f"{sub}.proj_in.") or r.startswith(f"{sub}.transformer_blocks.") for r in rest)

    inputs, outputs = blocks("input_blocks."), blocks("output_blocks.")
    if 0 not in inputs or not outputs:
        raise HiganbanaError("the UNet keys have no input_blocks/output_blocks: not an SD UNet")
    levels: list[list[int]] = [[]]
    for k in sorted(i for i in inputs if i > 0):
        if any(r.startswith("0.op.") for r in inputs[k]):
            levels.append([])
        else:
            levels[-1].append(k)
    lpb = [len(level) for level in levels]
    down_attn = [any(is_attn(inputs[k], "1") for k in level) for level in levels]
    depth = []
    linear = False
    for level in levels:
        n = 0
        for k in level:
            ids = {r.split(".")[2] for r in inputs[k] if r.startswith("1.transformer_blocks.")}
            n = max(n, len(ids))
            w = shapes.get(f"input_blocks.{k}.1.proj_in.weight")
            linear = linear or (w is not None and len(w) == 2)
        depth.append(max(n, 1))
    up_attn, k = [], 0
    for n in reversed(lpb):
        up_attn.append(any(is_attn(outputs.get(j, set()), "1") for j in range(k, k + n + 1)))
        k += n + 1
    middle = blocks("middle_block.")
    if not middle:
        mid = None
    elif any(r.startswith(("proj_in.", "transformer_blocks.")) for r in middle.get(1, set())):
        mid = "UNetMidBlock2DCrossAttn"
    else:
        raise HiganbanaError("the UNet's middle block has no attention: this layout is not supported")
    return {
        "down_block_types": [("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in down_attn],
        "up_block_types": [("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in up_attn],
        "layers_per_block": lpb[0] if len(set(lpb)) == 1 else lpb,
        "mid_block_type": mid,
        "transformer_layers_per_block": depth,
        "use_linear_projection": linear,
        "addition_embed_type": "text_time" if any(k.startswith("label_emb.0.0.") for k in keys) else None,
    }


# ----------------------------------------------------------------------------- checkpoint
@dataclass
class _Source:
    """One safetensors file of a checkpoint."""

    rel: str  # path relative to the checkpoint (folder) or the file name
    path: Path
    entries: dict[str, tuple[tuple[int, ...], str, tuple[int, int]]]  # key in the file -> (shape, dtype, bytes)
    metadata: dict[str, str]


@dataclass
class Checkpoint:
    """A lazily read SD checkpoint (see the module docstring for the key scheme)."""

    path: Path
    kind: str
    is_folder: bool
    sources: list[_Source]
    unet_config: dict[str, Any] | None = None
    #: SD3/Flux: the layout of the transformer, and the prefix of its keys in a single file
    dit_layout: DitLayout | None = None
    dit_prefix: str = ""
    _where: dict[str, tuple[_Source, str]] = field(default_factory=dict, repr=False)
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _modules: dict[str, dict[str, tuple[str, slice | None]]] | None = field(default=None, repr=False)
    _name_map: SgmNameMap | None = field(default=None, repr=False)
    _te_classes: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for src in self.sources:
            for k in src.entries:
                self._where[f"{src.rel}/{k}" if self.is_folder else k] = (src, k)
        if self.unet_config is not None:
            self._name_map = SgmNameMap(self.unet_config)

    # ------------------------------------------------------------------ tensors
    def keys(self) -> list[str]:
        return list(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        src, k = self._where[key]
        return src.entries[k][0]

    def dtype(self, key: str) -> torch.dtype:
        src, k = self._where[key]
        name = src.entries[k][1]
        if name not in ST_DTYPES:
            raise HiganbanaError(f"{src.path}: tensor {k!r} has dtype {name}, which is not supported")
        return ST_DTYPES[name]

    def get_tensor(self, key: str) -> torch.Tensor:
        """One tensor, read from disk now into its own memory (nothing is cached, nothing is mapped:
        a memory map would count every page read towards the process's resident memory)."""
        src, k = self._where[key]
        shape, _, (begin, end) = src.entries[k]
        dtype = self.dtype(key)
        handle = self._handles.get(src.path)
        try:
            if handle is None:
                handle = self._handles[src.path] = open(src.path, "rb")  # noqa: SIM115 (closed in close())
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            handle.seek(begin)
            # numpy's stubs give ndarray __buffer__ only for Python >= 3.12 (see streaming._tensor_bytes)
            if end > begin and handle.readinto(memoryview(buffer.numpy())) != end - begin:  # type: ignore[arg-type]
                raise OSError(f"the file ends inside tensor {k!r}")
        except OSError as exc:
            raise HiganbanaError(f"{src.path}: cannot read tensor {k!r} ({exc})") from exc
        return buffer.view(dtype).reshape(shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ names
    def module_key(self, key: str) -> tuple[str, str, slice | None] | None:
        """``(kohya module name, "weight"|"bias", row slice or None)`` for a tensor key, ``None`` when
        the tensor belongs to no adaptable module (VAE, embeddings, buffers)."""
        hits = self.module_keys(key)
        return hits[0] if hits else None

    def module_keys(self, key: str) -> list[tuple[str, str, slice | None]]:
        """Every module a tensor holds: three (q, k, v row slices) for OpenCLIP's ``in_proj``."""
        if key not in self._where:
            return []
        if self.is_folder:  # <component>/<file>/<tensor key>
            component, _, rest = key.partition("/")
            if self.dit_layout is not None:
                return self._dit_folder_module(component, rest.partition("/")[2])
            return self._folder_module(component, rest.partition("/")[2])
        if self.dit_layout is not None:
            return self._dit_single_module(key)
        return self._single_module(key)

    def _dit_folder_module(self, component: str, key: str) -> list[tuple[str, str, slice | None]]:
        path, _, param = key.rpartition(".")
        if param not in ("weight", "bias") or not path:
            return []
        if component == "transformer":
            return [(_kohya(SPLIT_PREFIX, path), param, None)]
        prefix = _DIT_TE_COMPONENTS[self.kind].get(component)
        if prefix is None:
            return []
        if "CLIP" in str(self._te_classes.get(component, "")) and not path.startswith(
            ("text_model.", "text_projection")
        ):
            path = "text_model." + path
        return [(_kohya(prefix, path), param, None)]

    def _dit_single_module(self, key: str) -> list[tuple[str, str, slice | None]]:
        """An original transformer tensor: its kohya (fused) module, and each split module it holds —
        a row block of a fused ``qkv``/``linear1``, or the same tensor for a one-to-one module."""
        layout = self.dit_layout
        assert layout is not None
        if not key.startswith(self.dit_prefix):
            return []
        path, _, param = key[len(self.dit_prefix) :].rpartition(".")
        if param not in ("weight", "bias") or path not in layout.members:
            return []
        out: list[tuple[str, str, slice | None]] = [(_kohya(ORIGINAL_PREFIX, path), param, None)]
        members = layout.members[path]
        sizes = layout.slots[members[0]].sizes
        start = 0
        for member, size in zip(members, sizes, strict=True):
            rows = slice(start, start + size) if len(members) > 1 else None
            out.append((_kohya(SPLIT_PREFIX, member), param, rows))
            start += size
        return out

    def row_views(self) -> set[str]:
        """Module names that are another view of a module of the checkpoint (the split names of a single
        SD3/Flux file): tools that visit every module once skip them."""
        if self.dit_layout is None or self.is_folder:
            return set()
        return {n for n in self.modules() if n.startswith(f"{SPLIT_PREFIX}_")}

    def _folder_module(self, component: str, key: str) -> list[tuple[str, str, slice | None]]:
        path, _, param = key.rpartition(".")
        if param not in ("weight", "bias") or not path:
            return []
        if component == "unet":
            if self.kind == "sdxl":
                assert self._name_map is not None  # a folder always has its UNet config
                try:
                    path = self._name_map.to_sgm(path)
                except NameMappingError:
                    return []
            return [(_kohya("lora_unet", path), param, None)]
        if component not in ("text_encoder", "text_encoder_2"):
            return []
        prefix = "lora_te" if self.kind != "sdxl" else ("lora_te1" if component == "text_encoder" else "lora_te2")
        if not path.startswith(("text_model.", "text_projection")):
            path = "text_model." + path
        return [(_kohya(prefix, path), param, None)]

    def _single_module(self, key: str) -> list[tuple[str, str, slice | None]]:
        if key.startswith(_UNET_PREFIX):
            path, _, param = key[len(_UNET_PREFIX) :].rpartition(".")
            if param not in ("weight", "bias") or self._name_map is None:
                return []
            if self.kind != "sdxl":
                try:
                    path = self._name_map.to_diffusers(path)
                except NameMappingError:
                    return []
            return [(_kohya("lora_unet", path), param, None)]
        for start, prefix, layout in _TE_PREFIXES[self.kind]:
            if not key.startswith(start):
                continue
            rest = key[len(start) :]
            if layout == "hf":
                path, _, param = rest.rpartition(".")
                if param in ("weight", "bias") and path.startswith("text_model."):
                    return [(_kohya(prefix, path), param, None)]
                return []
            return self._openclip_module(prefix, rest, key)
        return []

    def _openclip_module(self, prefix: str, rest: str, key: str) -> list[tuple[str, str, slice | None]]:
        if rest.startswith("ln_final."):
            return [(_kohya(prefix, "text_model.final_layer_norm"), rest[len("ln_final.") :], None)]
        if not rest.startswith("transformer.resblocks."):
            return []
        index, _, child = rest[len("transformer.resblocks.") :].partition(".")
        layer = f"text_model.encoder.layers.{index}"
        if child in ("attn.in_proj_weight", "attn.in_proj_bias"):
            d = self.shape(key)[0] // 3
            param = "weight" if child.endswith("weight") else "bias"
            return [
                (_kohya(prefix, f"{layer}.self_attn.{p}_proj"), param, slice(i * d, (i + 1) * d))
                for i, p in enumerate("qkv")
            ]
        path, _, param = child.rpartition(".")
        if path in _OPENCLIP_CHILDREN and param in ("weight", "bias"):
            return [(_kohya(prefix, f"{layer}.{_OPENCLIP_CHILDREN[path]}"), param, None)]
        return []

    def modules(self) -> dict[str, dict[str, tuple[str, slice | None]]]:
        """``{kohya name: {"weight"|"bias": (tensor key, row slice)}}`` for every module in the checkpoint."""
        if self._modules is None:
            out: dict[str, dict[str, tuple[str, slice | None]]] = {}
            for key in self._where:
                for name, param, rows in self.module_keys(key):
                    out.setdefault(name, {})[param] = (key, rows)
            self._modules = out
        return self._modules

    def aliases(self) -> dict[str, str]:
        """Other names files use for the checkpoint's modules: diffusers-path UNet names on SDXL and
        SimpleTuner's ``lycoris_<diffusers path>``, each -> the kohya name."""
        out: dict[str, str] = {}
        if self.dit_layout is not None:  # SimpleTuner's lycoris_<diffusers path>
            return {
                "lycoris_" + n[len(SPLIT_PREFIX) + 1 :]: n for n in self.modules() if n.startswith(f"{SPLIT_PREFIX}_")
            }
        if self._name_map is None:
            return out
        for name in self.modules():
            if not name.startswith("lora_unet_"):
                continue
            path = self._diffusers_path(name)
            if path is None:
                continue
            plain = _kohya("lora_unet", path)
            if plain != name:
                out.setdefault(plain, name)
            out.setdefault(_kohya("lycoris", path), name)
        return out

    def _diffusers_path(self, name: str) -> str | None:
        key = self.modules()[name].get("weight", next(iter(self.modules()[name].values())))[0]
        if self.is_folder:
            return key.split("/", 2)[2].rpartition(".")[0] if key.startswith("unet/") else None
        assert self._name_map is not None  # aliases(), the only caller, returns early without one
        try:
            return self._name_map.to_diffusers(key[len(_UNET_PREFIX) :].rpartition(".")[0])
        except NameMappingError:
            return None

    # ------------------------------------------------------------------ writing
    def write_like(
        self,
        out: str | os.PathLike,
        transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        overwrite: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> Path:
        """Write a checkpoint of the same format with ``transform(key, tensor)`` applied to each tensor
        (floating tensors cast to ``dtype`` when given). A folder's other files are copied."""
        from tqdm.auto import tqdm

        out = Path(out)
        if out.resolve() == self.path.resolve():
            raise HiganbanaError(f"{out}: the output would replace the checkpoint being read; choose another path")
        if out.exists() and not overwrite:
            raise HiganbanaError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")

        def out_dtype(key: str) -> torch.dtype:
            d = self.dtype(key)
            return dtype if dtype is not None and d.is_floating_point else d

        def produce(key: str) -> torch.Tensor:
            t = self.get_tensor(key)
            return transform(key, t) if transform is not None else t

        bar = tqdm(total=len(self), desc=f"writing {out.name}", unit="tensor", disable=None)
        try:
            if not self.is_folder:
                meta = {**self.sources[0].metadata, **(metadata or {})}
                items = [(k, self.shape(k), out_dtype(k)) for k in self._where]
                return write_streaming(out, items, produce, meta, progress=bar)
            return self._write_folder(out, out_dtype, produce, overwrite, metadata, bar)
        finally:
            bar.close()

    def _write_folder(
        self,
        out: Path,
        out_dtype: Callable[[str], torch.dtype],
        produce: Callable[[str], torch.Tensor],
        overwrite: bool,
        metadata: Mapping[str, str] | None,
        bar: Any,
    ) -> Path:
        with atomic_folder(out, overwrite=overwrite) as tmp:
            written = {src.rel for src in self.sources}
            skipped = self._other_variants()
            for file in sorted(self.path.rglob("*")):
                rel = file.relative_to(self.path).as_posix()
                if file.is_dir() or rel in written or rel in skipped:
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, tmp / rel)
            for src in self.sources:  # each file holds its own keys; produce() takes the checkpoint's
                items = [(k, self.shape(f"{src.rel}/{k}"), out_dtype(f"{src.rel}/{k}")) for k in src.entries]
                meta = {**src.metadata, **(metadata or {})}

                def produce_in(k: str, rel: str = src.rel) -> torch.Tensor:  # a def: mypy cannot type such a lambda
                    return produce(f"{rel}/{k}")

                write_streaming(tmp / src.rel, items, produce_in, meta, progress=bar)
        return out

    def _other_variants(self) -> set[str]:
        """Weight files of merged components that were not chosen (the other variant): not copied."""
        skipped = set()
        for src in self.sources:
            folder = (self.path / src.rel).parent
            for f in folder.glob("*.safetensors"):
                rel = f.relative_to(self.path).as_posix()
                if rel not in {s.rel for s in self.sources}:
                    skipped.add(rel)
        return skipped


def _kohya(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


# ----------------------------------------------------------------------------- opening
def open_checkpoint(path: str | os.PathLike, kind: str | None = None) -> Checkpoint:
    """Open a diffusers folder or an original single-file ``.safetensors`` checkpoint, lazily."""
    path = Path(path)
    if kind is not None and kind not in (*KINDS, *DIT_KINDS):
        raise HiganbanaError(f"unknown model kind {kind!r}; expected one of {(*KINDS, *DIT_KINDS)}")
    if path.is_dir():
        dit = dit_kind_of(path)
        if dit is not None or kind in DIT_KINDS:
            return _open_dit_folder(path, dit or str(kind))
        return _open_folder(path, kind)
    if not path.is_file():
        raise HiganbanaError(f"{path}: no such file or folder")
    if path.suffix.lower() != ".safetensors":
        raise HiganbanaError(f"{path}: only .safetensors checkpoints and diffusers folders are read")
    entries, metadata = read_header(path)
    found = _single_file_dit(entries)
    if found is not None:
        family, prefix = found
        layout = DitLayout(family, _infer_dit_config(family, entries, prefix))
        return Checkpoint(path, family, False, [_Source(path.name, path, entries, metadata)], None, layout, prefix)
    kind = kind or _single_file_kind(path, entries)
    unet_keys = {k[len(_UNET_PREFIX) :]: e[0] for k, e in entries.items() if k.startswith(_UNET_PREFIX)}
    config = infer_unet_config(unet_keys, unet_keys) if unet_keys else None
    return Checkpoint(path, kind, False, [_Source(path.name, path, entries, metadata)], config)


def _single_file_dit(entries: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(family, key prefix)`` of an original SD3 (MMDiT ``joint_blocks``) or Flux (``double_blocks``)
    transformer file, keys bare or under ``model.diffusion_model.``; None for anything else."""
    for prefix in ("", _UNET_PREFIX):
        if f"{prefix}joint_blocks.0.x_block.attn.qkv.weight" in entries:
            return "sd3", prefix
        if f"{prefix}double_blocks.0.img_attn.qkv.weight" in entries:
            return "flux", prefix
    return None


def _blocks(entries: Mapping[str, Any], start: str) -> list[int]:
    return sorted({int(k[len(start) :].split(".")[0]) for k in entries if k.startswith(start)})


def _infer_dit_config(family: str, entries: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The diffusers config fields :class:`DitLayout` needs, read from an original file's shapes."""

    def shape(key: str) -> tuple[int, ...]:
        return tuple(entries[prefix + key][0])

    if family == "flux":
        hidden = shape("img_in.weight")[0]
        singles = _blocks(entries, f"{prefix}single_blocks.")
        mlp = (shape(f"single_blocks.{singles[0]}.linear1.weight")[0] - 3 * hidden) if singles else 4 * hidden
        return {
            "num_attention_heads": 1,
            "attention_head_dim": hidden,
            "num_layers": len(_blocks(entries, f"{prefix}double_blocks.")),
            "num_single_layers": len(singles),
            "mlp_ratio": mlp / hidden,
            "guidance_embeds": f"{prefix}guidance_in.in_layer.weight" in entries,
        }
    hidden = shape("x_embedder.proj.weight")[0]
    blocks = _blocks(entries, f"{prefix}joint_blocks.")
    return {
        "num_attention_heads": 1,
        "attention_head_dim": hidden,
        "num_layers": len(blocks),
        "dual_attention_layers": [i for i in blocks if f"{prefix}joint_blocks.{i}.x_block.attn2.qkv.weight" in entries],
    }


def _open_dit_folder(path: Path, kind: str) -> Checkpoint:
    try:
        config = json.loads((path / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HiganbanaError(f"{path}: cannot read the transformer's config ({exc})") from exc
    sources, te_configs = _read_components(path, "transformer", _DIT_TE_COMPONENTS[kind])
    ckpt = Checkpoint(path, kind, True, sources, None, DitLayout(kind, config))
    ckpt._te_classes = {name: ",".join(c.get("architectures") or []) for name, c in te_configs.items()}
    return ckpt


def _single_file_kind(path: Path, entries: Mapping[str, Any]) -> str:
    keys = list(entries)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    found = sorted({".".join(k.split(".")[:2]) for k in keys})
    shown = ", ".join(found[:8]) + (f", … ({len(found)} in all)" if len(found) > 8 else "")
    raise HiganbanaError(
        f"{path}: not a recognisable SD1/SD2/SDXL checkpoint (no cond_stage_model/conditioner text-encoder "
        f"keys; found key groups {shown or 'none'}); pass kind= (--kind) or give a diffusers folder"
    )


def _read_components(path: Path, main: str, encoders: Iterable[str]) -> tuple[list[_Source], dict[str, dict[str, Any]]]:
    """The weight headers of a diffusers folder's ``main`` model (required) and its text ``encoders``
    (where present), and each present encoder's config (``{}`` when unreadable), in order."""
    sources: list[_Source] = []
    configs: dict[str, dict[str, Any]] = {}
    for component in (main, *encoders):
        files = _component_files(path / component)
        if component == main and not files:
            raise HiganbanaError(f"{path / main}: no .safetensors weights (pickled .bin weights are not read)")
        for file in files:
            entries, metadata = read_header(file)
            sources.append(_Source(file.relative_to(path).as_posix(), file, entries, metadata))
        if component != main and files:
            try:
                configs[component] = json.loads((path / component / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                configs[component] = {}
    return sources, configs


def _component_files(folder: Path) -> list[Path]:
    """The weight files of one component: the plain variant if present, else ``*.fp16.*``; sharded
    files follow their index."""
    for variant in ("", ".fp16"):
        for stem in ("diffusion_pytorch_model", "model"):
            single = folder / f"{stem}{variant}.safetensors"
            if single.is_file():
                return [single]
            index = folder / f"{stem}.safetensors.index{variant}.json"
            if not index.is_file():
                index = folder / f"{stem}{variant}.safetensors.index.json"
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (OSError, ValueError, KeyError) as exc:
                    raise HiganbanaError(f"{index}: not a readable shard index ({exc})") from exc
                return [folder / name for name in sorted(set(weight_map.values()))]
    return []


def _open_folder(path: Path, kind: str | None) -> Checkpoint:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise HiganbanaError(f"{path}: a folder checkpoint needs model_index.json (a diffusers model folder)")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        unet_config = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HiganbanaError(f"{path}: cannot read the model's configs ({exc})") from exc
    sources, by_component = _read_components(path, "unet", [c for c in _FOLDER_COMPONENTS if c != "unet"])
    te_configs = list(by_component.values())
    if kind is None:
        if "XL" in str(index.get("_class_name", "")):
            kind = "sdxl"
        else:
            # _Config stands in for a text encoder: detect_kind reads only its ``config``
            kind = detect_kind(unet_config, cast("list[torch.nn.Module]", [_Config(c) for c in te_configs]))
    return Checkpoint(path, kind, True, sources, unet_config)


class _Config:
    """A stand-in module with a ``config`` dict, for :func:`~higanbana.models.sd.detect_kind`."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
