"""Files we save load in ComfyUI and AUTOMATIC1111 with the same merged weights as ours.

For every algorithm each tool supports: a tiny SD1.5-layout and SDXL model is wrapped, the adapters
are randomised, the file is saved, and the reference loader of the tool (``comfyui_ref``,
``a1111_ref``, derived from the tools' code: each names the files and commit it reproduces) merges
it at strength 1 into copies of the original weights; the result must equal our merged model (fp32,
≤ 1e-5 relative). The UNet names are resolved independently: ComfyUI's key map from diffusers/SGM
paths, A1111's regex name conversion against the LDM layout. Where a tool deviates, the test checks
that it does and that ``info`` says so.
"""

from __future__ import annotations

import contextlib
import copy
import re

import pytest
import torch
from torch import nn

from higanbana.formats import load_tensors
from higanbana.formats.inspect import file_info
from higanbana.formats.sd_network import save_sd_network, sd_network
from higanbana.formats.sdxl_names import NameMappingError, diffusers_to_sgm
from higanbana.models.tiny import tiny_sd_parts

from ..algorithms.cases import randomize
from . import a1111_ref, comfyui_ref

FULL = "full"
NORMS = {"unet": {"layers": ["GroupNorm", "LayerNorm"]}, "text_encoder": {"layers": ["LayerNorm"]}}

#: (label, algo, options, config) — what ComfyUI loads exactly (docs/design.md §4)
COMFY_CASES = [
    ("lora", "lora", {"rank": 2, "alpha": 1}, FULL),
    ("locon-tucker", "lora", {"rank": 2, "use_tucker": True}, FULL),
    ("loha", "loha", {"rank": 2, "alpha": 1}, FULL),
    ("loha-tucker", "loha", {"rank": 2, "use_tucker": True}, FULL),
    ("lokr", "lokr", {"rank": 2, "alpha": 1, "factor": 4}, FULL),
    ("lokr-both-decomposed", "lokr", {"rank": 1, "factor": 8, "decompose_both": True}, FULL),
    ("lokr-full-scale-1", "lokr", {"rank": 64, "alpha": 3, "factor": 4}, FULL),
    ("lokr-tucker", "lokr", {"rank": 2, "factor": 2, "use_tucker": True}, FULL),
    ("glora", "glora", {"rank": 2, "alpha": 1}, FULL),
    ("oft", "oft", {"rank": 4}, FULL),
    ("boft", "boft", {"rank": 2}, FULL),
    ("full", "full", {}, FULL),
    ("norm", "norm", {}, NORMS),
    ("dora-input-axis", "lora", {"rank": 2, "weight_decompose": True, "wd_on_output": False}, FULL),
    ("loha-dora-input-axis", "loha", {"rank": 2, "weight_decompose": True, "wd_on_output": False}, FULL),
]
#: what A1111 loads exactly
A1111_CASES = [
    ("lora", "lora", {"rank": 2, "alpha": 1}, FULL),
    ("locon-tucker", "lora", {"rank": 2, "use_tucker": True}, FULL),
    ("loha", "loha", {"rank": 2, "alpha": 1}, FULL),
    ("loha-tucker", "loha", {"rank": 2, "use_tucker": True}, FULL),
    ("lokr", "lokr", {"rank": 2, "alpha": 1, "factor": 4}, FULL),
    ("lokr-full-scale-1", "lokr", {"rank": 64, "alpha": 3, "factor": 4}, FULL),
    ("lokr-tucker", "lokr", {"rank": 2, "factor": 2, "use_tucker": True}, FULL),
    ("ia3", "ia3", {}, FULL),
    ("ia3-preset", "ia3", {}, "ia3"),
    ("oft", "oft", {"rank": 4}, FULL),
    ("oft-rescaled-constraint", "oft", {"rank": 4, "rescaled": True, "constraint": 1e-3}, FULL),
    ("boft", "boft", {"rank": 2}, FULL),
    ("boft-rescaled", "boft", {"rank": 4, "rescaled": True}, FULL),
    ("full", "full", {}, FULL),
    ("norm", "norm", {}, NORMS),
    ("dora-input-axis", "lora", {"rank": 2, "weight_decompose": True, "wd_on_output": False}, FULL),
]


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def model(request):
    return tiny_sd_parts(request.param, seed=0)


def _layer_weights(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    return {
        path: (m.weight.detach().clone(), None if getattr(m, "bias", None) is None else m.bias.detach().clone())
        for path, m in module.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
        and isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm))
    }


def _te_path(te: nn.Module, path: str) -> str:
    """A ``text_model.…`` path of the tools, in this transformers' CLIP module (v5 flattened CLIPTextModel)."""
    return path if hasattr(te, "text_model") else path.removeprefix("text_model.")


def _saved_and_merged(model, algo, options, config, tmp_path):
    """(file path, original weights, our merged weights, our module name → (part index, path))."""
    model = copy.deepcopy(model)
    parts = [model.unet, *model.text_encoders]
    before = [_layer_weights(p) for p in parts]
    net = sd_network(model, config, algo, **options).attach()
    randomize(net, std=0.05)
    path = save_sd_network(net, tmp_path / f"{algo}.safetensors", model.kind)
    where = {}
    for name, record in net.records.items():
        index = 0 if record.prefix == "lora_unet" else [p.prefix for p in net.parts.values()].index(record.prefix)
        where[name] = (index, record.path)
    net.merge()
    after = [_layer_weights(p) for p in parts]
    net.restore()
    return path, before, after, where


def _check_close(got, expected, what):
    w, b = got
    ew, eb = expected
    torch.testing.assert_close(w, ew, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} weight: {m}")
    if eb is not None:
        torch.testing.assert_close(b, eb, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} bias: {m}")


# --------------------------------------------------------------------------- ComfyUI
def comfy_merge(model, path, before):
    sd, _ = load_tensors(path)
    unet = model.unet
    sgm = None
    if model.kind == "sdxl":
        sgm = {}
        for p in before[0]:
            with contextlib.suppress(NameMappingError):
                sgm[p] = diffusers_to_sgm(p, unet.config)
    key_map = {k: f"0:{v}" for k, v in comfyui_ref.unet_key_map(before[0], sgm).items()}
    prefixes = ["lora_te"] if len(model.text_encoders) == 1 else ["lora_te1", "lora_te2"]
    for i, (prefix, te) in enumerate(zip(prefixes, model.text_encoders, strict=True), start=1):
        layers = te.config.num_hidden_layers
        for k, v in comfyui_ref.te_key_map(layers, prefix).items():
            key_map[k] = f"{i}:{_te_path(te, v)}"
    patches, unloaded = comfyui_ref.load_patches(sd, key_map)
    merged = {}
    for target, plist in patches.items():
        index, p = target.split(":", 1)
        w, b = before[int(index)][p]
        errors: list[str] = []
        merged[(int(index), p)] = comfyui_ref.calculate_weight(plist, w, b, 1.0, errors=errors)
        if errors:  # ComfyUI logged the error and left the weight unpatched: the module is not loaded
            assert merged[(int(index), p)][0].equal(w)
            unloaded = [*unloaded, *(k for k in sd if key_map.get(k.partition(".")[0]) == target)]
    return merged, unloaded


def _verdict(path, tool):
    return {v["tool"]: v for v in file_info(path)["compatibility"]}[tool]


@pytest.mark.parametrize(("label", "algo", "options", "config"), COMFY_CASES, ids=[c[0] for c in COMFY_CASES])
def test_comfyui_merges_our_files_exactly(model, label, algo, options, config, tmp_path):
    path, before, after, where = _saved_and_merged(model, algo, options, config, tmp_path)
    merged, unloaded = comfy_merge(model, path, before)
    skipped = {k.partition(".")[0] for k in unloaded}
    verdict = _verdict(path, "ComfyUI")
    assert skipped == set(verdict["skipped"])  # info names exactly the modules ComfyUI leaves out
    assert not verdict["deviating"]
    loaded = set(where) - skipped
    assert loaded and {where[n] for n in loaded} <= set(merged)
    for name in loaded:
        _check_close(merged[where[name]], after[where[name][0]][where[name][1]], f"{label} {name}")


def test_comfyui_does_not_load_ia3_and_info_says_so(model, tmp_path):
    path, before, _after, _where = _saved_and_merged(model, "ia3", {}, FULL, tmp_path)
    merged, unloaded = comfy_merge(model, path, before)
    assert not merged and unloaded
    assert {v["tool"]: v["status"] for v in file_info(path)["compatibility"]}["ComfyUI"] == "does not load"


def _comfy_deviation(model, tmp_path, algo, options):
    path, before, after, where = _saved_and_merged(model, algo, options, "attn-mlp", tmp_path)
    merged, _ = comfy_merge(model, path, before)
    name = next(n for n in where if n.startswith("lora_unet"))
    got, expected = merged[where[name]][0], after[where[name][0]][where[name][1]][0]
    verdict = {v["tool"]: v for v in file_info(path)["compatibility"]}["ComfyUI"]
    return got, expected, verdict


def test_comfyui_output_axis_dora_deviates_and_info_warns(model, tmp_path):
    got, expected, verdict = _comfy_deviation(model, tmp_path, "lora", {"rank": 2, "weight_decompose": True})
    assert not torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert verdict["status"] == "loads with deviation" and "‖W0‖" in " ".join(verdict["notes"])


def test_comfyui_oft_constraint_deviates_and_info_warns(model, tmp_path):
    got, expected, verdict = _comfy_deviation(model, tmp_path, "oft", {"rank": 4, "constraint": 1e-3})
    assert not torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert verdict["status"] == "loads with deviation" and "α·out" in " ".join(verdict["notes"])


# --------------------------------------------------------------------------- A1111
_OPENCLIP_LAYER = re.compile(r"(?:1_)?model_transformer_resblocks_\d+_(.+)")


def _a1111_text_module_exists(compvis: str) -> bool:
    """Whether A1111's text-encoder module namespace (its ``network_layer_mapping``) has this name.

    The transformers CLIP encoders (SD1's, SDXL's first: ``transformer_text_model_…``,
    ``0_transformer_text_model_…``) keep every module path; the OpenCLIP ones (SD2's, SDXL's second:
    ``[1_]model_transformer_resblocks_N_…``) name their layers ``attn``, ``attn_out_proj``, ``ln_1``,
    ``ln_2``, ``mlp_c_fc``, ``mlp_c_proj`` — so a converted ``layer_norm1``/``layer_norm2`` matches
    nothing (q/k/v reach ``attn`` through A1111's ``_[qkv]_proj`` fallback). A name the conversion left
    alone (``lora_te_text_model_final_layer_norm``, ``lora_te2_…``) is not a module either.
    """
    if compvis.startswith(("transformer_text_model_", "0_transformer_text_model_")):
        return True
    layer = _OPENCLIP_LAYER.fullmatch(compvis)
    return layer is not None and not layer[1].startswith("layer_norm")


def a1111_merge(model, path, before, where):
    """A1111 merge; UNet weights keyed by their LDM names, derived independently of our kohya names."""
    sd, _ = load_tensors(path)
    weights, back = {}, {}
    for p, wb in before[0].items():
        try:
            name = "diffusion_model_" + diffusers_to_sgm(p, model.unet.config).replace(".", "_")
        except NameMappingError:
            continue
        weights[name], back[name] = wb, (0, p)
    for name, (index, p) in where.items():  # text encoders: A1111's name conversion is a renaming
        if index > 0:
            compvis = a1111_ref.convert_name(name, model.kind)
            if _a1111_text_module_exists(compvis):
                weights[compvis], back[compvis] = before[index][p], (index, p)
    merged, unsupported = a1111_ref.load_and_merge(sd, weights, model.kind)
    return {back[k]: v for k, v in merged.items()}, unsupported


@pytest.mark.parametrize(("label", "algo", "options", "config"), A1111_CASES, ids=[c[0] for c in A1111_CASES])
def test_a1111_merges_our_files_exactly(model, label, algo, options, config, tmp_path):
    path, before, after, where = _saved_and_merged(model, algo, options, config, tmp_path)
    merged, unsupported = a1111_merge(model, path, before, where)
    verdict = _verdict(path, "A1111")
    assert set(unsupported) == set(verdict["skipped"])  # e.g. conv_norm_out on SD1, partial OpenCLIP attention
    deviating = set(verdict["deviating"])
    # the one deviation: A1111 drops the q/k/v bias differences of OpenCLIP attention (SDXL's second encoder)
    drops_qkv_bias = {n for n in where if re.fullmatch(r"lora_te2_.*_self_attn_[qkv]_proj", n)}
    assert deviating == (drops_qkv_bias if label == "full" and model.kind == "sdxl" else set())
    loaded = set(where) - set(unsupported)
    assert len(loaded) > len(unsupported)
    for name in loaded:
        index, p = where[name]
        if name in deviating:
            (weight, bias), (ours, _) = merged[(index, p)], after[index][p]
            torch.testing.assert_close(weight, ours, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(bias, before[index][p][1])  # the bias difference is lost
            continue
        _check_close(merged[(index, p)], after[index][p], f"{label} {name}")


@pytest.mark.parametrize(("algo", "options"), [("glora", {"rank": 2})])
def test_a1111_rejects_new_glora_and_info_says_so(model, algo, options, tmp_path):
    path, before, _after, where = _saved_and_merged(model, algo, options, "attn-mlp", tmp_path)
    _merged, unsupported = a1111_merge(model, path, before, where)
    assert set(unsupported) == set(where)
    assert {v["tool"]: v["status"] for v in file_info(path)["compatibility"]}["A1111"] == "does not load"


def test_a1111_output_axis_dora_deviates_and_info_warns(model, tmp_path):
    path, before, after, where = _saved_and_merged(
        model, "lora", {"rank": 2, "weight_decompose": True}, "attn-mlp", tmp_path
    )
    merged, _ = a1111_merge(model, path, before, where)
    name = next(n for n in where if n.startswith("lora_unet"))
    index, p = where[name]
    assert not torch.allclose(merged[(index, p)][0], after[index][p][0], rtol=1e-4, atol=1e-6)
    verdict = {v["tool"]: v for v in file_info(path)["compatibility"]}["A1111"]
    assert verdict["status"] == "loads with deviation" and "input axis" in " ".join(verdict["notes"])


def test_a1111_skips_text_encoder_norms_it_cannot_name_and_info_says_so(model, tmp_path):
    """A1111 converts only the encoder layers of ``lora_te_``/``lora_te2_`` names, and on OpenCLIP
    encoders not their layer norms: SD1's final_layer_norm and SDXL's second encoder's norms are left
    unpatched; ``lora_te1_`` (SDXL's first encoder) falls back to its transformers names and loads."""
    path, before, _after, where = _saved_and_merged(model, "norm", {}, NORMS, tmp_path)
    _merged, unsupported = a1111_merge(model, path, before, where)
    skipped = set(_verdict(path, "A1111")["skipped"])
    assert set(unsupported) == skipped
    if model.kind == "sd1":
        assert "lora_te_text_model_final_layer_norm" in skipped
        assert not {n for n in skipped if "encoder_layers" in n}  # transformers layer norms load
    else:
        te2 = {n for n in where if n.startswith("lora_te2_")}
        assert te2 and te2 <= skipped  # layer_norm1/2 and final_layer_norm of the OpenCLIP encoder
        assert not {n for n in skipped if n.startswith("lora_te1_")}
