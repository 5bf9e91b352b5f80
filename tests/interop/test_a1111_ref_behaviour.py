"""What A1111's Lora extension (master 82a973c0, v1.10.1) does where it decides success or failure, as
reproduced by ``a1111_ref``: per-layer errors it logs and skips, errors that abort the whole file, and the
OpenCLIP ``nn.MultiheadAttention`` path.

Tiny float64 tensors; the expected weights are independent einsum/matmul formulas (not the loader's helpers),
compared with ``assert_close`` at float64 defaults (rtol 1e-7, atol 1e-7) unless stated.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from higanbana.algorithms import algorithm_class

from ..algorithms.cases import randomize
from . import a1111_ref as a1

F64 = torch.float64
X = "lora_unet_blk"
N = "diffusion_model_blk"


def rnd(*shape, seed=0):
    g = torch.Generator().manual_seed(seed * 7919 + 31 * len(shape) + sum(shape))
    return torch.randn(*shape, generator=g, dtype=F64)


def scalar(v):
    return torch.tensor(float(v))


def run(sd, weights, model="sd1", m=1.0):
    errors: list[str] = []
    merged, bad = a1.load_and_merge(sd, weights, model, m, dtype=F64, errors=errors)
    return merged, bad, errors


def one(parts, w, b=None, m=1.0):
    """A single UNet module ``X`` on the layer ``N``."""
    merged, bad, errors = run({f"{X}.{k}": v for k, v in parts.items()}, {N: (w, b)}, m=m)
    return merged[N], bad, errors


def assert_skipped(result, w, b=None, what="RuntimeError"):
    (got_w, got_b), bad, errors = result
    assert X in bad and what in bad[X], bad
    assert len(errors) == 1, errors
    assert torch.equal(got_w, w)
    assert (got_b is None and b is None) or torch.equal(got_b, b)


def cayley(q):
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return torch.linalg.solve((eye - q).mT, (eye + q).mT).mT  # (I+Q)(I−Q)⁻¹


def skew_clamped(blocks, limit):
    q = blocks - blocks.mT
    norm = q.flatten().norm()
    return q * (limit / norm) if 0 < limit < norm else q


# ----------------------------------------------------------------------------------------- (a) IA3


@pytest.mark.parametrize("on_input", [0, 1])
def test_ia3_linear_scales_rows_or_columns(on_input):
    w, b = rnd(6, 4), rnd(6)
    vec = rnd(4 if on_input else 6, seed=1)
    (gw, gb), bad, errors = one({"weight": vec, "on_input": torch.tensor(on_input)}, w, b, m=0.5)
    ref = torch.einsum("oi,i->oi", w, 1 + 0.5 * vec) if on_input else torch.einsum("oi,o->oi", w, 1 + 0.5 * vec)
    assert bad == {} and errors == []
    torch.testing.assert_close(gw, ref)
    torch.testing.assert_close(gb, b)


@pytest.mark.parametrize("k", [3, 1])
@pytest.mark.parametrize("stored", ["(1,C,1,1)", "(C,)"])
def test_ia3_conv_output_side_fails_per_layer(k, stored):
    """on_input=0 on a conv: (C,1) broadcasts against the kernel axes. 3×3: (out,in,3,3)·(out,1) raises;
    1×1: ΔW becomes (out,in,out,1) and copying W+ΔW into (out,in,1,1) raises. Logged, layer unpatched."""
    w, b = rnd(6, 4, k, k), rnd(6)
    vec = rnd(6, seed=1)
    vec = vec.reshape(1, -1, 1, 1) if stored == "(1,C,1,1)" else vec
    if k == 1:
        assert torch.broadcast_shapes(w.shape, (6, 1)) == (6, 4, 6, 1)
    assert_skipped(one({"weight": vec, "on_input": torch.tensor(0)}, w, b), w, b, "IA3: RuntimeError")


def test_ia3_conv_output_side_with_kernel_equal_to_channels_is_silently_wrong():
    """out = 3 = kernel height: (3,in,3,3)·(3,1) broadcasts along the kernel rows — no error, wrong weight."""
    w, vec = rnd(3, 4, 3, 3), rnd(3, seed=1)
    (gw, _), bad, errors = one({"weight": vec, "on_input": torch.tensor(0)}, w, m=0.5)
    assert bad == {} and errors == []
    torch.testing.assert_close(gw, torch.einsum("oihw,h->oihw", w, 1 + 0.5 * vec))
    assert not torch.allclose(gw, torch.einsum("oihw,o->oihw", w, 1 + 0.5 * vec))


@pytest.mark.parametrize("k", [3, 1])
def test_ia3_conv_input_side_right_with_1c11_vector_fails_with_flat_one(k):
    w = rnd(6, 4, k, k)
    vec = rnd(4, seed=1)
    (gw, _), bad, errors = one({"weight": vec.reshape(1, 4, 1, 1), "on_input": torch.tensor(1)}, w, m=0.5)
    assert bad == {} and errors == []
    torch.testing.assert_close(gw, torch.einsum("oihw,i->oihw", w, 1 + 0.5 * vec))
    # the same vector stored flat (C,) broadcasts against the last kernel axis: raises for 3×3, gives
    # (out,in,1,in) for 1×1 that cannot be copied into the weight
    assert_skipped(one({"weight": vec, "on_input": torch.tensor(1)}, w), w, None, "IA3: RuntimeError")


def test_ia3_without_on_input_aborts_the_whole_file():
    w1, w2 = rnd(6, 4), rnd(5, 4, seed=1)
    sd = {
        "lora_unet_a.lora_up.weight": rnd(6, 2),
        "lora_unet_a.lora_down.weight": rnd(2, 4),
        "lora_unet_b.weight": rnd(5),
    }
    merged, bad, errors = run(sd, {"diffusion_model_a": (w1, None), "diffusion_model_b": (w2, None)})
    assert set(bad) == {"lora_unet_a", "lora_unet_b"} and all("file not loaded" in r for r in bad.values())
    assert len(errors) == 1 and "KeyError" in errors[0]
    assert torch.equal(merged["diffusion_model_a"][0], w1) and torch.equal(merged["diffusion_model_b"][0], w2)


def test_ia3_on_a_norm_layer_fails_the_generation():
    """A 1-D weight has no size(1): IndexError, which A1111 does not catch."""
    with pytest.raises(a1.GenerationFailed, match="IndexError"):
        one({"weight": rnd(5), "on_input": torch.tensor(0)}, rnd(5))


# ------------------------------------------------------------------------ (b) OpenCLIP attention


def attention(model, bias=True, layer=0):
    prefix = {"sd2": "", "sdxl": "1_"}[model]
    names = [f"{prefix}model_transformer_resblocks_{layer}_attn_{p}_proj" for p in ("q", "k", "v", "out")]
    return {n: (rnd(4, 4, seed=i), rnd(4, seed=10 + i) if bias else None) for i, n in enumerate(names)}


def te_name(model, part, layer=0):
    prefix = {"sd2": "lora_te", "sdxl": "lora_te2", "sd1": "lora_te"}[model]
    return f"{prefix}_text_model_encoder_layers_{layer}_self_attn_{part}_proj"


@pytest.mark.parametrize("model", ["sd2", "sdxl"])
def test_full_on_openclip_attention_drops_qkv_bias_and_applies_out_bias(model):
    weights = attention(model)
    diffs = {p: (rnd(4, 4, seed=20 + i), rnd(4, seed=30 + i)) for i, p in enumerate(("q", "k", "v", "out"))}
    sd = {f"{te_name(model, p)}.{k}": t for p, (d, db) in diffs.items() for k, t in (("diff", d), ("diff_b", db))}
    merged, bad, errors = run(sd, weights, model, m=0.5)
    assert bad == {} and errors == []
    for (name, (w, b)), (p, (d, db)) in zip(weights.items(), diffs.items(), strict=True):
        gw, gb = merged[name]
        torch.testing.assert_close(gw, w + 0.5 * d)
        if p == "out":
            torch.testing.assert_close(gb, b + 0.5 * db)
        else:
            assert torch.equal(gb, b)  # in_proj_bias is never touched


def test_full_on_openclip_out_proj_without_bias_gets_one():
    weights = attention("sd2", bias=False)
    db = rnd(4, seed=3)
    sd = {f"{te_name('sd2', p)}.diff": rnd(4, 4, seed=i) for i, p in enumerate(("q", "k", "v", "out"))}
    sd[f"{te_name('sd2', 'out')}.diff_b"] = db
    merged, bad, _ = run(sd, weights, "sd2", m=0.5)
    assert bad == {}
    torch.testing.assert_close(merged["model_transformer_resblocks_0_attn_out_proj"][1], 0.5 * db)
    assert merged["model_transformer_resblocks_0_attn_q_proj"][1] is None


def test_full_on_transformers_attention_applies_every_bias():
    """SD1's (and SDXL's first) encoder has separate Linear q/k/v/out: every diff_b is added."""
    name = "transformer_text_model_encoder_layers_0_self_attn_q_proj"
    w, b, d, db = rnd(4, 4), rnd(4, seed=1), rnd(4, 4, seed=2), rnd(4, seed=3)
    merged, bad, _ = run({f"{te_name('sd1', 'q')}.diff": d, f"{te_name('sd1', 'q')}.diff_b": db}, {name: (w, b)})
    assert bad == {}
    torch.testing.assert_close(merged[name][0], w + d)
    torch.testing.assert_close(merged[name][1], b + db)


def test_openclip_attention_partial_is_silently_ignored():
    weights = attention("sdxl")
    sd = {f"{te_name('sdxl', p)}.diff": rnd(4, 4, seed=i) for i, p in enumerate(("q", "k", "v"))}
    merged, bad, errors = run(sd, weights, "sdxl")
    assert errors == [] and len(bad) == 3 and all("all four" in r for r in bad.values())
    assert all(torch.equal(merged[n][0], w) for n, (w, _) in weights.items())


def test_openclip_attention_in_proj_is_written_before_out_proj():
    """out's ΔW cannot be added to out_proj (wrong shape): q/k/v are already patched, out stays."""
    weights = attention("sd2")
    diffs = [rnd(4, 4, seed=1), rnd(4, 4, seed=2), rnd(4, 4, seed=3), rnd(4, 5, seed=4)]
    sd = {f"{te_name('sd2', p)}.diff": d for p, d in zip(("q", "k", "v", "out"), diffs, strict=True)}
    sd[f"{te_name('sd2', 'out')}.diff_b"] = rnd(4, seed=5)
    merged, bad, errors = run(sd, weights, "sd2")
    assert list(bad) == [te_name("sd2", "out")] and len(errors) == 1
    names = list(weights)
    for name, d in zip(names[:3], diffs[:3], strict=True):
        torch.testing.assert_close(merged[name][0], weights[name][0] + d)
    assert torch.equal(merged[names[3]][0], weights[names[3]][0])
    assert torch.equal(merged[names[3]][1], weights[names[3]][1])


def test_openclip_attention_error_in_q_leaves_all_four_unpatched():
    weights = attention("sd2")
    diffs = [rnd(4, 5, seed=1), rnd(4, 4, seed=2), rnd(4, 4, seed=3), rnd(4, 4, seed=4)]
    sd = {f"{te_name('sd2', p)}.diff": d for p, d in zip(("q", "k", "v", "out"), diffs, strict=True)}
    merged, bad, errors = run(sd, weights, "sd2")
    assert len(bad) == 4 and len(errors) == 1  # one error counted for the layer
    assert all(torch.equal(merged[n][0], w) for n, (w, _) in weights.items())


def test_ia3_on_openclip_attention_uses_the_in_proj_chunks():
    weights = attention("sd2")
    vecs = [rnd(4, seed=40 + i) for i in range(4)]
    sd = {}
    for p, v in zip(("q", "k", "v", "out"), vecs, strict=True):
        sd[f"{te_name('sd2', p)}.weight"] = v
        sd[f"{te_name('sd2', p)}.on_input"] = torch.tensor(0)
    merged, bad, errors = run(sd, weights, "sd2", m=0.5)
    assert bad == {} and errors == []
    for (name, (w, _)), v in zip(weights.items(), vecs, strict=True):
        torch.testing.assert_close(merged[name][0], torch.einsum("oi,o->oi", w, 1 + 0.5 * v))


# ------------------------------------------------------------------------------ whole-file aborts


@pytest.mark.parametrize(
    "bad_module",
    [
        {"w_norm": rnd(5)},  # norm needs b_norm too: no module type accepts it
        {"lokr_w1": rnd(1, 5)},  # LoKr with one side
        {"a1.weight": rnd(1, 5), "a2.weight": rnd(5, 1), "b1.weight": rnd(1, 5), "b2.weight": rnd(5, 1)},  # no α
    ],
    ids=["norm-without-b_norm", "lokr-one-side", "glora-without-alpha"],
)
def test_a_key_set_no_module_type_accepts_aborts_the_whole_file(bad_module):
    w1, w2 = rnd(6, 4), rnd(5, 5, seed=1)
    sd = {"lora_unet_a.lora_up.weight": rnd(6, 2), "lora_unet_a.lora_down.weight": rnd(2, 4)}
    sd.update({f"lora_unet_b.{k}": v for k, v in bad_module.items()})
    merged, bad, errors = run(sd, {"diffusion_model_a": (w1, None), "diffusion_model_b": (w2, None)})
    assert set(bad) == {"lora_unet_a", "lora_unet_b"} and "AssertionError" in errors[0]
    assert torch.equal(merged["diffusion_model_a"][0], w1)


def test_lora_on_a_norm_layer_aborts_the_whole_file():
    (gw, _), bad, errors = one({"lora_up.weight": rnd(5, 1), "lora_down.weight": rnd(1, 1)}, rnd(5))
    assert "file not loaded" in bad[X] and "AssertionError" in errors[0] and torch.equal(gw, rnd(5))


def test_name_with_a_digit_led_group_aborts_the_whole_file():
    """A1111 int()s every group that starts with a digit: ``…_attentions_0_0proj`` raises ValueError."""
    sd = {"lora_unet_down_blocks_0_attentions_0_0proj.diff": rnd(4, 4)}
    _, bad, errors = run(sd, {})
    assert "file not loaded" in bad["lora_unet_down_blocks_0_attentions_0_0proj"] and "ValueError" in errors[0]


def test_unmatched_names_are_only_ignored():
    w = rnd(6, 4)
    sd = {"lora_unet_nowhere.diff": rnd(3, 3), f"{X}.diff": rnd(6, 4, seed=1)}
    merged, bad, errors = run(sd, {N: (w, None)})
    gw = merged[N][0]
    assert errors == [] and list(bad) == ["lora_unet_nowhere"] and "diffusion_model_nowhere" in bad["lora_unet_nowhere"]
    torch.testing.assert_close(gw, w + rnd(6, 4, seed=1))


# ------------------------------------------------------------------------------------------ OFT / BOFT


def test_oft_without_alpha_or_with_alpha_0_rotates_unconstrained():
    w, blocks = rnd(6, 5), 0.3 * rnd(3, 2, 2, seed=1)
    rot = torch.block_diag(*cayley(blocks - blocks.mT))
    expected = w + 0.5 * (rot.T @ w - w)  # Rᵀ·W, linear in the multiplier
    for extra in ({}, {"alpha": scalar(0)}):
        (gw, _), bad, errors = one({"oft_blocks": blocks, **extra}, w, m=0.5)
        assert bad == {} and errors == []
        torch.testing.assert_close(gw, expected)


def test_oft_clamps_with_alpha_times_out_applies_rescale_and_ignores_scale_key():
    w, blocks, rescale = rnd(6, 5, 3, 3), 0.3 * rnd(3, 2, 2, seed=1), 1 + rnd(6, 1, 1, 1, seed=2)
    q_norm = float((blocks - blocks.mT).flatten().norm())
    c = q_norm / 12  # α·out = ‖Q‖/2: clamps
    sd = {"oft_blocks": blocks, "alpha": scalar(c), "rescale": rescale, "scale": scalar(0.1)}
    (gw, _), bad, _ = one(sd, w, m=0.5)
    assert bad == {}
    rot = torch.block_diag(*cayley(skew_clamped(blocks, c * 6)))
    rotated = torch.einsum("po,oikl->pikl", rot.T, w)
    torch.testing.assert_close(gw, w + 0.5 * (torch.einsum("o,oikl->oikl", rescale.flatten(), rotated) - w))


def test_oft_blocks_that_do_not_tile_the_rows_fail_per_layer():
    w = rnd(6, 5)
    assert_skipped(one({"oft_blocks": rnd(2, 2, 2), "alpha": scalar(1)}, w), w, None, "OFT: RuntimeError")


def test_old_oft_diag_is_used_as_the_rotation():
    w, r = rnd(6, 5), rnd(3, 2, 2, seed=1)
    (gw, _), bad, _ = one({"oft_diag": r}, w)
    assert bad == {}
    torch.testing.assert_close(gw, torch.block_diag(*r).T @ w)


def butterfly(blocks, w):
    """Stage i: permute rows by P_i (rows (out/2h, 2, h) with the last two axes swapped, h = 2^i·b/2), apply
    block-diag(R_i) on the left, permute back — written with explicit permutation matrices."""
    out, b = w.shape[0], blocks.shape[-1]
    x = w.flatten(1)
    for i, stage in enumerate(blocks):
        h = 2**i * b // 2
        perm = [a * 2 * h + g * h + t for a in range(out // (2 * h)) for t in range(h) for g in range(2)]
        p = torch.zeros(out, out, dtype=w.dtype)
        p[range(out), perm] = 1
        x = p.T @ torch.block_diag(*cayley(stage - stage.mT)) @ p @ x
    return x.reshape(w.shape)


@pytest.mark.parametrize("conv", [False, True])
def test_boft_is_applied_with_r_on_the_left(conv):
    w = rnd(8, 3, 3, 3) if conv else rnd(8, 3)
    blocks, rescale = 0.3 * rnd(3, 4, 2, 2, seed=1), 1 + rnd(8, 1, seed=2)
    (gw, _), bad, errors = one({"oft_blocks": blocks, "alpha": scalar(0), "rescale": rescale}, w)
    assert bad == {} and errors == []
    expected = rescale.reshape(-1, *[1] * (w.dim() - 1)) * butterfly(blocks, w)
    torch.testing.assert_close(gw, expected)


@pytest.mark.parametrize(
    ("algo", "options"),
    [("boft", {"rank": 2, "rescaled": True, "constraint": 0.05}), ("oft", {"rank": 2, "rescaled": True})],
)
def test_a1111_merges_our_orthogonal_files_like_we_do(algo, options):
    """Our OFT/BOFT files (rescale included) give our merged weight at strength 1 (our Cayley runs in
    float32: rtol 1e-6, atol 1e-7)."""
    layer = nn.Linear(3, 8).double()
    adapter = algorithm_class(algo)(layer, **options).double()
    randomize(adapter, std=0.2)
    sd = {f"{X}.{k}": v for k, v in adapter.state_tensors().items()}
    merged, bad, errors = run(sd, {N: (layer.weight.detach().clone(), layer.bias.detach().clone())})
    assert bad == {} and errors == []
    torch.testing.assert_close(merged[N][0], adapter.merged_weight(1.0).detach(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------- LoRA, LoHa, GLoRA


def test_lora_a_b_keys_drop_alpha_scale_and_dora_scale():
    w, up, down = rnd(5, 4), rnd(5, 2, seed=1), rnd(2, 4, seed=2)
    sd = {"lora_B.weight": up, "lora_A.weight": down, "alpha": scalar(1), "scale": scalar(0.25)}
    sd["dora_scale"] = 1 + rnd(1, 4, seed=3).abs()
    (gw, _), bad, _ = one(sd, w, m=0.5)
    assert bad == {}
    torch.testing.assert_close(gw, w + 0.5 * torch.einsum("or,ri->oi", up, down))


def test_a_bias_key_is_added_to_the_delta_before_the_scale():
    w, up, down, extra = rnd(5, 4), rnd(5, 2, seed=1), rnd(2, 4, seed=2), rnd(5, 4, seed=3)
    sd = {"lora_up.weight": up, "lora_down.weight": down, "alpha": scalar(1), "bias": extra}
    (gw, _), _, _ = one(sd, w, m=0.5)
    torch.testing.assert_close(gw, w + 0.5 * 0.5 * (torch.einsum("or,ri->oi", up, down) + extra))


def test_lora_on_inpainting_conv_is_padded_to_nine_inputs():
    w, up, down = rnd(6, 9, 3, 3), rnd(6, 2, 1, 1, seed=1), rnd(2, 4, 3, 3, seed=2)
    (gw, _), bad, _ = one({"lora_up.weight": up, "lora_down.weight": down}, w)
    assert bad == {}
    delta = torch.einsum("or,rikl->oikl", up.flatten(1), down)
    torch.testing.assert_close(gw[:, :4], w[:, :4] + delta)
    assert torch.equal(gw[:, 4:], w[:, 4:])


def test_loha_tucker_is_per_side():
    w = rnd(6, 4, 3, 3)
    t1, w1a, w1b = rnd(2, 2, 3, 3, seed=1), rnd(2, 6, seed=2), rnd(2, 4, seed=3)
    w2a, w2b = rnd(6, 2, seed=4), rnd(2, 36, seed=5)
    sd = {"hada_t1": t1, "hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    (gw, _), bad, _ = one(sd, w)
    assert bad == {}
    first = torch.einsum("abkl,ap,bq->pqkl", t1, w1a, w1b)
    second = torch.einsum("or,rj->oj", w2a, w2b).reshape(6, 4, 3, 3)
    torch.testing.assert_close(gw, w + first * second)


def test_glora_old_layout_on_linear_computes():
    w = rnd(6, 4)
    a1_, a2_, b1_, b2_ = rnd(2, 4, seed=1), rnd(4, 2, seed=2), rnd(2, 4, seed=3), rnd(6, 2, seed=4)
    sd = {"a1.weight": a1_, "a2.weight": a2_, "b1.weight": b1_, "b2.weight": b2_, "alpha": scalar(7)}
    (gw, _), bad, _ = one(sd, w, m=0.5)
    assert bad == {}
    torch.testing.assert_close(gw, w + 0.5 * (torch.einsum("oi,ir,rj->oj", w, a2_, a1_) + b2_ @ b1_))


@pytest.mark.parametrize("case", ["new-layout-linear", "old-layout-conv"])
def test_glora_new_layout_and_convs_fail_per_layer(case):
    if case == "new-layout-linear":  # a1 (in,r), a2 (r,in), b1 (out,r), b2 (r,in)
        w = rnd(6, 4)
        parts = {"a1.weight": rnd(4, 2), "a2.weight": rnd(2, 4), "b1.weight": rnd(6, 2), "b2.weight": rnd(2, 4)}
    else:  # old layout, 1×1 conv weights as LyCORIS stores them: not flattened, W·a2 does not compute
        w = rnd(6, 4, 1, 1)
        parts = {
            "a1.weight": rnd(2, 4, 1, 1),
            "a2.weight": rnd(4, 2, 1, 1),
            "b1.weight": rnd(2, 4, 1, 1),
            "b2.weight": rnd(6, 2, 1, 1),
        }
    assert_skipped(one({**parts, "alpha": scalar(1)}, w), w, None, "GLoRA: RuntimeError")


# ---------------------------------------------------------------------------------------------- names


def test_name_lookup_chain():
    known = {
        "diffusion_model_input_blocks_4_1_proj_in",
        "0_transformer_text_model_encoder_layers_0_mlp_fc1",
        "transformer_text_model_encoder_layers_0_mlp_fc1",
        "diffusion_model_down_blocks_0_attentions_0_proj_in",
    }
    # SGM name (no regex rule): lora_unet → diffusion_model
    assert a1.resolve_name("lora_unet_input_blocks_4_1_proj_in", "sdxl", known) == (
        "diffusion_model_input_blocks_4_1_proj_in",
        True,
    )
    # the regex result is missing: the fallback of the original name is tried
    assert a1.resolve_name("lora_unet_down_blocks_0_attentions_0_proj_in", "sdxl", known)[1]
    # lora_te1_: SDXL's first encoder, else a transformers encoder without the 0_ prefix
    assert a1.resolve_name("lora_te1_text_model_encoder_layers_0_mlp_fc1", "sdxl", known)[0].startswith("0_")
    sd1 = known - {"0_transformer_text_model_encoder_layers_0_mlp_fc1"}
    assert a1.resolve_name("lora_te1_text_model_encoder_layers_0_mlp_fc1", "sd1", sd1) == (
        "transformer_text_model_encoder_layers_0_mlp_fc1",
        True,
    )
    # lora_te_ on SDXL converts to transformer_text_model_… (no 0_) and has no fallback: not found
    sdxl = {"0_transformer_text_model_encoder_layers_0_mlp_fc1"}
    assert not a1.resolve_name("lora_te_text_model_encoder_layers_0_mlp_fc1", "sdxl", sdxl)[1]
    # SDXL diffusers upsampler 0: the SD1 layout gives output_blocks_2_1_conv (SDXL has it at 2_2)
    key, found = a1.resolve_name(
        "lora_unet_up_blocks_0_upsamplers_0_conv", "sdxl", {"diffusion_model_output_blocks_2_2_conv"}
    )
    assert not found and key == "diffusion_model_up_blocks_0_upsamplers_0_conv"


def test_glora_new_layout_rank_1_on_square_1x1_conv_is_silently_wrong():
    """Our layout (a1 (in,1,1,1), a2 (1,in,1,1), b1 (out,1,1,1), b2 (1,in,1,1)) on a 1×1 conv with in = out:
    the batched matmuls broadcast instead of failing; alpha is ignored (scale 1)."""
    w = rnd(4, 4, 1, 1)
    a1_, a2_, b1_, b2_ = (
        rnd(4, 1, 1, 1, seed=1),
        rnd(1, 4, 1, 1, seed=2),
        rnd(4, 1, 1, 1, seed=3),
        rnd(1, 4, 1, 1, seed=4),
    )
    sd = {"a1.weight": a1_, "a2.weight": a2_, "b1.weight": b1_, "b2.weight": b2_, "alpha": scalar(1)}
    (gw, _), bad, errors = one(sd, w, m=0.5)
    assert bad == {} and errors == []
    a1v, a2v, b1v, b2v = (t.flatten() for t in (a1_, a2_, b1_, b2_))
    got = torch.einsum("oi,i,o->oi", w.flatten(1), a2v, a1v) + torch.einsum("o,i->oi", b1v, b2v)
    torch.testing.assert_close(gw, w + 0.5 * got.reshape(w.shape))
    ours = torch.einsum("oj,j,i->oi", w.flatten(1), a1v, a2v) + torch.einsum("o,i->oi", b1v, b2v)  # W·a1·a2 + b1·b2
    assert not torch.allclose(gw, w + 0.5 * ours.reshape(w.shape))
