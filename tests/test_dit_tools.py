"""merge, extract and resize on SD3/Flux checkpoints (issue 19): an original (MMDiT/BFL) single file, whose
fused qkv/linear1 hold the split modules as row blocks, and a diffusers folder; files of either layout
merge into either with our merge's weights, and extraction from original files gives kohya's fused names."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from higanbana.formats.checkpoint import open_checkpoint
from higanbana.formats.dit_network import dit_network, load_dit_network, save_dit_network
from higanbana.models.tiny import save_tiny_dit, tiny_dit_parts
from higanbana.tools.extract import extract_models
from higanbana.tools.merge import merge
from higanbana.tools.resize import resize
from tests.interop import comfyui_ref as cf
from tests.interop.test_dit_files import comfy_maps, layers, merged_layers


def original_file(family, model, path):
    """The transformer's Linears in the original layout (``<original path>.weight``/``.bias``): what the
    checkpoint tools read of an MMDiT/BFL file."""
    dmap, _ = comfy_maps(family, model)
    tensors = {}
    for original, (w, b) in cf.original_state(dmap, layers(model)).items():
        tensors[f"{original}.weight"] = w.contiguous()
        if b is not None:
            tensors[f"{original}.bias"] = b.contiguous()
    save_file(tensors, str(path))
    return dmap


def trained(family, algo, options, seed=1):
    parts = tiny_dit_parts(family)
    net = dit_network(parts.transformer, algo=algo, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return parts, net


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize(
    ("algo", "options", "layout"), [("loha", {"rank": 2}, "split"), ("lora", {"rank": 2}, "original")]
)
def test_merge_into_an_original_single_file(tmp_path, family, algo, options, layout):
    parts, net = trained(family, algo, options)
    dmap = original_file(family, parts.transformer, tmp_path / "base.safetensors")
    adapter = save_dit_network(net, tmp_path / "a.safetensors", layout=layout)
    merge(tmp_path / "base.safetensors", [(adapter, 1.0)], tmp_path / "merged.safetensors")
    got = load_file(str(tmp_path / "merged.safetensors"))
    want = cf.original_state(dmap, merged_layers(parts.transformer, net))
    for original, (w, b) in want.items():
        torch.testing.assert_close(got[f"{original}.weight"], w, rtol=1e-5, atol=1e-6, msg=original)
        if b is not None:
            torch.testing.assert_close(got[f"{original}.bias"], b, rtol=1e-5, atol=1e-6, msg=original)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_merge_a_fused_kohya_file_into_a_diffusers_folder(tmp_path, family):
    parts, net = trained(family, "lora", {"rank": 2})
    folder = save_tiny_dit(tiny_dit_parts(family), tmp_path / "model")
    adapter = save_dit_network(net, tmp_path / "a.safetensors", layout="original")
    merge(folder, [(adapter, 0.5)], tmp_path / "merged")
    net.set_multiplier(0.5)
    want = merged_layers(parts.transformer, net)
    got = load_file(str(tmp_path / "merged" / "transformer" / "diffusion_pytorch_model.safetensors"))
    for path, (w, b) in want.items():
        torch.testing.assert_close(got[f"{path}.weight"], w, rtol=1e-5, atol=1e-6, msg=path)
        if b is not None:
            torch.testing.assert_close(got[f"{path}.bias"], b, rtol=1e-5, atol=1e-6, msg=path)


def test_original_files_have_fused_modules_and_row_views(tmp_path):
    parts = tiny_dit_parts("flux")
    original_file("flux", parts.transformer, tmp_path / "base.safetensors")
    with open_checkpoint(tmp_path / "base.safetensors") as ck:
        assert ck.kind == "flux"
        modules = ck.modules()
        _, rows = modules["lora_transformer_single_transformer_blocks_0_proj_mlp"]["weight"]
        assert (rows.start, rows.stop) == (48, 112)  # after q, k, v of 16 rows each: the MLP's 64
        assert modules["lora_unet_single_blocks_0_linear1"]["weight"][1] is None
        assert "lora_transformer_single_transformer_blocks_0_proj_mlp" in ck.row_views()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_extract_from_original_files_gives_fused_kohya_modules(tmp_path, family):
    parts, net = trained(family, "lora", {"rank": 2})
    original_file(family, parts.transformer, tmp_path / "base.safetensors")
    net.merge()
    original_file(family, parts.transformer, tmp_path / "tuned.safetensors")
    net.unmerge()
    extract_models(
        tmp_path / "base.safetensors",
        tmp_path / "tuned.safetensors",
        tmp_path / "x.safetensors",
        linear_param=8,
        conv_param=8,
    )
    names = {k.partition(".")[0] for k in load_file(str(tmp_path / "x.safetensors"))}
    assert names and all(n.startswith("lora_unet_") for n in names)
    assert (
        "lora_unet_double_blocks_0_img_attn_qkv" if family == "flux" else "lora_unet_joint_blocks_0_x_block_attn_qkv"
    ) in names
    # onto the split model: each member's ΔW is the trained one (a rank-8 fit of rank ≤ 6 differences)
    fresh = tiny_dit_parts(family).transformer
    loaded = load_dit_network(tmp_path / "x.safetensors", fresh)
    want = merged_layers(parts.transformer, net)
    got = merged_layers(fresh, loaded)
    for path in net.paths.values():
        torch.testing.assert_close(got[path][0], want[path][0], rtol=1e-4, atol=1e-5, msg=path)


def test_resize_a_dit_file(tmp_path):
    parts, net = trained("flux", "lora", {"rank": 4})
    adapter = save_dit_network(net, tmp_path / "a.safetensors", layout="original")
    resize(adapter, tmp_path / "r.safetensors", mode="fixed", param=2)
    out = load_file(str(tmp_path / "r.safetensors"))
    assert out["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 2
    load_dit_network(tmp_path / "r.safetensors", parts.transformer)  # still splits onto the model


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_convert_between_layouts_on_the_command_line(tmp_path, family, capsys):
    from higanbana.cli import main

    _, net = trained(family, "lora", {"rank": 2, "alpha": 1})
    folder = save_tiny_dit(tiny_dit_parts(family), tmp_path / "model")
    split = save_dit_network(net, tmp_path / "split.safetensors")
    assert (
        main(["convert", str(split), str(tmp_path / "o.safetensors"), "--layout", "original", "--base", str(folder)])
        == 0
    )
    assert (
        main(
            [
                "convert",
                str(tmp_path / "o.safetensors"),
                str(tmp_path / "s.safetensors"),
                "--layout",
                "split",
                "--base",
                str(folder),
            ]
        )
        == 0
    )
    names = {k.partition(".")[0] for k in load_file(str(tmp_path / "o.safetensors"))}
    assert all(n.startswith("lora_unet_") for n in names)
    want = net.state_tensors()
    for path in ("o", "s"):  # both layouts reload to exactly the trained tensors
        loaded = load_dit_network(tmp_path / f"{path}.safetensors", tiny_dit_parts(family).transformer)
        got = loaded.state_tensors()
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    _, loha = trained(family, "loha", {"rank": 2})
    path = save_dit_network(loha, tmp_path / "loha.safetensors")
    assert (
        main(["convert", str(path), str(tmp_path / "x.safetensors"), "--layout", "original", "--base", str(folder)])
        != 0
    )
    assert "LoHa modules cannot be stacked" in capsys.readouterr().err
