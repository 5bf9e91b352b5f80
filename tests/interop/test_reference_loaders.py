"""Unit tests of the ComfyUI and A1111 reference loaders against independent einsum formulas (docs/design.md §3).

Everything runs in float64 on tiny random tensors. The formulas here are written index by index, without the
helpers of the loaders, so that a slip in either shows up.
"""

from __future__ import annotations

import pytest
import torch

from higanbana.algorithms import algorithm_class

from . import a1111_ref as a1
from . import comfyui_ref as cf

F64 = torch.float64
X = "lora_unet_blk"  # file module name used throughout
T = "blk"  # ComfyUI target name
KM = {X: T}


def rnd(*shape, seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * len(shape) + sum(shape))
    return torch.randn(*shape, generator=g, dtype=F64)


def alpha(v):
    return torch.tensor(float(v))


def comfy(sd, w, b=None, s=1.0):
    patches, left = cf.load_patches(sd, KM)
    assert left == [], left
    return cf.calculate_weight(patches.get(T, []), w, b, s, intermediate_dtype=F64)


def auto(sd, w, b=None, m=1.0, model="sd1", name="diffusion_model_blk"):
    merged, bad = a1.load_and_merge(sd, {name: (w, b)}, model, m, dtype=F64)
    return merged[name], bad


def prefixed(d):
    return {f"{X}.{k}": v for k, v in d.items()}


# ------------------------------------------------------------------------------------ independent references


def tucker(t, wa, wb):
    """W[p,q,κ] = Σ_{a,c} t[a,c,κ]·wa[a,p]·wb[c,q]."""
    return torch.einsum("ac...,ap,cq->pq...", t, wa, wb)


def kron_delta(w1, w2, out_shape):
    """ΔW[i·u2+p, j·v2+q, κ] = w1[i,j]·w2[p,q,κ]."""
    u1, v1 = w1.shape
    u2, v2 = w2.shape[:2]
    d = torch.einsum("ij,pq...->ipjq...", w1, w2)
    return d.reshape(u1 * u2, v1 * v2, *w2.shape[2:]).reshape(out_shape)


def blockdiag(mats):
    return torch.block_diag(*mats)


def cayley(q):
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return torch.linalg.solve((eye - q).T, (eye + q).T).T  # (I+Q)(I−Q)⁻¹


def oft_rotation(blocks, constraint):
    """Block-diagonal R with the global-norm clamp ‖Q‖ ≤ constraint (constraint ≤ 0: none)."""
    qs = [b - b.T for b in blocks]
    norm = torch.sqrt(sum((q**2).sum() for q in qs))
    if constraint > 0 and norm > constraint:
        qs = [q * constraint / norm for q in qs]
    return blockdiag([cayley(q) for q in qs])


def shuffle_perm(out, b, i):
    """perm[new] = old for BOFT stage i: rows as (out/(2h), 2, h), last two axes swapped, h = 2^i·b/2."""
    h = 2**i * b // 2
    return [a * 2 * h + g * h + t for a in range(out // (2 * h)) for t in range(h) for g in range(2)]


def perm_matrix(perm):
    p = torch.zeros(len(perm), len(perm), dtype=F64)
    for new, old in enumerate(perm):
        p[new, old] = 1
    return p


def col_norm(w):
    return w.flatten(2).norm(dim=(0, 2)).reshape(1, -1, *([1] * (w.dim() - 2))) if w.dim() > 2 else w.norm(dim=0)


def row_norm(w):
    return w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))


EPS = torch.finfo(F64).eps  # ComfyUI's eps is that of the intermediate dtype, float64 here


# ------------------------------------------------------------------------------------ ComfyUI: maths


@pytest.mark.parametrize("conv", [False, True])
def test_comfy_lora(conv):
    w = rnd(6, 4, 3, 3) if conv else rnd(6, 4)
    down = rnd(2, 4, 3, 3) if conv else rnd(2, 4)
    up = rnd(6, 2, 1, 1) if conv else rnd(6, 2)
    sd = prefixed({"lora_up.weight": up, "lora_down.weight": down, "alpha": alpha(3)})
    got, _ = comfy(sd, w, s=0.7)
    ref = w + 0.7 * 1.5 * torch.einsum("or,ri...->oi...", up.flatten(1), down)
    torch.testing.assert_close(got, ref)


def test_comfy_lora_mid_tucker_and_no_alpha():
    w, down, mid, up = rnd(6, 4, 3, 3), rnd(2, 4, 1, 1), rnd(2, 2, 3, 3), rnd(6, 2, 1, 1)
    sd = prefixed({"lora_up.weight": up, "lora_down.weight": down, "lora_mid.weight": mid})
    got, _ = comfy(sd, w)  # no alpha ⇒ sc = 1
    ref = w + torch.einsum("oa,ackl,ci->oikl", up.flatten(1), mid, down.flatten(1))
    torch.testing.assert_close(got, ref)


def test_comfy_lora_alpha_zero_is_noop_and_alternative_names():
    w, up, down = rnd(5, 4), rnd(5, 2), rnd(2, 4)
    got, _ = comfy(prefixed({"lora_up.weight": up, "lora_down.weight": down, "alpha": alpha(0)}), w)
    torch.testing.assert_close(got, w)
    got, _ = comfy(prefixed({"lora_B.weight": up, "lora_A.weight": down}), w)
    torch.testing.assert_close(got, w + up @ down)


@pytest.mark.parametrize("use_tucker", [False, True])
def test_comfy_loha(use_tucker):
    if use_tucker:
        w = rnd(6, 4, 3, 3)
        t1, t2 = rnd(3, 3, 3, 3, seed=1), rnd(3, 3, 3, 3, seed=2)
        w1a, w1b, w2a, w2b = rnd(3, 6, seed=3), rnd(3, 4, seed=4), rnd(3, 6, seed=5), rnd(3, 4, seed=6)
        sd = prefixed(dict(hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b, hada_t1=t1, hada_t2=t2))
        delta = tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b)
    else:
        w = rnd(6, 4, 3, 3)
        w1a, w1b, w2a, w2b = rnd(6, 3, seed=3), rnd(3, 36, seed=4), rnd(6, 3, seed=5), rnd(3, 36, seed=6)
        sd = prefixed(dict(hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b))
        delta = (torch.einsum("or,ri->oi", w1a, w1b) * torch.einsum("or,ri->oi", w2a, w2b)).reshape(w.shape)
    sd[f"{X}.alpha"] = alpha(1.5)
    got, _ = comfy(sd, w, s=0.5)
    torch.testing.assert_close(got, w + 0.5 * 0.5 * delta)


def test_comfy_lokr_decomposed_w2_scale_alpha_over_rank():
    w = rnd(8, 6, 3, 3)
    w1, w2a, w2b = rnd(2, 3), rnd(4, 2), rnd(2, 2 * 9)  # u2 = 4, v2 = 2
    sd = prefixed(dict(lokr_w1=w1, lokr_w2_a=w2a, lokr_w2_b=w2b, alpha=alpha(1)))
    got, _ = comfy(sd, w)
    w2 = (w2a @ w2b).reshape(4, 2, 3, 3)
    torch.testing.assert_close(got, w + 0.5 * kron_delta(w1, w2, w.shape))


def test_comfy_lokr_both_full_scale_one():
    w, w1, w2 = rnd(8, 6), rnd(2, 3), rnd(4, 2)
    got, _ = comfy(prefixed(dict(lokr_w1=w1, lokr_w2=w2, alpha=alpha(7))), w)  # α ignored
    torch.testing.assert_close(got, w + kron_delta(w1, w2, w.shape))


def test_comfy_lokr_tucker_w2_fails_in_kron_and_is_skipped():
    """ComfyUI's Tucker w2 (one einsum, not contiguous) makes torch.kron raise for these shapes: the
    error is logged and the weight left unpatched — and ``info`` predicts it from the same tensors."""
    w = rnd(8, 6, 3, 3)
    w1a, w1b = rnd(2, 2, seed=1), rnd(2, 3, seed=2)
    t2, w2a, w2b = rnd(2, 2, 3, 3, seed=3), rnd(2, 4, seed=4), rnd(2, 2, seed=5)
    sd = prefixed(dict(lokr_w1_a=w1a, lokr_w1_b=w1b, lokr_t2=t2, lokr_w2_a=w2a, lokr_w2_b=w2b, alpha=alpha(3)))
    patches, _ = cf.load_patches(sd, KM)
    errors: list[str] = []
    got, _ = cf.calculate_weight(patches[T], w, None, 1.0, intermediate_dtype=F64, errors=errors)
    assert errors and torch.equal(got, w)
    module = {k.partition(".")[2]: v for k, v in sd.items()}
    assert algorithm_class("lokr").own_tool_verdicts(module, None)["ComfyUI"][0] == "skip"


def test_comfy_lokr_w1_factored_and_tucker_w2_where_kron_works():
    """With w1 a 1×1 block the same path succeeds: ΔW = kron(w1, tucker(t2, w2_a, w2_b))."""
    w = rnd(4, 6, 3, 3)
    w1a, w1b = rnd(1, 2, seed=1), rnd(2, 1, seed=2)
    t2, w2a, w2b = rnd(2, 2, 3, 3, seed=3), rnd(2, 4, seed=4), rnd(2, 6, seed=5)
    sd = prefixed(dict(lokr_w1_a=w1a, lokr_w1_b=w1b, lokr_t2=t2, lokr_w2_a=w2a, lokr_w2_b=w2b, alpha=alpha(3)))
    got, _ = comfy(sd, w)
    torch.testing.assert_close(got, w + 1.5 * kron_delta(w1a @ w1b, tucker(t2, w2a, w2b), w.shape))
    module = {k.partition(".")[2]: v for k, v in sd.items()}
    assert "ComfyUI" not in algorithm_class("lokr").own_tool_verdicts(module, None)


@pytest.mark.parametrize("conv", [False, True])
def test_comfy_glora_new_layout(conv):
    w = rnd(6, 4, 3, 3) if conv else rnd(6, 4)
    k = 9 if conv else 1
    a1, a2, b1, b2 = rnd(4, 2, seed=1), rnd(2, 4, seed=2), rnd(6, 2, seed=3), rnd(2, 4 * k, seed=4)
    sd = prefixed({"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2, "alpha": alpha(1)})
    got, _ = comfy(sd, w, s=0.8)
    delta = torch.einsum("oi...,ia,aj->oj...", w, a1, a2) + (b1 @ b2).reshape(w.shape)
    torch.testing.assert_close(got, w + 0.8 * 0.5 * delta)


def test_comfy_glora_old_layout():
    w = rnd(6, 4)
    a1, a2, b1, b2 = rnd(2, 4, seed=1), rnd(4, 2, seed=2), rnd(2, 4, seed=3), rnd(6, 2, seed=4)
    sd = prefixed({"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2, "alpha": alpha(1)})
    got, _ = comfy(sd, w)
    delta = torch.einsum("oi,ia,aj->oj", w, a2, a1) + b2 @ b1
    torch.testing.assert_close(got, w + 0.5 * delta)  # rank = a1.shape[0] = 2


def test_comfy_oft_raw_alpha_clamp_strength_squared_rescale_ignored():
    w, blocks = rnd(6, 5, 3), 0.3 * rnd(3, 2, 2)  # Conv1d-shaped W, 3 blocks of 2
    q_norm = torch.sqrt(sum(((b - b.T) ** 2).sum() for b in blocks))
    c = float(q_norm) / 2  # ‖Q‖ > α but ‖Q‖ < α·out: ComfyUI clamps, LyCORIS/A1111 would not
    sd = prefixed(dict(oft_blocks=blocks, alpha=alpha(c), rescale=rnd(6, 1, 1) + 3))
    for s in (1.0, 0.6):
        got, _ = comfy(sd, w, s=s)
        r = oft_rotation(blocks, c)
        rotated = (r.T @ w.flatten(1)).reshape(w.shape)
        torch.testing.assert_close(got, w + s * s * (rotated - w))
    unclamped = (oft_rotation(blocks, 0).T @ w.flatten(1)).reshape(w.shape)
    assert not torch.allclose(comfy(sd, w)[0], unclamped)


def boft_reference(blocks, w, c, rescale=None):
    m, n, b = blocks.shape[:3]
    out = n * b
    r = oft_rotation(blocks.reshape(m * n, b, b), c)  # one global norm over every stage and block
    total = torch.eye(out, dtype=F64)
    for i in range(m):
        p = perm_matrix(shuffle_perm(out, b, i))
        total = p.T @ r[i * out : (i + 1) * out, i * out : (i + 1) * out] @ p @ total
    res = total @ w.flatten(1)
    if rescale is not None:
        res = rescale.reshape(-1, 1) * res
    return res.reshape(w.shape)


def test_comfy_boft_one_stage_b2_is_oft_with_r_not_rt():
    w, blocks = rnd(8, 3), 0.4 * rnd(1, 4, 2, 2)
    got, _ = comfy(prefixed(dict(oft_blocks=blocks, alpha=alpha(0))), w)
    r = oft_rotation(blocks[0], 0)
    torch.testing.assert_close(got, r @ w)  # for b = 2 stage 0's shuffle is the identity
    assert not torch.allclose(got, r.T @ w)


def test_comfy_boft_one_stage_b4_is_shuffled_r():
    """For b > 2 stage 0 still interleaves the rows inside each block: W' = Pᵀ·R·P·W, not R·W."""
    w, blocks = rnd(8, 3), 0.4 * rnd(1, 2, 4, 4)
    got, _ = comfy(prefixed(dict(oft_blocks=blocks, alpha=alpha(0))), w)
    r, p = oft_rotation(blocks[0], 0), perm_matrix(shuffle_perm(8, 4, 0))
    torch.testing.assert_close(got, p.T @ r @ p @ w)
    assert not torch.allclose(got, r @ w)


def test_comfy_boft_stages_rescale_clamp_strength():
    w, blocks, rescale = rnd(8, 2, 3, 3), 0.3 * rnd(3, 4, 2, 2), 1 + 0.1 * rnd(8, 1, 1, 1)
    c = 0.5  # raw α, smaller than the global ‖Q‖
    assert torch.sqrt(sum(((b - b.transpose(-1, -2)) ** 2).sum() for b in blocks.flatten(0, 1))) > c
    sd = prefixed(dict(oft_blocks=blocks, alpha=alpha(c), rescale=rescale))
    got, _ = comfy(sd, w)
    torch.testing.assert_close(got, boft_reference(blocks, w, c, rescale))
    # strength: R_i ← s·R_i + (1−s)·I, rescale, then W + s·(out − W)
    s = 0.4
    m, n, b = blocks.shape[:3]
    r = oft_rotation(blocks.reshape(m * n, b, b), c)
    total = torch.eye(8, dtype=F64)
    for i in range(m):
        p = perm_matrix(shuffle_perm(8, b, i))
        ri = s * r[i * 8 : (i + 1) * 8, i * 8 : (i + 1) * 8] + (1 - s) * torch.eye(8, dtype=F64)
        total = p.T @ ri @ p @ total
    out = (rescale.reshape(-1, 1) * (total @ w.flatten(1))).reshape(w.shape)
    torch.testing.assert_close(comfy(sd, w, s=s)[0], w + s * (out - w))


@pytest.mark.parametrize("conv", [False, True])
def test_comfy_dora_output_axis_deviation(conv):
    w = rnd(6, 4, 3, 3) if conv else rnd(6, 4)
    down, up = (rnd(2, 4, 3, 3), rnd(6, 2, 1, 1)) if conv else (rnd(2, 4), rnd(6, 2))
    dora = row_norm(w) * (1 + 0.1 * rnd(6, *([1] * (w.dim() - 1))))  # (out, 1, …)
    sd = prefixed({"lora_up.weight": up, "lora_down.weight": down, "alpha": alpha(1), "dora_scale": dora})
    wc = w + 0.5 * lora_delta_flat(up, down, w.shape)
    comfy_formula = wc * dora / (row_norm(w) + EPS)
    correct = wc * dora / row_norm(wc)
    for s in (1.0, 0.3):
        got, _ = comfy(sd, w, s=s)
        torch.testing.assert_close(got, w + s * (comfy_formula - w))
    assert not torch.allclose(comfy_formula, correct)
    # with ΔW = 0 the deviation vanishes
    sd[f"{X}.lora_up.weight"] = torch.zeros_like(up)
    torch.testing.assert_close(comfy(sd, w)[0], w * dora / row_norm(w), rtol=1e-12, atol=1e-12)


def lora_delta_flat(up, down, shape):
    return torch.einsum("or,ri->oi", up.flatten(1), down.flatten(1)).reshape(shape)


@pytest.mark.parametrize("conv", [False, True])
def test_comfy_dora_input_axis(conv):
    w = rnd(6, 4, 3, 3) if conv else rnd(6, 4)
    down, up = (rnd(2, 4, 3, 3), rnd(6, 2, 1, 1)) if conv else (rnd(2, 4), rnd(6, 2))
    dora = 1 + rnd(1, 4, *([1] * (w.dim() - 2))).abs()  # (1, in, 1, …)
    sd = prefixed({"lora_up.weight": up, "lora_down.weight": down, "alpha": alpha(4), "dora_scale": dora})
    wc = w + 2 * lora_delta_flat(up, down, w.shape)
    got, _ = comfy(sd, w, s=0.5)
    torch.testing.assert_close(got, w + 0.5 * (wc * dora / (col_norm(wc) + EPS) - w))


def test_comfy_diff_and_norm_touch_bias():
    w, b, diff, diff_b = rnd(5, 4), rnd(5), rnd(5, 4, seed=1), rnd(5, seed=1)
    got_w, got_b = comfy(prefixed(dict(diff=diff, diff_b=diff_b)), w, b, s=0.5)
    torch.testing.assert_close(got_w, w + 0.5 * diff)
    torch.testing.assert_close(got_b, b + 0.5 * diff_b)
    wn, bn = rnd(7, seed=2), rnd(7, seed=3)
    gw, gb = comfy(prefixed(dict(w_norm=wn, b_norm=bn)), rnd(7), rnd(7, seed=9))
    torch.testing.assert_close(gw, rnd(7) + wn)
    torch.testing.assert_close(gb, rnd(7, seed=9) + bn)
    # no bias in the model: the bias patch is dropped
    assert comfy(prefixed(dict(diff=diff, diff_b=diff_b)), w, None)[1] is None
    # a diff of the wrong shape is skipped (SHAPE MISMATCH)
    torch.testing.assert_close(comfy(prefixed(dict(diff=rnd(4, 5))), w)[0], w)


def test_comfy_unconsumed_keys():
    sd = {
        "lora_unet_a.weight": rnd(5),  # IA3
        "lora_unet_a.on_input": torch.tensor(0),
        "lora_unet_b.lora_up.weight": rnd(5, 2),
        "lora_unet_b.lora_down.weight": rnd(2, 4),
        "lora_unet_b.alpha": alpha(2),
        "lora_unet_b.scale": alpha(9),  # never read
        "lora_unet_c.lora_up.weight": rnd(5, 2),  # not in the key map
        "lora_unet_c.lora_down.weight": rnd(2, 4),
    }
    patches, left = cf.load_patches(sd, {"lora_unet_a": "a", "lora_unet_b": "b"})
    assert left == [
        "lora_unet_a.weight",
        "lora_unet_a.on_input",
        "lora_unet_b.scale",
        "lora_unet_c.lora_up.weight",
        "lora_unet_c.lora_down.weight",
    ]
    assert set(patches) == {"b"} and patches["b"][0].kind == "lora" and patches["b"][0].alpha == 2.0


def test_comfy_later_patch_of_same_tensor_wins():
    w, diff = rnd(5, 4), rnd(5, 4, seed=3)
    sd = prefixed({"lora_up.weight": rnd(5, 2), "lora_down.weight": rnd(2, 4), "diff": diff})
    patches, left = cf.load_patches(sd, KM)
    assert left == [] and [p.kind for p in patches[T]] == ["diff"]
    torch.testing.assert_close(cf.calculate_weight(patches[T], w, intermediate_dtype=F64)[0], w + diff)


def test_comfy_float32_default_and_dtype_roundtrip():
    w, up, down = rnd(5, 4).float(), rnd(5, 2).float(), rnd(2, 4).float()
    patches, _ = cf.load_patches(prefixed({"lora_up.weight": up, "lora_down.weight": down}), KM)
    got, _ = cf.calculate_weight(patches[T], w.half())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), (w.half().float() + up @ down).half().float())


# ------------------------------------------------------------------------------------ ComfyUI: key maps


def test_comfy_te_key_map():
    km = cf.te_key_map(12, "lora_te")
    assert len(km) == 12 * 6
    assert km["lora_te_text_model_encoder_layers_0_mlp_fc1"] == "text_model.encoder.layers.0.mlp.fc1"
    assert (
        km["lora_te_text_model_encoder_layers_11_self_attn_out_proj"]
        == "text_model.encoder.layers.11.self_attn.out_proj"
    )
    assert "lora_te_text_model_embeddings_token_embedding" not in km
    km2 = cf.te_key_map(40, "lora_te2")
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in km2
    assert "lora_te2_text_model_encoder_layers_32_mlp_fc2" not in km2
    assert km2["lora_te2_text_projection"] == "text_projection"


def test_comfy_unet_key_map():
    paths = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "conv_in"]
    km = cf.unet_key_map(paths, None)
    assert km["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == paths[0]
    assert km["lora_unet_conv_in"] == "conv_in"
    sgm = {paths[0]: "input_blocks.1.1.transformer_blocks.0.attn1.to_q"}
    km = cf.unet_key_map(paths, sgm)
    assert km["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"] == paths[0]


# ------------------------------------------------------------------------------------ A1111: maths


@pytest.mark.parametrize("conv", [False, True])
def test_a1111_lora(conv):
    w = rnd(6, 4, 3, 3) if conv else rnd(6, 4)
    down = rnd(2, 4, 3, 3) if conv else rnd(2, 4)
    up = rnd(6, 2, 1, 1) if conv else rnd(6, 2)
    sd = prefixed({"lora_up.weight": up, "lora_down.weight": down, "alpha": alpha(3)})
    (got, _), bad = auto(sd, w, m=0.7)
    assert bad == {}
    torch.testing.assert_close(got, w + 0.7 * 1.5 * torch.einsum("or,ri...->oi...", up.flatten(1), down))


def test_a1111_lora_mid_lora_ab_and_scale_key():
    w, down, mid, up = rnd(6, 4, 3, 3), rnd(2, 4, 1, 1), rnd(2, 2, 3, 3), rnd(6, 2, 1, 1)
    (got, _), _ = auto(prefixed({"lora_up.weight": up, "lora_down.weight": down, "lora_mid.weight": mid}), w)
    torch.testing.assert_close(got, w + torch.einsum("oa,ackl,ci->oikl", up.flatten(1), mid, down.flatten(1)))
    w, up, down = rnd(5, 4), rnd(5, 2), rnd(2, 4)
    # lora_A/lora_B names: A1111 reads only the two factors (alpha and .scale dropped): scale 1
    (got, _), _ = auto(prefixed({"lora_B.weight": up, "lora_A.weight": down, "alpha": alpha(1)}), w)
    torch.testing.assert_close(got, w + up @ down)
    sd = prefixed({"lora_B.weight": up, "lora_A.weight": down, "alpha": alpha(1), "scale": alpha(0.25)})
    (got, _), _ = auto(sd, w)
    torch.testing.assert_close(got, w + up @ down)


@pytest.mark.parametrize("use_tucker", [False, True])
def test_a1111_loha(use_tucker):
    w = rnd(6, 4, 3, 3)
    if use_tucker:
        t1, t2 = rnd(3, 3, 3, 3, seed=1), rnd(3, 3, 3, 3, seed=2)
        w1a, w1b, w2a, w2b = rnd(3, 6, seed=3), rnd(3, 4, seed=4), rnd(3, 6, seed=5), rnd(3, 4, seed=6)
        sd = prefixed(dict(hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b, hada_t1=t1, hada_t2=t2))
        delta = tucker(t1, w1a, w1b) * tucker(t2, w2a, w2b)
    else:
        w1a, w1b, w2a, w2b = rnd(6, 3, seed=3), rnd(3, 36, seed=4), rnd(6, 3, seed=5), rnd(3, 36, seed=6)
        sd = prefixed(dict(hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b))
        delta = (torch.einsum("or,ri->oi", w1a, w1b) * torch.einsum("or,ri->oi", w2a, w2b)).reshape(w.shape)
    sd[f"{X}.alpha"] = alpha(1.5)
    (got, _), _ = auto(sd, w, m=0.5)
    torch.testing.assert_close(got, w + 0.5 * 0.5 * delta)


def test_a1111_lokr_scale_rules_and_missing_side():
    w = rnd(8, 6, 3, 3)
    w1, w2a, w2b = rnd(2, 3), rnd(4, 2), rnd(2, 2 * 9)
    (got, _), _ = auto(prefixed(dict(lokr_w1=w1, lokr_w2_a=w2a, lokr_w2_b=w2b, alpha=alpha(1))), w)
    torch.testing.assert_close(got, w + 0.5 * kron_delta(w1, (w2a @ w2b).reshape(4, 2, 3, 3), w.shape))
    w2 = rnd(4, 2, 3, 3, seed=7)
    (got, _), _ = auto(prefixed(dict(lokr_w1=w1, lokr_w2=w2, alpha=alpha(7))), w)  # both full: scale 1
    torch.testing.assert_close(got, w + kron_delta(w1, w2, w.shape))
    t2, w2a, w2b = rnd(2, 2, 3, 3, seed=3), rnd(2, 4, seed=4), rnd(2, 2, seed=5)
    sd = prefixed(dict(lokr_w1=w1, lokr_t2=t2, lokr_w2_a=w2a, lokr_w2_b=w2b, alpha=alpha(3)))
    (got, _), _ = auto(sd, w)
    torch.testing.assert_close(got, w + 1.5 * kron_delta(w1, tucker(t2, w2a, w2b), w.shape))
    (got, _), bad = auto(prefixed(dict(lokr_w1=w1, alpha=alpha(1))), w)
    assert X in bad and torch.equal(got, w)


@pytest.mark.parametrize("on_input", [0, 1])
def test_a1111_ia3(on_input):
    w, b = rnd(6, 4, 3, 3), rnd(6)
    vec = rnd(4 if on_input else 6, seed=2)
    sd = prefixed(dict(weight=vec.reshape(1, -1, 1, 1), on_input=torch.tensor(on_input)))
    (got, got_b), bad = auto(sd, w, b, m=0.5)
    torch.testing.assert_close(got_b, b)
    if not on_input:  # (out, in, 3, 3)·(out, 1) raises: logged, the conv left unpatched
        assert X in bad and torch.equal(got, w)
        return
    torch.testing.assert_close(got, w * (1 + 0.5 * vec.reshape(1, -1, 1, 1)))


def test_a1111_full_and_norm():
    w, b, diff, diff_b = rnd(5, 4), rnd(5), rnd(5, 4, seed=1), rnd(5, seed=1)
    (gw, gb), _ = auto(prefixed(dict(diff=diff, diff_b=diff_b)), w, b, m=0.5)
    torch.testing.assert_close(gw, w + 0.5 * diff)
    torch.testing.assert_close(gb, b + 0.5 * diff_b)
    (_, gb), _ = auto(prefixed(dict(diff=diff, diff_b=diff_b)), w, None)
    torch.testing.assert_close(gb, diff_b)  # the missing bias is created
    wn, bn = rnd(7, seed=2), rnd(7, seed=3)
    (gw, gb), _ = auto(prefixed(dict(w_norm=wn, b_norm=bn)), rnd(7), rnd(7, seed=9))
    torch.testing.assert_close(gw, rnd(7) + wn)
    torch.testing.assert_close(gb, rnd(7, seed=9) + bn)
    (gw, _), bad = auto(prefixed(dict(w_norm=wn)), rnd(7), rnd(7, seed=9))
    assert X in bad and torch.equal(gw, rnd(7))


def test_a1111_glora_old_layout_only_alpha_ignored():
    w = rnd(6, 4)
    a1, a2, b1, b2 = rnd(2, 4, seed=1), rnd(4, 2, seed=2), rnd(2, 4, seed=3), rnd(6, 2, seed=4)
    sd = prefixed({"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2, "alpha": alpha(1)})
    (got, _), bad = auto(sd, w)
    assert bad == {}
    torch.testing.assert_close(got, w + torch.einsum("oi,ia,aj->oj", w, a2, a1) + b2 @ b1)
    new = {"a1.weight": a2, "a2.weight": a1, "b1.weight": b2, "b2.weight": b1, "alpha": alpha(1)}
    (got, _), bad = auto(prefixed(new), w)
    assert "GLoRA" in bad[X] and torch.equal(got, w)
    del sd[f"{X}.alpha"]
    assert X in auto(sd, w)[1]  # GLoRA requires alpha


def test_a1111_oft_constraint_alpha_times_out_linear_multiplier():
    w, blocks = rnd(6, 5, 3), 0.3 * rnd(3, 2, 2)
    q_norm = float(torch.sqrt(sum(((b - b.T) ** 2).sum() for b in blocks)))
    c = q_norm / 2  # raw α clamps (ComfyUI) but α·out = 3‖Q‖ does not (A1111)
    rescale = rnd(6, 1, 1) + 3
    sd = prefixed(dict(oft_blocks=blocks, alpha=alpha(c), rescale=rescale))
    (got, _), bad = auto(sd, w, m=0.6)
    assert bad == {}
    rotated = (oft_rotation(blocks, 0).T @ w.flatten(1)).reshape(w.shape)
    torch.testing.assert_close(got, w + 0.6 * (rescale * rotated - w))  # linear in m, rescale applied
    comfy_w, _ = comfy(sd, w)
    assert not torch.allclose(comfy_w, rotated)
    # a constraint below ‖Q‖/out clamps
    c_small = q_norm / 12
    sd[f"{X}.alpha"] = alpha(c_small)
    (got, _), _ = auto(sd, w)
    clamped = (oft_rotation(blocks, c_small * 6).T @ w.flatten(1)).reshape(w.shape)
    torch.testing.assert_close(got, rescale * clamped)
    # α = 0 (and α absent): no constraint
    sd[f"{X}.alpha"] = alpha(0)
    torch.testing.assert_close(auto(sd, w)[0][0], rescale * rotated)
    del sd[f"{X}.alpha"]
    (got, _), bad = auto(sd, w)
    assert bad == {}
    torch.testing.assert_close(got, rescale * rotated)


def test_a1111_and_comfy_both_apply_boft():
    w, blocks = rnd(8, 3), 0.3 * rnd(2, 4, 2, 2)
    sd = prefixed(dict(oft_blocks=blocks, alpha=alpha(0)))
    (got, _), bad = auto(sd, w)
    assert bad == {}
    torch.testing.assert_close(got, boft_reference(blocks, w, 0))
    torch.testing.assert_close(comfy(sd, w)[0], boft_reference(blocks, w, 0))


@pytest.mark.parametrize("conv", [False, True])
def test_a1111_dora_input_axis_no_eps(conv):
    w = rnd(6, 4, 3, 3) if conv else rnd(6, 4)
    down, up = (rnd(2, 4, 3, 3), rnd(6, 2, 1, 1)) if conv else (rnd(2, 4), rnd(6, 2))
    dora = 1 + rnd(1, 4, *([1] * (w.dim() - 2))).abs()
    sd = prefixed({"lora_up.weight": up, "lora_down.weight": down, "alpha": alpha(4), "dora_scale": dora})
    wc = w + 2 * lora_delta_flat(up, down, w.shape)
    (got, _), _ = auto(sd, w, m=0.5)
    torch.testing.assert_close(got, w + 0.5 * (dora * wc / col_norm(wc) - w), rtol=1e-13, atol=1e-13)


def test_a1111_dora_output_axis_broadcasts_wrongly():
    w, down, up = rnd(6, 4), rnd(2, 4), rnd(6, 2)
    dora = row_norm(w)  # (out, 1): a LyCORIS wd_on_out file
    sd = prefixed({"lora_up.weight": up, "lora_down.weight": down, "alpha": alpha(2), "dora_scale": dora})
    wc = w + up @ down
    (got, _), bad = auto(sd, w)
    assert bad == {}
    torch.testing.assert_close(got, dora * wc / col_norm(wc))  # what the broadcast gives
    assert not torch.allclose(got, dora * wc / row_norm(wc))  # not the DoRA weight


def test_a1111_unmatched_module_and_multihead_rule():
    sd = {"lora_unet_nowhere.diff": rnd(5, 4)}
    merged, bad = a1.load_and_merge(sd, {}, "sd1")
    assert merged == {} and "diffusion_model_nowhere" in bad["lora_unet_nowhere"]
    names = [f"model_transformer_resblocks_0_attn_{p}_proj" for p in ("q", "k", "v", "out")]
    weights = {n: (rnd(4, 4, seed=i), None) for i, n in enumerate(names)}
    lora = {"lora_up.weight": rnd(4, 1), "lora_down.weight": rnd(1, 4)}
    parts = ("q", "k", "v")
    sd = {f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj.{k}": v for p in parts for k, v in lora.items()}
    merged, bad = a1.load_and_merge(sd, weights, "sd2")
    assert len(bad) == 3 and all(torch.equal(merged[n][0], weights[n][0]) for n in names)
    sd.update({f"lora_te_text_model_encoder_layers_0_self_attn_out_proj.{k}": v for k, v in lora.items()})
    merged, bad = a1.load_and_merge(sd, weights, "sd2", dtype=F64)
    assert bad == {}
    for n in names:
        torch.testing.assert_close(merged[n][0], weights[n][0] + lora["lora_up.weight"] @ lora["lora_down.weight"])


# ------------------------------------------------------------------------------------ A1111: names


@pytest.mark.parametrize(
    ("name", "model", "expected"),
    [
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "sd1",
            "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
        ),
        ("lora_unet_down_blocks_1_attentions_1_proj_in", "sd1", "diffusion_model_input_blocks_5_1_proj_in"),
        ("lora_unet_down_blocks_0_resnets_0_conv1", "sd1", "diffusion_model_input_blocks_1_0_in_layers_2"),
        ("lora_unet_down_blocks_2_resnets_1_conv2", "sd1", "diffusion_model_input_blocks_8_0_out_layers_3"),
        ("lora_unet_down_blocks_1_resnets_0_time_emb_proj", "sd1", "diffusion_model_input_blocks_4_0_emb_layers_1"),
        (
            "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
            "sd1",
            "diffusion_model_input_blocks_4_0_skip_connection",
        ),
        ("lora_unet_up_blocks_1_resnets_2_norm1", "sd1", "diffusion_model_output_blocks_5_0_in_layers_0"),
        ("lora_unet_up_blocks_3_attentions_2_proj_out", "sd1", "diffusion_model_output_blocks_11_1_proj_out"),
        ("lora_unet_mid_block_resnets_1_norm2", "sd1", "diffusion_model_middle_block_2_out_layers_0"),
        ("lora_unet_mid_block_attentions_0_proj_in", "sd1", "diffusion_model_middle_block_1_proj_in"),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", "sd1", "diffusion_model_input_blocks_3_0_op"),
        ("lora_unet_down_blocks_2_downsamplers_0_conv", "sd1", "diffusion_model_input_blocks_9_0_op"),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", "sd1", "diffusion_model_output_blocks_2_1_conv"),
        ("lora_unet_up_blocks_2_upsamplers_0_conv", "sd1", "diffusion_model_output_blocks_8_2_conv"),
        ("lora_unet_conv_in", "sd1", "diffusion_model_input_blocks_0_0"),
        ("lora_unet_conv_out", "sd1", "diffusion_model_out_2"),
        ("lora_unet_time_embedding_linear_2", "sd1", "diffusion_model_time_embed_2"),
        (
            "lora_te_text_model_encoder_layers_3_mlp_fc1",
            "sd1",
            "transformer_text_model_encoder_layers_3_mlp_fc1",
        ),
        ("lora_te_text_model_encoder_layers_3_mlp_fc1", "sd2", "model_transformer_resblocks_3_mlp_c_fc"),
        ("lora_te_text_model_encoder_layers_3_mlp_fc2", "sd2", "model_transformer_resblocks_3_mlp_c_proj"),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "sd2", "model_transformer_resblocks_0_attn_q_proj"),
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "sdxl",
            "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        ),
        ("lora_unet_output_blocks_2_2_conv", "sdxl", "diffusion_model_output_blocks_2_2_conv"),
        (
            "lora_te1_text_model_encoder_layers_0_self_attn_k_proj",
            "sdxl",
            "0_transformer_text_model_encoder_layers_0_self_attn_k_proj",
        ),
        (
            "lora_te2_text_model_encoder_layers_5_self_attn_out_proj",
            "sdxl",
            "1_model_transformer_resblocks_5_attn_out_proj",
        ),
        ("lora_te2_text_model_encoder_layers_5_mlp_fc1", "sdxl", "1_model_transformer_resblocks_5_mlp_c_fc"),
        ("oft_unet_input_blocks_4_1_proj_in", "sdxl", "diffusion_model_input_blocks_4_1_proj_in"),
    ],
)
def test_a1111_convert_name(name, model, expected):
    assert a1.convert_name(name, model) == expected


def test_a1111_convert_name_rejects_unknown_model():
    with pytest.raises(ValueError, match="sd1"):
        a1.convert_name("lora_unet_conv_in", "flux")
