"""``torch.compile(fullgraph=True)`` of a wrapped Linear runs and matches eager, every algorithm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from higanbana.algorithms import list_algorithms, make_adapter

from .cases import randomize, rel_err

OPTIONS = {"boft": {"rank": 4}, "oft": {"rank": 4}}


def wrapped(algo):
    torch.manual_seed(0)
    layer = nn.LayerNorm(16) if algo == "norm" else nn.Linear(16, 16)
    layer.requires_grad_(False)
    adapter = make_adapter(algo, layer, **OPTIONS.get(algo, {}))
    randomize(adapter, std=0.2)
    return adapter


@pytest.mark.parametrize("mode", ["merged", "bypass"])
@pytest.mark.parametrize("algo", list_algorithms())
def test_compile_fullgraph_matches_eager(algo, mode):
    torch._dynamo.reset()
    adapter = wrapped(algo)
    adapter.forward_mode = mode
    x = torch.randn(4, 16)
    eager = adapter(x)
    compiled = torch.compile(adapter, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert rel_err(out, eager) <= 1e-6
    out.sum().backward()  # the backward traces too
    assert all(p.grad is not None for p in adapter.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("algo", list_algorithms())
def test_compile_inductor_matches_eager(algo):
    torch._dynamo.reset()
    adapter = wrapped(algo).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        eager = adapter(x)
        out = torch.compile(adapter, fullgraph=True)(x)
    assert rel_err(out, eager) <= 1e-5
