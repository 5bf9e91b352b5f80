"""Unsupported inputs fail clearly at construction, naming the option, layer or dims."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from higanbana.algorithms import list_algorithms, make_adapter
from higanbana.errors import ConfigError, UnsupportedLayerError

CONV_ALGOS = [a for a in list_algorithms() if a != "norm"]


@pytest.mark.parametrize("algo", CONV_ALGOS)
def test_grouped_and_depthwise_convs_are_refused(algo):
    with pytest.raises(UnsupportedLayerError, match="groups=2"):
        make_adapter(algo, nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(UnsupportedLayerError, match="groups=8"):
        make_adapter(algo, nn.Conv2d(8, 8, 3, groups=8))


@pytest.mark.parametrize("algo", CONV_ALGOS)
def test_non_zero_padding_mode_and_other_layers_are_refused(algo):
    with pytest.raises(UnsupportedLayerError, match="padding_mode"):
        make_adapter(algo, nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(UnsupportedLayerError, match="Embedding"):
        make_adapter(algo, nn.Embedding(10, 8))


@pytest.mark.parametrize("algo", list_algorithms())
def test_unknown_option_names_the_nearest_valid_one(algo):
    layer = nn.LayerNorm(8) if algo == "norm" else nn.Linear(8, 8)
    with pytest.raises(ConfigError, match=r"unknown option 'multiplyer' \(did you mean 'multiplier'\?\)"):
        make_adapter(algo, layer, multiplyer=1.0)


def test_unknown_algorithm_names_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'lokr'"):
        make_adapter("lokrr", nn.Linear(4, 4))


def test_bad_option_values():
    with pytest.raises(ConfigError, match="rank"):
        make_adapter("lora", nn.Linear(4, 4), rank=0)
    with pytest.raises(ConfigError, match="dropout"):
        make_adapter("lora", nn.Linear(4, 4), dropout=1.5)
    with pytest.raises(ConfigError, match="forward_mode"):
        make_adapter("lora", nn.Linear(4, 4), forward_mode="fast")
    with pytest.raises(ConfigError, match="weight_decompose"):
        make_adapter("glora", nn.Linear(4, 4), weight_decompose=True)


def test_boft_dim_without_block_size_names_the_dims_that_work():
    with pytest.raises(ConfigError, match="dims that work: 10, 20"):
        make_adapter("boft", nn.Linear(320, 320), rank=4)
    assert make_adapter("boft", nn.Linear(320, 320), rank=16) is not None


def test_alias_dora_is_lora_with_weight_decompose():
    adapter = make_adapter("dora", nn.Linear(6, 4), rank=2)
    assert adapter.algo == "lora" and adapter.weight_decompose
    assert set(adapter.state_tensors()) == {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
    torch.testing.assert_close(adapter.dora_scale.flatten(), adapter.layer.weight.norm(dim=1))
