"""The exact rewrites that make the bypass cheap (issue 17) agree with the merged form in float64:
outputs *and* gradients of every trainable tensor and of the input, at a multiplier other than 1.

- LoHa's Hadamard product as one rank-r² product (Khatri–Rao factors);
- DoRA's norm expanded through LoRA's factors (both axes, Linear and conv, with and without bias),
  and its cache of ‖W0‖² following in-place changes of W0;
- GLoRA's two Linear forms (``W0·a1`` as a LoRA "up", or the frozen GEMM on a changed input);
- BOFT's stages composed into block-diagonal products, every split and the inverse;
- LoKr's Linear bypass (``w1`` first, ``w2`` as the GEMM that adds into the frozen output).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import higanbana.algorithms.glora as glora_module
from higanbana.algorithms import make_adapter

TOL = 1e-10


def _layer(kind: str, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(12, 10, bias=bias, dtype=torch.float64)
    else:
        layer = nn.Conv2d(6, 8, 3, padding=1, bias=bias, dtype=torch.float64)
    layer.requires_grad_(False)
    return layer


def _input(layer: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (2, 5, 12) if isinstance(layer, nn.Linear) else (2, 6, 5, 5)
    return torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_(True)


def _randomize(adapter: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=g) * 0.3 + (1.0 if p.dim() == 0 else 0.0))


def _step(adapter: nn.Module, x: torch.Tensor, mode: str, m: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    adapter.forward_mode, adapter.multiplier = mode, m
    x.grad = None
    for p in adapter.parameters():
        p.grad = None
    y = adapter(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in adapter.parameters() if p.requires_grad]
    return y.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


def _agree(adapter: nn.Module, x: torch.Tensor, m: float = 0.7) -> None:
    y_m, g_m = _step(adapter, x, "merged", m)
    y_b, g_b = _step(adapter, x, "bypass", m)
    assert _rel(y_b, y_m) <= TOL
    assert len(g_b) == len(g_m)
    for gb, gm in zip(g_b, g_m, strict=True):
        assert _rel(gb, gm) <= TOL


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bias", [True, False])
def test_loha_rank_r_squared_branch_is_exact(kind, bias):
    layer = _layer(kind, bias)
    adapter = make_adapter("loha", layer, rank=3, alpha=2.0, use_scalar=True, dtype=torch.float64)
    _randomize(adapter)
    u, v = adapter.khatri_rao(None)
    assert u.shape == (layer.weight.shape[0], 9) and v.shape[0] == 9
    assert _rel((u @ v).reshape(layer.weight.shape), adapter.delta_weight()) <= TOL
    _agree(adapter, _input(layer))


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("on_output", [True, False])
def test_dora_factored_norm_is_exact(kind, bias, on_output):
    layer = _layer(kind, bias)
    adapter = make_adapter(
        "lora", layer, rank=3, alpha=2.0, weight_decompose=True, wd_on_output=on_output, dtype=torch.float64
    )
    _randomize(adapter)
    assert adapter.dora_factors(None) is not None
    _agree(adapter, _input(layer))
    _agree(adapter, _input(layer), m=1.0)


def test_dora_norm_cache_follows_the_base_weight():
    layer = _layer("linear", True)
    adapter = make_adapter("lora", layer, rank=3, weight_decompose=True, dtype=torch.float64)
    _randomize(adapter)
    x = _input(layer)
    _agree(adapter, x)
    with torch.no_grad():
        layer.weight.mul_(1.5).add_(0.25)  # an in-place change (e.g. another adapter merged)
    _agree(adapter, x)
    layer.weight = nn.Parameter(layer.weight.detach() * 0.5 - 0.1, requires_grad=False)  # a new weight
    _agree(adapter, x)
    layer.weight.data = layer.weight.detach() + 0.3  # a swapped storage
    _agree(adapter, x)


@pytest.mark.parametrize("input_pass_cost", [0, 10**9], ids=["changed-input", "weight-form"])
@pytest.mark.parametrize("bias", [True, False])
def test_glora_linear_forms_are_exact(monkeypatch, input_pass_cost, bias):
    monkeypatch.setattr(glora_module, "INPUT_PASS_COST", input_pass_cost)
    layer = _layer("linear", bias)
    adapter = make_adapter("glora", layer, rank=3, alpha=2.0, dtype=torch.float64)
    _randomize(adapter)
    x = _input(layer)
    assert adapter._weight_form_is_cheaper(10) == (input_pass_cost > 0)
    _agree(adapter, x)


@pytest.mark.parametrize("out,rank,stages", [(32, 4, None), (48, 6, None), (64, 4, 3), (16, 2, 1)])
def test_boft_composed_products_equal_the_stages(monkeypatch, out, rank, stages):
    """Every split of the butterfly into a low and a high block-diagonal product (and the inverse)
    gives the stage-by-stage result; the layer's outputs and gradients agree in both modes."""
    torch.manual_seed(0)
    layer = nn.Linear(12, out, dtype=torch.float64)
    layer.requires_grad_(False)
    options = {"rank": rank} if stages is None else {"rank": rank, "boft_stages": stages}
    adapter = make_adapter("boft", layer, dtype=torch.float64, **options)
    _randomize(adapter)
    rotations = adapter.rotations(1.0)
    rows = torch.randn(2, out, 3, dtype=torch.float64)
    every = range(adapter.num_stages)
    staged = adapter.stages(rows, rotations, every)
    back = adapter.stages(staged, rotations, every, inverse=True)
    assert _rel(back, rows) <= TOL
    for k in [None, *every]:
        monkeypatch.setattr(type(adapter), "plan", lambda self, positions, k=k: k)
        assert _rel(adapter.rotate(rows, rotations), staged) <= TOL
        assert _rel(adapter.rotate(staged, rotations, inverse=True), rows) <= TOL
        _agree(adapter, _input(layer))
    monkeypatch.undo()
    assert adapter.plan(10**6) is not None or adapter.num_stages == 1  # many positions: the products pay


@pytest.mark.parametrize(
    "options,factored",
    [
        ({"rank": 2, "full_matrix": True}, (False, False)),  # scale 1
        ({"rank": 1, "factor": 2}, (False, True)),
        ({"rank": 1, "decompose_both": True, "use_scalar": True}, (True, True)),
    ],
    ids=["both-full", "w2-factored", "both-factored"],
)
@pytest.mark.parametrize("bias", [True, False])
def test_lokr_linear_bypass_is_exact(options, factored, bias):
    """LoKr's Linear bypass (w1 on the input groups, then w2 as the GEMM that adds into y0)."""
    layer = _layer("linear", bias)
    adapter = make_adapter("lokr", layer, alpha=2.0, dtype=torch.float64, **options)
    assert (adapter.w1_factored, adapter.w2_factored) == factored
    _randomize(adapter)
    _agree(adapter, _input(layer))
