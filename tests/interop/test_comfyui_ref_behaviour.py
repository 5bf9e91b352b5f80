"""The ComfyUI behaviours ``comfyui_ref`` reproduces that decide whether a module loads, fails or deviates.

Each test pins one behaviour read in ComfyUI's ``comfy/lora.py`` and ``comfy/weight_adapter/*.py`` (see the
module docstring of ``comfyui_ref``): which keys are read, which errors are caught (the weight is left
unpatched, :class:`PatchFailed`) and which are not (:class:`ComfyCrash`), and the maths where it differs from
LyCORIS. Tensors are tiny and float64; numerics are compared with formulas written here index by index
(einsum, permutation matrices), within ``TOL`` (rtol 1e-9, atol 1e-12): different kernels, never bitwise.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from higanbana.algorithms import algorithm_class

from . import comfyui_ref as cf

F64 = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-12}
X = "lora_unet_blk"
KM = {X: "blk"}


def rnd(*shape, seed=0):
    g = torch.Generator().manual_seed(7919 * seed + 31 * len(shape) + sum(shape))
    return torch.randn(*shape, generator=g, dtype=F64)


def alpha(v):
    return torch.tensor(float(v))


KEEP = ("set_weight", "reshape_weight")


def file(**tensors):
    """Module ``X``'s keys; ``a1_weight`` stands for ``a1.weight`` (``set_weight``, ``reshape_weight`` stay)."""
    return {
        f"{X}.{k if k in KEEP else k.removesuffix('_weight') + '.weight' if k.endswith('_weight') else k}": v
        for k, v in tensors.items()
    }


def load(sd):
    return cf.load_patches(sd, KM)


def merge(sd, w, b=None, s=1.0):
    """(weight, bias, errors, keys not loaded) as ComfyUI leaves them."""
    patches, left = load(sd)
    errors: list[str] = []
    got_w, got_b = cf.calculate_weight(patches.get("blk", []), w, b, s, intermediate_dtype=F64, errors=errors)
    return got_w, got_b, errors, left


def close(got, expected):
    torch.testing.assert_close(got, expected, **TOL)


# ---------------------------------------------------------------------------------------- load_lora: keys


def test_lora_up_name_decides_and_its_down_name_must_exist():
    with pytest.raises(cf.ComfyCrash, match="lora_down"):
        load(file(lora_up_weight=rnd(5, 2)))
    with pytest.raises(cf.ComfyCrash, match="lora_A"):
        load(file(lora_B_weight=rnd(5, 2), lora_down_weight=rnd(2, 4)))  # no fallback to another pair


def test_lora_name_precedence_kohya_first_and_the_rest_not_loaded():
    w, up, down = rnd(5, 4), rnd(5, 2, seed=1), rnd(2, 4, seed=2)
    sd = file(lora_up_weight=up, lora_down_weight=down, lora_B_weight=rnd(5, 2, seed=3), lora_A_weight=rnd(2, 4))
    got, _, errors, left = merge(sd, w)
    assert errors == [] and left == [f"{X}.lora_B.weight", f"{X}.lora_A.weight"]
    close(got, w + torch.einsum("or,ri->oi", up, down))


def test_lora_mid_is_read_only_with_kohya_names():
    w, up, down = rnd(5, 4), rnd(5, 2, seed=1), rnd(2, 4, seed=2)
    got, _, _, left = merge(file(lora_B_weight=up, lora_A_weight=down, lora_mid_weight=rnd(2, 2, 1, 1)), w)
    assert left == [f"{X}.lora_mid.weight"]
    close(got, w + torch.einsum("or,ri->oi", up, down))


def test_lokr_partial_keys_are_read_but_make_no_patch():
    patches, left = load(file(lokr_w1_b=rnd(2, 3), lokr_t2=rnd(2, 2, 3, 3), alpha=alpha(1)))
    assert patches == {} and left == []


def test_every_adapter_is_tried_the_last_that_accepts_wins():
    w, w1, w2 = rnd(8, 6), rnd(2, 3, seed=1), rnd(4, 2, seed=2)
    sd = file(lora_up_weight=rnd(8, 1), lora_down_weight=rnd(1, 6), lokr_w1=w1, lokr_w2=w2)
    patches, left = load(sd)
    assert left == [] and [p.kind for p in patches["blk"]] == ["lokr"]
    got, _, _, _ = merge(sd, w)
    close(got, w + torch.einsum("ij,pq->ipjq", w1, w2).reshape(8, 6))


def test_b_norm_is_read_only_with_w_norm():
    w, b, b_norm = rnd(6), rnd(6, seed=1), rnd(6, seed=2)
    patches, left = load(file(b_norm=b_norm))
    assert patches == {} and left == [f"{X}.b_norm"]
    _, got_b, _, left = merge(file(w_norm=0 * b_norm, b_norm=b_norm), w, b, s=0.5)
    assert left == []
    close(got_b, b + 0.5 * b_norm)


@pytest.mark.parametrize(("dims", "kind"), [(2, None), (3, "oft"), (4, "boft"), (5, None)])
def test_oft_blocks_dims_pick_oft_boft_or_nothing(dims, kind):
    blocks = torch.zeros(*([1] * (dims - 2)), 2, 2, dtype=F64)
    patches, left = load(file(oft_blocks=blocks, rescale=torch.ones(2, 1, dtype=F64), alpha=alpha(0)))
    if kind is None:  # neither adapter accepts: the blocks and the rescale are both "not loaded"
        assert patches == {} and left == [f"{X}.oft_blocks", f"{X}.rescale"]
    else:
        assert [p.kind for p in patches["blk"]] == [kind] and left == []


@pytest.mark.parametrize(
    "tensors",
    [
        {"hada_w1_a": rnd(4, 2), "hada_w1_b": rnd(2, 3), "hada_w2_a": rnd(4, 2)},  # no hada_w2_b
        {**{n: rnd(2, 2) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}, "hada_t1": rnd(2, 2, 1, 1)},
        {"a1_weight": rnd(3, 2), "a2_weight": rnd(2, 3), "b1_weight": rnd(4, 2)},  # no b2
    ],
    ids=["loha-w2_b", "loha-t2", "glora-b2"],
)
def test_missing_partner_keys_fail_the_load(tensors):
    with pytest.raises(cf.ComfyCrash, match="KeyError"):
        load(file(**tensors))


def test_alpha_must_be_one_number():
    with pytest.raises(cf.ComfyCrash, match="alpha"):
        load(file(lora_up_weight=rnd(5, 2), lora_down_weight=rnd(2, 4), alpha=torch.ones(2)))


# ---------------------------------------------------------------------------------------- LoRA, LoHa, LoKr


def test_lora_shape_mismatch_is_caught_and_the_weight_left_unpatched():
    w = rnd(5, 4)
    got, _, errors, _ = merge(file(lora_up_weight=rnd(5, 2), lora_down_weight=rnd(2, 3)), w)
    assert len(errors) == 1 and errors[0].startswith("ERROR lora") and torch.equal(got, w)


def test_lora_reshape_weight_pads_and_a_smaller_shape_crashes():
    w, up, down = rnd(4, 3), rnd(5, 2, seed=1), rnd(2, 3, seed=2)
    got, _, errors, left = merge(file(lora_up_weight=up, lora_down_weight=down, reshape_weight=torch.tensor([5, 3])), w)
    assert errors == [] and left == []
    padded = torch.cat([w, torch.zeros(1, 3, dtype=F64)])
    close(got, padded + torch.einsum("or,ri->oi", up, down))
    sd = file(lora_up_weight=rnd(3, 2), lora_down_weight=down, reshape_weight=torch.tensor([3, 3]))
    with pytest.raises(cf.ComfyCrash, match="pad"):
        merge(sd, w)


def test_loha_factors_are_built_outside_the_try():
    w = rnd(4, 3)
    factors = {"hada_w1_a": rnd(4, 2), "hada_w1_b": rnd(2, 3), "hada_w2_a": rnd(4, 2), "hada_w2_b": rnd(2, 3)}
    with pytest.raises(cf.ComfyCrash, match="loha"):  # torch.mm of a 3-D factor
        merge(file(**{**factors, "hada_w1_b": rnd(2, 3, 1)}), w)
    _, _, errors, _ = merge(file(**factors), rnd(4, 4))  # product (4, 3) into a (4, 4) weight: caught
    assert errors and errors[0].startswith("ERROR loha")


def test_lokr_factored_w2_must_be_a_matrix():
    w = rnd(8, 6, 3, 3)
    sd = file(lokr_w1=rnd(2, 3), lokr_w2_a=rnd(4, 2), lokr_w2_b=rnd(2, 2, 3, 3), alpha=alpha(1))
    with pytest.raises(cf.ComfyCrash, match="lokr"):
        merge(sd, w)
    w2b = rnd(2, 2 * 9, seed=5)
    got, _, errors, _ = merge(file(lokr_w1=rnd(2, 3), lokr_w2_a=rnd(4, 2), lokr_w2_b=w2b, alpha=alpha(1)), w)
    w1, w2 = rnd(2, 3), (rnd(4, 2) @ w2b).reshape(4, 2, 3, 3)
    assert errors == []
    close(got, w + 0.5 * torch.einsum("ij,pqkl->ipjqkl", w1, w2).reshape(w.shape))


def test_lokr_full_conv_w2_krons_with_w1_as_1x1():
    w, w1, w2 = rnd(8, 6, 3, 3), rnd(2, 3, seed=1), rnd(4, 2, 3, 3, seed=2)
    got, _, errors, _ = merge(file(lokr_w1=w1, lokr_w2=w2, alpha=alpha(5)), w, s=0.5)  # both full: α ignored
    assert errors == []
    close(got, w + 0.5 * torch.einsum("ij,pqkl->ipjqkl", w1, w2).reshape(w.shape))


def test_lokr_tucker_w2_einsum_is_not_contiguous_and_kron_raises():
    t2, w2a, w2b = rnd(2, 2, 3, 3, seed=3), rnd(2, 4, seed=4), rnd(2, 2, seed=5)
    rebuilt = cf._tucker4(t2, w2a, w2b)
    assert not rebuilt.is_contiguous()
    w = rnd(8, 6, 3, 3)
    sd = file(lokr_w1=rnd(2, 3), lokr_t2=t2, lokr_w2_a=w2a, lokr_w2_b=w2b, alpha=alpha(2))
    got, _, errors, _ = merge(sd, w)
    assert len(errors) == 1 and errors[0].startswith("ERROR lokr") and torch.equal(got, w)


# ---------------------------------------------------------------------------------------- GLoRA


def glora_new(w, a1, a2, b1, b2):
    """ΔW[o,j,κ] = Σ_i W[o,i,κ]·(a1·a2)[i,j] + (b1·b2)[o, j·∏k + κ] — the new layout."""
    return torch.einsum("oi...,ir,rj->oj...", w, a1.flatten(1), a2.flatten(1)) + (
        b1.flatten(1) @ b2.flatten(1)
    ).reshape(w.shape)


def test_glora_square_rank_equal_to_in_and_out_is_read_as_old():
    w = rnd(4, 4)
    a1, a2, b1, b2 = (rnd(4, 4, seed=i) for i in range(1, 5))  # new layout, r = in = out = 4
    assert cf.glora_layout(a1, a2, b1, b2, (4, 4)) == ("old", 4)
    got, _, errors, _ = merge(file(a1_weight=a1, a2_weight=a2, b1_weight=b1, b2_weight=b2, alpha=alpha(2)), w)
    assert errors == []
    old = torch.einsum("oi,ia,aj->oj", w, a2, a1) + torch.einsum("oa,aj->oj", b2, b1)
    close(got, w + 0.5 * old)
    assert not torch.allclose(got, w + 0.5 * glora_new(w, a1, a2, b1, b2))
    # r ≠ out: both layouts fit the shapes, the new one wins
    a1, a2, b1, b2 = rnd(4, 2, seed=1), rnd(2, 4, seed=2), rnd(4, 2, seed=3), rnd(2, 4, seed=4)
    assert cf.glora_layout(a1, a2, b1, b2, (4, 4)) == ("new", 2)


def test_glora_old_layout_fails_on_kxk_convs_and_works_on_1x1():
    a1, a2, b2 = rnd(2, 4, 1, 1, seed=1), rnd(4, 2, 1, 1, seed=2), rnd(6, 2, 1, 1, seed=4)
    w = rnd(6, 4, 3, 3)
    sd = file(a1_weight=a1, a2_weight=a2, b1_weight=rnd(2, 4, 3, 3, seed=3), b2_weight=b2, alpha=alpha(1))
    got, _, errors, _ = merge(sd, w)
    assert len(errors) == 1 and errors[0].startswith("ERROR glora") and torch.equal(got, w)
    w, b1 = rnd(6, 4, 1, 1), rnd(2, 4, 1, 1, seed=3)
    got, _, errors, _ = merge(file(a1_weight=a1, a2_weight=a2, b1_weight=b1, b2_weight=b2, alpha=alpha(1)), w)
    old = torch.einsum("oi,ia,aj->oj", w.flatten(1), a2.flatten(1), a1.flatten(1)) + b2.flatten(1) @ b1.flatten(1)
    assert errors == []
    close(got, w + 0.5 * old.reshape(w.shape))


def test_glora_factors_of_neither_layout():
    w = rnd(6, 4)
    bad = {"a1_weight": rnd(3, 2), "a2_weight": rnd(5, 4), "b1_weight": rnd(6, 7), "b2_weight": rnd(1, 4)}
    with pytest.raises(cf.ComfyCrash, match="rank"):  # α/rank with the rank never set
        merge(file(**bad, alpha=alpha(1)), w)
    got, _, errors, _ = merge(file(**bad), w)  # without α the new layout's products fail, caught
    assert errors and torch.equal(got, w)


# ---------------------------------------------------------------------------------------- OFT, BOFT


def cayley_clamped(blocks, a):
    """R per block; Q = B − Bᵀ scaled by α/(‖Q‖+1e-8) over the whole tensor when that exceeds α (α > 0)."""
    q = blocks - blocks.transpose(-1, -2)
    nu = torch.sqrt((q**2).sum()) + 1e-8
    if a > 0 and nu > a:
        q = q * a / nu
    eye = torch.eye(q.shape[-1], dtype=F64)
    return torch.linalg.solve((eye - q).transpose(-1, -2), (eye + q).transpose(-1, -2)).transpose(-1, -2)


def test_oft_blocks_must_tile_the_rows():
    w = rnd(6, 4)
    got, _, errors, _ = merge(file(oft_blocks=0.1 * rnd(2, 2, 2), alpha=alpha(1)), w)  # 2·2 rows ≠ 6
    assert len(errors) == 1 and errors[0].startswith("ERROR oft") and torch.equal(got, w)


@pytest.mark.parametrize("a", [None, 0.0625])  # α exact in float32 (the file stores it so)
def test_oft_clamp_and_strength_twice(a):
    w, blocks, s = rnd(6, 4, 3), 0.3 * rnd(3, 2, 2), 0.7
    sd = file(oft_blocks=blocks) if a is None else file(oft_blocks=blocks, alpha=alpha(a))
    got, _, errors, _ = merge(sd, w, s=s)
    r = torch.block_diag(*cayley_clamped(blocks, 0.0 if a is None else a))
    rotated = torch.einsum("nm,n...->m...", r, w)  # Rᵀ·W on the rows
    assert errors == []
    close(got, w + s * s * (rotated - w))


def test_oft_with_dora_scale_uses_alpha_as_the_scale():
    w, blocks, a, s = rnd(6, 4), 0.3 * rnd(3, 2, 2), 0.0625, 0.5
    dora = 1 + rnd(6, 1, seed=9).abs()
    got, _, errors, _ = merge(file(oft_blocks=blocks, alpha=alpha(a), dora_scale=dora), w, s=s)
    r = torch.block_diag(*cayley_clamped(blocks, a))
    delta = s * (torch.einsum("nm,ni->mi", r, w) - w)  # ΔW already holds the strength
    wc = w + a * delta
    wd = wc * dora / (w.norm(dim=1, keepdim=True) + torch.finfo(F64).eps)  # output axis: norm of the original W
    assert errors == []
    close(got, w + s * (wd - w))


def butterfly(out, b, i):
    """perm[new] = old for BOFT stage i: rows as (out/2h, 2, h) with h = 2^i·⌊b/2⌋, last two axes swapped."""
    h = 2**i * (b // 2)
    return [a * 2 * h + g * h + t for a in range(out // (2 * h)) for t in range(h) for g in range(2)]


def boft_expected(blocks, w, a, s=1.0, rescale=None):
    m, n, b = blocks.shape[:3]
    out = n * b
    r = cayley_clamped(blocks, a)  # one norm over every stage and block
    total = torch.eye(out, dtype=F64)
    for i in range(m):
        p = torch.eye(out, dtype=F64)[butterfly(out, b, i)]
        ri = torch.block_diag(*(s * r[i] + (1 - s) * torch.eye(b, dtype=F64)))
        total = p.T @ ri @ p @ total
    res = torch.einsum("oj,j...->o...", total, w)
    if rescale is not None:
        res = res * rescale
    return w + s * (res - w)


def test_boft_without_alpha_fails_and_is_left_unpatched():
    w = rnd(8, 3)
    got, _, errors, left = merge(file(oft_blocks=0.2 * rnd(2, 4, 2, 2)), w)
    assert left == [] and len(errors) == 1 and "NoneType" in errors[0] and torch.equal(got, w)


def test_boft_clamps_with_one_norm_over_all_stages():
    w, blocks = rnd(8, 3), rnd(3, 4, 2, 2)
    q = blocks - blocks.transpose(-1, -2)
    blocks = blocks * 0.4 / q.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)  # every stage ‖Q_i‖ = 0.4
    a = 0.5  # below the global ‖Q‖ = 0.4·√3, above every stage's
    got, _, errors, _ = merge(file(oft_blocks=blocks, alpha=alpha(a)), w)
    assert errors == []
    close(got, boft_expected(blocks, w, a))
    assert not torch.allclose(got, boft_expected(blocks, w, 0.0))


def test_boft_odd_block_size_uses_floor_half():
    w, blocks, s = rnd(12, 2), 0.3 * rnd(2, 4, 3, 3), 0.6
    got, _, errors, _ = merge(file(oft_blocks=blocks, alpha=alpha(0)), w, s=s)
    assert errors == []
    close(got, boft_expected(blocks, w, 0.0, s))


def test_boft_rescale_is_broadcast_as_stored():
    w, blocks = rnd(8, 3), 0.3 * rnd(2, 4, 2, 2)
    rescale = 1 + 0.1 * rnd(8, 1, seed=4)
    got, _, errors, _ = merge(file(oft_blocks=blocks, alpha=alpha(0), rescale=rescale), w)
    assert errors == []
    close(got, boft_expected(blocks, w, 0.0, rescale=rescale))
    got, _, errors, _ = merge(file(oft_blocks=blocks, alpha=alpha(0), rescale=rescale.reshape(8)), w)
    assert len(errors) == 1 and errors[0].startswith("ERROR boft") and torch.equal(got, w)  # (8,) vs (8, 3)


# ---------------------------------------------------------------------------------------- DoRA


def test_dora_scale_is_broadcast_as_stored():
    w, up, down = rnd(6, 4), rnd(6, 2, seed=1), rnd(2, 4, seed=2)
    dora = 1 + rnd(6, seed=3).abs()  # (out,) instead of (out, 1)
    got, _, errors, _ = merge(file(lora_up_weight=up, lora_down_weight=down, dora_scale=dora), w)
    assert len(errors) == 1 and errors[0].startswith("ERROR lora") and torch.equal(got, w)
    w, up, down = rnd(6, 6), rnd(6, 2, seed=1), rnd(2, 6, seed=2)  # square: it broadcasts along the columns
    got, _, errors, _ = merge(file(lora_up_weight=up, lora_down_weight=down, dora_scale=dora), w)
    wc = w + torch.einsum("or,ri->oi", up, down)
    norm = torch.sqrt((w**2).sum(dim=1)) + torch.finfo(F64).eps
    assert errors == []
    close(got, torch.einsum("oi,i,o->oi", wc, dora, 1 / norm))


# ---------------------------------------------------------------------------------------- diff, set


def test_diff_of_the_wrong_shape_is_reported_and_skipped():
    w, b = rnd(5, 4), rnd(5)
    got_w, got_b, errors, _ = merge(file(diff=rnd(4, 5), diff_b=rnd(4)), w, b)
    assert len(errors) == 2 and all("SHAPE MISMATCH" in e for e in errors)
    assert torch.equal(got_w, w) and torch.equal(got_b, b)


def test_set_weight_broadcasts_or_crashes():
    w, row = rnd(5, 4), rnd(4, seed=1)
    got, _, errors, _ = merge(file(set_weight=row), w, s=0.3)  # strength does not apply
    assert errors == []
    close(got, row.expand(5, 4))
    with pytest.raises(cf.ComfyCrash, match="set_weight"):
        merge(file(set_weight=rnd(3)), w)


# ---------------------------------------------------------------------------------------- key maps


def test_te_key_map_text_projection():
    assert "lora_te_text_projection" not in cf.te_key_map(12, "lora_te")
    assert cf.te_key_map(12, "lora_te1")["lora_te1_text_projection"] == "text_projection"
    assert "lora_te1_text_projection" not in cf.te_key_map(12, "lora_te1", projection=False)  # SD2's CLIP-H


# ---------------------------------------------------------------------------------------- info's verdicts
# Where the behaviour above decides `higanbana info`'s ComfyUI verdict for a module (these were wrong before
# src/higanbana/algorithms/{oft,glora}.py said what ComfyUI does).


def _module(algo, layer, **options):
    torch.manual_seed(0)
    adapter = algorithm_class(algo)(layer.double(), **options)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn_like(p))
    return adapter


def test_info_flags_boft_when_only_the_global_norm_exceeds_alpha():
    layer = nn.Linear(3, 8)
    adapter = _module("boft", layer, rank=2, constraint=0.5)
    with torch.no_grad():
        q = adapter.oft_blocks - adapter.oft_blocks.transpose(-1, -2)
        adapter.oft_blocks.mul_(0.4 / q.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1))
    tensors = adapter.state_tensors()
    got, _, errors, _ = merge(file(**tensors), layer.weight.detach())
    assert errors == [] and not torch.allclose(got, adapter.merged_weight(1.0).detach(), rtol=1e-4, atol=1e-6)
    assert "ComfyUI" in algorithm_class("boft").tool_verdicts(tensors, None)


def test_info_flags_glora_with_rank_equal_to_a_square_layer():
    layer = nn.Linear(4, 4)
    adapter = _module("glora", layer, rank=4, alpha=2)
    tensors = {k.replace(".weight", "_weight"): v for k, v in adapter.state_tensors().items()}
    got, _, errors, _ = merge(file(**tensors), layer.weight.detach())
    assert errors == [] and not torch.allclose(got, adapter.merged_weight(1.0).detach(), rtol=1e-4, atol=1e-6)
    assert "ComfyUI" in algorithm_class("glora").tool_verdicts(adapter.state_tensors(), None)


def test_info_skips_boft_without_alpha():
    verdicts = algorithm_class("boft").tool_verdicts({"oft_blocks": 0.2 * rnd(2, 4, 2, 2)}, None)
    assert verdicts.get("ComfyUI", ("load", ""))[0] == "skip"
