"""Reference re-implementation of how AUTOMATIC1111's built-in Lora extension loads and merges LyCORIS files.

Checked against the real code, read (not copied) at AUTOMATIC1111/stable-diffusion-webui ``master``, commit
82a973c04367123ae98bd9abdf80d9eda9b910e2 (v1.10.1, committed 2024-07-27; read 2026-12-07): the files
``extensions-builtin/Lora/networks.py``, ``network.py``, ``network_lora.py``, ``network_hada.py``,
``network_ia3.py``, ``network_lokr.py``, ``network_full.py``, ``network_norm.py``, ``network_glora.py``,
``network_oft.py``, ``lyco_helpers.py``, ``lora_patches.py`` and ``extra_networks_lora.py``. (There is no
``lora_convert.py`` in that tree: the name conversion lives in ``networks.py``; the ``dev`` branch was not
available to read.) Everything below is our own
code; where A1111's result depends on the order of tensor operations (broadcasting, reshapes), the same
operations are run in the same order so that the same inputs succeed or fail.

What it reproduces:

* names (:func:`convert_name`, :func:`resolve_name`): the regex conversion of ``networks.py``
  (``convert_diffusers_name_to_compvis``) and, when the converted name is not a module of the model, the
  fallbacks: ``<name>_{q,k,v}_proj`` → the OpenCLIP ``nn.MultiheadAttention`` ``<name>``, ``lora_unet`` →
  ``diffusion_model``, ``lora_te1_text_model`` → ``0_transformer_text_model`` then ``transformer_text_model``,
  ``oft_unet`` → ``diffusion_model``. Unmatched keys are ignored (a debug log line).
* loading (``load_network``): per module the first module type that accepts the keys (lora, hada, ia3, lokr,
  full, norm, glora, oft). Any exception while loading aborts the WHOLE file (``load_networks`` shows the
  error and skips the network): no module type accepts a key set, an ``ia3`` module without ``on_input``, a
  LoRA on a layer that is not Linear/Conv2d/MultiheadAttention (a norm), OFT on a norm layer, a LoRA
  factor that cannot be reshaped to the layer's conv kernel (:class:`FileNotLoaded`).
* merging (``network_apply_weights`` + each module's ``calc_updown`` + ``NetworkModule.finalize_updown``):
  a ``RuntimeError`` while a layer is patched is caught, logged (``logging.debug``) and counted in
  ``extra_network_lora.errors`` (the infotext says "Networks with errors: name (count)"); the layer keeps
  whatever was written before the error. Any other exception propagates and fails the generation
  (:class:`GenerationFailed`).
* OpenCLIP attention (SD2's text encoder, SDXL's second one): the four ``…_attn_{q,k,v,out}_proj`` modules are
  applied to ``in_proj_weight``/``out_proj`` only when all four are present (else silently ignored); q/k/v get
  the chunks of ``in_proj_weight``; **the ex-bias (``diff_b``, ``b_norm``) of q/k/v is dropped** (``in_proj_bias``
  is never touched), the one of ``out`` is added to ``out_proj.bias``. in_proj is patched before out_proj: an
  error in out leaves q/k/v patched.
* scale: ``.scale`` key, else ``α/dim`` where the type sets ``dim`` (LoRA, LoHa, LoKr with a decomposed side),
  else 1; OFT always 1 (it ignores ``.scale`` and ``alpha`` as a scale). ``lora_A``/``lora_B`` modules keep only
  those two tensors: their ``alpha``, ``scale``, ``dora_scale`` and ``lora_mid`` are dropped (scale 1).
  ``ΔW = m·(scale·updown)`` (DoRA: ``m·(d·Wc/‖Wc‖_col − W)`` on the input axis, no eps; an output-axis
  ``dora_scale`` broadcasts to a wrong result); the ex-bias is ``m·ex_bias``, a missing bias is created.
* IA3: the vector is used as stored for ``on_input`` and reshaped to ``(-1, 1)`` otherwise, then multiplied
  into the weight. On a Linear both work; on a Conv2d ``on_input=0`` broadcasts against the kernel axes —
  a 3×3 conv raises (kernel 3 vs channels), a 1×1 conv gives an (out, in, out, 1) ΔW whose copy into the
  weight raises — so every such layer is logged and left unpatched (a kernel equal to the channel count
  would give a silently wrong weight); ``on_input=1`` with a ``(1, C, 1, 1)`` vector is right, with a
  ``(C,)`` vector it fails the same way.
* OFT: accepted with ``oft_blocks`` alone (``alpha`` only sets the constraint ``α·out``; ``alpha`` absent or 0 →
  no constraint), ``rescale`` applied, BOFT (4-D ``oft_blocks``) supported with the butterfly permutation
  and ``R`` on the left; old LyCORIS ``oft_diag`` used as R. GLoRA: ``ΔW = b2·b1 + W·a2·a1`` with the tensors
  as stored (no flattening), so only the old layout on Linear layers computes; the new layout and convs
  raise per layer (logged, left unpatched) — or, for square shapes, compute something else silently.

Not reproduced: dtypes. A1111 computes LoRA in its model dtype and the other types in the file's dtype,
inverts OFT blocks in float32, and under ``torch.autocast`` (its default on CUDA); here everything runs in
``dtype`` (OFT's inverse in ``dtype`` or float32, whichever is wider). Without autocast a float16 model
with float32 OFT rotations would raise in the einsum (logged, skipped). Also not reproduced: ``dyn_dim``,
the fp8 weight path, the functional (``lora_functional``) mode and the separate TE/UNet multipliers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MODULE_TYPES",
    "FileNotLoaded",
    "GenerationFailed",
    "convert_name",
    "load_and_merge",
    "resolve_name",
]

MODULE_TYPES = ("lora", "hada", "ia3", "lokr", "full", "norm", "glora", "oft")
TITLES = {
    "lora": "LoRA",
    "hada": "LoHa",
    "ia3": "IA3",
    "lokr": "LoKr",
    "full": "full",
    "norm": "norm",
    "glora": "GLoRA",
    "oft": "OFT",
}


class FileNotLoaded(Exception):
    """``load_network`` raised: A1111 shows the error and does not load the file at all."""


class GenerationFailed(Exception):
    """A non-``RuntimeError`` while patching a layer: A1111 does not catch it and the generation fails."""


# --------------------------------------------------------------------------------------------- names

_RESNET_SUFFIX = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")
_MHA_PIECE = re.compile(r"((?:1_)?model_transformer_resblocks_\d+_attn)_(q|k|v|out)_proj")


def _groups(m: re.Match[str]) -> list[int | str]:
    """A1111 turns every group that starts with a digit into an int (``int('0_x')`` raises ValueError)."""
    return [int(g) if g[:1].isdigit() else g for g in m.groups()]


def _openclip(rest: str) -> str:
    for old, new in (("mlp_fc1", "mlp_c_fc"), ("mlp_fc2", "mlp_c_proj")):
        if old in rest:
            return rest.replace(old, new)
    return rest.replace("self_attn", "attn")


def _block_child(kind: str, suffix: str) -> str:
    """``<sub-index>_<suffix>`` inside an input/output block: attention at 1, resnet at 0 (renamed children)."""
    if kind == "attentions":
        return f"1_{suffix}"
    return f"0_{_RESNET_SUFFIX.get(suffix, suffix)}"


def _regex_name(name: str, is_sd2: bool) -> str:
    """The regex conversion (diffusers/kohya → compvis); a name no rule matches is returned unchanged.

    Rules are tried in A1111's order with ``re.match`` (anchored at the start only). The SD1 UNet layout (three
    input blocks per level, attention at sub-index 1) is used for every model.
    """

    def rule(pattern: str) -> list[int | str] | None:
        m = re.match(pattern, name)
        return None if m is None else _groups(m)

    if (g := rule(r"lora_unet_conv_in(.*)")) is not None:
        return f"diffusion_model_input_blocks_0_0{g[0]}"
    if (g := rule(r"lora_unet_conv_out(.*)")) is not None:
        return f"diffusion_model_out_2{g[0]}"
    if (g := rule(r"lora_unet_time_embedding_linear_(\d+)(.*)")) is not None:
        return f"diffusion_model_time_embed_{g[0] * 2 - 2}{g[1]}"
    if (g := rule(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        return f"diffusion_model_input_blocks_{1 + g[0] * 3 + g[2]}_{_block_child(g[1], g[3])}"
    if (g := rule(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")) is not None:
        index = 1 if g[0] == "attentions" else g[1] * 2
        return f"diffusion_model_middle_block_{index}_{_block_child(g[0], g[2]).partition('_')[2]}"
    if (g := rule(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        return f"diffusion_model_output_blocks_{g[0] * 3 + g[2]}_{_block_child(g[1], g[3])}"
    if (g := rule(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")) is not None:
        return f"diffusion_model_input_blocks_{3 + g[0] * 3}_0_op"
    if (g := rule(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")) is not None:
        return f"diffusion_model_output_blocks_{2 + g[0] * 3}_{2 if g[0] > 0 else 1}_conv"
    if (g := rule(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        if is_sd2:
            return f"model_transformer_resblocks_{g[0]}_{_openclip(g[1])}"
        return f"transformer_text_model_encoder_layers_{g[0]}_{g[1]}"
    if (g := rule(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        return f"1_model_transformer_resblocks_{g[0]}_{_openclip(g[1])}"
    return name


def _check_model(model: str) -> None:
    if model not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"model must be sd1, sd2 or sdxl, not {model!r}")


def _fallbacks(name: str) -> list[str]:
    """The names A1111 tries after the converted one (an ``if``/``elif`` chain on the ORIGINAL name)."""
    if "lora_unet" in name:
        return [name.replace("lora_unet", "diffusion_model")]
    if "lora_te1_text_model" in name:
        return [name.replace("lora_te1_text_model", p) for p in ("0_transformer_text_model", "transformer_text_model")]
    if "oft_unet" in name:
        return [name.replace("oft_unet", "diffusion_model")]
    return []


def convert_name(module_name: str, model: str) -> str:
    """The compvis name A1111 finds for ``module_name`` on a standard ``model`` (``sd1``, ``sd2``, ``sdxl``).

    The regex conversion when a rule matches (SD1/SD2 diffusers UNet names, ``lora_te_``/``lora_te2_`` encoder
    layers), otherwise the fallback that exists on such a model (``lora_unet_``/``oft_unet_`` →
    ``diffusion_model_``, ``lora_te1_text_model`` → ``0_transformer_text_model`` on SDXL, else
    ``transformer_text_model``). Without the model's module list this cannot tell whether a converted name
    exists; :func:`resolve_name` does the real look-up chain.
    """
    _check_model(model)
    converted = _regex_name(module_name, model == "sd2")
    if converted != module_name:
        return converted
    tries = _fallbacks(module_name)
    if len(tries) == 2:  # lora_te1_text_model: SDXL's first encoder, else a transformers CLIP
        return tries[0] if model == "sdxl" else tries[1]
    return tries[0] if tries else module_name


def resolve_name(module_name: str, model: str, known: Collection[str]) -> tuple[str, bool]:
    """A1111's look-up of a file module among the model's modules ``known``: ``(key, found)``.

    ``known`` are compvis names; an OpenCLIP attention piece ``…_attn_{q,k,v}_proj`` is found when it is in
    ``known`` (A1111 finds the MultiheadAttention ``…_attn`` through its ``_[qkv]_proj`` rule and keeps the key).
    The converted name is tried first, then the fallbacks of the original name; when nothing is found the key
    is the last name tried (the one A1111 logs). Raises ``ValueError`` for a group that starts with a digit
    but is not a number (see :func:`_groups`), which aborts the file.
    """
    _check_model(model)
    tried = [_regex_name(module_name, model == "sd2"), *_fallbacks(module_name)]
    for key in tried:
        if key in known:
            return key, True
    return tried[-1], False


# --------------------------------------------------------------------------------------------- modules


def _accepts(kind: str, w: Mapping[str, Tensor]) -> bool:
    """Which key sets each module type's ``create_module`` takes."""
    if kind == "lora":
        return {"lora_up.weight", "lora_down.weight"} <= w.keys() or {"lora_A.weight", "lora_B.weight"} <= w.keys()
    if kind == "hada":
        return {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= w.keys()
    if kind == "ia3":
        return "weight" in w  # on_input is read afterwards: without it the file fails to load
    if kind == "lokr":
        one = "lokr_w1" in w or {"lokr_w1_a", "lokr_w1_b"} <= w.keys()
        two = "lokr_w2" in w or {"lokr_w2_a", "lokr_w2_b"} <= w.keys()
        return one and two
    if kind == "full":
        return "diff" in w
    if kind == "norm":
        return {"w_norm", "b_norm"} <= w.keys()
    if kind == "glora":
        return {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"} <= w.keys()
    if kind == "oft":
        return "oft_blocks" in w or "oft_diag" in w
    raise AssertionError(kind)


@dataclass
class _Module:
    """One loaded module: what A1111's ``NetworkModule`` subclass holds after ``__init__``."""

    name: str  # file module name
    kind: str
    w: dict[str, Tensor]
    layer: str  # "linear", "conv", "mha" (q/k/v of an OpenCLIP attention) or "other" (norms)
    layer_shape: tuple[int, ...]
    dim: int | None = None
    alpha: float | None = None
    scale: float | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def title(self) -> str:
        if self.kind == "oft" and self.extra.get("boft"):
            return "BOFT"
        return TITLES[self.kind]

    def calc_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0


def _lora_factor(key: str, t: Tensor, m: _Module) -> Tensor:
    """The LoRA factor as A1111 copies it into a Linear/Conv2d (raises for other layers and bad kernels)."""
    if m.layer in ("linear", "mha"):
        return t.reshape(t.shape[0], -1)
    if m.layer != "conv":
        raise AssertionError(f"LoRA layer {m.name} matched a layer with unsupported type ({m.layer})")
    kernel = m.layer_shape[2:]
    if key == "lora_down.weight":
        if t.dim() == 2:
            t = t.reshape(t.shape[0], -1, 1, 1)
        k = tuple(kernel) if (t.shape[2] != 1 or t.shape[3] != 1) else (1, 1)
    elif key == "lora_mid.weight":
        k = tuple(kernel)
    else:
        k = (1, 1)
    target = (t.shape[0], t.shape[1], *k)
    return t if tuple(t.shape) == target else t.reshape(target)


def _create(name: str, kind: str, w: dict[str, Tensor], layer: str, shape: tuple[int, ...]) -> _Module:
    """The module type's ``__init__`` (plus ``NetworkModule.__init__``); any exception aborts the file."""
    if kind == "lora" and not {"lora_up.weight", "lora_down.weight"} <= w.keys():
        w = {"lora_up.weight": w["lora_B.weight"], "lora_down.weight": w["lora_A.weight"]}  # the rest is dropped
    m = _Module(name, kind, w, layer, shape)
    m.alpha = float(w["alpha"].item()) if "alpha" in w else None
    m.scale = float(w["scale"].item()) if "scale" in w else None
    if kind == "lora":
        for key in ("lora_up.weight", "lora_down.weight", "lora_mid.weight"):
            if key in w:
                m.extra[key] = _lora_factor(key, w[key], m)
        m.dim = w["lora_down.weight"].shape[0]
    elif kind == "hada":
        m.dim = w["hada_w1_b"].shape[0]
    elif kind == "ia3":
        m.extra["on_input"] = bool(w["on_input"].item())  # KeyError without on_input
    elif kind == "lokr":
        if "lokr_w1_b" in w:
            m.dim = w["lokr_w1_b"].shape[0]
        if "lokr_w2_b" in w:
            m.dim = w["lokr_w2_b"].shape[0]
    elif kind == "oft":
        _create_oft(m)
    return m


def _create_oft(m: _Module) -> None:
    w = m.w
    m.scale = 1.0  # OFT pins its scale: neither `.scale` nor alpha/dim applies
    if "oft_blocks" in w:
        blocks, is_r = w["oft_blocks"], False
        alpha = w.get("alpha")
        m.dim = blocks.shape[0]
    else:
        blocks, is_r, alpha = w["oft_diag"], True, None
        m.dim = blocks.shape[1]
    if m.layer == "other":
        raise AttributeError(f"OFT on {m.name}: a norm layer has no out_features/out_channels")
    out = m.layer_shape[0]
    boft = blocks.dim() == 4
    rescale = w.get("rescale")
    if rescale is not None and m.layer != "mha":
        rescale = rescale.reshape(-1, *[1] * (len(m.layer_shape) - 1))
    num_blocks, block_size = m.dim, out // m.dim
    constraint: Tensor | int = 0 if alpha is None else alpha * out
    if is_r:
        constraint, block_size, num_blocks = None, m.dim, out // m.dim
    elif boft:
        num_blocks, block_size = blocks.shape[1], blocks.shape[2]
    m.extra.update(
        blocks=blocks,
        is_r=is_r,
        boft=boft,
        boft_sized=boft and not is_r,  # a 4-D oft_diag gets no butterfly size: A1111's BOFT branch then raises
        rescale=rescale,
        num_blocks=num_blocks,
        block_size=block_size,
        constraint=constraint,
    )


# --------------------------------------------------------------------------------------------- maths


def _cp(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """LyCORIS Tucker rebuild, t (r,r,*k), wa (r,out), wb (r,in) → (out,in,*k): in over t's dim 1, out over 0."""
    inner = torch.einsum("abkl,bq->aqkl", t, wb)
    return torch.einsum("aqkl,ap->pqkl", inner, wa)


def _matmul_to(up: Tensor, down: Tensor, shape: list[int]) -> Tensor:
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


def _calc_updown(m: _Module, weight: Tensor, multiplier: float) -> tuple[Tensor, Tensor | None]:
    """``calc_updown`` of the module type, then ``finalize_updown``: (ΔW to add, ex-bias to add)."""
    w = m.w
    ex_bias = None
    if m.kind == "lora":
        up, down, mid = (m.extra.get(k) for k in ("lora_up.weight", "lora_down.weight", "lora_mid.weight"))
        shape = [up.shape[0], down.shape[1]]
        if mid is not None:
            updown = torch.einsum("nmkl,in,mj->ijkl", mid, up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1))
            shape += list(mid.shape[2:])
        else:
            if down.dim() == 4:
                shape += list(down.shape[2:])
            updown = _matmul_to(up, down, shape)
    elif m.kind == "hada":
        w1a, w1b, w2a, w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
        shape = [w1a.shape[0], w1b.shape[1]]
        if "hada_t1" in w:
            shape = [w1a.shape[1], w1b.shape[1], *w["hada_t1"].shape[2:]]
            first = _cp(w["hada_t1"], w1a, w1b)
        else:
            if w1b.dim() == 4:
                shape += list(w1b.shape[2:])
            first = _matmul_to(w1a, w1b, shape)
        second = _cp(w["hada_t2"], w2a, w2b) if "hada_t2" in w else _matmul_to(w2a, w2b, shape)
        updown = first * second
    elif m.kind == "ia3":
        vec = w["weight"]
        shape = [vec.shape[0], weight.shape[1]]
        if m.extra["on_input"]:
            shape.reverse()
        else:
            vec = vec.reshape(-1, 1)
        updown = weight * vec  # broadcasting against the kernel axes of a conv: see the module docstring
    elif m.kind == "lokr":
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        elif "lokr_t2" not in w:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
        else:
            w2 = _cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
        shape = [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
        if weight.dim() == 4:
            shape = list(weight.shape)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        updown = torch.kron(w1, w2.contiguous()).reshape(shape)
    elif m.kind in ("full", "norm"):
        delta, bias = ("diff", "diff_b") if m.kind == "full" else ("w_norm", "b_norm")
        updown, ex_bias = w[delta], w.get(bias)
        shape = list(updown.shape)
    elif m.kind == "glora":
        a1, a2, b1, b2 = (w[f"{k}.weight"] for k in ("a1", "a2", "b1", "b2"))
        shape = [a1.shape[0], b1.shape[1]]
        updown = (b2 @ b1) + ((weight.to(a1.dtype) @ a2) @ a1)  # as stored: no flattening
    elif m.kind == "oft":
        updown = _oft_updown(m, weight)
        shape = list(weight.shape)
    else:
        raise AssertionError(m.kind)
    return _finalize(m, updown, weight, shape, ex_bias, multiplier)


def _oft_updown(m: _Module, weight: Tensor) -> Tensor:
    x = m.extra
    blocks: Tensor = x["blocks"]
    wide = torch.promote_types(blocks.dtype, torch.float32)
    eye = torch.eye(x["block_size"], dtype=wide)
    if x["is_r"]:
        rot = blocks
    else:
        q = blocks - blocks.transpose(-1, -2)
        constraint = x["constraint"]
        if constraint != 0:  # alpha absent (int 0) or 0: no clamp
            norm = torch.norm(q.flatten())
            q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
        rot = torch.matmul(eye + q, (eye - q).to(wide).inverse())
    out, rest = weight.shape[0], weight.shape[1:]
    if not x["boft"]:
        k, n = x["num_blocks"], x["block_size"]
        if out != k * n:
            raise RuntimeError(f"einops: {out} rows are not {k} blocks of {n}")
        rows = torch.einsum("knm,kn...->km...", rot, weight.reshape(k, n, *rest))
        merged = rows.reshape(-1, *rows.shape[2:])
    else:
        if not x["boft_sized"]:
            raise AttributeError("4-D oft_diag: no BOFT block size is set (AttributeError in A1111)")
        b = x["block_size"]
        merged = weight
        for i in range(rot.shape[0]):
            stage = rot[i]
            if i == 0:
                stage = stage * 1.0 + 0.0 * eye
            h = 2**i * (b // 2)
            if h == 0 or out % (2 * h) or out % b:
                raise RuntimeError(f"einops: {out} rows do not split for BOFT stage {i} (b={b})")
            merged = merged.reshape(out // (2 * h), 2, h, *rest).transpose(1, 2).reshape(out, *rest)
            merged = torch.einsum("bij,bj...->bi...", stage, merged.reshape(out // b, b, *rest)).reshape(out, *rest)
            merged = merged.reshape(out // (2 * h), h, 2, *rest).transpose(1, 2).reshape(out, *rest)
    if x["rescale"] is not None:
        merged = x["rescale"].to(merged) * merged
    return merged - weight.to(merged.dtype)


def _finalize(
    m: _Module, updown: Tensor, weight: Tensor, shape: list[int], ex_bias: Tensor | None, multiplier: float
) -> tuple[Tensor, Tensor | None]:
    """``finalize_updown``: a ``bias`` key is added to ΔW, reshapes, scale, DoRA, multiplier."""
    if "bias" in m.w:
        updown = updown.reshape(m.w["bias"].shape).clone()
        updown += m.w["bias"].to(updown.dtype)
        updown = updown.reshape(shape)
    if len(shape) == 4:
        updown = updown.reshape(shape)
    if weight.numel() == updown.numel():
        updown = updown.reshape(weight.shape)
    if ex_bias is not None:
        ex_bias = ex_bias * multiplier
    updown = updown * m.calc_scale()
    if "dora_scale" in m.w:
        updown = _dora(m, updown, weight)
    return updown * multiplier, ex_bias


def _dora(m: _Module, updown: Tensor, weight: Tensor) -> Tensor:
    """``apply_weight_decompose``: ``Wc·(d/‖Wc‖_col) − W``, the norm over every dim but 1, no eps."""
    w0 = weight.to(updown.dtype)
    scale = m.w["dora_scale"].to(updown.dtype)
    wc = updown + w0
    cols = wc.shape[1]
    norm = wc.transpose(0, 1).reshape(cols, -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(cols, *[1] * (len(m.layer_shape) - 1)).transpose(0, 1)
    return wc * (scale / norm) - w0


# --------------------------------------------------------------------------------------------- loading


def _layer_kind(name: str, weight: Tensor, model: str) -> str:
    piece = _MHA_PIECE.fullmatch(name)
    if piece and piece[2] != "out" and model in ("sd2", "sdxl"):
        return "mha"
    if weight.dim() == 2:
        return "linear"
    return "conv" if weight.dim() > 2 else "other"  # 1-D: GroupNorm/LayerNorm


def _load(
    sd: Mapping[str, Tensor], weights: Mapping[str, tuple[Tensor, Tensor | None]], model: str, dtype: torch.dtype
) -> tuple[dict[str, _Module], dict[str, str]]:
    """``load_network``: the modules by compvis key, and the file modules it ignores (with the reason).

    Raises :class:`FileNotLoaded` for any exception A1111 would raise while loading.
    """
    parts: dict[str, dict[str, Tensor]] = {}
    names: dict[str, str] = {}
    ignored: dict[str, str] = {}
    try:
        for key, value in sd.items():
            module, _, part = key.partition(".")
            if module == "bundle_emb":
                if "." not in part:
                    raise ValueError(f"bundled embedding key {key!r} is not bundle_emb.<name>.<vector>")
                ignored[module] = "bundled embedding (loaded as a textual inversion, not merged)"
                continue
            compvis, found = resolve_name(module, model, weights)
            if not found:
                ignored[module] = f"no model module {compvis!r} (key ignored)"
                continue
            names.setdefault(compvis, module)
            parts.setdefault(compvis, {})[part] = value
        modules: dict[str, _Module] = {}
        for compvis, raw in parts.items():
            w = {k: v if k == "on_input" else v.to(dtype) for k, v in raw.items()}
            kind = next((k for k in MODULE_TYPES if _accepts(k, w)), None)
            if kind is None:
                raise AssertionError(f"{names[compvis]}: no module type accepts the keys {sorted(w)}")
            weight = weights[compvis][0]
            layer = _layer_kind(compvis, weight, model)
            modules[compvis] = _create(names[compvis], kind, w, layer, tuple(weight.shape))
    except Exception as exc:
        raise FileNotLoaded(f"{type(exc).__name__}: {exc}") from exc
    return modules, ignored


def _attempt(fn: Callable[[], object]) -> tuple[object, RuntimeError | None]:
    """One patching step as A1111 guards it: ``(result, None)`` or ``(None, the RuntimeError)``; any other
    exception escapes ``network_apply_weights`` and fails the generation."""
    try:
        return fn(), None
    except RuntimeError as exc:
        return None, exc
    except Exception as exc:
        raise GenerationFailed(f"{type(exc).__name__}: {exc}") from exc


def load_and_merge(
    sd: Mapping[str, Tensor],
    weights: Mapping[str, tuple[Tensor, Tensor | None]],
    model: str,
    multiplier: float = 1.0,
    dtype: torch.dtype = torch.float32,
    errors: list[str] | None = None,
) -> tuple[dict[str, tuple[Tensor, Tensor | None]], dict[str, str]]:
    """Reproduce A1111 loading ``sd`` and applying it at ``multiplier`` to ``weights``.

    ``weights`` maps the model's compvis module names (as :func:`convert_name` gives them) to ``(W, bias)``;
    an OpenCLIP attention (``[1_]model_transformer_resblocks_N_attn``, SD2/SDXL) is given as its four pieces
    ``…_attn_{q,k,v,out}_proj`` (q/k/v: the chunks of ``in_proj_weight``/``in_proj_bias``). Returns every entry
    of ``weights`` (patched where A1111 patches it, else unchanged copies) and, per file module that A1111 does
    not apply fully, the reason: not found (ignored), not applied (a logged error, or a partial attention),
    or "file not loaded" for every module when the file fails to load. ``errors`` receives what A1111
    reports: the file-level error, and each ``RuntimeError`` it logs and counts while patching a layer.
    Raises :class:`GenerationFailed` where A1111's generation itself would fail.
    """
    _check_model(model)
    merged = {k: (w.clone(), None if b is None else b.clone()) for k, (w, b) in weights.items()}
    try:
        modules, unsupported = _load(sd, weights, model, dtype)
    except FileNotLoaded as exc:
        if errors is not None:
            errors.append(f"file not loaded: {exc}")
        return merged, {n: f"file not loaded: {exc}" for n in sorted({k.partition(".")[0] for k in sd})}

    def failed(m: _Module, exc: Exception, what: str = "the layer left unpatched", log: bool = True) -> None:
        unsupported[m.name] = f"{m.title}: RuntimeError, logged and {what}: {exc}"
        if errors is not None and log:  # A1111 counts one error per network and layer
            errors.append(f"{m.name}: {exc}")

    attention: dict[str, list[str]] = {}
    for compvis, m in modules.items():
        piece = _MHA_PIECE.fullmatch(compvis) if model in ("sd2", "sdxl") else None
        if piece is not None:
            attention.setdefault(piece[1], []).append(compvis)
            continue
        w0, b0 = weights[compvis]
        weight = w0.to(dtype)

        def patch_weight(m: _Module = m, weight: Tensor = weight) -> tuple[Tensor, Tensor | None]:
            updown, ex_bias = _calc_updown(m, weight, multiplier)
            if weight.dim() == 4 and weight.shape[1] == 9:  # inpainting UNet: ΔW padded from 4 to 9 inputs
                updown = F.pad(updown, (0, 0, 0, 0, 0, 5))
            new = weight.clone()
            new.copy_((weight.to(updown.dtype) + updown).to(weight.dtype))  # copy_ broadcasts the sum
            return new, ex_bias

        done, exc = _attempt(patch_weight)
        if exc is not None:
            failed(m, exc)
            continue
        new_w, ex_bias = done
        merged[compvis] = (new_w.to(w0.dtype), merged[compvis][1])
        if ex_bias is None:
            continue
        new_b, exc = _attempt(partial(_add_bias, b0, ex_bias, dtype, w0.dtype, copy=True))
        if exc is not None:
            failed(m, exc, "its bias left unpatched (the weight was patched)")
        else:
            merged[compvis] = (merged[compvis][0], new_b)
    for parent, found in attention.items():
        group = [f"{parent}_{p}_proj" for p in ("q", "k", "v", "out")]
        if set(found) != set(group):
            for g in found:
                unsupported[modules[g].name] = "MultiheadAttention: q/k/v/out are applied only all four together"
            continue
        _apply_attention([modules[g] for g in group], group, weights, merged, multiplier, dtype, failed)
    return merged, unsupported


def _add_bias(b0: Tensor | None, ex_bias: Tensor, dtype: torch.dtype, w_dtype: torch.dtype, copy: bool) -> Tensor:
    """The bias after adding the ex-bias: created from it when the layer has none."""
    if b0 is None:
        return ex_bias.to(w_dtype)
    new = b0.to(dtype).clone()
    if copy:
        new.copy_(b0.to(dtype) + ex_bias)  # a Linear/Conv2d/norm layer: copy_ of the sum
    else:
        new += ex_bias  # out_proj of a MultiheadAttention: in place
    return new.to(b0.dtype)


def _apply_attention(
    mods: list[_Module],
    group: list[str],
    weights: Mapping[str, tuple[Tensor, Tensor | None]],
    merged: dict[str, tuple[Tensor, Tensor | None]],
    multiplier: float,
    dtype: torch.dtype,
    failed: Callable[..., None],
) -> None:
    """The ``nn.MultiheadAttention`` branch: q/k/v on the chunks of ``in_proj_weight``, out on ``out_proj``;
    only out's ex-bias is used; ``in_proj_weight`` is written before ``out_proj.weight``."""
    q, k, v, out = mods
    chunks = [weights[g][0].to(dtype) for g in group[:3]]
    w_out, b_out = weights[group[3]]

    def patch_in_proj() -> tuple[Tensor, Tensor, Tensor | None]:
        deltas = [_calc_updown(m, c, multiplier)[0] for m, c in zip((q, k, v), chunks, strict=True)]
        stacked = torch.vstack(deltas)
        d_out, ex_bias = _calc_updown(out, w_out.to(dtype), multiplier)
        in_proj = torch.cat(chunks)
        in_proj += stacked
        return in_proj, d_out, ex_bias

    done, exc = _attempt(patch_in_proj)
    if exc is not None:
        for i, m in enumerate(mods):
            failed(m, exc, "the MultiheadAttention left unpatched", log=i == 0)
        return
    in_proj, d_out, ex_bias = done
    for g, new in zip(group[:3], in_proj.split([c.shape[0] for c in chunks]), strict=True):
        merged[g] = (new.to(weights[g][0].dtype), merged[g][1])  # in_proj_bias is never touched

    def patch_out() -> Tensor:
        new = w_out.to(dtype).clone()
        new += d_out
        return new

    new_out, exc = _attempt(patch_out)
    if exc is not None:
        failed(out, exc, "out_proj left unpatched (q/k/v were patched)")
        return
    merged[group[3]] = (new_out.to(w_out.dtype), merged[group[3]][1])
    if ex_bias is not None:
        new_b, exc = _attempt(partial(_add_bias, b_out, ex_bias, dtype, w_out.dtype, copy=False))
        if exc is not None:
            failed(out, exc, "out_proj.bias left unpatched")
        else:
            merged[group[3]] = (merged[group[3]][0], new_b)
