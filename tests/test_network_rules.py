"""AdapterNetwork rules, presets, overrides, multipliers, stacking, parameter groups and describe()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from higanbana.errors import ConfigError, HiganbanaError
from higanbana.network import AdapterNetwork, NetworkConfig, Part, pattern_matches
from higanbana.presets import list_presets, load_preset

from .algorithms.cases import randomize

torch.manual_seed(0)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"to_q": nn.Linear(8, 8), "to_k": nn.Linear(8, 8)})
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.norm = nn.GroupNorm(2, 8)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 4)
        self.ln = nn.LayerNorm(8)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return Toy()


def names(net: AdapterNetwork) -> set[str]:
    return {r.path for r in net.records.values()}


def test_pattern_semantics():
    assert pattern_matches("to_k", "blocks.0.attn.to_k")
    assert not pattern_matches("to_k", "blocks.0.attn.to_kk")
    assert pattern_matches("attn.to_k", "blocks.0.attn.to_k")
    assert pattern_matches("blocks.*.conv", "blocks.1.conv")
    assert pattern_matches("re:blocks\\.[01]\\.attn\\.to_.", "blocks.1.attn.to_q")
    assert not pattern_matches("re:attn", "blocks.1.attn.to_q")  # full match, not search


def test_default_targets_every_linear_and_conv(toy):
    net = AdapterNetwork(toy, "lora", rank=2)
    assert len(names(net)) == 2 * 4 + 1  # norms only when asked for


def test_blocks_names_layers_and_exclude(toy):
    cfg = {"model": {"blocks": ["ModuleDict"], "names": ["head"], "exclude": ["blocks.1"]}}
    assert names(AdapterNetwork(toy, "lora", config=cfg, rank=2)) == {
        "blocks.0.attn.to_q",
        "blocks.0.attn.to_k",
        "head",
    }
    cfg = {"model": {"layers": ["Conv2d"], "exclude": ["re:.*pointwise"]}}
    assert names(AdapterNetwork(toy, "lora", config=cfg, rank=2)) == {"blocks.0.conv", "blocks.1.conv"}


def test_enable_conv_and_train_norm(toy):
    cfg = {"model": {"blocks": ["Block"]}, "enable_conv": False, "train_norm": True}
    net = AdapterNetwork(toy, "loha", config=cfg, rank=2)
    assert "blocks.0.conv" not in names(net) and "blocks.0.pointwise" in names(net)
    assert net.records["lycoris_blocks_0_norm"].algo == "norm"


def test_rules_switch_algorithm_and_options_per_layer(toy):
    cfg = {
        "model": {"blocks": ["Block"]},
        "options": {"rank": 4, "conv_rank": 2, "conv_alpha": 1},
        "rules": [
            {"names": ["attn"], "algo": "lokr", "options": {"rank": 2, "factor": 2}},
            {"names": ["blocks.1.attn.to_k"], "options": {"factor": 4}},
            {"layers": ["Conv2d"], "names": ["pointwise"], "algo": "ia3"},
        ],
    }
    net = AdapterNetwork(toy, config=cfg)
    assert net.records["lycoris_blocks_0_attn_to_q"].algo == "lokr"
    assert net.records["lycoris_blocks_1_attn_to_k"].options == {"rank": 2, "factor": 4}
    assert net.records["lycoris_blocks_0_conv"].algo == "ia3"  # the rule matches every Conv2d
    cfg["rules"] = cfg["rules"][:2]
    net = AdapterNetwork(toy, config=cfg)
    conv = net.adapters["lycoris_blocks_0_conv"]
    assert (conv.rank, conv.alpha) == (2, 1.0)  # conv_rank/conv_alpha for kernels > 1
    assert net.adapters["lycoris_blocks_0_pointwise"].rank == 4


def test_two_networks_with_different_presets_coexist(toy):
    a = AdapterNetwork(toy, "lora", config={"model": {"names": ["head"]}}, rank=2)
    b = AdapterNetwork(toy, "lora", config={"model": {"layers": ["Conv2d"]}}, rank=2)
    assert names(a) == {"head"} and len(names(b)) == 4
    again = AdapterNetwork(toy, "lora", config={"model": {"names": ["head"]}}, rank=2)
    assert names(again) == names(a)


@pytest.mark.parametrize(
    ("config", "options", "needle"),
    [
        ({"model": {"names": ["nothing_here"]}}, {}, "targets (names ['nothing_here']) match no layer of"),
        ({"model": {"names": ["head"]}}, {"factor": 4}, "'lora' takes no option 'factor'"),
        (
            {"model": {"names": ["head"]}, "rules": [{"names": ["head"], "algo": "ia3", "options": {"rank": 2}}]},
            {},
            "rules[0]",
        ),
        ({"model": {"namez": ["head"]}}, {}, "did you mean 'names'"),
        ({"modle": {"names": ["head"]}}, {}, "did you mean 'model'"),
        ({"model": {"names": ["head"]}, "algo": "lorra"}, {}, "unknown algorithm"),
        ({"preset": "ful"}, {}, "did you mean 'full'"),
        ({"model": {"names": ["head"]}, "rules": [{"algo": "lora"}]}, {}, "needs blocks, layers or names"),
    ],
)
def test_bad_configs_are_named_errors(toy, config, options, needle):
    with pytest.raises(ConfigError) as info:
        AdapterNetwork(toy, config=config, **options)
    assert needle in str(info.value)


def test_every_preset_loads_and_targets_a_tiny_unet():
    from higanbana.models.tiny import tiny_sd_unet

    unet = tiny_sd_unet()
    assert set(list_presets()) >= {
        "full",
        "full-lin",
        "attn-mlp",
        "attn-only",
        "unet-only",
        "unet-transformer-only",
        "unet-convblock-only",
        "ia3",
    }
    counts = {}
    for preset in list_presets():
        assert load_preset(preset)["description"]
        if NetworkConfig.load(preset).family != "sd":  # the DiT presets: tests/test_dit_networks.py
            continue
        net = AdapterNetwork([Part("lora_unet", unet, "unet")], config=preset)
        counts[preset] = len(net)
        assert load_preset(preset)["description"]
    assert counts["full"] == counts["unet-only"] > counts["full-lin"] > counts["attn-mlp"] > counts["attn-only"]
    assert counts["attn-mlp"] + counts["unet-convblock-only"] + 4 == counts["full"]  # + conv_in, conv_out, 2 time emb
    ia3 = AdapterNetwork([Part("lora_unet", unet, "unet")], config="ia3")
    on_input = {n for n, a in ia3 if a.on_input}
    assert on_input and all(n.endswith("ff_net_2") for n in on_input)


def test_preset_from_toml_file_and_fields_override(tmp_path, toy):
    path = tmp_path / "mine.toml"
    path.write_text('algo = "loha"\n[options]\nrank = 2\n[model]\nnames = ["head"]\n')
    net = AdapterNetwork(toy, config=str(path))
    assert names(net) == {"head"} and net.records["lycoris_head"].algo == "loha"
    cfg = NetworkConfig.from_dict({"preset": str(path), "model": {"layers": ["Conv2d"]}})
    assert names(AdapterNetwork(toy, config=cfg)) == {f"blocks.{i}.{c}" for i in (0, 1) for c in ("conv", "pointwise")}


def test_multiplier_global_and_per_module(toy):
    net = AdapterNetwork(toy, "lora", rank=2).attach()
    randomize(net, std=0.2)
    x = torch.randn(3, 8)
    with torch.no_grad():
        full = toy.head(x)
        net.set_multiplier({"lycoris_head": 0.0})
        assert torch.allclose(toy.head(x), nn.functional.linear(x, toy.head.weight, toy.head.bias))
        net.set_multiplier({"re:lycoris_h.*": 0.5})
        half = toy.head(x)
        base = nn.functional.linear(x, toy.head.weight, toy.head.bias)
        torch.testing.assert_close(half - base, 0.5 * (full - base), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="no module of the network matches"):
        net.set_multiplier({"lycoris_tail": 1.0})


def test_merge_and_restore_give_back_the_model(toy):
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    x = torch.randn(2, 8, 6, 6)
    net = AdapterNetwork(toy, "loha", config={"model": {"layers": ["Conv2d"]}}, rank=2).attach()
    randomize(net, std=0.2)
    with torch.no_grad():
        y = toy.blocks[0].conv(x)
        net.merge()
        torch.testing.assert_close(toy.blocks[0].conv(x), y, rtol=1e-5, atol=1e-5)
        net.restore()
    after = toy.state_dict()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert "forward" not in toy.blocks[0].conv.__dict__


def test_stacked_networks_compose_like_sequential_patches(toy):
    lin = toy.head
    w0 = lin.weight.detach().clone()
    first = AdapterNetwork(lin, "lora", rank=2).attach()
    second = AdapterNetwork(lin, "oft", rank=2).attach()
    randomize(first, std=0.2)
    randomize(second, std=0.2)
    a1, a2 = first.adapters["lycoris"], second.adapters["lycoris"]
    x = torch.randn(5, 8)
    with torch.no_grad():
        w1 = w0 + a1.scale * a1.delta_weight()  # LoRA on W0
        expected_w = a2.merged_weight(1.0)
        y = lin(x)
    torch.testing.assert_close(y, nn.functional.linear(x, expected_w, lin.bias), rtol=1e-5, atol=1e-6)
    # the OFT adapter's W0 is the LoRA-adapted weight
    torch.testing.assert_close(a2.base_weight.detach(), w1, rtol=1e-6, atol=1e-6)
    with pytest.raises(HiganbanaError, match="merge that first"):
        second.merge()
    with pytest.raises(HiganbanaError, match="detach it first"):
        first.detach()
    with torch.no_grad():
        first.merge()
        second.merge()
        torch.testing.assert_close(lin(x), y, rtol=1e-5, atol=1e-5)
        with pytest.raises(HiganbanaError, match="unmerge it first"):
            first.unmerge()
        second.restore()
        first.restore()
    torch.testing.assert_close(lin.weight, w0, rtol=0, atol=1e-6)
    assert "forward" not in lin.__dict__


def test_param_groups_lrs_and_loraplus_for_every_factored_algorithm():
    torch.manual_seed(0)
    unet_like, te_like = Toy(), Toy()
    parts = [Part("lora_unet", unet_like), Part("lora_te", te_like)]
    for algo, ups in [("lora", {"lora_up"}), ("loha", {"hada_w2_a"}), ("lokr", {"lokr_w2", "lokr_w2_b"})]:
        net = AdapterNetwork(parts, algo, config={"model": {"layers": ["Linear"]}}, rank=2)
        groups = net.param_groups(1e-3, lrs={"lora_te": 1e-4}, loraplus_ratio={"lora_unet": 16})
        assert [(g["name"], g["lr"]) for g in groups] == [
            ("lora_unet", 1e-3),
            ("lora_unet (LoRA+ up)", 16e-3),
            ("lora_te", 1e-4),
        ]
        up_ids = {id(p) for g in groups if "LoRA+" in g["name"] for p in g["params"]}
        expected = {id(p) for n, a in net if n.startswith("lora_unet") for k, p in a.named_parameters() if k in ups}
        assert up_ids == expected
        assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
        assert [g["name"] for g in net.param_groups(1e-3, lrs={"lora_te": 0})] == ["lora_unet"]
    with pytest.raises(ConfigError, match="unknown part"):
        net.param_groups(1e-3, lrs={"lora_te9": 1.0})


def test_max_norm_scales_only_modules_above_the_limit(toy):
    net = AdapterNetwork(toy, "lora", config={"model": {"layers": ["Linear"]}}, rank=2)
    randomize(net, std=0.5)
    norms = {n: float(a.scale * a.delta_weight().detach().norm()) for n, a in net}
    limit = sorted(norms.values())[len(norms) // 2]
    scaled, mean, top = net.apply_max_norm(limit)
    assert scaled == sum(v > limit for v in norms.values())
    clipped = [min(v, limit) for v in norms.values()]  # kohya reports the norms after scaling
    assert mean == pytest.approx(sum(clipped) / len(clipped)) and top == pytest.approx(limit)
    after = {n: float(a.scale * a.delta_weight().detach().norm()) for n, a in net}
    assert after == pytest.approx({n: min(v, limit) for n, v in norms.items()}, rel=1e-5)


def test_describe_lists_every_module_with_shapes_and_parameters(toy):
    net = AdapterNetwork(toy, "lora", config={"model": {"names": ["head", "blocks.0.conv"]}}, rank=2)
    rows = {r["name"]: r for r in net.describe()}
    assert rows["lycoris_head"]["layer"] == "Linear" and rows["lycoris_head"]["weight"] == (4, 8)
    assert rows["lycoris_head"]["shapes"]["lora_down.weight"] == (2, 8)
    assert rows["lycoris_blocks_0_conv"]["parameters"] == 2 * 8 * 9 + 8 * 2
    table = net.describe_table()
    assert "lycoris_blocks_0_conv" in table and table.splitlines()[-1].startswith("total")


def test_strict_and_non_strict_loading_report_by_key(toy, tmp_path):
    net = AdapterNetwork(toy, "lora", config={"model": {"layers": ["Linear"]}}, rank=2)
    tensors = net.state_tensors()
    tensors["lycoris_nowhere.lora_up.weight"] = torch.zeros(1)
    del tensors["lycoris_head.lora_up.weight"]
    tensors["lycoris_blocks_0_attn_to_q.lora_down.weight"] = torch.zeros(3, 8)
    with pytest.raises(HiganbanaError) as info:
        net.load_state_tensors(tensors, source="f.safetensors")
    message = str(info.value)
    assert "lycoris_nowhere.lora_up.weight" in message and "lycoris_head" in message
    assert "lycoris_blocks_0_attn_to_q" in message
    report = net.load_state_tensors(tensors, source="f.safetensors", strict=False)
    assert "lycoris_blocks_0_attn_to_k" in report.loaded and "lycoris_head" in report.mismatched
    assert report.unexpected == ["lycoris_nowhere.lora_up.weight"]


class CrossAttention(nn.Module):
    """sd-scripts' UNet attention (library/original_unet.py) is a class of this name, not diffusers' Attention."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.to_out = nn.ModuleList([nn.Linear(8, 8)])


class SdScriptsLikeUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3)
        self.attn1 = CrossAttention()


def test_attn_only_preset_finds_sd_scripts_attention_and_a_part_matching_nothing_is_an_error():
    unet = SdScriptsLikeUNet()
    net = AdapterNetwork([Part("lora_unet", unet, "unet")], "lora", config={"preset": "attn-only"}, rank=2)
    assert set(net.adapters) == {f"lora_unet_attn1_{n}" for n in ("to_q", "to_k", "to_v", "to_out_0")}
    with pytest.raises(ConfigError, match=r"unet targets \(blocks \['Transformer2DModel'\]\) match no layer"):
        AdapterNetwork([Part("lora_unet", unet, "unet")], "lora", config={"preset": "unet-transformer-only"}, rank=2)
