"""AdapterNetwork on a tiny SD UNet, the safetensors round trip, atomic writes and bad files."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from higanbana.errors import ConfigError, HiganbanaError
from higanbana.formats import load_network, load_tensors, save_network, save_tensors
from higanbana.models.tiny import tiny_sd_unet, tiny_unet_inputs
from higanbana.network import AdapterNetwork, module_key

from .algorithms.cases import randomize


def attention_linears(path, module):
    return isinstance(module, nn.Linear) and ".attn" in path


@pytest.fixture(scope="module")
def unet():
    return tiny_sd_unet(seed=0).requires_grad_(False).eval()


def test_module_key_follows_kohya():
    assert module_key("lora_unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    )


def test_one_construction_path_records_rebuild_the_same_network(unet):
    """A config's plan and the records it leaves (``modules=``, as a file's records are built) give
    the same modules, options and tensors; mixing the two ways is an error."""
    from higanbana.network import Part, plan_modules

    net = AdapterNetwork(unet, "lora", attention_linears, prefix="lora_unet", rank=2, alpha=1)
    randomize(net, std=0.1)
    again = AdapterNetwork(unet, prefix="lora_unet", modules=list(net.records.values()))
    assert list(again.records) == list(net.records)
    assert again.module_records() == net.module_records()
    again.load_state_tensors(net.state_tensors())
    for name, adapter in net:
        torch.testing.assert_close(again.adapters[name].merged_weight(1.0), adapter.merged_weight(1.0))
    parts = [Part("lora_unet", unet)]
    plan = plan_modules(parts, net.config, attention_linears)
    assert [r.name for r in plan] == list(net.records)
    with pytest.raises(ConfigError, match="pass no config"):
        AdapterNetwork(unet, "lora", modules=plan)


def test_save_and_reload_reproduces_outputs(unet, tmp_path):
    net = AdapterNetwork(unet, "lokr", attention_linears, prefix="lora_unet", rank=2, factor=4).attach()
    randomize(net, std=0.1)
    batch = tiny_unet_inputs(seed=3)
    with torch.no_grad():
        expected = unet(**batch).sample
    path = save_network(net, tmp_path / "net.safetensors", metadata={"ss_output_name": "net"})
    net.detach()
    tensors, metadata = load_tensors(path)
    assert metadata["higanbana.format_version"] == "1"
    records = json.loads(metadata["higanbana.modules"])
    assert set(records) == set(net.adapters)
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert tensors[next(k for k in tensors if k.endswith(".alpha"))].dtype == torch.float32
    fresh = tiny_sd_unet(seed=0).requires_grad_(False).eval()
    load_network(path, fresh).attach()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).sample, expected)


def test_half_precision_file_keeps_alpha_float32(unet, tmp_path):
    net = AdapterNetwork(unet, "lora", attention_linears, rank=2)
    path = save_network(net, tmp_path / "half.safetensors", dtype=torch.float16)
    tensors, _ = load_tensors(path)
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} == {torch.float32}


def test_network_merge_equals_attached_forward(unet):
    model = tiny_sd_unet(seed=0).requires_grad_(False).eval()
    net = AdapterNetwork(model, "loha", attention_linears, rank=2).attach()
    randomize(net, std=0.1)
    batch = tiny_unet_inputs(seed=4)
    with torch.no_grad():
        attached = model(**batch).sample
        net.merge()
        merged = model(**batch).sample
        net.unmerge()
        net.detach()
        plain = model(**batch).sample
        base = unet(**batch).sample
    assert (merged - attached).abs().max() <= 1e-5 * attached.abs().max()
    assert (plain - base).abs().max() <= 1e-5 * base.abs().max()


def test_selection_matching_nothing_is_an_error(unet):
    with pytest.raises(ConfigError, match="matched no module"):
        AdapterNetwork(unet, "lora", lambda p, m: False)


def test_unknown_option_names_the_nearest(unet):
    with pytest.raises(ConfigError, match="did you mean 'rank'"):
        AdapterNetwork(unet, "lora", attention_linears, rnak=4)


def test_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.safetensors"
    save_tensors({"a": torch.ones(2)}, target)
    original = target.read_bytes()

    def boom(tensors, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("higanbana.formats.safetensors_io.save_file", boom)
    with pytest.raises(HiganbanaError, match=r"cannot write .*out.safetensors: No space left"):
        save_tensors({"a": torch.zeros(2)}, target)
    assert target.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # no partial file left


def test_bad_files_name_the_file(tmp_path):
    truncated = tmp_path / "cut.safetensors"
    save_tensors({"a": torch.ones(64)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    with pytest.raises(HiganbanaError, match="cut.safetensors"):
        load_tensors(truncated)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(HiganbanaError, match="empty.safetensors"):
        load_tensors(empty)
    pickle = tmp_path / "model.ckpt"
    torch.save({"a": torch.ones(1)}, pickle)
    with pytest.raises(HiganbanaError, match="pickle"):
        load_tensors(pickle)
    with pytest.raises(HiganbanaError, match="no such file"):
        load_tensors(tmp_path / "missing.safetensors")


def test_loading_a_wrong_shape_names_module_and_key(unet, tmp_path):
    net = AdapterNetwork(unet, "lora", attention_linears, rank=2)
    tensors = net.state_tensors()
    key = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[key] = torch.zeros(3, 5)
    with pytest.raises(HiganbanaError, match="lora_down.weight"):
        net.load_state_tensors(tensors)


@pytest.mark.parametrize(
    "algo", ["lora", "dora", "loha", "lokr", "ia3", "glora", "oft", "boft", "full", "full-diff", "norm"]
)
def test_every_algorithm_round_trips_through_a_file(unet, tmp_path, algo):
    """The reloaded network computes what the saved one did: bitwise, but for full training the weight
    itself (its default), whose file holds ``diff = W − W0`` and reloads as ``W0 + diff``: equal up to
    float32 rounding."""
    kinds = (nn.LayerNorm,) if algo == "norm" else (nn.Linear,)
    select = lambda path, m: isinstance(m, kinds) and ".transformer_blocks." in path  # noqa: E731
    options = {"rank": 4} if algo not in {"ia3", "full", "full-diff", "norm"} else {}
    if algo == "full-diff":
        algo, options = "full", {"train_weight": False}
    model = tiny_sd_unet(seed=0).requires_grad_(False).eval()
    net = AdapterNetwork(model, algo, select, prefix="lora_unet", **options).attach()
    randomize(net, std=0.05)
    batch = tiny_unet_inputs(seed=5)
    with torch.no_grad():
        expected = model(**batch).sample
    path = save_network(net, tmp_path / f"{algo}.safetensors")
    fresh = tiny_sd_unet(seed=0).requires_grad_(False).eval()
    reloaded = load_network(path, fresh).attach()
    assert {type(a) for a in reloaded.adapters.values()} == {type(a) for a in net.adapters.values()}
    with torch.no_grad():
        got = fresh(**batch).sample
    if algo == "full" and not options:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got, expected)
