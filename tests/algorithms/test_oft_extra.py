"""OFT/BOFT specifics beyond the generic contract: orthogonality, block sizes, constraint, alpha."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from higanbana.algorithms import algorithm_class, make_adapter
from higanbana.algorithms.oft import NO_CONSTRAINT
from higanbana.errors import ConfigError

from . import ref_boft, ref_oft
from .cases import make_input, randomize, rel_err

MULTIPLIERS = (-1.5, -0.3, 0.0, 0.5, 1.0, 2.0, 7.0)
SETUPS = [
    ("oft", {"rank": 4}),
    ("oft", {"rank": 2, "constraint": 0.02}),
    ("boft", {"rank": 2}),
    ("boft", {"rank": 4, "constraint": 0.01}),
    ("boft", {"rank": 2, "boft_stages": 2}),
]


def adapter_on(algo, out=16, in_features=None, seed=0, **options):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features or out, out, dtype=torch.float64)
    layer.requires_grad_(False)
    adapter = make_adapter(algo, layer, dtype=torch.float64, **options)
    randomize(adapter, std=0.5, seed=seed)
    return layer, adapter


@pytest.mark.parametrize("algo,options", SETUPS)
def test_rotation_is_orthogonal_for_every_multiplier(algo, options):
    layer, adapter = adapter_on(algo, **options)
    eye_b = torch.eye(adapter.block_size, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(16, dtype=torch.float64))
    for m in MULTIPLIERS:
        r = adapter.rotations(m)
        assert (r.transpose(-1, -2) @ r - eye_b).abs().max() < 1e-12, m
        s = adapter.merged_weight(m)  # W0 = I: the whole channel transform as a matrix
        assert (s.T @ s - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-12, m
        assert torch.allclose(s.det().abs(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(adapter.rotations(0.0), eye_b.expand_as(adapter.rotations(0.0)))


@pytest.mark.parametrize("algo,options", SETUPS)
def test_bypass_and_merged_agree_for_negative_and_large_multipliers(algo, options):
    _, adapter = adapter_on(algo, **options)
    x = torch.randn(3, 16, dtype=torch.float64)
    for m in (-1.5, 2.0):
        adapter.multiplier = m
        adapter.forward_mode = "bypass"
        bypass = adapter(x)
        adapter.forward_mode = "merged"
        assert rel_err(bypass, adapter(x)) < 1e-12


def test_boft_block_size_error_names_the_dims_that_work():
    with pytest.raises(ConfigError, match=r"dims that work: 10, 20, 40, 80, 160, 320"):
        make_adapter("boft", nn.Linear(320, 320), rank=4)
    adapter = make_adapter("boft", nn.Linear(320, 320), rank=16)
    assert (adapter.block_size, adapter.num_blocks, adapter.num_stages) == (10, 32, 6)
    assert tuple(adapter.oft_blocks.shape) == (6, 32, 10, 10)


def test_boft_stages_default_and_bounds():
    assert make_adapter("boft", nn.Linear(8, 32), rank=4).num_stages == 4  # n = 8: log2(8) + 1
    assert make_adapter("boft", nn.Linear(8, 32), rank=4, boft_stages=1).num_stages == 1
    assert make_adapter("boft", nn.Linear(8, 32), rank=32).num_stages == 1  # one block
    with pytest.raises(ConfigError, match=r"boft_stages=5 must be between 1 and log2\(n\)\+1 = 4"):
        make_adapter("boft", nn.Linear(8, 32), rank=4, boft_stages=5)


def test_oft_block_size_rule():
    """b = the largest divisor of out that is ≤ rank."""
    assert make_adapter("oft", nn.Linear(4, 12), rank=5).block_size == 4
    assert make_adapter("oft", nn.Linear(4, 12), rank=100).block_size == 12
    assert make_adapter("oft", nn.Linear(4, 320), rank=32).block_size == 32
    assert make_adapter("oft", nn.Linear(4, 320), rank=7).block_size == 5
    with pytest.raises(ConfigError, match=r"ranks that work: 7"):
        make_adapter("oft", nn.Linear(4, 7), rank=4)
    with pytest.raises(ConfigError, match="constraint"):
        make_adapter("oft", nn.Linear(4, 8), constraint=-1)


@pytest.mark.parametrize(
    "case", [c for c in ref_oft.CASES + ref_boft.CASES if c.options.get("constraint")], ids=lambda c: c.id
)
def test_constraint_is_active_in_the_constrained_cases(case):
    """The randomized contract tests really exercise the clamp ν > c·out (both randomizations)."""
    for std in (0.3, 0.2):
        layer = case.make_layer(torch.float64)
        adapter = make_adapter(case.algo, layer, dtype=torch.float64, **case.options)
        randomize(adapter, std=std)
        blocks = adapter.oft_blocks.detach()
        limit = case.options["constraint"] * layer.weight.shape[0]
        nu = float((blocks - blocks.transpose(-1, -2)).norm())
        assert nu > 2 * limit
        assert float(adapter.skew().detach().norm()) == pytest.approx(limit)


@pytest.mark.parametrize("algo", ["oft", "boft"])
def test_alpha_in_files(algo):
    """c = 0 is written as 1e30 (never 0, α·out finite in float32 for A1111) and read back as 0; foreign
    0/inf/float32-max mean none."""
    layer = nn.Linear(4, 8)
    adapter = make_adapter(algo, layer, rank=2)
    tensors = adapter.state_tensors()
    assert tensors["alpha"].dtype == torch.float32 and float(tensors["alpha"]) == pytest.approx(NO_CONSTRAINT)
    assert torch.isfinite(tensors["alpha"] * 2**24)  # A1111 clamps with α·out in float32
    cls = algorithm_class(algo)
    assert cls.options_from_state(tensors, layer)["constraint"] == 0.0
    for foreign in (0.0, -1.0, math.inf, float(torch.finfo(torch.float32).max)):
        assert cls.options_from_state({**tensors, "alpha": torch.tensor(foreign)}, layer)["constraint"] == 0.0
    constrained = make_adapter(algo, layer, rank=2, constraint=0.1)
    alpha = constrained.state_tensors()["alpha"]
    assert float(alpha) == float(torch.tensor(0.1, dtype=torch.float32))
    assert cls.options_from_state(constrained.state_tensors(), layer)["constraint"] == float(alpha)
    adapter.load_state_tensors(constrained.state_tensors())
    assert adapter.constraint == float(alpha)


@pytest.mark.parametrize("algo", ["oft", "boft"])
def test_options_from_state_rejects_bad_shapes(algo):
    layer = nn.Linear(4, 8)
    bad = torch.zeros(3, 2, 2) if algo == "oft" else torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="oft_blocks"):
        algorithm_class(algo).options_from_state({"oft_blocks": bad, "alpha": torch.tensor(1.0)}, layer)


@pytest.mark.parametrize("algo", ["oft", "boft"])
def test_float64_unmerge_without_backup_is_exact(algo):
    layer, adapter = adapter_on(algo, rank=4, rescaled=True)
    w0 = layer.weight.detach().clone()
    for m in (1.0, 0.5, -2.0):
        adapter.multiplier = m
        adapter.merge_into()
        assert adapter._backup is None
        adapter.unmerge()
        assert rel_err(layer.weight, w0) < 1e-13


@pytest.mark.parametrize("algo", ["oft", "boft"])
def test_bypass_does_not_build_the_weight(algo, monkeypatch):
    _, adapter = adapter_on(algo, rank=4)
    adapter.forward_mode = "bypass"
    monkeypatch.setattr(type(adapter), "merged_weight", lambda *a, **k: pytest.fail("weight rebuilt"))
    adapter(torch.randn(2, 16, dtype=torch.float64))


@pytest.mark.parametrize("algo", ["oft", "boft"])
def test_dropout_acts_on_the_rotation_branch(algo):
    layer = nn.Conv2d(3, 8, 3, padding=1)
    layer.requires_grad_(False)
    adapter = make_adapter(algo, layer, rank=2, dropout=1.0)
    randomize(adapter)
    x = make_input(layer, torch.float32)
    adapter.train()
    assert torch.equal(adapter(x), layer(x))  # the whole branch y' − y dropped
    adapter.eval()
    assert not torch.equal(adapter(x), layer(x))
