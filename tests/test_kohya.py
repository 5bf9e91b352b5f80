"""``higanbana.kohya`` driven the way sd-scripts' ``train_network.py`` drives a network module."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from higanbana import kohya
from higanbana.errors import ConfigError, HiganbanaError
from higanbana.formats.safetensors_io import load_tensors
from higanbana.models.tiny import tiny_sd_inputs, tiny_sd_parts


# --------------------------------------------------------------------------- tiny models
def make_models(kind: str, seed: int = 0):
    """``(parts, unet, text_encoder)``; ``text_encoder`` as kohya passes it: one CLIP for SD1/2, two for SDXL."""
    parts = tiny_sd_parts(kind, seed=seed)
    te = list(parts.text_encoders) if kind == "sdxl" else parts.text_encoders[0]
    return parts, parts.unet, te


def run(parts) -> torch.Tensor:
    """Text encoder(s) → UNet on fixed inputs, as training does (gradients flow into both)."""
    return parts.unet(**tiny_sd_inputs(parts, seed=0)).sample


def train_like_kohya(kind: str, network_args: dict[str, str], lr_ratio: str | None = None, steps: int = 3):
    """create_network → prepare_network → apply_to → prepare_optimizer_params → steps; returns the pieces."""
    parts, unet, te = make_models(kind)
    args = dict(network_args)
    if lr_ratio:
        args["loraplus_lr_ratio"] = lr_ratio
    net = kohya.create_network(1.0, 4, 2.0, None, te, unet, neuron_dropout=None, dropout=None, **args)
    net.prepare_network(SimpleNamespace(save_model_as="safetensors"))
    net.apply_to(te, unet, True, True)
    groups, descriptions = net.prepare_optimizer_params_with_multiple_te_lrs([1e-3], 2e-3, 5e-3)
    unet.requires_grad_(False)
    for t in te if isinstance(te, list) else [te]:
        t.requires_grad_(False)
    net.prepare_grad_etc(te, unet)
    net.on_epoch_start(te, unet)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    for _ in range(steps):
        net.on_step_start(te, unet)
        loss = run(parts).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.get_trainable_params(), 1.0)
        opt.step()
    return SimpleNamespace(net=net, parts=parts, unet=unet, te=te, groups=groups, descriptions=descriptions)


def _prefixes(net) -> set[str]:
    return {r.prefix for r in net.records.values()}


# --------------------------------------------------------------------------- the trainer's flow
@pytest.mark.parametrize(
    ("kind", "network_args"),
    [
        ("sd1", {"algo": "lora", "conv_dim": "2", "conv_alpha": "1"}),
        ("sd1", {"algo": "lokr", "factor": "4", "preset": "attn-mlp"}),
        ("sdxl", {"algo": "loha", "preset": "attn-mlp", "use_scalar": "0"}),
    ],
)
def test_trainer_flow_round_trip_and_merge(tmp_path, kind, network_args):
    t = train_like_kohya(kind, network_args, lr_ratio="16")
    net = t.net
    # param groups: a plain and a LoRA+ group per part, kohya's descriptions and rates
    te_desc = ["textencoder 1", "textencoder 2"] if kind == "sdxl" else ["textencoder"]
    expected = {
        "unet": 2e-3,
        "unet plus": 2e-3 * 16,
        **{d: 1e-3 for d in te_desc},
        **{f"{d} plus": 1.6e-2 for d in te_desc},
    }
    assert sorted(t.descriptions) == sorted(expected)
    for group, desc in zip(t.groups, t.descriptions, strict=True):
        assert group["lr"] == pytest.approx(expected[desc])
    plus_ids = {id(p) for g, d in zip(t.groups, t.descriptions, strict=True) if d.endswith("plus") for p in g["params"]}
    ups = [getattr(a, n) for a in net.adapters.values() for n in a.up_factors if getattr(a, n, None) is not None]
    assert len(ups) >= len(net.adapters) and all(id(p) in plus_ids for p in ups)
    # gradients reached adapters in the UNet and in every text encoder, and training changed them
    trained = {
        net.records[n].prefix
        for n, a in net.adapters.items()
        if any(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters())
    }
    assert (
        trained
        == set(net.parts)
        == ({"lora_unet", "lora_te1", "lora_te2"} if kind == "sdxl" else {"lora_unet", "lora_te"})
    )
    # max-norm regularization: tiny threshold scales every factored module down to it
    n_scaled, mean_norm, max_norm = net.apply_max_norm_regularization(1e-3, torch.device("cpu"))
    assert n_scaled > len(net.adapters) // 2 and max_norm == pytest.approx(1e-3) and 0 < mean_norm <= 1e-3 + 1e-9
    assert net.apply_max_norm_regularization(1.0, "cpu")[0] == 0
    # after scale-down the adapter is small: train a bit more so outputs differ clearly from the base
    for p in net.get_trainable_params():
        p.data.add_(torch.randn_like(p) * 0.05)
    net.eval()
    with torch.no_grad():
        adapted = run(t.parts)
    # save with kohya-like metadata
    meta = {
        "ss_network_module": "higanbana.kohya",
        "ss_network_dim": "4",
        "ss_network_alpha": "2.0",
        "ss_network_args": json.dumps(network_args),
        "ss_base_model_version": "sdxl_base_v1-0" if kind == "sdxl" else "sd_v1",
        "ss_v2": "False",
        "ss_seed": "42",
        "modelspec.title": "tiny",
    }
    path = tmp_path / "net.safetensors"
    net.save_weights(str(path), torch.float32, dict(meta))
    tensors, saved = load_tensors(path)
    assert saved["ss_seed"] == "42" and saved["modelspec.title"] == "tiny"
    assert json.loads(saved["ss_network_args"])["algo"] == network_args["algo"]
    assert len(saved["sshs_model_hash"]) == 64 and len(saved["sshs_legacy_hash"]) == 8
    assert "higanbana.modules" in saved
    # rebuild on fresh models from the file: same outputs
    parts2, unet2, te2 = make_models(kind)
    with torch.no_grad():
        assert not torch.allclose(run(parts2), adapted, atol=1e-4)
    net2, sd = kohya.create_network_from_weights(1.0, str(path), None, te2, unet2)
    assert set(sd) == set(tensors) and net2.algos == net.algos
    net2.apply_to(te2, unet2, True, True)
    net2.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(parts2), adapted, rtol=1e-5, atol=1e-5)
    # merge_to on fresh models (kohya's inference path) equals the attached network
    parts3, unet3, te3 = make_models(kind)
    net3, sd3 = kohya.create_network_from_weights(1.0, str(path), None, te3, unet3, for_inference=True)
    assert net3.is_mergeable()
    net3.merge_to(te3, unet3, sd3, torch.float32, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(run(parts3), adapted, rtol=1e-4, atol=1e-4)
    # load_weights (resume) on a network created from args: everything loads
    parts4, unet4, te4 = make_models(kind)
    net4 = kohya.create_network(1.0, 4, 2.0, None, te4, unet4, **network_args)
    net4.apply_to(te4, unet4)
    info = net4.load_weights(str(path))
    assert info.missing_keys == [] and info.unexpected_keys == [] and "loaded" in str(info)
    net4.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(parts4), adapted, rtol=1e-5, atol=1e-5)


def test_weights_sd_and_multiplier(tmp_path):
    t = train_like_kohya("sd1", {"algo": "lora", "preset": "attn-only"}, steps=2)
    path = tmp_path / "a.safetensors"
    t.net.save_weights(path, torch.float16, None)  # no trainer metadata: ours is written
    tensors, meta = load_tensors(path)
    assert meta["ss_network_module"] == "higanbana.kohya" and meta["ss_base_model_version"] == "sd_v1"
    assert (
        tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"].dtype
        == torch.float16
    )
    parts, unet, te = make_models("sd1")
    base = run(parts).detach()
    # weights_sd given (kohya gen_img) and multiplier 0.5, merged at that multiplier
    net, sd = kohya.create_network_from_weights(0.5, None, None, te, unet, weights_sd=tensors, for_inference=True)
    assert net.algos and set(net.algos.values()) == {"lora"}
    attached, attached_unet, attached_te = make_models("sd1")
    ref, _ = kohya.create_network_from_weights(0.5, path, None, attached_te, attached_unet)
    ref.apply_to(attached_te, attached_unet)
    ref.eval()
    net.merge_to(te, unet, sd, torch.float32, None)
    with torch.no_grad():
        want = run(attached)
        torch.testing.assert_close(run(parts), want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(want, base, atol=1e-6)


def test_apply_to_unet_only_drops_text_encoder():
    _, unet, te = make_models("sd1")
    net = kohya.create_network(1.0, None, None, None, te, unet)  # kohya defaults: dim 4, alpha 1
    assert {a.rank for a in net.adapters.values()} == {4} and {a.alpha for a in net.adapters.values()} == {1.0}
    net.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    assert _prefixes(net) == {"lora_unet"} and set(net.parts) == {"lora_unet"}
    groups, desc = net.prepare_optimizer_params(None, None, 1e-4)
    assert desc == ["unet"] and groups[0]["lr"] == 1e-4
    groups, desc = net.prepare_optimizer_params(None, None)  # old trainers: no default rate
    assert desc == ["unet"] and "lr" not in groups[0]
    with pytest.raises(HiganbanaError, match="safetensors"):
        net.save_weights("x.ckpt", torch.float16, {})
    with pytest.raises(ConfigError, match="save_model_as"):
        net.prepare_network(SimpleNamespace(save_model_as="ckpt"))


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", False),
        ("false", False),
        ("No", False),
        ("OFF", False),
        ("1", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
    ],
)
def test_strict_booleans(text, value):
    assert kohya.parse_network_args({"use_scalar": text})["use_scalar"] is value


def test_bad_args_are_errors_naming_them():
    with pytest.raises(ConfigError, match="use_tucker='maybe'"):
        kohya.parse_network_args({"use_tucker": "maybe"})
    with pytest.raises(ConfigError, match="'fator'.*did you mean 'factor'"):
        kohya.parse_network_args({"fator": "4"})
    with pytest.raises(ConfigError, match="factor='4.5'"):
        kohya.parse_network_args({"factor": "4.5"})
    with pytest.raises(ConfigError, match="block_dims"):
        kohya.parse_network_args({"block_dims": "2,2,2"})
    _, unet, te = make_models("sd1")
    with pytest.raises(ConfigError, match="factor"):  # lora takes no factor
        kohya.create_network(1.0, 4, 1, None, te, unet, algo="lora", factor="4")
    with pytest.raises(ConfigError, match="preset"):
        kohya.create_network(1.0, 4, 1, None, te, unet, preset="atn-mlp")
    args = kohya.parse_network_args({"dora_wd": "true", "bypass_mode": "1", "conv_dim": "8", "boft_stages": "none"})
    assert args == {"weight_decompose": True, "forward_mode": "bypass", "conv_dim": 8, "boft_stages": None}


def test_neuron_dropout_becomes_dropout():
    _, unet, te = make_models("sd1")
    net = kohya.create_network(1.0, 4, 1, None, te, unet, neuron_dropout=0.1, dropout=0.1, preset="attn-only")
    assert {a.dropout for a in net.adapters.values()} == {0.1}
    net = kohya.create_network(1.0, 4, 1, None, te, unet, neuron_dropout=0.1, preset="attn-only", dropout="0.25")
    assert {a.dropout for a in net.adapters.values()} == {0.25}  # network_args win


def test_sdxl_names_and_kind():
    _, unet, tes = make_models("sdxl")
    net = kohya.create_network(1.0, 4, 1, None, tes, unet, algo="locon")
    assert net.model_kind == "sdxl"
    names = set(net.adapters)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names and "lora_unet_input_blocks_3_0_op" in names
    assert any(n.startswith("lora_te1_text_model_encoder_layers_0_") for n in names)
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names
    groups, desc = net.prepare_optimizer_params([1e-4, 2e-4], 3e-4, 1.0)
    assert dict(zip(desc, [g["lr"] for g in groups], strict=True)) == {
        "unet": 3e-4,
        "textencoder 1": 1e-4,
        "textencoder 2": 2e-4,
    }
    assert kohya.detect_model_kind([tes[0]], unet) == "sd1"  # quick_gelu CLIP: SD1
    sd2 = tiny_sd_parts("sd2")
    assert kohya.detect_model_kind(sd2.text_encoders, sd2.unet) == "sd2"
    assert kohya.detect_model_kind(sd2.text_encoders, sd2.unet, "sd1") == "sd1"
    with pytest.raises(ConfigError, match="model_kind"):
        kohya.detect_model_kind(tes, unet, "sd1")


def test_algorithms_without_rank_or_alpha():
    _, unet, te = make_models("sd1")
    net = kohya.create_network(1.0, 8, 4, None, te, unet, preset="ia3")  # the preset's algorithm, no rank
    assert set(net.algos.values()) == {"ia3"}
    net = kohya.create_network(1.0, 4, 1, None, te, unet, algo="diag-oft", preset="attn-only", constraint="1e-3")
    assert set(net.algos.values()) == {"oft"}
    with pytest.raises(ConfigError, match="conv_alpha"):
        kohya.create_network(1.0, 4, 1, None, te, unet, algo="oft", conv_alpha="2")


def test_native_sgm_unet_keeps_its_own_paths():
    """kohya's own SDXL UNet (sdxl_original_unet) has SGM paths already: names come from them directly."""
    from torch import nn

    class Transformer2DModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_in = nn.Linear(32, 32)

    class SdxlUNet2DConditionModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_blocks = nn.ModuleList(
                [nn.ModuleList([nn.Conv2d(4, 32, 3)]), nn.ModuleList([nn.Identity(), Transformer2DModel()])]
            )
            self.time_embed = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 32))
            self.out = nn.Sequential(nn.GroupNorm(8, 32), nn.SiLU(), nn.Conv2d(32, 4, 3))

    _, _, tes = make_models("sdxl")
    net = kohya.create_network(1.0, 4, 1, None, tes, SdxlUNet2DConditionModel())
    unet_names = {n for n in net.adapters if n.startswith("lora_unet")}
    assert unet_names == {
        "lora_unet_input_blocks_0_0",
        "lora_unet_input_blocks_1_1_proj_in",
        "lora_unet_time_embed_0",
        "lora_unet_time_embed_2",
        "lora_unet_out_2",
    }


def test_the_alias_sd_scripts_imports_is_the_integration():
    """``--network_module higanbana.kohya`` imports the alias; it holds the same objects as the home module."""
    import importlib

    from higanbana.integrations import kohya as home

    alias = importlib.import_module(kohya.NETWORK_MODULE)
    assert alias is kohya and kohya.NETWORK_MODULE == "higanbana.kohya"
    public = {
        n for n, v in vars(home).items() if not n.startswith("_") and getattr(v, "__module__", None) == home.__name__
    }
    assert public | set(home.__all__) <= set(alias.__all__)
    for name in alias.__all__:
        assert getattr(alias, name) is getattr(home, name), name
