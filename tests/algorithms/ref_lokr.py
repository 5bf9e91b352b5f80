"""Reference for LoKr (factor, decompose_both, full_matrix, unbalanced split, Tucker, DoRA) from docs/design.md §3.

The Kronecker product is built block by block from its index formula
``ΔW[i·u2+p, j·v2+q, κ] = w1[i,j]·w2[p,q,κ]`` (no ``torch.kron``).
"""

from __future__ import annotations

import torch
from torch import nn

from .cases import STANDARD_LAYERS, Case, conv2d
from .ref_lora import dora_reference


def reference(state, w0, b0, m):
    out, inp, kernel = w0.shape[0], w0.shape[1], tuple(w0.shape[2:])
    ranks = []
    if "lokr_w1" in state:
        w1 = state["lokr_w1"]
    else:
        w1_a, w1_b = state["lokr_w1_a"], state["lokr_w1_b"]  # (u1, r), (r, v1)
        ranks.append(w1_a.shape[1])
        w1 = torch.einsum("ia,aj->ij", w1_a, w1_b)
    u1, v1 = w1.shape
    assert out % u1 == 0 and inp % v1 == 0
    u2, v2 = out // u1, inp // v1
    if "lokr_w2" in state:
        w2 = state["lokr_w2"]
    elif "lokr_t2" in state:
        t2, w2_a, w2_b = state["lokr_t2"], state["lokr_w2_a"], state["lokr_w2_b"]  # (r,r,*k), (r,u2), (r,v2)
        ranks.append(w2_a.shape[0])
        w2 = torch.einsum("ac...,ap,cq->pq...", t2, w2_a, w2_b)
    else:
        w2_a, w2_b = state["lokr_w2_a"], state["lokr_w2_b"]  # (u2, r), (r, v2·∏k)
        ranks.append(w2_a.shape[1])
        w2 = torch.einsum("pa,ax->px", w2_a, w2_b).reshape(u2, v2, *kernel)
    assert tuple(w2.shape) == (u2, v2, *kernel), (w2.shape, u2, v2, kernel)
    assert len(set(ranks)) <= 1
    delta = torch.zeros_like(w0)
    for i in range(u1):
        for j in range(v1):
            delta[i * u2 : (i + 1) * u2, j * v2 : (j + 1) * v2] = w1[i, j] * w2
    scale = float(state["alpha"]) / ranks[0] if ranks else 1.0  # both blocks full: α ignored
    if "dora_scale" in state:
        return dora_reference(w0, scale * delta, state["dora_scale"], m), b0
    return w0 + m * scale * delta, b0


def linear_48_32(dtype: torch.dtype = torch.float32) -> nn.Module:
    """out 32 = 4·8, in 48 = 6·8 (factor 4: 4·8 and 4·12)."""
    return nn.Linear(48, 32, dtype=dtype)


def conv2d_16_32(dtype: torch.dtype = torch.float32) -> nn.Module:
    """out 32 = 4·8, in 16 = 4·4, 3x3 stride 2: w2 (8, 4, 3, 3) factors for r < 4."""
    return nn.Conv2d(16, 32, 3, stride=2, padding=1, dtype=dtype)


def conv1d_12_16(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Conv1d(12, 16, 3, padding="same", bias=False, dtype=dtype)


W1, W1_AB = {"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"}
W2, W2_AB, W2_T = {"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}, {"lokr_w2_a", "lokr_w2_b", "lokr_t2"}
A = {"alpha"}

CASES = [
    # small standard layers (w2 is at most 4 wide): rank 1 factors w2, rank 4 keeps it full
    *(
        Case("lokr", name, make, reference, {"rank": 1, "alpha": 2.0}, W1 | W2_AB | A, label="w2-factored")
        for name, make in STANDARD_LAYERS.items()
    ),
    *(
        Case("lokr", name, make, reference, {"rank": 4, "alpha": 3.0}, W1 | W2 | A, label="w2-full")
        for name, make in STANDARD_LAYERS.items()
    ),
    Case("lokr", "conv2d", conv2d, reference, {"rank": 1, "use_tucker": True}, W1 | W2_T | A, label="tucker"),
    Case(
        "lokr",
        "conv3d",
        STANDARD_LAYERS["conv3d"],
        reference,
        {"rank": 1, "alpha": 8.0, "use_tucker": True},
        W1 | W2_T | A,
        label="tucker",
    ),
    # full_matrix: w2 full even at rank 1; both blocks full so α is ignored (scale 1)
    Case(
        "lokr",
        "linear",
        STANDARD_LAYERS["linear"],
        reference,
        {"rank": 1, "alpha": 5.0, "full_matrix": True},
        W1 | W2 | A,
        label="full_matrix",
    ),
    # larger layers: factor, decompose_both, unbalanced split
    Case("lokr", "linear48", linear_48_32, reference, {"rank": 3, "factor": 4}, W1 | W2_AB | A, label="factor4"),
    Case(
        "lokr",
        "linear48",
        linear_48_32,
        reference,
        {"rank": 2, "factor": 4, "full_matrix": True},
        W1 | W2 | A,
        label="factor4-full",
    ),
    Case(
        "lokr",
        "linear48",
        linear_48_32,
        reference,
        {"rank": 1, "factor": 4, "decompose_both": True, "full_matrix": True},
        W1_AB | W2 | A,
        label="w1-factored-w2-full",
    ),
    Case(
        "lokr",
        "linear48",
        linear_48_32,
        reference,
        {"rank": 2, "alpha": 4.0, "decompose_both": True, "unbalanced_factorization": True},
        W1_AB | W2_AB | A,
        label="both-factored-unbalanced",
    ),
    Case(
        "lokr",
        "linear48",
        linear_48_32,
        reference,
        {"rank": 3, "unbalanced_factorization": True},
        W1 | W2_AB | A,
        label="unbalanced",
    ),
    Case(
        "lokr",
        "linear48",
        linear_48_32,
        reference,
        {"rank": 4, "factor": 2, "rs_lora": True, "alpha": 4.0},
        W1 | W2_AB | A,
        label="rs_lora",
    ),
    Case("lokr", "conv2d16", conv2d_16_32, reference, {"rank": 2}, W1 | W2_AB | A, label="w2-factored"),
    Case(
        "lokr",
        "conv2d16",
        conv2d_16_32,
        reference,
        {"rank": 3, "use_tucker": True, "alpha": 1.5},
        W1 | W2_T | A,
        label="tucker",
    ),
    Case(
        "lokr",
        "conv2d16",
        conv2d_16_32,
        reference,
        {"rank": 1, "alpha": 16.0, "decompose_both": True, "unbalanced_factorization": True, "use_tucker": True},
        W1_AB | W2_T | A,
        label="both-factored-unbalanced-tucker",
    ),
    Case(
        "lokr",
        "conv1d12",
        conv1d_12_16,
        reference,
        {"rank": 1, "factor": 4, "decompose_both": True},
        W1_AB | W2_AB | A,
        label="factor4-both",
    ),
    # use_scalar: the scalar folds into w2 (full) or w2_b (factored)
    Case(
        "lokr",
        "linear",
        STANDARD_LAYERS["linear"],
        reference,
        {"rank": 1, "use_scalar": True},
        W1 | W2_AB | A,
        label="scalar-factored",
    ),
    Case(
        "lokr",
        "linear",
        STANDARD_LAYERS["linear"],
        reference,
        {"rank": 4, "use_scalar": True},
        W1 | W2 | A,
        label="scalar-full",
    ),
    Case(
        "lokr",
        "conv2d16",
        conv2d_16_32,
        reference,
        {"rank": 2, "use_scalar": True, "use_tucker": True},
        W1 | W2_T | A,
        label="scalar-tucker",
    ),
    # DoRA on both axes, with w2 factored and full
    *(
        Case(
            "lokr",
            name,
            make,
            reference,
            {"rank": rank, "weight_decompose": True, "wd_on_output": axis},
            keys | {"dora_scale"},
            label=f"dora-{'out' if axis else 'in'}-r{rank}",
        )
        for name, make, rank, keys in (
            ("linear48", linear_48_32, 2, W1 | W2_AB | A),
            ("conv2d", conv2d, 4, W1 | W2 | A),
        )
        for axis in (True, False)
    ),
]
