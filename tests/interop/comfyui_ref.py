"""Reference re-implementation of how ComfyUI loads and merges LyCORIS-family files.

Written from a description of ComfyUI's loader (and docs/design.md §3/§4) only; no
ComfyUI code was consulted or copied. It reproduces, for SD-family files:

* the key maps of ``comfy/lora.py::model_lora_keys_unet`` / ``model_lora_keys_clip`` (A.2) for the kohya names
  we write (:func:`unet_key_map`, :func:`te_key_map`);
* ``comfy/lora.py::load_lora`` (A.1, A.3): per module, which adapter the keys form, and which file keys are
  "not loaded" (:func:`load_patches`);
* ``comfy/lora.py::calculate_weight`` and the ``comfy/weight_adapter/*`` maths (A.3-A.5), including the known
  deviations (output-axis DoRA normalises by the ORIGINAL weight, OFT clamps with the raw α, OFT strength is
  applied twice, OFT ignores ``rescale``) (:func:`calculate_weight`).

Checked against the real code since (read, not copied): the LoKr path follows
``comfy/weight_adapter/lokr.py`` of comfyanonymous/ComfyUI at commit 179c2d35c84b (read 2026-12-06) —
its Tucker ``w2`` is one einsum whose non-contiguous result makes ``torch.kron`` raise for most
shapes, an error ``calculate_weight`` logs before leaving the weight unpatched (:class:`PatchFailed`).

Everything is computed in ``intermediate_dtype`` (float32 like ComfyUI, float64 for tests) and cast back to the
dtype of the weight passed in (ComfyUI uses stochastic rounding for low-precision weights; we cast plainly).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Patch", "PatchFailed", "calculate_weight", "load_patches", "te_key_map", "unet_key_map"]

#: ``LORA_CLIP_MAP`` of A.2: kohya suffix → transformers CLIP module path inside an encoder layer.
CLIP_MAP = {
    "mlp_fc1": "mlp.fc1",
    "mlp_fc2": "mlp.fc2",
    "self_attn_q_proj": "self_attn.q_proj",
    "self_attn_k_proj": "self_attn.k_proj",
    "self_attn_v_proj": "self_attn.v_proj",
    "self_attn_out_proj": "self_attn.out_proj",
}

#: LoRA up/down name pairs tried in this order (A.3 "alternatives"); the first pair present wins.
LORA_NAME_PAIRS = (
    ("{}.lora_up.weight", "{}.lora_down.weight"),
    ("{}_lora.up.weight", "{}_lora.down.weight"),
    ("{}.lora_B.weight", "{}.lora_A.weight"),
    ("{}.lora.up.weight", "{}.lora.down.weight"),
    ("{}.lora_B", "{}.lora_A"),
    ("{}.lora_linear_layer.up.weight", "{}.lora_linear_layer.down.weight"),
    ("{}.lora_B.default.weight", "{}.lora_A.default.weight"),
)


@dataclass
class Patch:
    """One patch of one model tensor: ``kind`` is an adapter name or ``"diff"``/``"set"``; ``part`` is
    ``"weight"`` or ``"bias"``; ``t`` holds the file tensors by short name."""

    kind: str
    part: str
    t: dict[str, Tensor | None] = field(default_factory=dict)
    alpha: float | None = None
    dora_scale: Tensor | None = None


# --------------------------------------------------------------------------------------------- key maps


def te_key_map(num_layers: int, prefix: str) -> dict[str, str]:
    """kohya text-encoder names ComfyUI maps (A.2, ``LORA_CLIP_MAP``, layers 0-31 only).

    ``{prefix}_text_model_encoder_layers_{i}_{mlp_fc1|…}`` → ``text_model.encoder.layers.{i}.{mlp.fc1|…}``
    (the transformers ``CLIPTextModel`` module path). For the SDXL prefixes ``lora_te1``/``lora_te2`` the
    ``{prefix}_text_projection`` → ``text_projection`` entry is added as well. Embeddings, norms and layers ≥ 32
    are deliberately absent: ComfyUI cannot load them from kohya names.
    """
    out: dict[str, str] = {}
    for i in range(min(num_layers, 32)):
        for kohya, path in CLIP_MAP.items():
            out[f"{prefix}_text_model_encoder_layers_{i}_{kohya}"] = f"text_model.encoder.layers.{i}.{path}"
    if prefix in ("lora_te1", "lora_te2"):
        out[f"{prefix}_text_projection"] = "text_projection"
    return out


def unet_key_map(module_paths: Iterable[str], sgm_paths: Mapping[str, str] | None = None) -> dict[str, str]:
    """kohya UNet names ComfyUI maps (A.2), each to the diffusers module path.

    ComfyUI maps every diffusers module as ``lora_unet_<diffusers path, . → _>`` (the SD1/SD2 kohya form) and the
    SimpleTuner alias ``lycoris_<…>``; and every LDM/SGM module as ``lora_unet_<sgm path, . → _>`` (the SDXL kohya
    form). ``sgm_paths`` (diffusers path → SGM path, e.g. from our SDXL name table) enables the latter.
    """
    out: dict[str, str] = {}
    for path in module_paths:
        flat = path.replace(".", "_")
        out[f"lora_unet_{flat}"] = path
        out[f"lycoris_{flat}"] = path
        if sgm_paths is not None and path in sgm_paths:
            out["lora_unet_" + sgm_paths[path].replace(".", "_")] = path
    return out


# --------------------------------------------------------------------------------------------- loading


def _get(sd: Mapping[str, Tensor], key: str, loaded: set[str]) -> Tensor | None:
    if key in sd:
        loaded.add(key)
        return sd[key]
    return None


def _load_adapters(x: str, sd: Mapping[str, Tensor], loaded: set[str]) -> list[Patch]:
    """Each adapter class of ``weight_adapter.adapters = [LoRA, LoHa, LoKr, GLoRA, OFT, BOFT]`` that accepts."""
    found: list[Patch] = []
    # LoRA / LoCon
    for up_name, down_name in LORA_NAME_PAIRS:
        up_k, down_k = up_name.format(x), down_name.format(x)
        if up_k in sd and down_k in sd:
            t = {"up": _get(sd, up_k, loaded), "down": _get(sd, down_k, loaded)}
            t["mid"] = _get(sd, f"{x}.lora_mid.weight", loaded)
            t["reshape"] = _get(sd, f"{x}.reshape_weight", loaded)
            found.append(Patch("lora", "weight", t))
            break
    # LoHa (+ Tucker)
    if f"{x}.hada_w1_a" in sd:
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
        found.append(Patch("loha", "weight", {n: _get(sd, f"{x}.{n}", loaded) for n in names}))
    # LoKr: any of the factors announces it
    names = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    if any(f"{x}.{n}" in sd for n in names):
        found.append(Patch("lokr", "weight", {n: _get(sd, f"{x}.{n}", loaded) for n in names}))
    # GLoRA (layout decided in calculate_weight, where the weight shape is known)
    if f"{x}.a1.weight" in sd:
        names = ("a1", "a2", "b1", "b2")
        found.append(Patch("glora", "weight", {n: _get(sd, f"{x}.{n}.weight", loaded) for n in names}))
    # OFT (3-D blocks) and BOFT (4-D blocks); both load `rescale`
    blocks = sd.get(f"{x}.oft_blocks")
    if blocks is not None and blocks.dim() in (3, 4):
        kind = "oft" if blocks.dim() == 3 else "boft"
        t = {"blocks": _get(sd, f"{x}.oft_blocks", loaded), "rescale": _get(sd, f"{x}.rescale", loaded)}
        found.append(Patch(kind, "weight", t))
    return found


def load_patches(sd: Mapping[str, Tensor], key_map: Mapping[str, str]) -> tuple[dict[str, list[Patch]], list[str]]:
    """Reproduce ``comfy/lora.py::load_lora``.

    For every file module name ``x`` of ``key_map`` (→ a target name of the caller's choosing), read ``x.alpha``
    (a float) and ``x.dora_scale``, try the adapter classes in ComfyUI's order (the last one that accepts wins: the
    loop has no ``break``), then the diff-type patches ``w_norm`` (weight), ``b_norm`` (bias), ``diff`` (weight),
    ``diff_b`` (bias), ``set_weight`` (weight). ComfyUI stores patches in a dict keyed by model tensor, so a later
    patch of the same tensor replaces an earlier one; its keys still count as loaded. Returned per target:
    at most one weight patch and one bias patch, weight first.

    The second result lists the file keys never read, in file order: ComfyUI's ``lora key not loaded`` warnings
    (IA3 ``weight``/``on_input``, ``.scale``, modules missing from ``key_map``, …).
    """
    loaded: set[str] = set()
    by_target: dict[str, dict[str, Patch]] = {}
    for x, target in key_map.items():
        alpha_t = _get(sd, f"{x}.alpha", loaded)
        alpha = float(alpha_t.item()) if alpha_t is not None else None
        dora_scale = _get(sd, f"{x}.dora_scale", loaded)
        slot = by_target.setdefault(target, {})
        adapters = _load_adapters(x, sd, loaded)
        if adapters:
            p = adapters[-1]
            p.alpha, p.dora_scale = alpha, dora_scale
            slot["weight"] = p
        for suffix, part, kind in (
            ("w_norm", "weight", "diff"),
            ("b_norm", "bias", "diff"),
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


def _f(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """``einsum('ijkl,jr,ip->prkl', t, wb, wa)``: t (r,r,*k), wa (r,out), wb (r,in) → (out,in,*k)."""
    return torch.einsum("ij...,jr,ip->pr...", t, wb, wa)


def _scale(alpha: float | None, rank: int | None) -> float:
    """A.3: ``sc = α/rank`` when ``.alpha`` is present (and the rank known), else 1."""
    return 1.0 if alpha is None or rank is None else alpha / rank


def _factored_delta(p: Patch, w: Tensor, dt: torch.dtype) -> tuple[Tensor, float]:
    """ΔW (shaped like ``w``) and ``sc`` for LoRA, LoHa, LoKr, GLoRA — table of A.3."""
    t = {k: _f(v, dt) for k, v in p.t.items()}
    if p.kind == "lora":
        if t.get("reshape") is not None:
            raise NotImplementedError("reshape_weight (pads W) is not reproduced")
        up, down, mid = t["up"], t["down"], t["mid"]
        if mid is None:
            delta = up.flatten(1) @ down.flatten(1)
        else:
            delta = torch.einsum("oa,ab...,bi->oi...", up.flatten(1), mid, down.flatten(1))
        return delta.reshape(w.shape), _scale(p.alpha, down.shape[0])
    if p.kind == "loha":
        if t["hada_t1"] is not None:
            w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1 = t["hada_w1_a"] @ t["hada_w1_b"]
            w2 = t["hada_w2_a"] @ t["hada_w2_b"]
        return (w1 * w2).reshape(w.shape), _scale(p.alpha, t["hada_w1_b"].shape[0])
    if p.kind == "lokr":
        rank = None
        w1 = t["lokr_w1"]
        if w1 is None:
            w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
            rank = t["lokr_w1_b"].shape[0]
        w2 = t["lokr_w2"]
        if w2 is None:
            rank = t["lokr_w2_b"].shape[0]  # w2_b wins over w1_b
            if t["lokr_t2"] is not None:
                # the real loader builds the Tucker w2 with one einsum (a non-contiguous (u2, v2, k, k)
                # result) and krons it with w1 as (u1, v1, 1, 1); torch.kron raises for most shapes, and
                # ComfyUI logs the error and leaves the weight unpatched
                w2 = torch.einsum("xykl,yo,xq->qokl", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
                try:
                    delta = torch.kron(w1[:, :, None, None], w2).reshape(w.shape)
                except RuntimeError as exc:
                    raise PatchFailed(f"lokr: {exc}") from exc
                return delta, _scale(p.alpha, rank)
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)
        # w1 acts as (u1, v1, 1, …) for conv: kron with the flattened (u2, v2·∏k) w2 is the same tensor
        delta = torch.kron(w1.flatten(1).contiguous(), w2.flatten(1).contiguous()).reshape(w.shape)
        return delta, _scale(p.alpha, rank)  # both sides full ⇒ rank None ⇒ sc = 1, α ignored
    if p.kind == "glora":
        a1, a2, b1, b2 = (t[n].flatten(1) for n in ("a1", "a2", "b1", "b2"))
        if _glora_is_old(a1, a2, b1, b2, w):
            # old layout: a1 (r,in), a2 (in,r), b1 (r,in·∏k), b2 (out,r): ΔW = b2@b1 + W@a2@a1
            a, b, rank = a2 @ a1, b2 @ b1, a1.shape[0]
        else:
            # new layout: a1 (in,r), a2 (r,in), b1 (out,r), b2 (r,in·∏k): ΔW = W@a1@a2 + b1@b2
            a, b, rank = a1 @ a2, b1 @ b2, a2.shape[0]
        delta = torch.einsum("oi...,ij->oj...", w, a) + b.reshape(w.shape)
        return delta, _scale(p.alpha, rank)
    raise AssertionError(p.kind)


def _glora_is_old(a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor, w: Tensor) -> bool:
    """Layout detection by shapes (A.3 only says "detected by shapes"; the rule here is ours).

    New: a1 (in,r), a2 (r,in), b1 (out,r), b2 (r,·). Old: a1 (r,in), a2 (in,r), b1 (r,·), b2 (out,r).
    The new layout wins when both fit (possible only when in == out or r == in).
    """
    out, inp = w.shape[0], w.shape[1]
    new = a1.shape[0] == inp and a2.shape[1] == inp and b1.shape[0] == out and a1.shape[1] == a2.shape[0]
    new = new and b1.shape[1] == a1.shape[1] == b2.shape[0]
    old = a1.shape[1] == inp and a2.shape[0] == inp and b2.shape[0] == out and a1.shape[0] == a2.shape[1]
    old = old and b2.shape[1] == a1.shape[0] == b1.shape[0]
    return old and not new


def _weight_decompose(dora_scale: Tensor, w: Tensor, delta: Tensor, sc: float, s: float) -> Tensor:
    """A.4 ``weight_decompose`` with ComfyUI's output-axis deviation (norm of the ORIGINAL ``w``, + eps)."""
    eps = torch.finfo(w.dtype).eps
    d = dora_scale.to(w.dtype)
    wc = w + sc * delta
    if d.shape[0] == w.shape[0]:  # output axis (LyCORIS wd_on_out): ‖W‖ per row of the original weight
        n = w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1))) + eps
        d = d.reshape(n.shape)
    else:  # input axis: ‖W + scΔW‖ per column (all dims but 1)
        dims = [i for i in range(w.dim()) if i != 1]
        n = torch.linalg.vector_norm(wc, dim=dims, keepdim=True) + eps
    wc = wc * (d / n)
    return wc if s == 1.0 else w + s * (wc - w)


def _cayley_blocks(blocks: Tensor, alpha: float | None) -> Tensor:
    """Q = B − Bᵀ (last two axes); raw-α clamp with one global Frobenius norm (A.5); R = (I+Q)(I−Q)⁻¹."""
    q = blocks - blocks.transpose(-1, -2)
    if alpha is not None and alpha > 0:
        norm = q.norm()
        if norm > alpha:
            q = q * (alpha / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _oft(p: Patch, w: Tensor, s: float, dt: torch.dtype) -> Tensor:
    """A.5 OFT: W'_k = W_k + s²·(R_kᵀ W_k − W_k) on output-row blocks; ``rescale`` ignored; bias untouched."""
    if p.dora_scale is not None:
        raise NotImplementedError("dora_scale with OFT is outside the reproduced spec")
    blocks = p.t["blocks"].to(dt)
    n, b = blocks.shape[0], blocks.shape[1]
    r = _cayley_blocks(blocks, p.alpha)
    eye = torch.eye(b, dtype=dt)
    wb = w.reshape(n, b, *w.shape[1:])
    delta = torch.einsum("knm,kn...->km...", s * r - s * eye, wb).reshape(w.shape)
    return w + s * delta


def _boft(p: Patch, w: Tensor, s: float, dt: torch.dtype) -> Tensor:
    """A.5 BOFT: per stage i, g=2, k=2^i·b/2: permute rows, ``R_i·W`` per block of b rows, un-permute.

    Strength: R_i ← s·R_i + (1−s)·I; then ``⊙ rescale`` (rows) when present; then W + s·(out − W).
    The raw-α clamp uses one Frobenius norm over all stages and blocks (our reading of "same constraint").
    """
    if p.dora_scale is not None:
        raise NotImplementedError("dora_scale with BOFT is outside the reproduced spec")
    blocks = p.t["blocks"].to(dt)
    m, b = blocks.shape[0], blocks.shape[-1]
    r = _cayley_blocks(blocks, p.alpha)
    eye = torch.eye(b, dtype=dt)
    r = s * r + (1 - s) * eye
    out = w
    for i in range(m):
        g, k = 2, (2**i) * b // 2
        x = out.unflatten(0, (-1, g, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("bij,bj...->bi...", r[i], x)
        out = x.flatten(0, 1).unflatten(0, (-1, k, g)).transpose(1, 2).flatten(0, 2)
    if p.t["rescale"] is not None:
        out = out * p.t["rescale"].to(dt).reshape(-1, *([1] * (w.dim() - 1)))
    return w + s * (out - w)


class PatchFailed(RuntimeError):
    """An error ComfyUI catches inside ``calculate_weight``: it logs "ERROR <adapter> <key> …" and leaves
    the weight as it was."""


def calculate_weight(
    patches: list[Patch],
    weight: Tensor,
    bias: Tensor | None = None,
    strength: float = 1.0,
    intermediate_dtype: torch.dtype = torch.float32,
    errors: list[str] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Reproduce ``comfy/lora.py::calculate_weight`` for one module (A.3-A.5) at LoRA strength ``strength``.

    Weight patches change ``weight``, bias patches change ``bias`` (dropped when the module has no bias, as
    ComfyUI only patches tensors the model has). Factored adapters: ``W += s·sc·ΔW`` or DoRA (A.4); diff:
    ``W += s·diff`` (skipped on a shape mismatch, like ComfyUI's "SHAPE MISMATCH"); set: ``W = set_weight``;
    OFT/BOFT per A.5. Returns new tensors in the input dtypes. A patch whose computation raises (LoKr
    with a Tucker ``w2``, see :func:`_factored_delta`) leaves the weight unchanged, its message appended
    to ``errors``, as ComfyUI logs it.
    """
    dt = intermediate_dtype
    w = weight.to(dt).clone()
    b = None if bias is None else bias.to(dt).clone()
    s = float(strength)
    for p in patches:
        if p.part == "bias":
            if b is not None and p.t["diff"].shape == b.shape:
                b = b + s * p.t["diff"].to(dt) if p.kind == "diff" else p.t["diff"].to(dt).clone()
            continue
        if p.kind == "diff":
            if p.t["diff"].shape == w.shape:
                w = w + s * p.t["diff"].to(dt)
        elif p.kind == "set":
            w = p.t["diff"].to(dt).reshape(w.shape).clone()
        elif p.kind == "oft":
            w = _oft(p, w, s, dt)
        elif p.kind == "boft":
            w = _boft(p, w, s, dt)
        else:
            try:
                delta, sc = _factored_delta(p, w, dt)
            except PatchFailed as exc:
                if errors is not None:
                    errors.append(str(exc))
                continue
            decomposed = p.dora_scale is not None
            w = _weight_decompose(p.dora_scale, w, delta, sc, s) if decomposed else w + (s * sc) * delta
    return w.to(weight.dtype), None if b is None else b.to(bias.dtype)
