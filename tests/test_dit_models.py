"""SD3/Flux model loading (issue 19): diffusers folders, original single files with a config folder, the
families' errors — offline, from tiny models written here."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from higanbana.errors import HiganbanaError
from higanbana.models.architectures import FLUX1_DEV_TRANSFORMER
from higanbana.models.dit import dit_kind_of, load_dit
from higanbana.models.tiny import save_tiny_dit, tiny_dit_parts


def _swap(t):
    """SAI's adaLN order (shift, scale) ↔ diffusers' (scale, shift)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def sai_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The tiny SD3 transformer in Stability's MMDiT layout (as SD3/SD3.5 single files hold it), written
    from ComfyUI's map (``mmdit_to_diffusers``): fused qkv, ln_q/ln_k, swapped final and last context adaLN."""
    sd = transformer.state_dict()
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    top = {
        "x_embedder.proj": "pos_embed.proj",
        "context_embedder": "context_embedder",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
        "final_layer.linear": "proj_out",
    }
    for o, d in top.items():
        out[f"{o}.weight"], out[f"{o}.bias"] = sd[f"{d}.weight"], sd[f"{d}.bias"]
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(sd[f"norm_out.linear.{p}"])
    n = transformer.config.num_layers
    for i in range(n):
        d, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for p in ("weight", "bias"):
            out[f"{o}.x_block.attn.qkv.{p}"] = torch.cat([sd[f"{d}.attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{o}.context_block.attn.qkv.{p}"] = torch.cat([sd[f"{d}.attn.add_{x}_proj.{p}"] for x in "qkv"])
            pairs = {
                "x_block.attn.proj": "attn.to_out.0",
                "x_block.mlp.fc1": "ff.net.0.proj",
                "x_block.mlp.fc2": "ff.net.2",
                "x_block.adaLN_modulation.1": "norm1.linear",
            }
            if i < n - 1:
                pairs |= {
                    "context_block.attn.proj": "attn.to_add_out",
                    "context_block.mlp.fc1": "ff_context.net.0.proj",
                    "context_block.mlp.fc2": "ff_context.net.2",
                    "context_block.adaLN_modulation.1": "norm1_context.linear",
                }
            else:
                out[f"{o}.context_block.adaLN_modulation.1.{p}"] = _swap(sd[f"{d}.norm1_context.linear.{p}"])
            if f"{d}.attn2.to_q.{p}" in sd:
                out[f"{o}.x_block.attn2.qkv.{p}"] = torch.cat([sd[f"{d}.attn2.to_{x}.{p}"] for x in "qkv"])
                pairs["x_block.attn2.proj"] = "attn2.to_out.0"
            for oo, dd in pairs.items():
                out[f"{o}.{oo}.{p}"] = sd[f"{d}.{dd}.{p}"]
        norms = {
            "x_block.attn.ln_q": "attn.norm_q",
            "x_block.attn.ln_k": "attn.norm_k",
            "context_block.attn.ln_q": "attn.norm_added_q",
            "context_block.attn.ln_k": "attn.norm_added_k",
            "x_block.attn2.ln_q": "attn2.norm_q",
            "x_block.attn2.ln_k": "attn2.norm_k",
        }
        for oo, dd in norms.items():
            if f"{d}.{dd}.weight" in sd:
                out[f"{o}.{oo}.weight"] = sd[f"{d}.{dd}.weight"]
    return {f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}


def test_sd3_original_single_file_loads_with_its_config_folder(tmp_path):
    parts = tiny_dit_parts("sd3", seed=3)
    folder = save_tiny_dit(tiny_dit_parts("sd3", seed=0), tmp_path / "config")
    single = tmp_path / "sd3_tiny.safetensors"
    save_file(sai_state_dict(parts.transformer), str(single))
    assert dit_kind_of(single) == "sd3" and dit_kind_of(folder) == "sd3"
    loaded = load_dit(single, config=folder)
    want = parts.transformer.state_dict()
    got = loaded.transformer.state_dict()
    assert got.keys() == want.keys()
    for key in want:  # every weight from the file (seed 3), not from the config folder's model (seed 0)
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    with pytest.raises(HiganbanaError, match="give model.config, a local diffusers folder"):
        load_dit(single)


def test_folder_errors_name_what_is_wrong(tmp_path):
    folder = save_tiny_dit(tiny_dit_parts("flux"), tmp_path / "flux")
    with pytest.raises(HiganbanaError, match="holds a flux model, not sd3"):
        load_dit(folder, "sd3")
    (folder / "tokenizer_2").rename(tmp_path / "gone")
    with pytest.raises(HiganbanaError, match="names no tokenizer_2"):
        load_dit(folder)
    with pytest.raises(HiganbanaError, match="neither an SD3/Flux diffusers folder"):
        load_dit(tmp_path / "gone")


def bfl_state_dict(transformer) -> dict[str, torch.Tensor]:
    """A diffusers Flux transformer in Black Forest Labs' layout (as Flux single files hold it), written from
    ComfyUI's map (``flux_to_diffusers``): fused qkv and linear1, q/k norm scales, swapped final adaLN."""
    sd = transformer.state_dict()
    out = {}

    def both(o, d):
        out[f"{o}.weight"], out[f"{o}.bias"] = sd[f"{d}.weight"], sd[f"{d}.bias"]

    def cat(o, ds):
        for p in ("weight", "bias"):
            out[f"{o}.{p}"] = torch.cat([sd[f"{d}.{p}"] for d in ds])

    for o, d in {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out",
    }.items():
        both(o, d)
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(sd[f"norm_out.linear.{p}"])
    for i in range(transformer.config.num_layers):
        d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        cat(f"{o}.img_attn.qkv", [f"{d}.attn.to_{x}" for x in "qkv"])
        cat(f"{o}.txt_attn.qkv", [f"{d}.attn.add_{x}_proj" for x in "qkv"])
        for oo, dd in {
            "img_attn.proj": "attn.to_out.0",
            "txt_attn.proj": "attn.to_add_out",
            "img_mlp.0": "ff.net.0.proj",
            "img_mlp.2": "ff.net.2",
            "txt_mlp.0": "ff_context.net.0.proj",
            "txt_mlp.2": "ff_context.net.2",
            "img_mod.lin": "norm1.linear",
            "txt_mod.lin": "norm1_context.linear",
        }.items():
            both(f"{o}.{oo}", f"{d}.{dd}")
        for oo, dd in {
            "img_attn.norm.query_norm": "attn.norm_q",
            "img_attn.norm.key_norm": "attn.norm_k",
            "txt_attn.norm.query_norm": "attn.norm_added_q",
            "txt_attn.norm.key_norm": "attn.norm_added_k",
        }.items():
            out[f"{o}.{oo}.scale"] = sd[f"{d}.{dd}.weight"]
    for i in range(transformer.config.num_single_layers):
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        cat(f"{o}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"])
        both(f"{o}.linear2", f"{d}.proj_out")
        both(f"{o}.modulation.lin", f"{d}.norm.linear")
        out[f"{o}.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{o}.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.slow
def test_flux_original_single_file_loads_with_its_config_folder(tmp_path):
    """diffusers' BFL converter assumes Flux.1's width (3072), so this Flux has it, with one block of each
    kind (0.55B parameters, bf16): the single file loads offline through load_dit, every weight from it."""
    from diffusers import FluxTransformer2DModel

    config = {**FLUX1_DEV_TRANSFORMER, "num_layers": 1, "num_single_layers": 1}
    parts = tiny_dit_parts("flux")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        real = FluxTransformer2DModel(**config).to(torch.bfloat16)
    parts.transformer = real  # (the tiny text encoders do not fit its widths: only the transformer is compared)
    folder = save_tiny_dit(parts, tmp_path / "config")
    single = tmp_path / "flux_one_block.safetensors"
    save_file(bfl_state_dict(real), str(single))
    assert dit_kind_of(single) == "flux"
    loaded = load_dit(single, dtype=torch.bfloat16, config=folder)
    want, got = real.state_dict(), loaded.transformer.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
