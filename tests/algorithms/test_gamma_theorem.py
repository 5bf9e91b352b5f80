"""The γ theorem (paper Appendix B.1, docs/design.md §3), as a float64 identity.

With ΔW = γ·T(A_1..A_k), T homogeneous of degree k, training with scale γ equals training with
γ = 1 after scaling the initialisation by γ^(1/k) and the learning rate by γ^(c/k)
(c = 2 for SGD, c = 1 for Adam with ε = 0). Every factor starts random and non-zero.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from higanbana.algorithms import make_adapter

from .cases import rel_err

# (algo, options, rank, degree k)
SETUPS = [
    ("lora", {}, 3, 2),
    ("loha", {}, 3, 4),
    ("lokr", {"factor": 4}, 1, 3),  # w1 (4,4) full, w2 = w2_a·w2_b: degree 3
    ("lokr", {"factor": 4, "decompose_both": True, "full_matrix": True}, 1, 3),  # w1 factored, w2 full
]


def train(algo, options, rank, gamma, init_scale, lr, optimizer, steps=20):
    torch.manual_seed(0)
    layer = nn.Linear(16, 16, dtype=torch.float64).requires_grad_(False)
    adapter = make_adapter(algo, layer, rank=rank, alpha=gamma * rank, dtype=torch.float64, **options)
    assert adapter.scale == pytest.approx(gamma)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(adapter.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5 * init_scale)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    target = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    if optimizer == "sgd":
        opt = torch.optim.SGD(adapter.parameters(), lr=lr)
    else:
        opt = torch.optim.Adam(adapter.parameters(), lr=lr, eps=0.0)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(adapter(x), target).backward()
        opt.step()
    with torch.no_grad():
        return adapter.scale * adapter.delta_weight()


@pytest.mark.parametrize("optimizer,c,lr", [("sgd", 2, 0.05), ("adam", 1, 1e-2)])
@pytest.mark.parametrize("algo,options,rank,k", SETUPS, ids=[f"{s[0]}-k{s[3]}" for s in SETUPS])
def test_gamma_equivalence(algo, options, rank, k, optimizer, c, lr):
    gamma = 4.0
    scaled = train(algo, options, rank, gamma, 1.0, lr, optimizer)
    equivalent = train(algo, options, rank, 1.0, gamma ** (1 / k), lr * gamma ** (c / k), optimizer)
    assert rel_err(scaled, equivalent) <= 1e-10
    # and the identity is not vacuous: plain γ = 1 training with the original lr differs
    plain = train(algo, options, rank, 1.0, 1.0, lr, optimizer)
    assert rel_err(plain, scaled) > 1e-3
