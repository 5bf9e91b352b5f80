"""Reference re-implementation of how ComfyUI loads and merges LyCORIS-family files.

Our own code, written after reading ComfyUI's loading code (comfyanonymous/ComfyUI, now published as
Comfy-Org/ComfyUI; GPL-3.0: read, never copied or translated line by line). Read on 2026-12-07:

* the whole tree at commit a125cd84b054a57729b5eecab930ca9408719832 (2025-10-12, the newest snapshot
  that could be fetched): ``comfy/lora.py`` (``load_lora``, ``model_lora_keys_unet``,
  ``model_lora_keys_clip``, ``calculate_weight``, ``pad_tensor_to_shape``), ``comfy/lora_convert.py``,
  ``comfy/weight_adapter/__init__.py``, ``base.py`` (``weight_decompose``), ``lora.py``, ``loha.py``,
  ``lokr.py``, ``glora.py``, ``oft.py``, ``boft.py``, and around them ``comfy/sd.py``
  (``load_lora_for_models``), ``comfy/model_patcher.py`` (``add_patches``, ``patch_weight_to_device``),
  ``comfy/utils.py`` (``unet_to_diffusers``), ``comfy/clip_model.py``;
* later revisions, from a public code index that names the commit of only some of them:
  ``comfy/weight_adapter/lokr.py`` at 179c2d35c84b and after it, and the "bypass mode" revisions of
  ``comfy/weight_adapter/__init__.py``, ``base.py``, ``lora.py``, ``lokr.py``, ``glora.py``, ``boft.py``,
  ``bypass.py`` and of ``model_lora_keys_unet`` (with the Lumina2/Kandinsky5/ACEStep15 maps): they add
  bypass-mode methods, training classes and key maps of other models, and change nothing below.

What it reproduces for SD-family files:

* the kohya names of ``model_lora_keys_unet`` / ``model_lora_keys_clip`` (:func:`unet_key_map`,
  :func:`te_key_map`); ``lora_convert.convert_lora`` rewrites none of them;
* ``load_lora`` (:func:`load_patches`): which adapter each module's keys form, and the keys left "not loaded";
* ``calculate_weight`` with the ``weight_adapter`` maths (:func:`calculate_weight`), including where it
  fails. Each adapter runs part of its computation inside ``try/except Exception``: an error there is
  logged (``ERROR <adapter> <key> …``) and the weight is left as it was (:class:`PatchFailed`); an error in
  the part before that ``try`` (building the factors, GLoRA's rank, a Tucker core) or in ``load_lora``
  (a missing partner key) is not caught and fails the whole LoRA load or sampling run
  (:class:`ComfyCrash`). A ``diff`` of the wrong shape is skipped with a warning ("SHAPE MISMATCH").

The deviations from LyCORIS it reproduces: output-axis DoRA divides by the norm of the ORIGINAL weight;
OFT/BOFT clamp ‖Q‖ (+1e-8, one norm over every block and stage) to the raw α; OFT applies the strength
twice and ignores ``rescale``; BOFT without ``alpha`` fails; DoRA scales, ``rescale`` and the rest are
broadcast as stored (a 1-D ``(out,)`` tensor broadcasts along the last axis).

ComfyUI patches a float32 copy of the weight with ``intermediate_dtype`` float32 and rounds the result
back stochastically; here everything is computed in ``intermediate_dtype`` (float64 in the unit tests)
and cast back plainly. ComfyUI inverts the Cayley denominator in float32 whatever that dtype; here in
``intermediate_dtype``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "ComfyCrash",
    "Patch",
    "PatchFailed",
    "calculate_weight",
    "dit_key_map",
    "flux_diffusers_map",
    "load_patches",
    "mmdit_diffusers_map",
    "original_state",
    "patch_dit",
    "te_key_map",
    "unet_key_map",
]

#: ``LORA_CLIP_MAP``: kohya suffix → transformers CLIP module path inside an encoder layer.
CLIP_MAP = {
    "mlp_fc1": "mlp.fc1",
    "mlp_fc2": "mlp.fc2",
    "self_attn_q_proj": "self_attn.q_proj",
    "self_attn_k_proj": "self_attn.k_proj",
    "self_attn_v_proj": "self_attn.v_proj",
    "self_attn_out_proj": "self_attn.out_proj",
}

#: LoRA (up, down) name pairs in ComfyUI's order of precedence. The first whose UP name is in the file
#: wins; its down name must then exist too. Only the first pair also reads ``lora_mid.weight``.
LORA_NAME_PAIRS = (
    ("{}.lora_up.weight", "{}.lora_down.weight"),
    ("{}_lora.up.weight", "{}_lora.down.weight"),
    ("{}.lora_B.weight", "{}.lora_A.weight"),
    ("{}.lora.up.weight", "{}.lora.down.weight"),
    ("{}.lora_B", "{}.lora_A"),
    ("{}.lora_linear_layer.up.weight", "{}.lora_linear_layer.down.weight"),
    ("{}.lora_B.default.weight", "{}.lora_A.default.weight"),
)
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
#: the LoKr keys that make an adapter (``lokr_w1_b``, ``lokr_w2_b``, ``lokr_t2`` alone are read, then dropped)
LOKR_MARKERS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")
GLORA_KEYS = ("a1", "a2", "b1", "b2")


@dataclass
class Patch:
    """One patch of one model tensor: ``kind`` is an adapter name or ``"diff"``/``"set"``; ``part`` is
    ``"weight"`` or ``"bias"``; ``t`` holds the file tensors by short name."""

    kind: str
    part: str
    t: dict[str, Tensor | None] = field(default_factory=dict)
    alpha: float | None = None
    dora_scale: Tensor | None = None


class PatchFailed(RuntimeError):
    """An error ComfyUI catches inside an adapter's ``calculate_weight``: it logs "ERROR <adapter> <key> …"
    and leaves the weight as it was (the module is in effect not loaded). A ``diff`` of the wrong shape
    ("WARNING SHAPE MISMATCH … WEIGHT NOT MERGED") is reported the same way."""


class ComfyCrash(RuntimeError):
    """An error ComfyUI does not catch: raised in ``load_lora`` (a missing partner key) or in the part of an
    adapter's ``calculate_weight`` before its ``try``; the LoRA loader node or the sampling run fails."""


# --------------------------------------------------------------------------------------------- key maps


def te_key_map(num_layers: int, prefix: str, projection: bool | None = None) -> dict[str, str]:
    """kohya text-encoder names ComfyUI maps (``model_lora_keys_clip``, ``LORA_CLIP_MAP``, layers 0-31 only).

    ``{prefix}_text_model_encoder_layers_{i}_{mlp_fc1|…}`` → ``text_model.encoder.layers.{i}.{mlp.fc1|…}``
    (the transformers ``CLIPTextModel`` module path). ComfyUI accepts ``lora_te_`` and ``lora_te1_`` for a
    CLIP-L or CLIP-H encoder, ``lora_te2_`` for SDXL's CLIP-G (``lora_te_`` when CLIP-G is alone).

    ``{prefix}_text_projection`` → ``text_projection`` is added when ``projection`` says so; by default for
    the prefixes ``lora_te1``/``lora_te2``. Really ComfyUI maps ``lora_te1_text_projection`` only where the
    model has a CLIP-L (SD1, SDXL: not SD2's CLIP-H), ``lora_te2_text_projection`` only to a CLIP-G, and
    ``lora_te_text_projection`` never. Embeddings, norms and layers ≥ 32 are never mapped.
    """
    out: dict[str, str] = {}
    for i in range(min(num_layers, 32)):
        for kohya, path in CLIP_MAP.items():
            out[f"{prefix}_text_model_encoder_layers_{i}_{kohya}"] = f"text_model.encoder.layers.{i}.{path}"
    if projection is None:
        projection = prefix in ("lora_te1", "lora_te2")
    if projection:
        out[f"{prefix}_text_projection"] = "text_projection"
    return out


def unet_key_map(module_paths: Iterable[str], sgm_paths: Mapping[str, str] | None = None) -> dict[str, str]:
    """kohya UNet names ComfyUI maps (``model_lora_keys_unet``), each to the diffusers module path.

    ComfyUI maps every diffusers module its ``unet_to_diffusers`` table knows as
    ``lora_unet_<diffusers path, . → _>`` (the SD1/SD2 kohya form) and as ``lycoris_<…>`` (SimpleTuner), and
    every module of its own LDM/SGM UNet as ``lora_unet_<sgm path, . → _>`` (the SDXL kohya form; accepted
    for SD1/SD2 too). ``sgm_paths`` (diffusers path → SGM path) enables the latter.
    """
    out: dict[str, str] = {}
    for path in module_paths:
        flat = path.replace(".", "_")
        out[f"lora_unet_{flat}"] = path
        out[f"lycoris_{flat}"] = path
        if sgm_paths is not None and path in sgm_paths:
            out["lora_unet_" + sgm_paths[path].replace(".", "_")] = path
    return out


# --------------------------------------------------------------------------------------------- SD3 / Flux

#: a target of ComfyUI's key map: an original module path, or (path, (dim, start, size)) — a row block of a
#: fused weight (``ModelPatcher.add_patches`` narrows the weight to it before the adapter runs)
Target = str | tuple[str, tuple[int, int, int]]


def _rows(start: int, size: int) -> tuple[int, int, int]:
    return (0, start, size)


def flux_diffusers_map(config: Mapping[str, int]) -> dict[str, Target]:
    """``comfy/utils.py::flux_to_diffusers`` for the Linears: diffusers module path → BFL module path or row
    block (``hidden_size`` from ``img_in``; ``to_q/k/v`` and single-stream ``proj_mlp`` into ``qkv``/``linear1``).
    ``norm_out.linear`` carries ComfyUI's ``swap_scale_shift`` function: left out here (never adapted)."""
    h = config["hidden_size"]
    out: dict[str, Target] = {}
    for i in range(config["depth"]):
        a, o = f"transformer_blocks.{i}.attn", f"double_blocks.{i}"
        for j, n in enumerate(("to_q", "to_k", "to_v")):
            out[f"{a}.{n}"] = (f"{o}.img_attn.qkv", _rows(j * h, h))
        for j, n in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            out[f"{a}.{n}"] = (f"{o}.txt_attn.qkv", _rows(j * h, h))
        for d, b in (
            ("attn.to_out.0", "img_attn.proj"),
            ("norm1.linear", "img_mod.lin"),
            ("norm1_context.linear", "txt_mod.lin"),
            ("attn.to_add_out", "txt_attn.proj"),
            ("ff.net.0.proj", "img_mlp.0"),
            ("ff.net.2", "img_mlp.2"),
            ("ff_context.net.0.proj", "txt_mlp.0"),
            ("ff_context.net.2", "txt_mlp.2"),
        ):
            out[f"transformer_blocks.{i}.{d}"] = f"{o}.{b}"
    for i in range(config["depth_single_blocks"]):
        a, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, n in enumerate(("to_q", "to_k", "to_v")):
            out[f"{a}.attn.{n}"] = (f"{o}.linear1", _rows(j * h, h))
        # ComfyUI's size argument for proj_mlp is 4·h (narrow takes a length): the MLP's rows, mlp_ratio 4
        out[f"{a}.proj_mlp"] = (f"{o}.linear1", _rows(3 * h, 4 * h))
        out[f"{a}.norm.linear"] = f"{o}.modulation.lin"
        out[f"{a}.proj_out"] = f"{o}.linear2"
    for d, b in (
        ("proj_out", "final_layer.linear"),
        ("x_embedder", "img_in"),
        ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("context_embedder", "txt_in"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ):
        out[d] = b
    return out


def mmdit_diffusers_map(config: Mapping[str, int]) -> dict[str, Target]:
    """``comfy/utils.py::mmdit_to_diffusers`` for the Linears. ComfyUI's SD3 ``depth`` is
    ``x_embedder.proj.weight.shape[0] // 64`` (``model_detection.py``): the row offset is ``64·depth`` and the
    blocks mapped are ``range(depth)`` — right for the real SD3/SD3.5 models, whose width is 64 per block."""
    depth = config["hidden_size"] // 64
    off = depth * 64
    out: dict[str, Target] = {}
    for i in range(depth):
        a, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for j, n in enumerate(("to_q", "to_k", "to_v")):
            out[f"{a}.attn.{n}"] = (f"{o}.x_block.attn.qkv", _rows(j * off, off))
            out[f"{a}.attn2.{n}"] = (f"{o}.x_block.attn2.qkv", _rows(j * off, off))
        for j, n in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            out[f"{a}.attn.{n}"] = (f"{o}.context_block.attn.qkv", _rows(j * off, off))
        for d, b in (
            ("norm1_context.linear", "context_block.adaLN_modulation.1"),
            ("attn.to_add_out", "context_block.attn.proj"),
            ("ff_context.net.0.proj", "context_block.mlp.fc1"),
            ("ff_context.net.2", "context_block.mlp.fc2"),
            ("norm1.linear", "x_block.adaLN_modulation.1"),
            ("attn.to_out.0", "x_block.attn.proj"),
            ("attn2.to_out.0", "x_block.attn2.proj"),
            ("ff.net.0.proj", "x_block.mlp.fc1"),
            ("ff.net.2", "x_block.mlp.fc2"),
        ):
            out[f"{a}.{d}"] = f"{o}.{b}"
    for d, b in (
        ("context_embedder", "context_embedder"),
        ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
        ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
        ("pos_embed.proj", "x_embedder.proj"),
        ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
        ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
        ("proj_out", "final_layer.linear"),
    ):
        out[d] = b
    # the last block's norm1_context.linear maps with swap_scale_shift: left out, like norm_out.linear
    out.pop(f"transformer_blocks.{depth - 1}.norm1_context.linear", None)
    return out


def dit_key_map(
    family: str, diffusers_map: Mapping[str, Target], original_paths: Iterable[str], hidden_size: int = 0
) -> dict[str, Target]:
    """File module names ComfyUI's ``model_lora_keys_unet`` maps on an SD3 (``family="sd3"``) or Flux model.

    Every module of ComfyUI's own (original-layout) model: ``lora_unet_<path, . → _>`` (kohya) and
    ``diffusion_model.<path>`` (its "generic" format). The diffusers names of ``diffusers_map``: SD3 as
    ``transformer.<p>``, ``base_model.model.<p>``, ``lora_transformer_<p_>`` (OneTrainer), ``lycoris_<p_>``
    (SimpleTuner); Flux as ``transformer.<p>``, ``lycoris_<p_>``, ``lora_transformer_<p_>``, plus
    ``diffusion_model.single_blocks.<i>.linear1_qkv`` → the first 3·h rows of ``linear1`` (``hidden_size`` h).
    """
    out: dict[str, Target] = {}
    for path in original_paths:
        out["lora_unet_" + path.replace(".", "_")] = path
        out[f"diffusion_model.{path}"] = path
    forms = (
        ("transformer.{}", "base_model.model.{}", "lora_transformer_{}", "lycoris_{}")
        if family == "sd3"
        else ("transformer.{}", "lycoris_{}", "lora_transformer_{}")
    )
    for path, target in diffusers_map.items():
        for form in forms:
            name = path if "." in form else path.replace(".", "_")
            out[form.format(name)] = target
    if family == "flux":
        for path in original_paths:
            if path.endswith(".linear1"):
                out[f"diffusion_model.{path[: -len('.linear1')]}.linear1_qkv"] = (path, _rows(0, 3 * hidden_size))
    return out


def original_state(diffusers_map: Mapping[str, Target], weights: Mapping[str, tuple[Tensor, Tensor | None]]):
    """ComfyUI's model, original layout: ``{original path: (weight, bias)}`` assembled from the diffusers
    model's ``{path: (weight, bias)}`` (row blocks concatenated in offset order)."""
    blocks: dict[str, list[tuple[int, str]]] = {}
    for path, target in diffusers_map.items():
        if path not in weights:
            continue
        if isinstance(target, str):
            blocks[target] = [(0, path)]
        else:
            blocks.setdefault(target[0], []).append((target[1][1], path))
    out = {}
    for original, members in blocks.items():
        members.sort()
        ws = [weights[p][0] for _, p in members]
        bs = [weights[p][1] for _, p in members]
        out[original] = (torch.cat(ws), None if any(b is None for b in bs) else torch.cat(bs))
    return out


def patch_dit(
    patches: Mapping[Target, list[Patch]],
    model: Mapping[str, tuple[Tensor, Tensor | None]],
    strength: float = 1.0,
    intermediate_dtype: torch.dtype = torch.float32,
    errors: list[str] | None = None,
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Apply patches the way ``ModelPatcher.patch_weight_to_device`` does on an original-layout model: a row
    block target narrows the weight, the adapter patches that view, the result is written back. A bias patch of
    a row-block target is dropped: ``load_lora`` names it ``"{}.bias".format(target[:-len(".weight")])`` on a
    tuple, a key the model does not have (``add_patches`` ignores it)."""
    out = {k: (w.clone(), None if b is None else b.clone()) for k, (w, b) in model.items()}
    for target, plist in patches.items():
        path, rows = (target, None) if isinstance(target, str) else (target[0], target[1])
        if path not in out:
            continue  # add_patches ignores keys the model lacks
        w, b = out[path]
        if rows is None:
            out[path] = calculate_weight(plist, w, b, strength, intermediate_dtype, errors)
            continue
        weight_patches = [p for p in plist if p.part == "weight"]
        _, start, size = rows
        view = w.narrow(0, start, size)
        new, _ = calculate_weight(weight_patches, view, None, strength, intermediate_dtype, errors)
        w = w.clone()
        w.narrow(0, start, size).copy_(new)
        out[path] = (w, b)
    return out


# --------------------------------------------------------------------------------------------- loading


def _get(sd: Mapping[str, Tensor], key: str, loaded: set[str]) -> Tensor | None:
    if key in sd:
        loaded.add(key)
        return sd[key]
    return None


def _need(sd: Mapping[str, Tensor], key: str, loaded: set[str]) -> Tensor:
    """A key ComfyUI indexes without checking: its absence is a ``KeyError`` out of ``load_lora``."""
    if key not in sd:
        raise ComfyCrash(f"load_lora: KeyError {key!r}")
    loaded.add(key)
    return sd[key]


def _load_lora(x: str, sd: Mapping[str, Tensor], loaded: set[str]) -> Patch | None:
    for up_name, down_name in LORA_NAME_PAIRS:
        if up_name.format(x) not in sd:
            continue
        t: dict[str, Tensor | None] = {
            "up": _need(sd, up_name.format(x), loaded),
            "down": _need(sd, down_name.format(x), loaded),
            "mid": _get(sd, f"{x}.lora_mid.weight", loaded) if up_name == LORA_NAME_PAIRS[0][0] else None,
            "reshape": _get(sd, f"{x}.reshape_weight", loaded),
        }
        return Patch("lora", "weight", t)
    return None


def _load_loha(x: str, sd: Mapping[str, Tensor], loaded: set[str]) -> Patch | None:
    if f"{x}.hada_w1_a" not in sd:
        return None
    t = {n: _need(sd, f"{x}.{n}", loaded) for n in LOHA_KEYS[:4]}
    tucker = f"{x}.hada_t1" in sd  # then hada_t2 must be there too
    t["hada_t1"] = _need(sd, f"{x}.hada_t1", loaded) if tucker else None
    t["hada_t2"] = _need(sd, f"{x}.hada_t2", loaded) if tucker else None
    return Patch("loha", "weight", t)


def _load_lokr(x: str, sd: Mapping[str, Tensor], loaded: set[str]) -> Patch | None:
    t = {n: _get(sd, f"{x}.{n}", loaded) for n in LOKR_KEYS}  # each present key counts as loaded
    return Patch("lokr", "weight", t) if any(t[n] is not None for n in LOKR_MARKERS) else None


def _load_glora(x: str, sd: Mapping[str, Tensor], loaded: set[str]) -> Patch | None:
    if f"{x}.a1.weight" not in sd:
        return None
    return Patch("glora", "weight", {n: _need(sd, f"{x}.{n}.weight", loaded) for n in GLORA_KEYS})


def _load_orthogonal(dims: int, kind: str) -> Callable[[str, Mapping[str, Tensor], set[str]], Patch | None]:
    def load(x: str, sd: Mapping[str, Tensor], loaded: set[str]) -> Patch | None:
        blocks = sd.get(f"{x}.oft_blocks")
        if blocks is None or blocks.dim() != dims:
            return None  # neither the blocks nor the rescale count as loaded
        t = {"blocks": _get(sd, f"{x}.oft_blocks", loaded), "rescale": _get(sd, f"{x}.rescale", loaded)}
        return Patch(kind, "weight", t)

    return load


#: ``weight_adapter.adapters``, in ComfyUI's order; each one is tried (no ``break``), the last that accepts wins
ADAPTER_LOADERS = (
    _load_lora,
    _load_loha,
    _load_lokr,
    _load_glora,
    _load_orthogonal(3, "oft"),
    _load_orthogonal(4, "boft"),
)


def load_patches(sd: Mapping[str, Tensor], key_map: Mapping[str, str]) -> tuple[dict[str, list[Patch]], list[str]]:
    """Reproduce ``comfy/lora.py::load_lora``.

    For every file module name ``x`` of ``key_map`` (→ a target name of the caller's choosing), read ``x.alpha``
    (``.item()``) and ``x.dora_scale``, try every adapter in ComfyUI's order (a later one that accepts
    replaces an earlier one; the keys each one read still count as loaded), then the diff-type patches
    ``w_norm`` (weight) with ``b_norm`` (bias, read only together with ``w_norm``), ``diff`` (weight), ``diff_b``
    (bias), ``set_weight`` (weight), each replacing an earlier patch of the same tensor. Returned per target:
    at most one weight patch and one bias patch, weight first. A missing partner key (``lora_down`` of a
    ``lora_up``, the rest of a LoHa or GLoRA, ``hada_t2``) raises :class:`ComfyCrash`.

    The second result lists the file keys never read, in file order: ComfyUI's ``lora key not loaded`` warnings
    (IA3 ``weight``/``on_input``, ``.scale``, a ``b_norm`` without ``w_norm``, modules missing from ``key_map``…).
    """
    loaded: set[str] = set()
    by_target: dict[str, dict[str, Patch]] = {}
    for x, target in key_map.items():
        alpha_t = _get(sd, f"{x}.alpha", loaded)
        try:
            alpha = None if alpha_t is None else float(alpha_t.item())
        except RuntimeError as exc:
            raise ComfyCrash(f"load_lora: {x}.alpha: {exc}") from exc
        dora_scale = _get(sd, f"{x}.dora_scale", loaded)
        slot = by_target.setdefault(target, {})
        for loader in ADAPTER_LOADERS:
            patch = loader(x, sd, loaded)
            if patch is not None:
                patch.alpha, patch.dora_scale = alpha, dora_scale
                slot["weight"] = patch
        w_norm = _get(sd, f"{x}.w_norm", loaded)
        if w_norm is not None:
            slot["weight"] = Patch("diff", "weight", {"diff": w_norm})
            b_norm = _get(sd, f"{x}.b_norm", loaded)
            if b_norm is not None:
                slot["bias"] = Patch("diff", "bias", {"diff": b_norm})
        for suffix, part, kind in (
            ("diff", "weight", "diff"),
            ("diff_b", "bias", "diff"),
            ("set_weight", "weight", "set"),
        ):
            v = _get(sd, f"{x}.{suffix}", loaded)
            if v is not None:
                slot[part] = Patch(kind, part, {"diff": v})
        if not slot:
            del by_target[target]
    patches = {t: [s[p] for p in ("weight", "bias") if p in s] for t, s in by_target.items()}
    return patches, [k for k in sd if k not in loaded]


# --------------------------------------------------------------------------------------------- maths


@contextmanager
def _caught(kind: str) -> Iterator[None]:
    """The part of an adapter ComfyUI runs inside ``try/except Exception``."""
    try:
        yield
    except (PatchFailed, ComfyCrash):
        raise
    except Exception as exc:  # ComfyUI catches every exception here
        raise PatchFailed(f"ERROR {kind}: {exc}") from exc


@contextmanager
def _uncaught(kind: str) -> Iterator[None]:
    """The part of an adapter ComfyUI runs before its ``try``: any error propagates."""
    try:
        yield
    except (PatchFailed, ComfyCrash):
        raise
    except Exception as exc:
        raise ComfyCrash(f"{kind}: {type(exc).__name__}: {exc}") from exc


def _f(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _scale(alpha: float | None, rank: int | None) -> float:
    """``sc = α/rank`` when ``.alpha`` is present (and the adapter has a rank), else 1."""
    return 1.0 if alpha is None or rank is None else alpha / rank


def _tucker4(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """Tucker rebuild of a 4-D core (ComfyUI's einsum takes exactly four core axes): t (a, c, k, l),
    wa (a, p), wb (c, q) → (p, q, k, l), left in the layout einsum returns (often not contiguous)."""
    if t.dim() != 4:
        raise ValueError(f"Tucker core has {t.dim()} dims; the einsum expects 4")
    return torch.einsum("ackl,cq,ap->pqkl", t, wb, wa)


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """``torch.mm``: both operands must be matrices (no flattening)."""
    return torch.mm(a, b)


def _inplace_mul(target: Tensor, factor: Tensor) -> Tensor:
    """``target *= factor``: the factor may broadcast into ``target`` but never grow it."""
    if torch.broadcast_shapes(target.shape, factor.shape) != target.shape:
        raise RuntimeError(f"output with shape {list(target.shape)} doesn't match the broadcast shape")
    return target * factor


def _into(w: Tensor, new: Tensor) -> Tensor:
    """``weight += …`` / ``weight[:] = …``: the result is written into the weight's own shape, so it may
    broadcast into it but never be larger (then the in-place op raises)."""
    if new.shape != w.shape:
        if torch.broadcast_shapes(w.shape, new.shape) != w.shape:
            raise RuntimeError(f"result of shape {list(new.shape)} cannot be written into {list(w.shape)}")
        new = torch.broadcast_to(new, w.shape).clone()
    return new


def _weight_decompose(dora_scale: Tensor, w: Tensor, delta: Tensor, sc: float, s: float) -> Tensor:
    """``weight_decompose``: ``W_c = W + sc·ΔW``, scaled by ``dora_scale / (‖·‖ + eps)`` broadcast as stored.

    The axis is the output one when ``dora_scale.shape[0] == out``; there ComfyUI divides by the row norms of
    the ORIGINAL weight (LyCORIS: of ``W_c``). Otherwise by the norms of ``W_c`` over every axis but 1. The
    strength interpolates: ``W + s·(W_d − W)``. ``sc`` is α/rank for LoRA-likes and the raw α (the
    constraint) for OFT/BOFT, whose ΔW already holds the strength.
    """
    eps = torch.finfo(w.dtype).eps
    d = dora_scale.to(w.dtype)
    wc = w + sc * delta
    if d.shape[0] == wc.shape[0]:
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
    else:
        norm = torch.linalg.vector_norm(wc, dim=[i for i in range(w.dim()) if i != 1], keepdim=True)
    wc = _inplace_mul(wc, d / (norm + eps))
    return _into(w, wc if s == 1.0 else w + s * (wc - w))


def _apply(p: Patch, w: Tensor, delta: Tensor, sc: float, s: float) -> Tensor:
    """The common end of LoRA/LoHa/LoKr/GLoRA: DoRA when ``dora_scale`` is present, else ``W + s·sc·ΔW``."""
    if p.dora_scale is not None:
        return _weight_decompose(p.dora_scale, w, delta, sc, s)
    return _into(w, w + (s * sc) * delta)


def _pad(w: Tensor, shape: Iterable[int]) -> Tensor:
    """``reshape_weight``: the weight zero-padded to a larger shape of the same rank."""
    shape = tuple(int(v) for v in shape)
    if len(shape) != w.dim() or any(n < o for n, o in zip(shape, w.shape, strict=True)):
        raise ValueError(f"cannot pad {tuple(w.shape)} to {shape}")
    out = w.new_zeros(shape)
    out[tuple(slice(0, n) for n in w.shape)] = w
    return out


def _lora(p: Patch, w: Tensor, s: float, dt: torch.dtype) -> Tensor:
    """LoRA/LoCon: ``ΔW = up·down`` (both flattened to matrices), ``sc = α/down.shape[0]``.

    A ``lora_mid`` (Tucker, 4-D core) is folded into ``down`` first, outside the ``try``:
    ``down'[j, i, κ] = Σ_a mid[j, a, κ]·down[a, i]`` (``down`` must be (r, in, 1, 1)).
    """
    up, down, mid = (_f(p.t[n], dt) for n in ("up", "down", "mid"))
    with _uncaught("lora"):
        if p.t["reshape"] is not None:
            w = _pad(w, p.t["reshape"].tolist())
        sc = _scale(p.alpha, down.shape[0])
        if mid is not None:
            if mid.dim() != 4 or down.dim() < 2 or down[0, 0].numel() != 1:
                raise ValueError(f"lora_mid {tuple(mid.shape)} does not fit lora_down {tuple(down.shape)}")
            down = torch.einsum("jakl,ai->jikl", mid, down.flatten(1))
    with _caught("lora"):
        delta = _mm(up.flatten(1), down.flatten(1)).reshape(w.shape)
        return _apply(p, w, delta, sc, s)


def _loha(p: Patch, w: Tensor, s: float, dt: torch.dtype) -> Tensor:
    """LoHa: ``ΔW = (w1a·w1b) ⊙ (w2a·w2b)`` or the Tucker rebuilds of both; ``sc = α/w1b.shape[0]``."""
    t = {k: _f(v, dt) for k, v in p.t.items()}
    with _uncaught("loha"):
        sc = _scale(p.alpha, t["hada_w1_b"].shape[0])
        if t["hada_t1"] is not None:
            m1 = _tucker4(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            m2 = _tucker4(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            m1 = _mm(t["hada_w1_a"], t["hada_w1_b"])
            m2 = _mm(t["hada_w2_a"], t["hada_w2_b"])
    with _caught("loha"):
        return _apply(p, w, (m1 * m2).reshape(w.shape), sc, s)


def _lokr(p: Patch, w: Tensor, s: float, dt: torch.dtype) -> Tensor:
    """LoKr: ``ΔW = kron(w1, w2)`` reshaped to W; ``sc = α/rank`` of the factored side (``w2_b`` wins over
    ``w1_b``), 1 when both sides are full.

    ``w1``/``w2`` are built outside the ``try`` (``torch.mm`` needs a 2-D ``w2_b``); a 4-D ``w2`` (full, or
    the Tucker rebuild) makes ``w1`` (u1, v1, 1, 1). The Tucker rebuild is one einsum whose result is not
    contiguous, and ``torch.kron`` then raises for most shapes — caught: the weight stays unpatched.
    """
    t = {k: _f(v, dt) for k, v in p.t.items()}
    rank = None
    with _uncaught("lokr"):
        w1 = t["lokr_w1"]
        if w1 is None:
            rank = t["lokr_w1_b"].shape[0]
            w1 = _mm(t["lokr_w1_a"], t["lokr_w1_b"])
        w2 = t["lokr_w2"]
        if w2 is None:
            rank = t["lokr_w2_b"].shape[0]
            if t["lokr_t2"] is None:
                w2 = _mm(t["lokr_w2_a"], t["lokr_w2_b"])
            else:
                w2 = _tucker4(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        sc = _scale(p.alpha, rank)
    with _caught("lokr"):
        return _apply(p, w, torch.kron(w1, w2).reshape(w.shape), sc, s)


def glora_layout(a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor, weight_shape: tuple[int, ...]) -> tuple[str, int]:
    """ComfyUI's GLoRA layout rule on the stored (unflattened) shapes → ``(layout, rank)``.

    Old (a1 (r, in), a2 (in, r), b1 (r, ·), b2 (out, r)) when ``b2[1] == b1[0] == a1[0] == a2[1]``; new
    (a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, ·)) when ``b2[0] == b1[1] == a1[1] == a2[0]``. When both
    match, new wins unless ``a2[0] == out`` and the weight's first two axes are equal — so new-layout files
    with r == in == out are read as old. When neither matches the rank is undefined: ``"none"``.
    """
    old = b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]
    new = b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]
    if new and not (old and a2.shape[0] == weight_shape[0] and weight_shape[0] == weight_shape[1]):
        return "new", a2.shape[0]
    if old:
        return "old", a1.shape[0]
    return "none", 0


def _glora(p: Patch, w: Tensor, s: float, dt: torch.dtype) -> Tensor:
    """GLoRA. New layout: ``ΔW = W·(a1·a2)`` on the input axis ``+ b1·b2``; old: ``ΔW = flat(W)·a2·a1 + b2·b1``
    — ``flat(W)`` (out, in·∏k), so the old layout fails (caught) on k×k convs. ``sc = α/rank``."""
    with _uncaught("glora"):
        layout, rank = glora_layout(*(p.t[n] for n in GLORA_KEYS), tuple(w.shape))
        if layout == "none" and p.alpha is not None:
            raise NameError("GLoRA rank undefined: the factors fit neither layout")
        sc = _scale(p.alpha, rank or None)
        a1, a2, b1, b2 = (p.t[n].to(dt).flatten(1) for n in GLORA_KEYS)
    with _caught("glora"):
        if layout == "old":
            delta = (_mm(b2, b1) + _mm(_mm(w.flatten(1), a2), a1)).reshape(w.shape)
        else:
            mixed = torch.einsum("oi...,ir,rj->oj...", w, a1, a2) if w.dim() > 2 else _mm(_mm(w, a1), a2)
            delta = mixed.reshape(w.shape) + _mm(b1, b2).reshape(w.shape)
        return _apply(p, w, delta, sc, s)


def _cayley_blocks(blocks: Tensor, alpha: float) -> Tensor:
    """``Q = B − Bᵀ`` (last two axes); with α > 0 and ``ν = ‖Q‖_F + 1e-8`` over the whole tensor (every block
    of every stage), ``Q ← Q·α/ν`` when ``ν > α``; ``R = (I + Q)(I − Q)⁻¹``."""
    q = blocks - blocks.transpose(-1, -2)
    if alpha > 0:
        nu = q.norm() + 1e-8
        if nu > alpha:
            q = q * (alpha / nu)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _oft(p: Patch, w: Tensor, s: float, dt: torch.dtype) -> Tensor:
    """OFT: ``W + s·ΔW`` with ``ΔW_k = (s·R_k − s·I)ᵀ·W_k`` on blocks of output rows (strength twice);
    α missing reads as 0 (no clamp); ``rescale`` is loaded and ignored.

    The rows are regrouped with ``view`` (n·b must equal out, else caught) and the einsum result is
    ``view``-ed back (caught when not viewable). DoRA: ``weight_decompose`` with sc = α.
    """
    alpha = 0.0 if p.alpha is None else p.alpha
    blocks = p.t["blocks"].to(dt)
    n, b = blocks.shape[0], blocks.shape[1]
    with _caught("oft"):
        r = _cayley_blocks(blocks, alpha)
        eye = torch.eye(b, dtype=dt)
        rows = w.view(n, b, *w.shape[1:])
        delta = torch.einsum("knm,kn...->km...", s * r - s * eye, rows).view(-1, *w.shape[1:])
        if p.dora_scale is not None:
            return _weight_decompose(p.dora_scale, w, delta, alpha, s)
        return _into(w, w + s * delta)


def _boft(p: Patch, w: Tensor, s: float, dt: torch.dtype) -> Tensor:
    """BOFT: stage i (``h = 2^i·⌊b/2⌋``): rows viewed as (·, 2, h), the last two axes swapped, blocks of b rows
    multiplied on the left by ``R_i ← s·R_i + (1−s)·I``, permutation undone; then ``⊙ rescale`` as stored;
    ``W + s·(out − W)``.

    α is compared with 0 without a default: a file without ``alpha`` fails (caught, unpatched). DoRA:
    ``weight_decompose`` with sc = α and ΔW = out − W.
    """
    blocks = p.t["blocks"].to(dt)
    stages, b = blocks.shape[0], blocks.shape[2]
    with _caught("boft"):
        if p.alpha is None:
            raise TypeError("'>' not supported between instances of 'NoneType' and 'int'")
        r = _cayley_blocks(blocks, p.alpha)
        eye = torch.eye(b, dtype=dt)
        out = w
        for i in range(stages):
            h = 2**i * (b // 2)
            ri = r[i] if s == 1 else s * r[i] + (1 - s) * eye
            x = out.unflatten(0, (-1, 2, h)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
            x = torch.einsum("bij,bj...->bi...", ri, x)
            out = x.flatten(0, 1).unflatten(0, (-1, h, 2)).transpose(1, 2).flatten(0, 2)
        if p.t["rescale"] is not None:
            out = out * p.t["rescale"].to(dt)
        delta = out - w
        if p.dora_scale is not None:
            return _weight_decompose(p.dora_scale, w, delta, p.alpha, s)
        return _into(w, w + s * delta)


ADAPTERS: dict[str, Callable[[Patch, Tensor, float, torch.dtype], Tensor]] = {
    "lora": _lora,
    "loha": _loha,
    "lokr": _lokr,
    "glora": _glora,
    "oft": _oft,
    "boft": _boft,
}


def calculate_weight(
    patches: list[Patch],
    weight: Tensor,
    bias: Tensor | None = None,
    strength: float = 1.0,
    intermediate_dtype: torch.dtype = torch.float32,
    errors: list[str] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Reproduce ``comfy/lora.py::calculate_weight`` for one module at LoRA strength ``strength``.

    Weight patches change ``weight``, bias patches change ``bias`` (dropped when the module has no bias: ComfyUI
    patches only tensors the model has). ``diff``: ``W += s·diff``, skipped on a shape mismatch; ``set``:
    ``W ← set_weight`` broadcast (an unbroadcastable one raises :class:`ComfyCrash`); adapters per their
    functions above. Returns new tensors in the input dtypes. An adapter whose guarded part raises, or a
    mismatched diff, leaves the tensor unchanged and appends its message to ``errors`` (ComfyUI logs it);
    :class:`ComfyCrash` propagates.
    """
    dt = intermediate_dtype
    w = weight.to(dt).clone()
    b = None if bias is None else bias.to(dt).clone()
    s = float(strength)

    def failed(message: str) -> None:
        if errors is not None:
            errors.append(message)

    for p in patches:
        if p.part == "bias":
            if b is None:
                continue
            v = p.t["diff"].to(dt)
            if v.shape != b.shape:
                failed(f"SHAPE MISMATCH bias {tuple(v.shape)} != {tuple(b.shape)}: not merged")
            elif s != 0.0:
                b = b + s * v
            continue
        if p.kind == "diff":
            v = p.t["diff"].to(dt)
            if v.shape != w.shape:
                failed(f"SHAPE MISMATCH weight {tuple(v.shape)} != {tuple(w.shape)}: not merged")
            elif s != 0.0:
                w = w + s * v
        elif p.kind == "set":
            try:
                w = torch.broadcast_to(p.t["diff"].to(dt), w.shape).clone()
            except RuntimeError as exc:
                raise ComfyCrash(f"set_weight: {exc}") from exc
        else:
            try:
                w = ADAPTERS[p.kind](p, w, s, dt)
            except PatchFailed as exc:
                failed(str(exc))
    return w.to(weight.dtype), None if b is None else b.to(bias.dtype)
