"""Reference for IA3 (output and input channels) from docs/design.md §3, and its error cases.

``W' = W0 ⊙ (1 + m·w)`` row-wise (``on_input`` = 0) or column-wise (``on_input`` = 1); the bias is
unchanged. ``weight`` is ``(C,)`` for Linear and ``(1, C, 1..)`` for ConvNd.

The ``test_*`` functions here are collected when this file is named on the pytest command line.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from higanbana.algorithms import algorithm_class, make_adapter
from higanbana.errors import UnsupportedLayerError

from .cases import STANDARD_LAYERS, Case, linear, make_input, randomize, rel_err


def reference(state, w0, b0, m):
    w, on_input = state["weight"], state["on_input"]
    assert on_input.dim() == 0 and on_input.dtype == torch.int64
    out, inp, nk = w0.shape[0], w0.shape[1], w0.dim() - 2
    channels = inp if int(on_input) else out
    expected = (1, channels, *([1] * nk)) if nk else (channels,)
    assert tuple(w.shape) == expected, (tuple(w.shape), expected)
    v = w.reshape(channels)
    if int(on_input):
        w_new = torch.einsum("oi...,i->oi...", w0, 1.0 + m * v)
    else:
        w_new = torch.einsum("oi...,o->oi...", w0, 1.0 + m * v)
    return w_new, b0


KEYS = {"weight", "on_input"}

CASES = [
    Case("ia3", name, make, reference, {"on_input": side}, KEYS)
    for name, make in STANDARD_LAYERS.items()
    for side in (False, True)
]


# ---------------------------------------------------------------------- extra checks
@pytest.mark.parametrize("layer", [nn.Embedding(10, 8), nn.LayerNorm(8), nn.ConvTranspose2d(4, 4, 3)])
def test_ia3_refuses_other_layers(layer):
    with pytest.raises(UnsupportedLayerError, match=type(layer).__name__):
        make_adapter("ia3", layer)


def test_ia3_refuses_grouped_conv():
    with pytest.raises(UnsupportedLayerError, match="groups=2"):
        make_adapter("ia3", nn.Conv2d(8, 8, 3, groups=2))


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_bias_unchanged_and_bypass_is_channel_scaling(on_input):
    layer = nn.Conv2d(6, 8, 3, padding=1).requires_grad_(False)
    adapter = make_adapter("ia3", layer, on_input=on_input)
    randomize(adapter)
    b0 = layer.bias.clone()
    assert torch.equal(adapter.merged_bias(0.7), b0)
    x = make_input(layer, torch.float32)
    w = adapter.weight.detach()
    y0 = layer(x)
    adapter.forward_mode, adapter.multiplier = "bypass", 0.7
    if on_input:
        expected = nn.functional.conv2d(x * (1 + 0.7 * w), layer.weight, layer.bias, padding=1)
    else:
        expected = (y0 - b0[:, None, None]) * (1 + 0.7 * w) + b0[:, None, None]
    assert rel_err(adapter(x), expected) <= 1e-6


def test_ia3_foreign_file_without_on_input_infers_the_side():
    cls = algorithm_class("ia3")
    layer = linear()
    assert cls.options_from_state({"weight": torch.zeros(12)}, layer) == {"on_input": True}
    assert cls.options_from_state({"weight": torch.zeros(8)}, layer) == {"on_input": False}
    with pytest.raises(ValueError, match="expected 8"):
        cls.options_from_state({"weight": torch.zeros(5)}, layer)
    adapter = make_adapter("ia3", layer)
    with pytest.raises(ValueError, match="on_input"):
        adapter.load_state_tensors({"weight": torch.zeros(8), "on_input": torch.tensor(1)})


def test_ia3_auto_prefers_bypass_in_inference():
    layer = nn.Linear(64, 64).requires_grad_(False)
    adapter = make_adapter("ia3", layer).eval()
    assert adapter.use_bypass(torch.randn(4, 64))


def test_ia3_unmerge_with_a_vanishing_channel_uses_a_backup():
    layer = linear().requires_grad_(False)
    adapter = make_adapter("ia3", layer)
    w0 = layer.weight.clone()
    with torch.no_grad():
        adapter.weight.fill_(0.5)
        adapter.weight[0] = -1.0  # 1 + m·w = 0: row 0 vanishes when merged
    adapter.merge_into()
    assert torch.equal(layer.weight[0], torch.zeros_like(w0[0]))
    adapter.unmerge()
    assert torch.equal(layer.weight, w0)
