"""Reference for GLoRA from docs/design.md §3: ``ΔW = flat(W0)·(a1·a2) + b1·b2``, ``s = α/r``.

For a conv the ``a`` term acts on the input-channel axis of W0:
``ΔW[o,j,κ] = Σ_i W0[o,i,κ]·(a1·a2)[i,j]``; ``b2`` is stored as ``(r, in, *k)``. The bias is unchanged.

The ``test_*`` functions here are collected when this file is named on the pytest command line.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from higanbana.algorithms import algorithm_class, make_adapter
from higanbana.errors import UnsupportedLayerError

from .cases import STANDARD_LAYERS, Case, conv2d, linear, make_input, randomize, rel_err


def reference(state, w0, b0, m):
    a1, a2 = state["a1.weight"], state["a2.weight"]
    b1, b2 = state["b1.weight"], state["b2.weight"]
    out, inp, kernel = w0.shape[0], w0.shape[1], tuple(w0.shape[2:])
    r = a1.shape[1]
    ones = (1,) * len(kernel)  # convolutions: a1, a2 and b1 are 1×1 conv weights (LyCORIS's layout)
    assert tuple(a1.shape) == (inp, r, *ones) and tuple(a2.shape) == (r, inp, *ones)
    assert tuple(b1.shape) == (out, r, *ones) and tuple(b2.shape) == (r, inp, *kernel)
    a1, a2, b1 = a1.flatten(1), a2.flatten(1), b1.flatten(1)
    scale = float(state["alpha"]) / r
    a = torch.einsum("ir,rj->ij", a1, a2)
    delta = torch.einsum("oi...,ij->oj...", w0, a) + torch.einsum("or,ri...->oi...", b1, b2)
    return w0 + m * scale * delta, b0


KEYS = {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}

CASES = [
    *(Case("glora", name, make, reference, {"rank": 3, "alpha": 2.0}, KEYS) for name, make in STANDARD_LAYERS.items()),
    Case("glora", "linear", linear, reference, {"rank": 2, "use_scalar": True}, KEYS),
    Case("glora", "conv2d", conv2d, reference, {"rank": 2, "alpha": 4.0, "use_scalar": True}, KEYS),
    Case("glora", "linear", linear, reference, {"rank": 4, "alpha": 8, "rs_lora": True}, KEYS),
]


def _wrapped(make=conv2d, **options):
    torch.manual_seed(0)
    layer = make(torch.float64).requires_grad_(False)
    adapter = make_adapter("glora", layer, dtype=torch.float64, **{"rank": 3, **options})
    randomize(adapter)
    return layer, adapter


# ---------------------------------------------------------------------- extra checks
@pytest.mark.parametrize("layer", [nn.Embedding(10, 8), nn.LayerNorm(8), nn.Conv2d(8, 8, 3, groups=4)])
def test_glora_refuses_other_layers(layer):
    with pytest.raises(UnsupportedLayerError):
        make_adapter("glora", layer)


@pytest.mark.parametrize("name", sorted(STANDARD_LAYERS))
def test_glora_bypass_is_one_base_op_and_matches_the_two_op_form(name):
    """op(x + c·a1(a2(x)), W0, b0) + c·b1(b2(x)) = op(x, W0, b0) + c·[op(x, W0·A) + op(x, B)]."""
    layer, adapter = _wrapped(STANDARD_LAYERS[name])
    x = make_input(layer, torch.float64)
    c = 0.7 * adapter.scale
    spec = adapter.spec
    w0 = layer.weight
    a = adapter.a1 @ adapter.a2
    wa = torch.einsum("oi...,ij->oj...", w0, a)
    b = (adapter.b1 @ adapter.b2.flatten(1)).reshape(w0.shape)
    two_op = spec.op(x, w0, layer.bias) + c * (spec.op(x, wa) + spec.op(x, b))
    adapter.forward_mode, adapter.multiplier = "bypass", 0.7
    assert rel_err(adapter(x), two_op) <= 1e-12


def test_glora_unmerge_inverts_exactly_without_backup():
    layer, adapter = _wrapped()
    w0 = layer.weight.clone()
    adapter.multiplier = 0.8
    adapter.merge_into()
    assert adapter._backup is None
    assert rel_err(layer.weight, w0) > 1e-3
    adapter.unmerge()
    assert rel_err(layer.weight, w0) <= 1e-13


def test_glora_singular_merge_keeps_a_backup():
    layer = linear().requires_grad_(False)
    adapter = make_adapter("glora", layer, rank=1, alpha=1.0)
    randomize(adapter)
    with torch.no_grad():  # a2·a1 = −1: I + a1·a2 is singular, W0 cannot be recovered from W'
        adapter.a1.zero_()[0, 0] = 1.0
        adapter.a2.zero_()[0, 0] = -1.0
    w0 = layer.weight.clone()
    adapter.merge_into()
    assert adapter._backup is not None
    torch.testing.assert_close(layer.weight[:, 0], adapter.b1[:, 0].detach() * adapter.b2[0, 0].detach())
    adapter.unmerge()
    assert torch.equal(layer.weight, w0)


def test_glora_nearly_singular_merge_in_float32_keeps_a_backup():
    layer = linear().requires_grad_(False)
    adapter = make_adapter("glora", layer, rank=1, alpha=1.0)
    randomize(adapter)
    with torch.no_grad():
        adapter.a1.zero_()[0, 0] = 1.0
        adapter.a2.zero_()[0, 0] = -0.9999
    assert adapter._needs_backup()
    with torch.no_grad():
        adapter.a2[0, 0] = -0.5
    assert not adapter._needs_backup()


def test_glora_use_scalar_folds_into_a2_and_b2():
    layer, adapter = _wrapped(linear, use_scalar=True)
    with torch.no_grad():
        adapter.scalar.fill_(0.25)
    state = adapter.state_tensors()
    torch.testing.assert_close(state["a2.weight"], 0.25 * adapter.a2.detach())
    torch.testing.assert_close(state["b2.weight"], 0.25 * adapter.b2.detach())
    ref, _ = reference(state, layer.weight, layer.bias, 1.0)
    assert rel_err(adapter.merged_weight(1.0), ref) <= 1e-12


def test_glora_at_init_use_scalar_is_identity_but_trainable():
    torch.manual_seed(0)
    layer = linear().requires_grad_(False)
    adapter = make_adapter("glora", layer, rank=2, use_scalar=True)
    assert adapter.a2.abs().sum() > 0 and adapter.b2.abs().sum() > 0
    x = make_input(layer, torch.float32)
    assert torch.equal(adapter(x), layer(x))


def test_glora_loads_the_old_layout():
    """Old layout: a1 (r, in), a2 (in, r), b1 (r, in·∏k), b2 (out, r), ΔW = W0·a2·a1 + b2·b1."""
    layer, adapter = _wrapped(conv2d)
    new = adapter.state_tensors()
    old = {
        "a1.weight": new["a2.weight"],
        "a2.weight": new["a1.weight"],
        "b1.weight": new["b2.weight"].flatten(1),
        "b2.weight": new["b1.weight"],
        "alpha": new["alpha"],
    }
    cls = algorithm_class("glora")
    fresh = copy.deepcopy(layer)
    options = cls.options_from_state(old, fresh)
    assert options == {"rank": 3}
    reloaded = make_adapter("glora", fresh, dtype=torch.float64, **options)
    reloaded.load_state_tensors(old)
    assert rel_err(reloaded.merged_weight(1.0), adapter.merged_weight(1.0)) <= 1e-12
    with pytest.raises(ValueError, match="fit neither layout"):
        cls.options_from_state({**new, "b1.weight": torch.zeros(5, 3)}, fresh)


def test_glora_auto_prefers_bypass_for_sd_convs_in_training():
    layer = nn.Conv2d(320, 320, 3, padding=1).requires_grad_(False)
    adapter = make_adapter("glora", layer, rank=8)
    x = torch.empty(1, 320, 64, 64)
    assert adapter.use_bypass(x)  # measured: 1.23x vs merged 1.70x (docs/benchmarks.md)
    with torch.no_grad():
        assert not adapter.use_bypass(x)  # inference: one op with the merged weight
