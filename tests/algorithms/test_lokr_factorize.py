"""LoKr's factorisation (docs/design.md §3 examples), clear construction errors, and the bypass path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from higanbana.algorithms import make_adapter
from higanbana.algorithms.factorize import factorize
from higanbana.algorithms.lokr import LoKr, find_factor, lokr_split
from higanbana.errors import ConfigError

from .cases import randomize, rel_err


@pytest.mark.parametrize(
    "dim,factor,expected",
    [
        (128, -1, (8, 16)),
        (128, 4, (4, 32)),
        (250, -1, (10, 25)),
        (360, 8, (8, 45)),
        (127, -1, (1, 127)),
        (127, 4, (1, 127)),
        (127, 127, (1, 127)),
    ],
)
def test_factorize_design_examples(dim, factor, expected):
    assert factorize(dim, factor) == expected


def test_unbalanced_factorization_swaps_the_output_split():
    assert lokr_split(32, 48, -1, False) == ((4, 8), (6, 8))
    assert lokr_split(32, 48, -1, True) == ((8, 4), (6, 8))
    adapter = make_adapter("lokr", nn.Linear(48, 32), rank=2, unbalanced_factorization=True)
    assert tuple(adapter.lokr_w1.shape) == (8, 6)
    assert tuple(adapter.lokr_w2_b.shape) == (2, 8) and tuple(adapter.lokr_w2_a.shape) == (4, 2)


@pytest.mark.parametrize("factor", [0, -2])
def test_invalid_factor_is_a_clear_error(factor):
    with pytest.raises(ConfigError, match=f"factor={factor}"):
        make_adapter("lokr", nn.Linear(12, 8), factor=factor)


def test_split_that_does_not_multiply_back_names_the_dims(monkeypatch):
    monkeypatch.setattr("higanbana.algorithms.lokr.factorize", lambda dim, factor: (3, 3))
    with pytest.raises(ConfigError, match=r"out=8 into 3·3.*in=12 into 3·3"):
        make_adapter("lokr", nn.Linear(12, 8), factor=3)


def test_state_with_mismatched_blocks_names_the_dims():
    tensors = {"lokr_w1": torch.zeros(3, 4), "lokr_w2": torch.zeros(4, 4), "alpha": torch.tensor(1.0)}
    with pytest.raises(ConfigError, match=r"\(12, 16\).*\(8, 12\)"):
        LoKr.options_from_state(tensors, nn.Linear(12, 8))


def test_state_with_two_ranks_is_an_error():
    tensors = {
        "lokr_w1_a": torch.zeros(8, 2),
        "lokr_w1_b": torch.zeros(2, 6),
        "lokr_w2_a": torch.zeros(4, 1),
        "lokr_w2_b": torch.zeros(1, 8),
    }
    with pytest.raises(ConfigError, match="rank"):
        LoKr.options_from_state(tensors, nn.Linear(48, 32))


@pytest.mark.parametrize(
    "out,inp,factor",
    [(320, 768, 8), (320, 768, -1), (640, 2048, 16), (1280, 1280, 5), (96, 60, 7), (12, 8, 1), (127, 64, -1)],
)
def test_factor_is_recovered_from_shapes(out, inp, factor):
    for unbalanced in (False, True):
        u, v = lokr_split(out, inp, factor, unbalanced)
        f, ub = find_factor(out, inp, u, v)
        assert lokr_split(out, inp, f, ub) == (u, v)


def test_scale_is_one_when_no_side_is_factored():
    full = make_adapter("lokr", nn.Linear(12, 8), rank=1, alpha=7.0, full_matrix=True)
    assert full.scale == 1.0 and full.rank_mask() is None
    factored = make_adapter("lokr", nn.Linear(12, 8), rank=1, alpha=7.0)
    assert factored.scale == 7.0


@pytest.mark.parametrize("options", [{"rank": 2}, {"rank": 16}, {"rank": 2, "decompose_both": True}])
@pytest.mark.parametrize("make", [lambda: nn.Linear(64, 96), lambda: nn.Conv2d(32, 64, 3, padding=1)])
def test_bypass_never_builds_delta(make, options, monkeypatch):
    torch.manual_seed(0)
    layer = make().requires_grad_(False)
    adapter = make_adapter("lokr", layer, forward_mode="merged", **options)
    randomize(adapter, std=0.2)
    x = torch.randn(2, 64) if isinstance(layer, nn.Linear) else torch.randn(2, 32, 5, 5)
    merged = adapter(x)

    def no_delta(*args, **kwargs):
        raise AssertionError("bypass built ΔW")

    monkeypatch.setattr(adapter, "delta_weight", no_delta)
    adapter.forward_mode = "bypass"
    assert rel_err(adapter(x), merged) <= 1e-5
    tokens = 4096
    assert adapter.costs(tokens).bypass < tokens * layer.weight.numel()


@pytest.mark.parametrize("rank", [2, 8])
def test_auto_prefers_bypass_for_sd_convs_in_training(rank):
    adapter = make_adapter("lokr", nn.Conv2d(320, 320, 3, padding=1).requires_grad_(False), rank=rank)
    x = torch.empty(1, 320, 64, 64)
    assert adapter.use_bypass(x)  # measured: 1.35x vs merged 1.67x (docs/benchmarks.md)
    with torch.no_grad():
        assert not adapter.use_bypass(x)


def test_unbatched_conv_bypass():
    torch.manual_seed(0)
    layer = nn.Conv1d(12, 16, 3, padding=1).requires_grad_(False)
    adapter = make_adapter("lokr", layer, rank=1, factor=4, decompose_both=True)
    randomize(adapter)
    x = torch.randn(12, 7)
    adapter.forward_mode = "merged"
    merged = adapter(x)
    adapter.forward_mode = "bypass"
    assert rel_err(adapter(x), merged) <= 1e-5


def test_loha_hadamard_product_gradients():
    """LoHa's memory-saving Hadamard product (recomputes the products in backward) has exact gradients."""
    from higanbana.algorithms.loha import HadamardProduct

    gen = torch.Generator().manual_seed(0)
    a1, b1, a2, b2 = (
        torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in ((5, 3), (3, 7), (5, 3), (3, 7))
    )
    assert torch.autograd.gradcheck(HadamardProduct.apply, (a1, b1, a2, b2))
    assert torch.autograd.gradgradcheck(HadamardProduct.apply, (a1, b1, a2, b2))
