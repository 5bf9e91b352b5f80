"""Reference for BOFT from docs/design.md §3, float64, with explicit permutation matrices.

Each stage's permutation is an index list built by a plain Python loop and turned into a dense
permutation matrix P; the stage is ``Pᵀ·blockdiag(R_i)·P`` on the rows of ``flat(W0)``, the stages
multiply in order i = 0..M−1 and the rescale comes last. Reads only the file tensors.
"""

from __future__ import annotations

import torch

from .cases import STANDARD_LAYERS, Case, flat
from .ref_oft import apply_rescale, block_diagonal, cayley, constrain, constraint_of


def stage_permutation(out, b, i):
    """``perm[new] = old``: rows viewed as (out/(2h), 2, h), last two axes swapped, flattened."""
    h = (2**i) * b // 2
    perm = []
    for a in range(out // (2 * h)):
        for t in range(h):
            for g in range(2):
                perm.append(a * 2 * h + g * h + t)
    return perm


def permutation_matrix(perm):
    p = torch.zeros(len(perm), len(perm), dtype=torch.float64)
    for new, old in enumerate(perm):
        p[new, old] = 1.0
    return p  # (P·W)[new] = W[perm[new]]


def reference(state, w0, b0, m):
    blocks = state["oft_blocks"].double()
    stages, n, b = blocks.shape[0], blocks.shape[1], blocks.shape[2]
    out = w0.shape[0]
    assert n * b == out
    qs = []
    for i in range(stages):
        q = block_diagonal(blocks[i])
        qs.append(q - q.T)
    # the constraint looks at all blocks of all stages together
    norm_all = torch.stack(qs)
    scaled = constrain(norm_all, constraint_of(state), out)
    total = torch.eye(out, dtype=torch.float64)
    for i in range(stages):
        p = permutation_matrix(stage_permutation(out, b, i))
        rot = cayley(m * scaled[i])  # block-diagonal R_i, multiplied on the LEFT
        total = p.T @ rot @ p @ total
    w = total @ flat(w0)
    return apply_rescale(state, w, m).reshape(w0.shape), b0


KEYS = {"oft_blocks", "alpha"}
LIN = STANDARD_LAYERS["linear"]

CASES = [
    # out = 8: b = 2 → n = 4, M ≤ 3; b = 4 → n = 2, M ≤ 2; b = 8 → n = 1, M = 1
    *(
        Case("boft", name, make, reference, {"rank": 2}, KEYS, label="b=2,M=3")
        for name, make in STANDARD_LAYERS.items()
    ),
    *(
        Case("boft", name, make, reference, {"rank": 4, "boft_stages": 1}, KEYS, label="b=4,M=1")
        for name, make in STANDARD_LAYERS.items()
    ),
    *(
        Case("boft", name, make, reference, {"rank": 2, "constraint": 0.02}, KEYS, label="b=2,constrained")
        for name, make in (
            ("linear", LIN),
            ("conv2d", STANDARD_LAYERS["conv2d"]),
            ("conv1d", STANDARD_LAYERS["conv1d"]),
        )
    ),
    Case("boft", "linear", LIN, reference, {"rank": 4}, KEYS, label="b=4,M=2"),
    Case("boft", "linear", LIN, reference, {"rank": 8}, KEYS, label="b=8,M=1"),
    Case("boft", "linear", LIN, reference, {"rank": 2, "boft_stages": 2}, KEYS, label="b=2,M=2"),
    Case(
        "boft",
        "linear",
        LIN,
        reference,
        {"rank": 3, "rescaled": True},
        KEYS | {"rescale"},
        label="rank=3->b=2,rescaled",
    ),
    Case(
        "boft",
        "conv3d",
        STANDARD_LAYERS["conv3d"],
        reference,
        {"rank": 2, "constraint": 0.01, "rescaled": True},
        KEYS | {"rescale"},
        label="constrained,rescaled",
    ),
]
