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
    *(Case("full", name, make, reference, {"train_weight": False}, KEYS) for name, make in STANDARD_LAYERS.items()),
    Case("full", "linear_no_bias", linear_no_bias, reference, {"train_weight": False}, {"diff"}),
    Case("full", "conv2d_no_bias", conv2d_no_bias, reference, {"train_weight": False}, {"diff"}),
    Case("full", "linear", linear, reference, {"train_weight": False, "train_bias": False}, {"diff"}),
]


# ---------------------------------------------------------------------- extra checks
@pytest.mark.parametrize("layer", [nn.Embedding(10, 8), nn.LayerNorm(8), nn.Conv2d(8, 8, 3, groups=8)])
def test_full_refuses_other_layers(layer):
    with pytest.raises(UnsupportedLayerError):
        make_adapter("full", layer)


def test_full_trains_a_difference_and_auto_runs_merged():
    layer = nn.Linear(64, 64).requires_grad_(False)
    adapter = make_adapter("full", layer, train_weight=False)
    assert adapter.diff.data_ptr() != layer.weight.data_ptr()
    assert adapter.trained_weight is None
    assert not adapter.use_bypass(torch.randn(4, 64))
    adapter.train()
    assert not adapter.use_bypass(torch.randn(4, 64))


def test_full_train_weight_uses_the_trained_weight_as_it_is():
    """At multiplier 1 the forward's weight is the trained tensor itself (no W0 + diff per step);
    the file still says diff = W − W0, and a merge/un-merge round trip restores W0 and the diff."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 8, dtype=torch.float64).requires_grad_(False)
    w0, b0 = layer.weight.clone(), layer.bias.clone()
    adapter = make_adapter("full", layer, train_weight=True, dtype=torch.float64)
    assert adapter.diff is None and adapter.trained_weight is not None
    assert adapter.merged_weight(1.0) is adapter.trained_weight
    assert adapter.merged_bias(1.0) is adapter.trained_bias
    assert torch.equal(adapter.state_tensors()["diff"], torch.zeros(8, 12, dtype=torch.float64))
    diff, diff_b = torch.randn(8, 12, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    adapter.load_state_tensors({"diff": diff, "diff_b": diff_b})
    torch.testing.assert_close(adapter.trained_weight, w0 + diff, rtol=0, atol=1e-12)
    adapter.multiplier = 0.3
    adapter.merge_into()
    torch.testing.assert_close(layer.weight, w0 + 0.3 * diff, rtol=0, atol=1e-12)
    torch.testing.assert_close(adapter.state_tensors()["diff"], diff, rtol=0, atol=1e-12)  # read from the backup
    torch.testing.assert_close(adapter.state_tensors()["diff_b"], diff_b, rtol=0, atol=1e-12)
    adapter.unmerge()
    assert torch.equal(layer.weight, w0) and torch.equal(layer.bias, b0)
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(adapter(x), x @ (w0 + 0.3 * diff).T + b0 + 0.3 * diff_b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="'diff' has shape"):
        adapter.load_state_tensors({"diff": torch.zeros(8, 11), "diff_b": diff_b})


def test_full_options_from_state():
    cls = algorithm_class("full")
    layer = linear()
    assert cls.options_from_state({"diff": torch.zeros(8, 12), "diff_b": torch.zeros(8)}, layer) == {"train_bias": True}
    assert cls.options_from_state({"diff": torch.zeros(8, 12)}, layer) == {"train_bias": False}
    with pytest.raises(ValueError, match="expected"):
        cls.options_from_state({"diff": torch.zeros(8, 11)}, layer)
    with pytest.raises(ValueError, match="no bias"):
        cls.options_from_state({"diff": torch.zeros(8, 12), "diff_b": torch.zeros(8)}, linear_no_bias())


def test_full_trains_the_weight_by_default_and_the_difference_over_a_quantized_base():
    """``train_weight`` unset: a copy of the weight over a plain base (no add per step); the difference
    over an int8 base, where the layer runs in bypass and a trained copy would cost ``W − W0`` per step."""
    from higanbana.models.quantize import quantize_weights

    plain = make_adapter("full", nn.Linear(16, 8).requires_grad_(False))
    assert plain.trained_weight is not None and plain.diff is None
    quantized = nn.Sequential(nn.Linear(16, 8))
    assert quantize_weights(quantized, "int8") == 1
    adapter = make_adapter("full", quantized[0])
    assert adapter.trained_weight is None and adapter.diff is not None
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = quantized[0](x)
        adapter.attach()
        torch.testing.assert_close(quantized[0](x), want)  # diff = 0: the layer's own output
    assert make_adapter("full", nn.Linear(16, 8), train_weight=False).diff is not None
