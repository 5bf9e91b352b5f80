"""Reference for Diag-OFT from docs/design.md §3, written with full out×out matrices in float64.

It reads only the file tensors (``oft_blocks``, ``alpha``, optional ``rescale``), builds the
block-diagonal skew matrix as one dense ``out × out`` matrix, applies the constraint to its norm,
takes the Cayley transform with an explicit inverse and multiplies ``flat(W0)`` on the left by Rᵀ.
"""

from __future__ import annotations

import torch

from .cases import STANDARD_LAYERS, Case, flat

#: alpha at or above this means "no constraint" (alpha is never 0 in a file)
NO_CONSTRAINT = 1e30


def constraint_of(state):
    c = float(state["alpha"])
    return 0.0 if c <= 0 or c >= NO_CONSTRAINT else c


def block_diagonal(blocks):
    """Dense matrix with ``blocks[k]`` (b×b) on the diagonal, by plain index loops."""
    n, b = blocks.shape[0], blocks.shape[1]
    full = torch.zeros(n * b, n * b, dtype=torch.float64)
    for k in range(n):
        for i in range(b):
            for j in range(b):
                full[k * b + i, k * b + j] = blocks[k, i, j]
    return full


def constrain(q, c, out):
    """docs/design.md §3: ν = ‖Q‖_F (+1e-8) over all blocks; if ν > c·out, Q ← Q·(c·out)/ν."""
    if c > 0:
        nu = float(torch.sqrt((q * q).sum())) + 1e-8
        if nu > c * out:
            q = q * (c * out / nu)
    return q


def cayley(q):
    eye = torch.eye(q.shape[0], dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q)


def apply_rescale(state, w, m):
    """Rows times ``rescale``; at multiplier m our choice is ``1 + m·(rescale − 1)`` (1 at m = 0)."""
    if "rescale" in state:
        s = state["rescale"].double().reshape(-1, 1)
        w = w * (1 + m * (s - 1))
    return w


def reference(state, w0, b0, m):
    blocks = state["oft_blocks"].double()
    out = w0.shape[0]
    q = block_diagonal(blocks)
    q = q - q.T  # per block B − Bᵀ (the transpose of a block-diagonal matrix is blockwise)
    q = constrain(q, constraint_of(state), out)
    r = cayley(m * q)
    w = r.T @ flat(w0)
    return apply_rescale(state, w, m).reshape(w0.shape), b0


KEYS = {"oft_blocks", "alpha"}
LIN = STANDARD_LAYERS["linear"]

CASES = [
    *(Case("oft", name, make, reference, {"rank": 4}, KEYS) for name, make in STANDARD_LAYERS.items()),
    *(
        Case("oft", name, make, reference, {"rank": 2, "constraint": 0.02}, KEYS, label="b=2,constrained")
        for name, make in STANDARD_LAYERS.items()
    ),
    *(
        Case("oft", name, make, reference, {"rank": 4, "rescaled": True}, KEYS | {"rescale"})
        for name, make in (("linear", LIN), ("conv2d", STANDARD_LAYERS["conv2d"]))
    ),
    Case("oft", "linear", LIN, reference, {"rank": 8}, KEYS, label="b=8,one block"),
    Case("oft", "linear", LIN, reference, {"rank": 3}, KEYS, label="rank=3->b=2"),
    Case(
        "oft",
        "conv3d",
        STANDARD_LAYERS["conv3d"],
        reference,
        {"rank": 4, "constraint": 0.01, "rescaled": True},
        KEYS | {"rescale"},
        label="constrained,rescaled",
    ),
]
