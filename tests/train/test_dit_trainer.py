"""Training SD3/SD3.5 and Flux.1 through the same trainer as the UNet families (issue 19): every
algorithm trains on a tiny diffusers folder of each family with flow matching, the saved file (both
layouts) loads back exactly, and what the trainer optimises is the flow-matching loss of the formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from higanbana.errors import ConfigError
from higanbana.formats.dit_network import load_dit_network
from higanbana.formats.inspect import file_info
from higanbana.models.dit import load_dit
from higanbana.models.tiny import save_tiny_dit, tiny_dit_parts
from higanbana.train import train
from higanbana.train.flow_step import DitConditioner, FlowSettings, flow_matching_loss

from .test_trainer import config_for as sd_config_for
from .test_trainer import make_images

ALGOS = [
    ("lora", "lora", {"rank": 2}),
    ("loha", "loha", {"rank": 2}),
    ("lokr", "lokr", {"rank": 2, "factor": 4}),
    ("ia3", "ia3", {}),
    ("glora", "glora", {"rank": 2}),
    ("dora", "lora", {"rank": 2, "weight_decompose": True}),
    ("oft", "oft", {"rank": 4}),
    ("boft", "boft", {"rank": 2}),
    ("full", "full", {}),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit-models")
    return {kind: save_tiny_dit(tiny_dit_parts(kind, seed=0), root / kind) for kind in ("flux", "sd3")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit-data")
    make_images(root / "2_sks toy", sizes=((32, 32), (32, 32), (32, 32)))
    return root


def config_for(model_dir, data_dir, out, **sections):
    sections.setdefault("training", {})
    sections["training"] = {"max_sequence_length": 16, **sections["training"]}
    sections.setdefault("data", {})
    sections["data"] = {"resolution": 32, "enable_bucket": False, **sections["data"]}
    return sd_config_for(model_dir, data_dir, out, **sections)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize(("label", "algo", "options"), ALGOS, ids=[a[0] for a in ALGOS])
def test_every_algorithm_trains_on_dit_and_reloads(models, images, tmp_path, kind, label, algo, options):
    stackable = algo in ("lora", "full", "ia3") and label != "dora"
    config = config_for(
        models[kind],
        images,
        tmp_path / "out",
        network={"algo": algo, "options": options},
        save={"layout": "original" if stackable else "split"},
    )
    result = train(config, progress=False, log=lambda _m: None)
    assert result.steps == 2 and all(np.isfinite(result.losses))
    info = file_info(result.output)
    assert info["base_model"] == kind
    prefixes = set(info["modules_per_prefix"])
    assert prefixes == ({"lora_unet"} if stackable else {"lora_transformer"}), prefixes
    parts = load_dit(models[kind])
    net = load_dit_network(result.output, parts.transformer)
    assert net.adapters and any(float(t.abs().sum()) > 0 for k, t in net.state_tensors().items() if "alpha" not in k)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_the_trainer_loss_is_the_flow_matching_formula(models, kind):
    """flow_matching_loss against the contract written here: x_σ = (1−σ)x0 + σε, v = ε − x0, MSE; SD3
    reads 1000σ, Flux σ with 2×2-packed latents, (0, row, col) position ids and its guidance input."""
    parts = load_dit(models[kind])
    cond = DitConditioner(parts, max_sequence_length=8, trainable=False, cache=False)
    embeds, pooled = cond(["a red cube", "a blue ball"])
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = FlowSettings(scheme="uniform", shift=1.0, guidance=2.0)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with torch.no_grad():
        got = flow_matching_loss(parts, latents, embeds, pooled, gens, settings)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    noise = torch.stack([torch.randn(16, 8, 8, generator=g) for g in gens])
    sigma = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens]).float()
    noisy = (1 - sigma[:, None, None, None]) * latents + sigma[:, None, None, None] * noise
    with torch.no_grad():
        if kind == "sd3":
            pred = parts.transformer(
                hidden_states=noisy, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=1000 * sigma
            ).sample
        else:
            packed = noisy.reshape(2, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 64)
            rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
            ids = torch.stack([torch.zeros(16), rows.flatten(), cols.flatten()], dim=1)
            out = parts.transformer(
                hidden_states=packed,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                timestep=sigma,
                img_ids=ids,
                txt_ids=torch.zeros(embeds.shape[1], 3),
                guidance=torch.full((2,), 2.0),
            ).sample
            pred = out.reshape(2, 4, 4, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 16, 8, 8)
    want = ((pred - (noise - latents)) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_unet_objective_options_are_refused_on_dit(models, images, tmp_path):
    config = config_for(models["flux"], images, tmp_path / "out", training={"min_snr_gamma": 5.0})
    with pytest.raises(ConfigError, match="training.min_snr_gamma belongs to the UNet"):
        train(config, progress=False, log=lambda _m: None)


@pytest.mark.parametrize(("label", "algo", "options"), [a for a in ALGOS if a[0] in ("lora", "lokr", "dora", "ia3")])
def test_a_frozen_int8_base_trains_with_adapters_in_bypass(models, images, tmp_path, label, algo, options):
    """model.quantize = "int8": the transformer's Linears are torchao int8 weights; the adapters run in bypass
    over them (DoRA's norm on the dequantized weight) and train; merging into them is refused."""
    config = config_for(
        models["flux"], images, tmp_path / "out", model={"quantize": "int8"}, network={"algo": algo, "options": options}
    )
    result = train(config, progress=False, log=lambda _m: None)
    assert result.steps == 2 and all(np.isfinite(result.losses))


def test_adapters_over_int8_weights_compute_what_they_compute_over_the_dequantized_ones():
    from torch import nn

    from higanbana.errors import HiganbanaError
    from higanbana.formats.dit_network import dit_network
    from higanbana.models.quantize import quantize_weights

    quantized = tiny_dit_parts("flux").transformer
    assert quantize_weights(quantized, "int8") > 0
    dense = tiny_dit_parts("flux").transformer
    with torch.no_grad():  # the same base, dequantized: what the int8 model computes, in float
        for m, q in zip(dense.modules(), quantized.modules(), strict=True):
            if isinstance(m, nn.Linear):
                m.weight.copy_(q.weight.dequantize())
    nets = [dit_network(t, algo="lora", rank=2, weight_decompose=True).attach() for t in (quantized, dense)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p_q, p_d in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
            p_q.copy_(p_q + torch.randn(p_q.shape, generator=g) * 0.05)
            p_d.copy_(p_q)
    from higanbana.models.tiny import tiny_dit_inputs

    inputs = tiny_dit_inputs("flux", torch.randn(1, 16, 8, 8), torch.tensor([0.5]))
    with torch.no_grad():
        got, want = (t(**inputs).sample for t in (quantized, dense))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    with pytest.raises(HiganbanaError, match="quantized"):
        nets[0].merge()


def test_the_default_layout_is_kohyas_where_every_module_stacks(models, images, tmp_path):
    """save.layout = "auto": LoRA gets kohya's fused names; LoHa (which cannot stack) the split ones."""
    for algo, prefix in (("lora", "lora_unet"), ("loha", "lora_transformer")):
        config = config_for(models["flux"], images, tmp_path / algo, network={"algo": algo, "options": {"rank": 2}})
        result = train(config, progress=False, log=lambda _m: None)
        assert set(file_info(result.output)["modules_per_prefix"]) == {prefix}


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_text_encoders_train_with_kohyas_prefixes(models, images, tmp_path, kind):
    """network.train_text_encoder on SD3/Flux: CLIP-L lora_te1, SD3's CLIP-G lora_te2, T5 lora_te3; the file
    reloads onto the transformer and the encoders."""
    config = config_for(
        models[kind],
        images,
        tmp_path / "out",
        network={
            "algo": "lora",
            "options": {"rank": 2},
            "train_text_encoder": True,
        },
    )
    result = train(config, progress=False, log=lambda _m: None)
    prefixes = set(file_info(result.output)["modules_per_prefix"])
    want = {"lora_te1", "lora_te3"} | ({"lora_te2"} if kind == "sd3" else set())
    assert want <= prefixes, prefixes
    names = {k.partition(".")[0] for k in load_file(str(result.output))}
    # kohya's (and ComfyUI's t5xxl) names: T5's own module paths; CLIP's with text_model_
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    parts = load_dit(models[kind])
    net = load_dit_network(result.output, parts.transformer, parts.text_encoders)
    assert {r.prefix for r in net.records.values()} >= want
