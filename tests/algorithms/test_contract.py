"""The numeric contract of every algorithm × layer type (issue: tests 1–5, 7 and 8).

Each case comes from a ``ref_<algo>.py`` reference written from docs/design.md §3.
"""

from __future__ import annotations

import copy

import pytest
import torch

from higanbana.algorithms import algorithm_class, list_algorithms, make_adapter

from .cases import REFERENCE_MODULES, all_cases, make_input, randomize, rel_err

CASES = all_cases()
IDS = [c.id for c in CASES]


def build(case, dtype=torch.float32, param_dtype=torch.float32, seed=0, **extra):
    torch.manual_seed(seed)
    layer = case.make_layer(dtype)
    with torch.no_grad():  # give the base weight a generic (non-init) value
        layer.weight.copy_(torch.randn_like(layer.weight, dtype=torch.float32).to(dtype) * 0.5 + 0.1)
        if getattr(layer, "bias", None) is not None:
            layer.bias.copy_(torch.randn_like(layer.bias, dtype=torch.float32).to(dtype))
    layer.requires_grad_(False)
    adapter = make_adapter(case.algo, layer, dtype=param_dtype, **{**case.options, **extra})
    return layer, adapter


def forward_in(adapter, x, mode, m):
    adapter.forward_mode, adapter.multiplier = mode, m
    return adapter(x)


def test_every_algorithm_has_cases():
    covered = {c.algo for c in CASES}
    assert set(list_algorithms()) == set(REFERENCE_MODULES)
    missing = set(list_algorithms()) - covered
    assert not missing, f"no test cases for {sorted(missing)}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identity_at_init(case):
    layer, adapter = build(case)
    x = make_input(layer, torch.float32)
    expected = layer(x)
    # equal up to float32 rounding, not bitwise: a bypass computes conv(x, W) + b where the layer runs
    # conv(x, W, b), and the two kernels round differently on some CPUs (1.8e-7 seen on AMD EPYC)
    for mode in ("merged", "bypass"):
        torch.testing.assert_close(forward_in(adapter, x, mode, 1.0), expected, rtol=1e-6, atol=1e-6, msg=mode)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merged_weight_matches_reference_float64(case):
    layer, adapter = build(case, dtype=torch.float64, param_dtype=torch.float64)
    randomize(adapter)
    state = {k: v.double() if v.is_floating_point() else v for k, v in adapter.state_tensors().items()}
    if case.keys is not None:
        assert set(state) == case.keys
    w0 = layer.weight.detach().clone()
    b0 = None if layer.bias is None else layer.bias.detach().clone()
    for m in (1.0, 0.5):
        ref_w, ref_b = case.reference(state, w0, b0, m)
        assert rel_err(adapter.merged_weight(m), ref_w) <= 1e-10
        if ref_b is not None:
            assert rel_err(adapter.merged_bias(m), ref_b) <= 1e-10
        # the update is not trivial: the reference moved the weight
        assert rel_err(ref_w, w0) > 1e-3 or m == 0


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 1e-2)], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_modes_and_merge_agree(case, dtype, tol):
    layer, adapter = build(case, dtype=dtype)
    randomize(adapter, std=0.2)
    adapter.eval()
    x = make_input(layer, dtype, torch.Generator().manual_seed(1))
    base_out = layer(x).float()
    for m in (0.0, 0.5, 1.0):
        merged = forward_in(adapter, x, "merged", m).float()
        bypass = forward_in(adapter, x, "bypass", m).float()
        auto = forward_in(adapter, x, "auto", m).float()
        assert rel_err(bypass, merged) <= tol, m
        assert rel_err(auto, merged) <= tol, m
        adapter.merge_into()
        baked = layer(x).float()
        adapter.unmerge()
        assert rel_err(baked, merged) <= tol, m
        if m == 0.0:
            assert torch.equal(merged, base_out)
    assert rel_err(merged, base_out) > 1e-3  # the adapter does change the output


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bias_handling(case):
    """The bias of the merged layer is the reference's (unchanged for OFT/BOFT/IA3/LoRA...)."""
    layer, adapter = build(case, dtype=torch.float64, param_dtype=torch.float64)
    randomize(adapter)
    b0 = None if getattr(layer, "bias", None) is None else layer.bias.detach().clone()
    state = {k: v.double() if v.is_floating_point() else v for k, v in adapter.state_tensors().items()}
    _, ref_b = case.reference(state, layer.weight.detach().clone(), b0, 1.0)
    adapter.merge_into()
    if ref_b is None:
        assert layer.bias is None
    else:
        assert rel_err(layer.bias, ref_b) <= 1e-10
    adapter.unmerge()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_unmerge_restores_base(case):
    layer, adapter = build(case)
    randomize(adapter)
    w0 = layer.weight.detach().clone()
    b0 = None if getattr(layer, "bias", None) is None else layer.bias.detach().clone()
    for m in (1.0, 0.5):
        adapter.multiplier = m
        adapter.merge_into()
        assert rel_err(layer.weight, w0) > 1e-4
        adapter.unmerge()
        assert rel_err(layer.weight, w0) <= 1e-6
        if b0 is not None:
            assert rel_err(layer.bias, b0) <= 1e-6


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_merge_unmerge_is_exact(case):
    layer, adapter = build(case, dtype=torch.bfloat16)
    randomize(adapter)
    w0 = layer.weight.detach().clone()
    adapter.merge_into()
    adapter.unmerge()
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("mode", ["merged", "bypass"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_step_changes_every_trainable_tensor_and_nothing_else(case, mode):
    layer, adapter = build(case, forward_mode=mode)
    randomize(adapter)
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    base_before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.SGD(adapter.parameters(), lr=0.1)
    x = make_input(layer, torch.float32, torch.Generator().manual_seed(2))
    target = torch.randn_like(layer(x))
    adapter.train()
    loss = ((adapter(x) - target) ** 2).mean()
    loss.backward()
    opt.step()
    for name, p in adapter.named_parameters():
        if name in case.frozen_ok:
            continue
        assert not torch.equal(p, before[name]), f"{name} did not change"
    for name, p in layer.named_parameters():
        assert torch.equal(p, base_before[name]), f"base {name} changed"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_round_trip(case):
    layer, adapter = build(case)
    randomize(adapter)
    adapter.eval()
    tensors = adapter.state_tensors()
    if case.keys is not None:
        assert set(tensors) == case.keys
    for key, t in tensors.items():
        if key == "alpha":
            assert t.dim() == 0 and t.dtype == torch.float32 and float(t) != 0
    fresh_layer = copy.deepcopy(layer)
    cls = algorithm_class(case.algo)
    options = cls.options_from_state(tensors, fresh_layer)
    reloaded = make_adapter(case.algo, fresh_layer, **options)
    reloaded.load_state_tensors(tensors)
    reloaded.eval()
    x = make_input(layer, torch.float32)
    assert rel_err(reloaded(x), adapter(x)) <= 1e-6
    assert {k: tuple(v.shape) for k, v in reloaded.state_tensors().items()} == {
        k: tuple(v.shape) for k, v in tensors.items()
    }


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dropouts_only_in_training(case):
    cls = algorithm_class(case.algo)
    from higanbana.algorithms import accepted_options

    valid = accepted_options(cls)
    options = {k: v for k, v in {"dropout": 0.5, "rank_dropout": 0.5, "module_dropout": 0.5}.items() if k in valid}
    layer, adapter = build(case, **options)
    randomize(adapter)
    x = make_input(layer, torch.float32)
    adapter.eval()
    first = adapter(x)
    assert torch.equal(adapter(x), first)  # deterministic in eval
    adapter.train()
    torch.manual_seed(0)
    outs = [adapter(x) for _ in range(6)]
    assert any(not torch.equal(o, first) for o in outs) or not options

    layer, adapter = build(case, module_dropout=1.0)
    randomize(adapter)
    adapter.train()
    assert torch.equal(adapter(x), layer(x))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_multiplier_zero_is_base(case):
    layer, adapter = build(case)
    randomize(adapter)
    x = make_input(layer, torch.float32)
    adapter.multiplier = 0.0
    assert torch.equal(adapter(x), layer(x))


def test_attach_and_detach():
    layer = torch.nn.Linear(4, 3)
    adapter = make_adapter("lora", layer, rank=2)
    randomize(adapter)
    x = torch.randn(2, 4)
    plain = layer(x)
    adapter.attach()
    assert torch.equal(layer(x), adapter(x))
    assert not torch.equal(layer(x), plain)
    adapter.detach()
    assert torch.equal(layer(x), plain)
    assert "weight" in layer.state_dict() and "lora_up" not in layer.state_dict()
