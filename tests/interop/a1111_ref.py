"""Reference re-implementation of how AUTOMATIC1111's built-in Lora extension loads and merges LyCORIS files.

Written from a description of A1111's loader (its differences from ComfyUI, with the
shared maths of section A) and docs/design.md §3/§4 only; no A1111 code was copied. It reproduces
``extensions-builtin/Lora``:

* ``lora_convert.convert_diffusers_name_to_compvis`` plus the name fallbacks of ``networks.py``
  (:func:`convert_name`);
* the module types of ``networks.py`` (first accept wins: lora, hada, ia3, lokr, full, norm, glora, oft), the
  scale rule of ``network.py`` and the DoRA of ``apply_weight_decompose`` (:func:`load_and_merge`).

Known A1111 behaviours reproduced on purpose: GLoRA only in the OLD layout (new shapes fail), no BOFT (4-D
``oft_blocks`` fail), OFT needs ``alpha`` and clamps with ``α·out``, OFT ignores ``rescale``, DoRA on the input
axis only and without eps, a ``.scale`` key overrides ``α/dim``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["MODULE_TYPES", "convert_name", "load_and_merge"]

MODULE_TYPES = ("lora", "hada", "ia3", "lokr", "full", "norm", "glora", "oft")

_RESNET_SUFFIX = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}

_RE_BLOCK = re.compile(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")
_RE_MID = re.compile(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")
_RE_DOWNSAMPLER = re.compile(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")
_RE_UPSAMPLER = re.compile(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")
_RE_TIME = re.compile(r"lora_unet_time_embedding_linear_(\d+)")
_RE_TE = re.compile(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")
_RE_TE2 = re.compile(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")


def _open_clip_suffix(suffix: str) -> str:
    """transformers CLIP names → OpenCLIP names (SD2 TE, SDXL TE2): mlp_fc1→mlp_c_fc, mlp_fc2→mlp_c_proj,
    self_attn→attn."""
    return suffix.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")


def _resnet_suffix(kind: str, suffix: str) -> str:
    return _RESNET_SUFFIX.get(suffix, suffix) if kind == "resnets" else suffix


def convert_name(module_name: str, model: str) -> str:
    """A1111's ``convert_diffusers_name_to_compvis`` followed by the ``networks.py`` fallbacks.

    ``model`` is ``"sd1"``, ``"sd2"`` or ``"sdxl"``. SD1/SD2 diffusers UNet names become
    ``diffusion_model_{input,middle,output}_blocks_…`` (resnet suffixes renamed, down/upsamplers to ``op``/``conv``);
    ``lora_te_…`` becomes ``transformer_text_model_…`` (SD1/SDXL) or ``model_transformer_resblocks_…`` (SD2);
    ``lora_te2_…`` becomes ``1_model_transformer_resblocks_…``. Names no regex matched fall back:
    ``lora_unet_``/``oft_unet_`` → ``diffusion_model_`` (SDXL SGM names), ``lora_te1_text_model`` →
    ``0_transformer_text_model`` (SDXL) or ``transformer_text_model`` (SD1/SD2). The SD1 UNet layout (3 input
    blocks per level, attentions at sub-index 1) is applied to every model, as A1111 does.
    """
    if model not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"model must be sd1, sd2 or sdxl, not {model!r}")
    name = module_name
    if name == "lora_unet_conv_in":
        return "diffusion_model_input_blocks_0_0"
    if name == "lora_unet_conv_out":
        return "diffusion_model_out_2"
    if m := _RE_TIME.fullmatch(name):
        return f"diffusion_model_time_embed_{(int(m[1]) - 1) * 2}"
    if m := _RE_BLOCK.fullmatch(name):
        side, n, kind, j, suffix = m[1], int(m[2]), m[3], int(m[4]), m[5]
        sub = 1 if kind == "attentions" else 0
        idx = 1 + 3 * n + j if side == "down" else 3 * n + j
        blocks = "input_blocks" if side == "down" else "output_blocks"
        return f"diffusion_model_{blocks}_{idx}_{sub}_{_resnet_suffix(kind, suffix)}"
    if m := _RE_MID.fullmatch(name):
        kind, j, suffix = m[1], int(m[2]), m[3]
        idx = 1 if kind == "attentions" else 2 * j
        return f"diffusion_model_middle_block_{idx}_{_resnet_suffix(kind, suffix)}"
    if m := _RE_DOWNSAMPLER.fullmatch(name):
        return f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"
    if m := _RE_UPSAMPLER.fullmatch(name):
        n = int(m[1])
        return f"diffusion_model_output_blocks_{2 + 3 * n}_{2 if n > 0 else 1}_conv"
    if m := _RE_TE.fullmatch(name):
        if model == "sd2":
            return f"model_transformer_resblocks_{m[1]}_{_open_clip_suffix(m[2])}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := _RE_TE2.fullmatch(name):
        return f"1_model_transformer_resblocks_{m[1]}_{_open_clip_suffix(m[2])}"
    # fallbacks of networks.py (tried when the converted name is not a model module)
    for prefix in ("lora_unet_", "oft_unet_"):
        if name.startswith(prefix):
            return "diffusion_model_" + name[len(prefix) :]
    if name.startswith("lora_te1_text_model"):
        new = "0_transformer_text_model" if model == "sdxl" else "transformer_text_model"
        return new + name[len("lora_te1_text_model") :]
    return name


# --------------------------------------------------------------------------------------------- maths


def _cp(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """``make_weight_cp``: t (r,r,*k), wa (r,out), wb (r,in) → (out,in,*k)."""
    return torch.einsum("ij...,jr,ip->pr...", t, wb, wa)


def _accepts(kind: str, w: Mapping[str, Tensor]) -> bool:
    """``create_module`` of each module type: which key sets it accepts (B)."""
    if kind == "lora":
        return ("lora_up.weight" in w and "lora_down.weight" in w) or ("lora_A.weight" in w and "lora_B.weight" in w)
    if kind == "hada":
        return all(f"hada_w{i}_{s}" in w for i in (1, 2) for s in "ab")
    if kind == "ia3":
        return "weight" in w and "on_input" in w
    if kind == "lokr":
        one = "lokr_w1" in w or ("lokr_w1_a" in w and "lokr_w1_b" in w)
        two = "lokr_w2" in w or ("lokr_w2_a" in w and "lokr_w2_b" in w)
        return one and two
    if kind == "full":
        return "diff" in w
    if kind == "norm":
        return "w_norm" in w and "b_norm" in w
    if kind == "glora":
        return all(f"{n}.weight" in w for n in ("a1", "a2", "b1", "b2")) and "alpha" in w
    if kind == "oft":
        return ("oft_blocks" in w and "alpha" in w) or "oft_diag" in w
    raise AssertionError(kind)


class Unsupported(Exception):
    """The module type accepted the keys but cannot compute (A1111 would log an error and skip it)."""


def _updown(kind: str, w: Mapping[str, Tensor], weight: Tensor) -> tuple[Tensor, Tensor | None, int | None]:
    """(ΔW before scale, ex_bias, dim) for one module type; ``dim`` feeds ``α/dim``."""
    shape = weight.shape
    if kind == "lora":
        up = w.get("lora_up.weight", w.get("lora_B.weight"))
        down = w.get("lora_down.weight", w.get("lora_A.weight"))
        mid = w.get("lora_mid.weight")
        if mid is not None:
            delta = torch.einsum("nmkl,in,mj->ijkl", mid, up.flatten(1), down.flatten(1))
        else:
            delta = up.flatten(1) @ down.flatten(1)
        return delta.reshape(shape), None, down.shape[0]
    if kind == "hada":
        if "hada_t1" in w and "hada_t2" in w:
            w1 = _cp(w["hada_t1"], w["hada_w1_a"], w["hada_w1_b"])
            w2 = _cp(w["hada_t2"], w["hada_w2_a"], w["hada_w2_b"])
        else:
            w1 = w["hada_w1_a"] @ w["hada_w1_b"]
            w2 = w["hada_w2_a"] @ w["hada_w2_b"]
        return (w1 * w2).reshape(shape), None, w["hada_w1_b"].shape[0]
    if kind == "ia3":
        vec = w["weight"].flatten()
        on_input = bool(int(w["on_input"].item()))
        view = [1] * weight.dim()
        view[1 if on_input else 0] = -1
        return weight * vec.reshape(view), None, None
    if kind == "lokr":
        dim = None
        w1 = w.get("lokr_w1")
        if w1 is None:
            w1 = w["lokr_w1_a"] @ w["lokr_w1_b"]
            dim = w["lokr_w1_b"].shape[0]
        w2 = w.get("lokr_w2")
        if w2 is None:
            dim = w["lokr_w2_b"].shape[0]
            if "lokr_t2" in w:
                w2 = _cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
            else:
                w2 = w["lokr_w2_a"] @ w["lokr_w2_b"].flatten(1)
        return torch.kron(w1.flatten(1).contiguous(), w2.flatten(1).contiguous()).reshape(shape), None, dim
    if kind == "full":
        return w["diff"].reshape(shape), w.get("diff_b"), None
    if kind == "norm":
        return w["w_norm"].reshape(shape), w["b_norm"], None
    if kind == "glora":
        a1, a2, b1, b2 = (w[f"{n}.weight"].flatten(1) for n in ("a1", "a2", "b1", "b2"))
        try:
            delta = b2 @ b1 + weight.flatten(1) @ a2 @ a1
        except RuntimeError as e:
            raise Unsupported(f"GLoRA: only the old layout computes ({e})") from None
        if delta.numel() != weight.numel():
            raise Unsupported("GLoRA: only the old layout computes (result has the wrong size)")
        return delta.reshape(shape), None, None  # dim never set ⇒ α ignored
    if kind == "oft":
        return _oft_updown(w, weight), None, None
    raise AssertionError(kind)


def _oft_updown(w: Mapping[str, Tensor], weight: Tensor) -> Tensor:
    """B OFT: n = shape[0], b = out/n, c = α·out, Q ← Q·(min(‖Q‖,c)+1e-8)/(‖Q‖+1e-8), Cayley, RᵀW − W.

    ``oft_diag`` (old LyCORIS) is used as R directly. ``rescale`` is ignored. 4-D blocks (BOFT) fail.
    """
    out = weight.shape[0]
    if "oft_blocks" in w:
        blocks = w["oft_blocks"]
        if blocks.dim() != 3:
            raise Unsupported(f"OFT: oft_blocks of {blocks.dim()} dims (BOFT) is not supported")
        c = float(w["alpha"].item()) * out
        q = blocks - blocks.transpose(1, 2)
        norm = q.norm()  # no `c > 0` guard: α = 0 clamps Q to ≈0, so R ≈ I and the file has no effect
        q = q * ((norm.clamp(max=c) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(q.shape[-1], dtype=q.dtype)
        r = (eye + q) @ torch.linalg.inv(eye - q)
    else:
        r = w["oft_diag"]
    n = r.shape[0]
    if out % n or out // n != r.shape[1]:
        raise Unsupported(f"OFT: {n} blocks of {r.shape[1]} do not tile {out} output channels")
    merged = torch.einsum("knm,kn...->km...", r, weight.reshape(n, out // n, *weight.shape[1:]))
    return merged.reshape(weight.shape) - weight


def _dora_input_axis(dora_scale: Tensor, weight: Tensor, delta: Tensor) -> Tensor:
    """``apply_weight_decompose``: ``dora_scale·(W+scΔW)/‖W+scΔW‖_col − W``, no eps.

    The column norm is over every dim but 1. An output-axis ``dora_scale`` (out,1,…) is multiplied in as is:
    the broadcast gives ``Wc·d_row/‖Wc‖_col`` — the silently wrong A1111 result, reproduced (not flagged).
    """
    wc = weight + delta
    dims = [i for i in range(weight.dim()) if i != 1]
    return dora_scale * wc / torch.linalg.vector_norm(wc, dim=dims, keepdim=True) - weight


def _multihead_names(name: str) -> tuple[str, ...] | None:
    m = re.fullmatch(r"((?:1_)?model_transformer_resblocks_\d+_attn)_(q|k|v|out)_proj", name)
    return None if m is None else tuple(f"{m[1]}_{p}_proj" for p in ("q", "k", "v", "out"))


def load_and_merge(
    sd: Mapping[str, Tensor],
    weights: Mapping[str, tuple[Tensor, Tensor | None]],
    model: str,
    multiplier: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, tuple[Tensor, Tensor | None]], dict[str, str]]:
    """Reproduce A1111 loading ``sd`` and merging it at ``multiplier`` into ``weights``.

    ``weights`` maps compvis module names (as :func:`convert_name` gives them) to ``(W, bias)``. Keys are split
    by ``key.partition('.')`` into module and part; ``bundle_emb.*`` is a textual inversion (skipped). Per module
    the first accepting type wins; ``scale`` = ``.scale`` key, else ``α/dim`` (dim set by LoRA, LoHa, LoKr with a
    decomposed side), else 1. ``W' = W + m·scale·ΔW`` (DoRA: ``W + m·(d·Wc/‖Wc‖_col − W)``), bias
    ``b + m·ex_bias`` (``ex_bias`` = ``diff_b``/``b_norm`` is not scaled; a missing bias is created). For
    SD2/SDXL-TE2 attention (``…_attn_{q,k,v,out}_proj``) the four are merged only if all four modules are
    present and accepted.

    Returns every entry of ``weights`` (merged where an adapter applied, else unchanged copies) and, per file
    module not applied, the reason. Maths run in ``dtype`` and results come back in the input dtypes.
    """
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        module, _, part = key.partition(".")
        modules.setdefault(module, {})[part] = value
    merged = {k: (w.clone(), None if b is None else b.clone()) for k, (w, b) in weights.items()}
    unsupported: dict[str, str] = {}
    accepted: dict[str, tuple[str, str, dict[str, Tensor]]] = {}  # compvis → (module, kind, tensors)
    for module, w in modules.items():
        if module == "bundle_emb":
            unsupported[module] = "bundled embedding (loaded as a textual inversion, not merged)"
            continue
        name = convert_name(module, model)
        if name not in weights:
            unsupported[module] = f"no model module {name!r}"
            continue
        kind = next((k for k in MODULE_TYPES if _accepts(k, w)), None)
        if kind is None:
            unsupported[module] = f"no module type accepts keys {sorted(w)}"
            continue
        accepted[name] = (module, kind, {k: v.to(dtype) for k, v in w.items()})
    for name, (module, kind, w) in accepted.items():
        group = _multihead_names(name)
        if group is not None and model in ("sd2", "sdxl") and not all(g in accepted for g in group):
            unsupported[module] = "MultiheadAttention: q/k/v/out are applied only together"
            continue
        weight0, bias0 = weights[name]
        weight = weight0.to(dtype)
        try:
            delta, ex_bias, dim = _updown(kind, w, weight)
        except Unsupported as e:
            unsupported[module] = str(e)
            continue
        if "scale" in w:
            scale = float(w["scale"].item())
        elif dim is not None and "alpha" in w:
            scale = float(w["alpha"].item()) / dim
        else:
            scale = 1.0
        final = scale * delta
        if "dora_scale" in w:
            final = _dora_input_axis(w["dora_scale"], weight, final)
        new_w = (weight + multiplier * final).to(weight0.dtype)
        new_b = bias0
        if ex_bias is not None:
            eb = multiplier * (ex_bias.reshape(bias0.shape) if bias0 is not None else ex_bias)
            new_b = eb if bias0 is None else bias0.to(dtype) + eb
            new_b = new_b.to(weight0.dtype if bias0 is None else bias0.dtype)
        merged[name] = (new_w, new_b)
    return merged, unsupported
