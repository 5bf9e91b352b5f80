"""Reference for LoHa (+Tucker, +use_scalar, +DoRA on both axes) from docs/design.md §3."""

from __future__ import annotations

import torch

from .cases import STANDARD_LAYERS, Case, conv2d
from .ref_lora import dora_reference


def reference(state, w0, b0, m):
    w1_a, w1_b = state["hada_w1_a"], state["hada_w1_b"]
    w2_a, w2_b = state["hada_w2_a"], state["hada_w2_b"]
    if "hada_t1" in state:
        # W_j[p,q,κ] = Σ_{a,c} t_j[a,c,κ]·w_j_a[a,p]·w_j_b[c,q]; w_j_a (r,out), w_j_b (r,in)
        r = w1_a.shape[0]
        w1 = torch.einsum("ac...,ap,cq->pq...", state["hada_t1"], w1_a, w1_b)
        w2 = torch.einsum("ac...,ap,cq->pq...", state["hada_t2"], w2_a, w2_b)
    else:
        # (w1_a·w1_b) ⊙ (w2_a·w2_b) with w_j_a (out,r), w_j_b (r,in·∏k)
        r = w1_a.shape[1]
        assert w1_b.shape == (r, w0[0].numel()) and w2_a.shape == (w0.shape[0], r)
        w1 = torch.einsum("oa,ai->oi", w1_a, w1_b).reshape(w0.shape)
        w2 = torch.einsum("oa,ai->oi", w2_a, w2_b).reshape(w0.shape)
    delta = w1 * w2
    assert delta.shape == w0.shape
    scale = float(state["alpha"]) / r
    if "dora_scale" in state:
        return dora_reference(w0, scale * delta, state["dora_scale"], m), b0
    return w0 + m * scale * delta, b0


KEYS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
TUCKER_KEYS = KEYS | {"hada_t1", "hada_t2"}
LINEAR = STANDARD_LAYERS["linear"]

CASES = [
    *(Case("loha", name, make, reference, {"rank": 3, "alpha": 2.0}, KEYS) for name, make in STANDARD_LAYERS.items()),
    Case("loha", "conv2d", conv2d, reference, {"rank": 3, "use_tucker": True}, TUCKER_KEYS),
    Case(
        "loha",
        "conv1d",
        STANDARD_LAYERS["conv1d"],
        reference,
        {"rank": 2, "alpha": 40.0, "use_tucker": True},
        TUCKER_KEYS,
    ),
    Case(
        "loha",
        "conv3d",
        STANDARD_LAYERS["conv3d"],
        reference,
        {"rank": 2, "alpha": 40.0, "use_tucker": True},
        TUCKER_KEYS,
    ),
    # Tucker is only for kernels > 1: a 1x1 conv keeps the plain layout
    Case("loha", "conv2d_1x1", STANDARD_LAYERS["conv2d_1x1"], reference, {"rank": 2, "use_tucker": True}, KEYS),
    Case("loha", "linear", LINEAR, reference, {"rank": 4, "alpha": 8, "rs_lora": True}, KEYS),
    Case("loha", "linear", LINEAR, reference, {"rank": 2, "use_scalar": True}, KEYS),
    Case(
        "loha",
        "conv2d",
        conv2d,
        reference,
        {"rank": 2, "alpha": 40.0, "use_scalar": True, "use_tucker": True},
        TUCKER_KEYS,
    ),
    *(
        Case(
            "loha",
            name,
            make,
            reference,
            {"rank": 3, "weight_decompose": True, "wd_on_output": axis},
            KEYS | {"dora_scale"},
        )
        for name, make in (("linear", LINEAR), ("conv2d", conv2d))
        for axis in (True, False)
    ),
    Case(
        "loha",
        "conv2d",
        conv2d,
        reference,
        {"rank": 2, "use_tucker": True, "weight_decompose": True},
        TUCKER_KEYS | {"dora_scale"},
    ),
]
