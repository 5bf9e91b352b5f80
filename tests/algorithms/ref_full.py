"""Reference for Full (native fine-tuning) from docs/design.md §3: ``W' = W0 + m·diff``, ``b' = b0 + m·diff_b``.

The ``test_*`` functions here are collected when this file is named on the pytest command line.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from higanbana.algorithms import algorithm_class, make_adapter
from higanbana.errors import UnsupportedLayerError

from .cases import STANDARD_LAYERS, Case, linear


def reference(state, w0, b0, m):
    diff = state["diff"]
    assert diff.shape == w0.shape
    w_new = w0 + m * diff
    if b0 is None or "diff_b" not in state:
        assert "diff_b" not in state or b0 is not None
        return w_new, b0
    diff_b = state["diff_b"]
    assert diff_b.shape == b0.shape
    return w_new, b0 + m * diff_b


def linear_no_bias(dtype=torch.float32):
    return nn.Linear(12, 8, bias=False, dtype=dtype)


def conv2d_no_bias(dtype=torch.float32):
    return nn.Conv2d(6, 8, 3, padding=1, bias=False, dtype=dtype)


KEYS = {"diff", "diff_b"}

CASES = [
    *(Case("full", name, make, reference, {}, KEYS) for name, make in STANDARD_LAYERS.items()),
    Case("full", "linear_no_bias", linear_no_bias, reference, {}, {"diff"}),
    Case("full", "conv2d_no_bias", conv2d_no_bias, reference, {}, {"diff"}),
    Case("full", "linear", linear, reference, {"train_bias": False}, {"diff"}),
]


# ---------------------------------------------------------------------- extra checks
@pytest.mark.parametrize("layer", [nn.Embedding(10, 8), nn.LayerNorm(8), nn.Conv2d(8, 8, 3, groups=8)])
def test_full_refuses_other_layers(layer):
    with pytest.raises(UnsupportedLayerError):
        make_adapter("full", layer)


def test_full_trains_a_difference_and_auto_runs_merged():
    layer = nn.Linear(64, 64).requires_grad_(False)
    adapter = make_adapter("full", layer)
    assert adapter.diff.data_ptr() != layer.weight.data_ptr()
    assert not adapter.use_bypass(torch.randn(4, 64))
    adapter.train()
    assert not adapter.use_bypass(torch.randn(4, 64))


def test_full_options_from_state():
    cls = algorithm_class("full")
    layer = linear()
    assert cls.options_from_state({"diff": torch.zeros(8, 12), "diff_b": torch.zeros(8)}, layer) == {"train_bias": True}
    assert cls.options_from_state({"diff": torch.zeros(8, 12)}, layer) == {"train_bias": False}
    with pytest.raises(ValueError, match="expected"):
        cls.options_from_state({"diff": torch.zeros(8, 11)}, layer)
    with pytest.raises(ValueError, match="no bias"):
        cls.options_from_state({"diff": torch.zeros(8, 12), "diff_b": torch.zeros(8)}, linear_no_bias())
