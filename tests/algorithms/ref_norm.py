"""Reference for Norm (LayerNorm / GroupNorm) from docs/design.md §3: ``W' = W0 + m·w_norm``, ``b' = b0 + m·b_norm``.

Both ``w_norm`` and ``b_norm`` are always written (docs/design.md §4); a norm without bias writes a zero
``b_norm`` and its bias stays absent.

The ``test_*`` functions here are collected when this file is named on the pytest command line.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from higanbana.algorithms import algorithm_class, make_adapter
from higanbana.errors import UnsupportedLayerError

from .cases import Case, make_input, randomize, rel_err


def reference(state, w0, b0, m):
    w_norm, b_norm = state["w_norm"], state["b_norm"]
    assert w_norm.shape == w0.shape and b_norm.shape == w0.shape
    if b0 is None:
        assert torch.count_nonzero(b_norm) == 0
        return w0 + m * w_norm, None
    return w0 + m * w_norm, b0 + m * b_norm


def layer_norm(dtype=torch.float32):
    return nn.LayerNorm(12, dtype=dtype)


def layer_norm_2d(dtype=torch.float32):
    return nn.LayerNorm((3, 4), eps=1e-6, dtype=dtype)


def layer_norm_no_bias(dtype=torch.float32):
    return nn.LayerNorm(12, bias=False, dtype=dtype)


def group_norm(dtype=torch.float32):
    return nn.GroupNorm(4, 8, dtype=dtype)


KEYS = {"w_norm", "b_norm"}

CASES = [
    Case("norm", "layernorm", layer_norm, reference, {}, KEYS),
    Case("norm", "layernorm_2d", layer_norm_2d, reference, {}, KEYS),
    Case("norm", "layernorm_no_bias", layer_norm_no_bias, reference, {}, KEYS),
    Case("norm", "groupnorm", group_norm, reference, {}, KEYS),
]


# ---------------------------------------------------------------------- extra checks
@pytest.mark.parametrize(
    "layer,match",
    [
        (nn.Linear(8, 8), "cannot wrap Linear"),
        (nn.Embedding(10, 8), "cannot wrap Embedding"),
        (nn.Conv2d(8, 8, 3, groups=2), "cannot wrap Conv2d"),
        (nn.BatchNorm2d(8), "cannot wrap BatchNorm2d"),
        (nn.LayerNorm(8, elementwise_affine=False), "no affine weight"),
        (nn.GroupNorm(2, 8, affine=False), "no affine weight"),
    ],
)
def test_norm_refuses_other_layers(layer, match):
    with pytest.raises(UnsupportedLayerError, match=match):
        make_adapter("norm", layer)


def test_norm_bypass_branch_is_normalised_input_times_w_plus_b():
    layer = group_norm().requires_grad_(False)
    adapter = make_adapter("norm", layer, forward_mode="bypass")
    randomize(adapter)
    x = make_input(layer, torch.float32)
    xhat = nn.functional.group_norm(x, 4, eps=layer.eps)
    expected = layer(x) + 0.5 * (xhat * adapter.w_norm[:, None, None] + adapter.b_norm[:, None, None])
    adapter.multiplier = 0.5
    assert rel_err(adapter(x), expected) <= 1e-6
    assert not make_adapter("norm", layer).use_bypass(x)  # auto: merged


def test_norm_without_bias_rejects_a_non_zero_b_norm():
    layer = layer_norm_no_bias()
    adapter = make_adapter("norm", layer)
    assert set(adapter.state_tensors()) == KEYS
    adapter.load_state_tensors({"w_norm": torch.ones(12), "b_norm": torch.zeros(12)})
    with pytest.raises(ValueError, match="b_norm"):
        adapter.load_state_tensors({"w_norm": torch.ones(12), "b_norm": torch.ones(12)})


def test_norm_options_from_state_checks_the_shape():
    cls = algorithm_class("norm")
    assert cls.options_from_state({"w_norm": torch.zeros(12), "b_norm": torch.zeros(12)}, layer_norm()) == {}
    with pytest.raises(ValueError, match="w_norm"):
        cls.options_from_state({"w_norm": torch.zeros(8), "b_norm": torch.zeros(8)}, layer_norm())
