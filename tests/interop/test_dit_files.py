"""SD3/SD3.5 and Flux.1 files (issue 19): what ComfyUI and diffusers make of the files we write, in both
layouts, and the exact conversion between kohya's fused names and the split diffusers names.

ComfyUI is ``comfyui_ref`` (its key maps and row-block patching, reproduced); diffusers is the real library
(0.42.1 in the peers' venv: ``FluxPipeline``/``StableDiffusion3Pipeline.load_lora_weights`` + ``fuse_lora``,
run by ``dit_diffusers_run.py``). ``info``'s verdicts must say what each of them did.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from higanbana.algorithms.factorize import factorize
from higanbana.algorithms.files import LayoutRefused
from higanbana.errors import HiganbanaError
from higanbana.formats.dit_network import dit_network, save_dit_network
from higanbana.formats.inspect import file_info
from higanbana.formats.peft import export_peft
from higanbana.models.tiny import tiny_flux_transformer, tiny_sd3_transformer

from . import comfyui_ref as cf
from .test_diffusers_reads_ours import run_in_peers

RUNNER = Path(__file__).with_name("dit_diffusers_run.py")
MODELS = {"flux": tiny_flux_transformer, "sd3": tiny_sd3_transformer}
#: (label, algo, options): the algorithms ComfyUI has, as they would be trained on these families
COMFY_ALGOS = [
    ("lora", "lora", {"rank": 2}),
    ("loha", "loha", {"rank": 2}),
    ("lokr", "lokr", {"rank": 2, "factor": 4}),
    ("full", "full", {}),
    ("glora", "glora", {"rank": 2}),
    ("oft", "oft", {"rank": 4}),
    ("boft", "boft", {"rank": 4}),
]
STACKABLE = {"lora", "full", "ia3"}


def trained(family: str, algo: str, options: dict, seed: int = 0):
    """A tiny model and a network on it with every adapter tensor random (as after training)."""
    model = MODELS[family]().requires_grad_(False)
    net = dit_network(model, algo=algo, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, net


def layers(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    return {
        path: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
        for path, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }


def merged_layers(model, net):
    net.merge()
    try:
        return layers(model)
    finally:
        net.unmerge()


def comfy_maps(family: str, model: nn.Module):
    config = dict(model.config)
    h = config["num_attention_heads"] * config["attention_head_dim"]
    if family == "flux":
        dmap = cf.flux_diffusers_map(
            {"hidden_size": h, "depth": config["num_layers"], "depth_single_blocks": config["num_single_layers"]}
        )
    else:
        dmap = cf.mmdit_diffusers_map({"hidden_size": h})
    originals = {t if isinstance(t, str) else t[0] for t in dmap.values()}
    return dmap, cf.dit_key_map(family, dmap, originals, h)


def comfy_merge(family, model, path):
    """ComfyUI's weights after loading ``path`` at strength 1 (original layout), and the keys it left."""
    dmap, key_map = comfy_maps(family, model)
    before = cf.original_state(dmap, layers(model))
    patches, unloaded = cf.load_patches(load_file(str(path)), key_map)
    errors: list[str] = []
    after = cf.patch_dit(patches, before, errors=errors)
    assert not errors, errors
    return before, after, unloaded


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize(("label", "algo", "options"), COMFY_ALGOS, ids=[c[0] for c in COMFY_ALGOS])
def test_comfyui_merges_split_and_original_files_like_us(tmp_path, family, label, algo, options):
    model, net = trained(family, algo, options)
    dmap, _ = comfy_maps(family, model)
    ours = cf.original_state(dmap, merged_layers(model, net))
    for layout in ("split", "original"):
        try:
            path = save_dit_network(net, tmp_path / f"{layout}.safetensors", layout=layout)
        except LayoutRefused:
            assert layout == "original" and algo not in STACKABLE
            continue
        before, after, unloaded = comfy_merge(family, model, path)
        assert not unloaded, (layout, unloaded[:3])
        verdicts = {v["tool"]: v for v in file_info(path)["compatibility"]}
        assert file_info(path)["base_model"] == family
        assert verdicts["A1111"]["status"] == "does not load"
        dropped_bias = set()
        for original, (w, b) in ours.items():
            torch.testing.assert_close(after[original][0], w, rtol=1e-5, atol=1e-6, msg=f"{layout} {original}")
            if b is None:
                continue
            fused_member = layout == "split" and any(not isinstance(t, str) and t[0] == original for t in dmap.values())
            # ComfyUI drops a bias difference aimed at a row block of a fused layer (see cf.patch_dit)
            expected = before[original][1] if fused_member else b
            torch.testing.assert_close(after[original][1], expected, rtol=1e-5, atol=1e-6, msg=f"{layout} {original}")
            if fused_member and not torch.equal(b, before[original][1]):
                dropped_bias |= {p for p, t in dmap.items() if not isinstance(t, str) and t[0] == original}
        comfy = verdicts["ComfyUI"]
        if dropped_bias:  # info names exactly the modules whose bias difference ComfyUI drops
            names = {"lora_transformer_" + p.replace(".", "_") for p in dropped_bias}
            assert comfy["status"] == "loads with deviation" and set(comfy["deviating"]) == names
        else:
            assert comfy["status"] == "loads", comfy


def test_comfyui_does_not_load_ia3_on_dit_and_info_says_so(tmp_path):
    model, net = trained("flux", "ia3", {})
    path = save_dit_network(net, tmp_path / "ia3.safetensors", layout="original")
    _, _, unloaded = comfy_merge("flux", model, path)
    assert set(unloaded) == set(load_file(str(path)))  # "lora key not loaded" for every key
    verdict = {v["tool"]: v for v in file_info(path)["compatibility"]}["ComfyUI"]
    assert verdict["status"] == "does not load"


# --------------------------------------------------------------------------- diffusers (the real library)
DIFFUSERS_CASES = [
    ["flux-lora-diffusers", "flux", "lora", {"rank": 2}, "diffusers"],
    ["sd3-lora-diffusers", "sd3", "lora", {"rank": 2}, "diffusers"],
    ["flux-lora-original", "flux", "lora", {"rank": 2}, "original"],
    ["flux-lora-split", "flux", "lora", {"rank": 2}, "split"],
    ["flux-lora-split-attention", "flux", "lora", {"rank": 2, "attention_only": True}, "split"],
    ["sd3-lora-original", "sd3", "lora", {"rank": 2}, "original"],
    ["sd3-lora-split", "sd3", "lora", {"rank": 2}, "split"],
]


@pytest.fixture(scope="module")
def diffusers_rows(tmp_path_factory):
    return run_in_peers(RUNNER, tmp_path_factory.mktemp("dit-diffusers"), DIFFUSERS_CASES)


def _weights_file(row: dict) -> Path:
    path = Path(row["path"])
    return path / "pytorch_lora_weights.safetensors" if path.is_dir() else path


@pytest.mark.parametrize("label", [c[0] for c in DIFFUSERS_CASES])
def test_info_says_what_diffusers_does_with_dit_files(diffusers_rows, label):
    row = diffusers_rows[label]
    info = file_info(_weights_file(row))
    verdict = {v["tool"]: v for v in info["compatibility"]}["diffusers"]
    if "failed" in row:
        assert verdict["status"] == "does not load", (row["failed"], verdict)
    elif not row["applied"]:
        assert verdict["status"] == "does not load", verdict
        assert len(verdict["skipped"]) == info["modules"]  # silently: diffusers only warns
    else:  # every module applied and equal to our merge
        assert not row["not_applied"] and not row["differing"] and row["matching"]
        assert verdict["status"] == "loads", verdict


def test_diffusers_reads_peft_names_and_flux1_kohya_files_exactly(diffusers_rows):
    for label in ("flux-lora-diffusers", "sd3-lora-diffusers", "flux-lora-split-attention"):
        row = diffusers_rows[label]
        assert set(row["matching"]) == set(row["modules"]), label
    kohya = diffusers_rows["kohya-flux"]  # our fused Flux.1-width LoRA through diffusers' own conversion
    assert len(kohya["matching"]) == 17 and not kohya["differing"] and not kohya["left"]
    assert "AssertionError" in diffusers_rows["flux-lora-original"]["failed"]  # tiny widths: not Flux.1's


def test_diffusers_export_of_dit_networks_holds_lora_only(tmp_path):
    _, net = trained("flux", "lokr", {"rank": 2, "factor": 4})
    with pytest.raises(HiganbanaError, match="reads LoRA only"):
        export_peft(net, tmp_path / "lokr", target="diffusers-transformer")


# --------------------------------------------------------------------------- foreign fused files onto our split model
def fused_file(family: str, model: nn.Module, algo: str, seed: int = 3) -> dict[str, torch.Tensor]:
    """A kohya-style file trained on the original model's fused layers (random tensors of the shapes a
    trainer on the original layout writes): every fused qkv/linear1 and a few one-to-one modules."""
    dmap, _ = comfy_maps(family, model)
    shapes = {o: w.shape for o, (w, _) in cf.original_state(dmap, layers(model)).items() if w.dim() == 2}
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    out = {}
    for original, (n_out, n_in) in shapes.items():
        if not original.endswith(("qkv", "linear1", "linear2", "proj", "fc1", "img_mlp.0")):
            continue
        name = "lora_unet_" + original.replace(".", "_")
        if algo == "lora":
            out |= {f"{name}.lora_down.weight": rnd(4, n_in), f"{name}.lora_up.weight": rnd(n_out, 4)}
            out[f"{name}.alpha"] = torch.tensor(2.0)
        elif algo == "loha":
            out |= {f"{name}.hada_w1_a": rnd(n_out, 2), f"{name}.hada_w1_b": rnd(2, n_in)}
            out |= {f"{name}.hada_w2_a": rnd(n_out, 2), f"{name}.hada_w2_b": rnd(2, n_in)}
            out[f"{name}.alpha"] = torch.tensor(1.0)
        elif algo == "lokr":  # the fused qkv only: kron(w1, w2) with w1 (3·a, v1) and w2 (b, v2), where
            # (a, b), (v1, v2) are the member's own factorisations (factor 4): each member is kron(w1 rows, w2)
            if not original.endswith("qkv"):
                continue
            (a, b), (v1, v2) = factorize(n_out // 3, 4), factorize(n_in, 4)
            out |= {f"{name}.lokr_w1": rnd(3 * a, v1), f"{name}.lokr_w2": rnd(b, v2)}
        elif algo == "full":
            out |= {f"{name}.diff": rnd(n_out, n_in), f"{name}.diff_b": rnd(n_out)}
    return out


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "full"])
def test_fused_files_load_onto_split_models_exactly(tmp_path, family, algo):
    """What ComfyUI computes on the original (fused) model is what our split network merges to."""
    from safetensors.torch import save_file

    from higanbana.formats.dit_network import load_dit_network

    model = MODELS[family]().requires_grad_(False)
    path = tmp_path / f"{algo}.safetensors"
    save_file(fused_file(family, model, algo), str(path))
    _, expected, unloaded = comfy_merge(family, model, path)
    assert not unloaded
    net = load_dit_network(path, model)
    dmap, _ = comfy_maps(family, model)
    got = cf.original_state(dmap, merged_layers(model, net))
    for original, (w, b) in expected.items():
        torch.testing.assert_close(got[original][0], w, rtol=1e-5, atol=1e-6, msg=original)
        if b is not None:
            torch.testing.assert_close(got[original][1], b, rtol=1e-5, atol=1e-6, msg=original)
