"""A new algorithm is one class (one file) and one registration: nothing else in the package changes.

The toy algorithm below is declared here, in the test, and registered with ``register``. Without any
other file knowing it, it is built by rules and presets, listed with its options, saved with its
records, detected in a foreign file, validated, described and given tool verdicts by ``info``,
loaded back exactly, merged into the model's weights and trained, saved and reloaded by ``selfcheck``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from higanbana.algorithms import (
    Adapter,
    AdapterOptions,
    accepted_options,
    algorithm_class,
    list_algorithms,
    register,
    unregister,
)
from higanbana.algorithms.base import copy_checked, require
from higanbana.algorithms.files import FileStateError, dims, need, shape
from higanbana.algorithms.options import option
from higanbana.errors import HiganbanaError
from higanbana.formats import load_network, load_tensors, save_network, save_tensors
from higanbana.formats.compat import compatibility
from higanbana.formats.detect import detect_algo, group_modules
from higanbana.formats.inspect import file_info
from higanbana.formats.reader import read_network_file
from higanbana.network import AdapterNetwork


class Toy(Adapter):
    """ΔW[o, :] = shift[o]·gain: one learned value per output row, added to every weight of the row."""

    algo = "toy"
    title = "Toy"
    file_keys = frozenset({"toy_shift"})
    marker_keys = ("toy_shift",)
    loaded_by = frozenset({"ComfyUI"})
    examples = (("toy", {"gain": 1.0}, 1e-4),)

    @dataclass(frozen=True)
    class Options(AdapterOptions):
        gain: float = option(1.0, "how strongly the shift acts")

    def __init__(self, layer: nn.Module, **options: Any) -> None:
        super().__init__(layer, **options)
        self.gain = float(self.options.gain)
        self.toy_shift = self.new_param(self.spec.out_features)
        nn.init.zeros_(self.toy_shift)

    def delta_weight(self, mask: Tensor | None = None) -> Tensor:
        shape_ = self.base_weight.shape
        return (self.gain * self.toy_shift).reshape(-1, *[1] * (len(shape_) - 1)).expand(shape_)

    def state_tensors(self) -> dict[str, Tensor]:
        return {"toy_shift": self.toy_shift.detach().clone()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        copy_checked(self.toy_shift, require(tensors, "toy_shift"), "toy_shift")

    def extra_state_options(self) -> dict[str, Any]:
        return {"gain": self.gain}

    @classmethod
    def options_from_state(cls, tensors: dict[str, Tensor], layer: nn.Module) -> dict[str, Any]:
        return {}

    @classmethod
    def check_file_shapes(cls, tensors: Mapping[str, Tensor]) -> tuple[int | None, int | None]:
        (shift,) = need(tensors, "toy_shift")
        dims(shift, "toy_shift", 1)
        return shape(shift)[0], None

    @classmethod
    def describe_rank(cls, tensors: Mapping[str, Tensor]) -> str:
        return "row"


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)


@pytest.fixture
def toy():
    register(Toy)
    try:
        yield Toy
    finally:
        unregister("toy")


def _model() -> Small:
    torch.manual_seed(0)
    return Small().requires_grad_(False)


def _trained(model: nn.Module) -> AdapterNetwork:
    net = AdapterNetwork(model, "toy", gain=2.0).attach()
    with torch.no_grad():
        for adapter in net.adapters.values():
            adapter.toy_shift.copy_(torch.linspace(-0.5, 0.5, adapter.toy_shift.numel()))
    return net


def test_registered_listed_and_removed(toy):
    assert "toy" in list_algorithms() and algorithm_class("toy") is Toy
    assert accepted_options(Toy) == {"gain", "multiplier", "dropout", "module_dropout", "forward_mode", "dtype"}
    from higanbana.workflows.selfcheck import selfcheck_setups

    assert ("toy", "toy", {"gain": 1.0}, 1e-4) in selfcheck_setups()
    unregister("toy")
    assert "toy" not in list_algorithms()
    register(Toy)
    with pytest.raises(HiganbanaError, match="already registered"):
        register(Toy)
    with pytest.raises(HiganbanaError, match="built-in"):
        unregister("lora")


def test_cli_lists_it(toy, capsys):
    from higanbana.cli import main

    assert main(["algorithms"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("toy"))
    assert "gain" in line


def test_saved_detected_described_loaded_and_merged(toy, tmp_path):
    model = _model()
    x = torch.randn(2, 6)
    net = _trained(model)
    expected = model.fc(x)
    path = save_network(net, tmp_path / "toy.safetensors")
    net.detach()
    assert not torch.allclose(model.fc(x), expected)

    tensors, records, _ = read_network_file(path)  # records and validation from our metadata
    assert {r["algo"] for r in records.values()} == {"toy"} and records["lycoris_fc"]["options"]["gain"] == 2.0
    info = file_info(path)
    assert info["algorithms"] == {"toy": 2} and info["ranks"] == {"toy": {"row": 2}}
    assert {v["tool"]: v["status"] for v in info["compatibility"]}["ComfyUI"] == "loads"
    sd_name = "lora_unet_down_blocks_0_resnets_0_conv1"  # a name every tool maps: the algorithm decides
    verdicts = {v.tool: v for v in compatibility({sd_name: group_modules(load_tensors(path)[0])["lycoris_conv"]}, {})}
    assert verdicts["ComfyUI"].status == "loads"
    assert verdicts["A1111"].status == "does not load" and "A1111 has no Toy" in verdicts["A1111"].notes[0]
    assert verdicts["diffusers"].status == "does not load" and "(toy)" in verdicts["diffusers"].notes[0]

    fresh = _model()
    load_network(path, fresh).attach()
    torch.testing.assert_close(fresh.fc(x), expected)

    tensors, _ = load_tensors(path)
    foreign = save_tensors(tensors, tmp_path / "foreign.safetensors")  # no records: detected from the keys
    groups = group_modules(tensors)
    assert {detect_algo(n, m) for n, m in groups.items()} == {"toy"}
    other = _model()
    loaded = load_network(foreign, other)
    assert {a.algo for a in loaded.adapters.values()} == {"toy"}

    merged = _model()
    net = load_network(path, merged)
    net.merge()  # baked into the weights: the plain layer computes the adapted output
    torch.testing.assert_close(merged.fc(x), expected)


def test_validated_like_every_algorithm(toy, tmp_path):
    net = _trained(_model())
    path = save_network(net, tmp_path / "toy.safetensors")
    tensors, meta = load_tensors(path)
    tensors["lycoris_fc.toy_shift"] = torch.zeros(4, 2)
    bad = save_tensors(tensors, tmp_path / "bad.safetensors", meta)
    with pytest.raises(
        HiganbanaError, match=r"module lycoris_fc: tensor 'toy_shift' has shape \(4, 2\); expected 1 dims"
    ):
        read_network_file(bad)
    tensors["lycoris_fc.toy_shift"] = torch.zeros(4)
    tensors["lycoris_fc.extra"] = torch.zeros(4)
    with pytest.raises(HiganbanaError, match="unexpected key"):
        read_network_file(save_tensors(tensors, tmp_path / "extra.safetensors", meta))
    with pytest.raises(FileStateError):
        Toy.check_file_shapes({})


def test_selfcheck_trains_saves_and_reloads_it(toy, tmp_path):
    from higanbana.workflows.selfcheck import run_selfcheck

    (row,) = run_selfcheck(tmp_path, steps=5, only=["toy"])
    assert row.label == "toy" and row.loss_after < row.loss_before and row.reload_error < 1e-5
