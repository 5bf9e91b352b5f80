"""SD3/SD3.5 and Flux.1 (issue 19, first part): the family presets choose the attention and MLP
Linears of the diffusion transformers' blocks and nothing else, and every algorithm trains on them
with the flow-matching objective, runs merged and bypass alike, and saves and reloads exactly — in the
split layout always, and in kohya's original (fused) layout where the algorithm stacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from higanbana.algorithms.files import LayoutRefused
from higanbana.errors import ConfigError
from higanbana.formats.dit_network import dit_network, load_dit_network, save_dit_network
from higanbana.models.tiny import tiny_dit_inputs, tiny_flux_transformer, tiny_sd3_transformer
from higanbana.network import AdapterNetwork, NetworkConfig
from higanbana.network.selection import Part
from higanbana.train import flow
from higanbana.workflows.selfcheck import selfcheck_setups

MODELS = {"sd3": tiny_sd3_transformer, "flux": tiny_flux_transformer}
#: the modulation Linears of the adaLN-Zero norms: conditioning, never adapted by the presets
MODULATION = (".norm1.linear", ".norm1_context.linear", ".norm.linear")


def expected_layers(model: nn.Module) -> set[str]:
    """Written from the architecture, not from the preset: every Linear inside a transformer block
    (double- or single-stream) that is not a modulation Linear."""
    return {
        path
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and path.startswith(("transformer_blocks.", "single_transformer_blocks."))
        and not path.endswith(MODULATION)
    }


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_family_preset_adapts_attention_and_mlp_only(family):
    model = MODELS[family]()
    net = AdapterNetwork([Part("lora_transformer", model, "unet")], config=f"{family}-attn-mlp", algo="lora", rank=2)
    paths = set(net.paths.values())
    assert paths == expected_layers(model)
    assert NetworkConfig.load(f"{family}-attn-mlp").family == family
    if family == "flux":  # single-stream linear1/linear2 and the text stream of the double blocks
        assert {"single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.1.proj_out"} <= paths
    assert "transformer_blocks.0.attn.add_q_proj" in paths and not any("embed" in p for p in paths)


def test_family_is_checked():
    with pytest.raises(ConfigError, match="family: expected one of"):
        NetworkConfig.from_dict({"family": "flx"})


def batches(family: str, count: int = 3):
    """Fixed (inputs, velocity target) pairs of the flow-matching objective on random latents."""
    out = []
    for i in range(count):
        gen = [torch.Generator().manual_seed(100 * i + j) for j in range(2)]
        g = torch.Generator().manual_seed(i)
        latents, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
        sigmas = flow.sample_sigmas(gen, scheme="logit_normal")
        noisy = flow.interpolate(latents, noise, sigmas)
        out.append((tiny_dit_inputs(family, noisy, sigmas, seed=i), flow.velocity(latents, noise)))
    return out


def predict(model: nn.Module, family: str, inputs: dict) -> torch.Tensor:
    out = model(**inputs, return_dict=False)[0]
    return flow.unpack_latents(out, 8, 8) if family == "flux" else out


def flow_loss(model, family, data) -> torch.Tensor:
    return sum(nn.functional.mse_loss(predict(model, family, x), v) for x, v in data) / len(data)


SETUPS = [s for s in selfcheck_setups() if s[1] != "norm"]  # the presets adapt no norm


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize(("label", "algo", "options", "lr"), SETUPS, ids=[s[0] for s in SETUPS])
def test_every_algorithm_trains_with_flow_matching_and_reloads(tmp_path, family, label, algo, options, lr):
    model = MODELS[family]().requires_grad_(False)
    data = batches(family)
    net = dit_network(model, algo=algo, **options).attach()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    with torch.no_grad():
        before = float(flow_loss(model, family, data))
    for step in range(30):
        opt.zero_grad(set_to_none=True)
        flow_loss(model, family, data[step % len(data) : step % len(data) + 1]).backward()
        opt.step()
    net.eval()
    probe = data[0][0]
    with torch.no_grad():
        after = float(flow_loss(model, family, data))
        trained = predict(model, family, probe)
        net.set_forward_mode("merged")
        merged = predict(model, family, probe)
        net.set_forward_mode("bypass")
        bypass = predict(model, family, probe)
    assert after < before, (label, before, after)
    torch.testing.assert_close(merged, bypass, rtol=1e-4, atol=1e-5)
    saved = net.state_tensors()
    for layout in ("split", "original"):  # the original layout only where fused layers can hold the algorithm
        try:
            path = save_dit_network(net, tmp_path / f"{label}-{layout}.safetensors", layout=layout)
        except LayoutRefused as exc:
            assert layout == "original" and (
                algo not in ("lora", "full", "ia3") or "DoRA" in str(exc) or "Tucker" in str(exc)
            )
            continue
        fresh = MODELS[family]().requires_grad_(False)
        loaded = load_dit_network(path, fresh).attach().eval()
        assert loaded.state_tensors().keys() == saved.keys()
        for key, value in loaded.state_tensors().items():  # the same tensors, through either layout
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=f"{layout} {key}")
        with torch.no_grad():
            torch.testing.assert_close(predict(fresh, family, probe), trained, rtol=1e-5, atol=1e-6)


def test_rules_by_block_index_on_the_transformers():
    """Rules address blocks by index, as kohya's train_double/single_block_indices do: LoKr on the single
    block 1 only, a larger rank on the first double block's image attention."""
    model = MODELS["flux"]()
    config = {
        "preset": "flux-attn-mlp",
        "algo": "lora",
        "options": {"rank": 2},
        "rules": [
            {"names": ["single_transformer_blocks.1.*"], "algo": "lokr", "options": {"rank": 2, "factor": 4}},
            {"names": ["transformer_blocks.0.attn.to_*"], "options": {"rank": 4}},
        ],
    }
    net = dit_network(model, config)
    algos = {n: a.algo for n, a in net.adapters.items()}
    assert {n for n, a in algos.items() if a == "lokr"} == {
        n for n in algos if n.startswith("lora_transformer_single_transformer_blocks_1_")
    }
    ranks = {net.records[n].path: a.rank for n, a in net.adapters.items() if a.algo == "lora"}
    assert ranks["transformer_blocks.0.attn.to_q"] == 4 and ranks["transformer_blocks.0.attn.add_q_proj"] == 2
