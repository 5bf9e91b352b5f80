"""Detection of algorithms and foreign naming (formats/detect.py) and the PEFT export (formats/peft.py).

The exactness of the export is proven against the real PEFT library when the bench virtualenv has it
(``.venv-bench``): PEFT loads our folder, merges, and its merged weights must equal ours.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from higanbana.algorithms import algorithm_class, make_adapter
from higanbana.errors import HiganbanaError
from higanbana.formats.detect import (
    detect_algo,
    dora_axis,
    glora_layout,
    group_modules,
    load_peft_folder,
    normalize_foreign,
    peft_alphas,
)
from higanbana.formats.peft import peft_factorization, save_peft_folder, to_peft

ROOT = Path(__file__).resolve().parents[1]
#: the peers' venv (``make test`` builds it: PEFT, lycoris-lora), so CI runs these checks in a subprocess
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"


def randomized(algo: str, layer: nn.Module, seed: int = 0, **options):
    """An adapter whose every parameter is random (so ΔW ≠ 0 and every factor matters)."""
    torch.manual_seed(seed)
    adapter = make_adapter(algo, layer, **options)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.dim() == 0:
                continue
            nn.init.normal_(p, std=0.3)
            if "dora_scale" in dict(adapter.named_parameters()) and p is adapter.dora_scale:
                p.abs_().add_(0.5)
    return adapter


def keyed(name: str, adapter) -> dict[str, Tensor]:
    return {f"{name}.{k}": v for k, v in adapter.state_tensors().items()}


# --------------------------------------------------------------------------- detection
DETECT_CASES = [
    ("lora", lambda: nn.Linear(8, 6), {"rank": 2}, "lora"),
    ("lora", lambda: nn.Conv2d(6, 4, 3), {"rank": 2, "use_tucker": True}, "lora"),
    ("loha", lambda: nn.Linear(8, 6), {"rank": 2}, "loha"),
    ("loha", lambda: nn.Conv2d(6, 4, 3), {"rank": 2, "use_tucker": True}, "loha"),
    ("lokr", lambda: nn.Linear(16, 12), {"rank": 1}, "lokr"),
    ("lokr", lambda: nn.Linear(64, 64), {"rank": 2, "decompose_both": True}, "lokr"),
    ("lokr", lambda: nn.Conv2d(16, 16, 3), {"rank": 1, "use_tucker": True}, "lokr"),
    ("ia3", lambda: nn.Linear(8, 6), {}, "ia3"),
    ("ia3", lambda: nn.Conv2d(6, 4, 3), {"on_input": True}, "ia3"),
    ("glora", lambda: nn.Linear(8, 6), {"rank": 2}, "glora"),
    ("oft", lambda: nn.Linear(8, 8), {"rank": 4}, "oft"),
    ("boft", lambda: nn.Linear(8, 8), {"rank": 2}, "boft"),
    ("full", lambda: nn.Linear(8, 6), {}, "full"),
    ("norm", lambda: nn.LayerNorm(8), {}, "norm"),
    ("norm", lambda: nn.GroupNorm(2, 8), {}, "norm"),
]


@pytest.mark.parametrize(("algo", "make_layer", "options", "expected"), DETECT_CASES)
def test_detect_every_algorithm(algo, make_layer, options, expected):
    adapter = randomized(algo, make_layer(), **options)
    groups = group_modules(keyed("lycoris_m", adapter))
    assert list(groups) == ["lycoris_m"]
    assert detect_algo("lycoris_m", groups["lycoris_m"]) == expected


def test_group_modules_splits_at_the_first_dot():
    t = torch.zeros(1)
    groups = group_modules({"lora_unet_a_b.lora_up.weight": t, "lora_unet_a_b.alpha": t, "lora_te_c.alpha": t})
    assert groups == {"lora_unet_a_b": {"lora_up.weight": t, "alpha": t}, "lora_te_c": {"alpha": t}}
    with pytest.raises(HiganbanaError, match="nodot"):
        group_modules({"nodot": t})


def test_detect_unknown_names_module_and_suffixes():
    with pytest.raises(HiganbanaError, match=r"lora_unet_x.*\['foo', 'scale'\]"):
        detect_algo("lora_unet_x", {"foo": torch.zeros(1), "scale": torch.zeros(1)})
    with pytest.raises(HiganbanaError, match="oft_blocks has 2 dims"):
        detect_algo("m", {"oft_blocks": torch.zeros(2, 2)})


@pytest.mark.parametrize("on_output", [True, False])
@pytest.mark.parametrize("make_layer", [lambda: nn.Linear(8, 6), lambda: nn.Conv2d(6, 4, 3)])
def test_dora_axis(on_output, make_layer):
    layer = make_layer()
    out = layer.weight.shape[0]
    adapter = randomized("lora", layer, rank=2, weight_decompose=True, wd_on_output=on_output)
    assert dora_axis(adapter.state_tensors(), out) == ("output" if on_output else "input")
    assert dora_axis(randomized("lora", make_layer(), rank=2).state_tensors(), out) is None
    with pytest.raises(HiganbanaError, match="dora_scale has shape"):
        dora_axis({"dora_scale": torch.zeros(3, 2)}, out)


def test_glora_layout_new_old_and_square():
    new = randomized("glora", nn.Linear(8, 6), rank=2).state_tensors()
    assert glora_layout(new) == "new"
    old = {"a1.weight": new["a2.weight"], "a2.weight": new["a1.weight"]}
    old |= {"b1.weight": new["b2.weight"], "b2.weight": new["b1.weight"]}
    assert glora_layout(old) == "old"
    square = randomized("glora", nn.Linear(4, 4), rank=4).state_tensors()  # every axis is 4: ambiguous
    assert glora_layout(square) == "new"
    with pytest.raises(HiganbanaError, match="neither layout"):
        glora_layout({**new, "b1.weight": torch.zeros(6, 3)})


# --------------------------------------------------------------------------- foreign naming
def test_normalize_native_and_kohya_oft():
    t = torch.zeros(2)
    tensors, source = normalize_foreign({"lora_unet_a.lora_up.weight": t, "lora_te1_b.alpha": t})
    assert source == "kohya" and set(tensors) == {"lora_unet_a.lora_up.weight", "lora_te1_b.alpha"}
    assert normalize_foreign({"lycoris_a.alpha": t})[1] == "lycoris"
    tensors, source = normalize_foreign({"oft_unet_x_proj.oft_blocks": t, "oft_unet_x_proj.alpha": t})
    assert source == "kohya-oft" and set(tensors) == {"lora_unet_x_proj.oft_blocks", "lora_unet_x_proj.alpha"}


def test_normalize_peft_keys_dora_and_adapter_name():
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    mag_lin, mag_conv = torch.rand(6), torch.rand(1, 4, 1, 1)
    raw = {
        "base_model.model.blocks.0.proj.lora_A.weight": a,
        "base_model.model.blocks.0.proj.lora_B.default.weight": b,
        "base_model.model.blocks.0.proj.lora_magnitude_vector": mag_lin,
        "base_model.model.conv.lora_magnitude_vector.default.weight": mag_conv,
        "base_model.model.conv.hada_w1_a.default": a,
    }
    tensors, source = normalize_foreign(raw, peft_prefix="lora_unet")
    assert source == "peft"
    assert tensors["lora_unet_blocks_0_proj.lora_down.weight"] is a
    assert tensors["lora_unet_blocks_0_proj.lora_up.weight"] is b
    assert tensors["lora_unet_blocks_0_proj.dora_scale"].shape == (6, 1)
    assert tensors["lora_unet_conv.dora_scale"].shape == (4, 1, 1, 1)
    assert torch.equal(tensors["lora_unet_conv.dora_scale"].flatten(), mag_conv.flatten())
    assert "lora_unet_conv.hada_w1_a" in tensors
    assert "lycoris_conv.hada_w1_a" in normalize_foreign(raw)[0]  # default PEFT prefix


def test_normalize_diffusers_sd_and_sdxl_text_encoders():
    t = torch.zeros(1)
    sd = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": t,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": t,
    }
    tensors, source = normalize_foreign(sd)
    assert source == "diffusers"
    assert set(tensors) == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
    }
    sdxl = {**sd, "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": t}
    names = {k.partition(".")[0] for k in normalize_foreign(sdxl)[0]}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in names
    names = {k.partition(".")[0] for k in normalize_foreign(sd, te_prefix="lora_te1")[0]}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    names = {k.partition(".")[0] for k in normalize_foreign(sd, prefixes={"unet": "lycoris"})[0]}
    assert "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names


def test_normalize_errors_name_a_key():
    t = torch.zeros(1)
    with pytest.raises(HiganbanaError, match="model.layers.0.weight"):
        normalize_foreign({"model.layers.0.weight": t})
    with pytest.raises(HiganbanaError, match="mixed key naming"):
        normalize_foreign({"lora_unet_a.alpha": t, "unet.a.lora_A.weight": t})
    with pytest.raises(HiganbanaError, match="unknown PEFT/diffusers suffix"):
        normalize_foreign({"base_model.model.a.oft_R.weight": t})
    with pytest.raises(HiganbanaError, match="lora_bias"):
        normalize_foreign({"base_model.model.a.lora_B.bias": t})
    with pytest.raises(HiganbanaError, match="no tensors"):
        normalize_foreign({})


def test_peft_alphas_patterns_and_rslora():
    cfg = {"r": 4, "lora_alpha": 8, "rank_pattern": {r"1\.0": 2}, "alpha_pattern": {"0": 3}}
    assert peft_alphas(cfg, ["0", "1.0", "2"]) == {"0": 3.0, "1.0": 3.0, "2": 8.0}  # "0" also matches "1.0"
    rs = {"r": 4, "lora_alpha": 8, "use_rslora": True}
    alpha = peft_alphas(rs, ["x"])["x"]
    assert alpha / 4 == pytest.approx(8 / math.sqrt(4))  # our reader's α/r is PEFT's lora_alpha/√r
    assert peft_alphas({"r": 2, "alpha": 5}, ["x"]) == {"x": 5.0}  # LoHa/LoKr configs say "alpha"


def test_peft_factorization_matches_ours_except_unsorted_factor():
    from higanbana.algorithms.factorize import factorize

    for dim in (6, 8, 64, 127, 128, 250, 320, 360, 768):
        for f in (-1, 2, 3, 4, 8, 16):
            ours, theirs = factorize(dim, f), peft_factorization(dim, f)
            assert tuple(sorted(theirs)) == ours
    assert peft_factorization(128, 32) == (32, 4)  # PEFT keeps (factor, dim/factor)


# --------------------------------------------------------------------------- export
def _model(spec: list) -> nn.Module:
    """A tiny model: a list of layer specs; a nested list is an inner nn.Sequential (paths like "1.0")."""
    layers = []
    for s in spec:
        if isinstance(s[0], list):
            layers.append(_model(s))
        elif s[0] == "linear":
            layers.append(nn.Linear(s[1], s[2]))
        else:
            layers.append(nn.Conv2d(s[1], s[2], s[3]))
    return nn.Sequential(*layers)


# name: (algo, model spec, {path: options})
EXPORT_CASES = {
    "lora": ("lora", [["linear", 8, 6], [["linear", 6, 6]], ["conv", 6, 4, 3]], {"0": {"rank": 2, "alpha": 3.0},
             "1.0": {"rank": 3, "alpha": 1.5}, "2": {"rank": 2, "alpha": 3.0}}),
    "lora_rs": ("lora", [["linear", 8, 6]], {"0": {"rank": 4, "alpha": 2.0, "rs_lora": True}}),
    "dora": ("lora", [["linear", 8, 6], ["conv", 6, 4, 3]], {"0": {"rank": 2, "weight_decompose": True},
             "1": {"rank": 2, "alpha": 1.0, "weight_decompose": True}}),
    "loha": ("loha", [["linear", 8, 6], ["conv", 6, 4, 3]], {"0": {"rank": 2, "alpha": 1.0},
             "1": {"rank": 2, "alpha": 1.0}}),
    "loha_tucker": ("loha", [["linear", 8, 6], ["conv", 6, 4, 3]], {"0": {"rank": 2, "alpha": 3.0},
                    "1": {"rank": 2, "alpha": 3.0, "use_tucker": True}}),
    "lokr": ("lokr", [["linear", 16, 12], ["conv", 16, 16, 3]], {"0": {"rank": 1, "alpha": 2.0},
             "1": {"rank": 1, "alpha": 2.0, "use_tucker": True}}),
    "lokr_conv": ("lokr", [["conv", 16, 16, 3]], {"0": {"rank": 1, "alpha": 0.5}}),
    "lokr_full": ("lokr", [["linear", 8, 6]], {"0": {"rank": 8, "alpha": 2.0}}),
    "lokr_both": ("lokr", [["linear", 64, 64], ["linear", 64, 32]], {"0": {"rank": 2, "decompose_both": True},
                  "1": {"rank": 2, "alpha": 4.0, "decompose_both": True}}),
}  # fmt: skip


def _build_case(name: str):
    """(model, {module name: adapter}, tensors, records, paths, shapes) for one export case."""
    algo, spec, per_path = EXPORT_CASES[name]
    torch.manual_seed(1)
    model = _model(spec)
    modules = dict(model.named_modules())
    adapters, tensors, records, paths, shapes = {}, {}, {}, {}, {}
    for i, (path, options) in enumerate(per_path.items()):
        ours = "lycoris_" + path.replace(".", "_")
        adapter = randomized(algo, modules[path], seed=10 + i, **options)
        adapters[ours] = adapter
        tensors |= keyed(ours, adapter)
        records[ours] = {"algo": adapter.algo, "options": adapter.extra_state_options()}
        paths[ours] = path
        shapes[ours] = tuple(modules[path].weight.shape)
    return model, adapters, tensors, records, paths, shapes


def _ours_merged(adapters, paths) -> dict[str, Tensor]:
    return {f"{paths[n]}.weight": a.merged_weight(1.0).detach() for n, a in adapters.items()}


def _close(a: Tensor, b: Tensor, rel: float = 1e-5) -> bool:
    return bool((a - b).norm() <= rel * max(b.norm(), 1e-12))


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_round_trip_through_load_peft_folder(case, tmp_path):
    model, adapters, tensors, records, paths, shapes = _build_case(case)
    config, out = to_peft(tensors, records, paths, shapes=shapes)
    assert config["peft_type"] == {"lora": "LORA", "loha": "LOHA", "lokr": "LOKR"}[EXPORT_CASES[case][0]]
    assert config["target_modules"] == sorted(paths.values())
    assert all(k.startswith("base_model.model.") for k in out)
    save_peft_folder(tmp_path, config, out)
    loaded, cfg = load_peft_folder(tmp_path)
    assert cfg == json.loads(json.dumps(config))
    modules = dict(model.named_modules())
    for name, mod in group_modules(loaded).items():
        layer = modules[paths[name]]
        algo = detect_algo(name, mod)
        options = algorithm_class(algo).options_from_state(mod, layer)
        again = make_adapter(algo, layer, **options)
        again.load_state_tensors(mod)
        assert _close(again.merged_weight(1.0), adapters[name].merged_weight(1.0)), name


def test_export_patterns_and_dora_shapes():
    _, _, tensors, records, paths, _ = _build_case("lora")
    config, out = to_peft(tensors, records, paths)
    assert config["r"] == 2 and config["lora_alpha"] == 3
    assert config["rank_pattern"] == {r"1\.0": 3} and config["alpha_pattern"] == {r"1\.0": 1.5}
    assert config["use_dora"] is False and config["use_rslora"] is False
    _, _, tensors, records, paths, _ = _build_case("dora")
    config, out = to_peft(tensors, records, paths)
    assert config["use_dora"] is True
    assert out["base_model.model.0.lora_magnitude_vector"].shape == (6,)
    assert out["base_model.model.1.lora_magnitude_vector"].shape == (1, 4, 1, 1)
    _, _, tensors, records, paths, _ = _build_case("lokr_full")
    config, out = to_peft(tensors, records, paths)
    assert config["alpha"] == config["r"]  # our scale is 1 when both blocks are full


def test_export_conv_lokr_needs_layer_shapes():
    _, _, tensors, records, paths, shapes = _build_case("lokr_conv")
    assert "lycoris_0.lokr_w2_b" in tensors and "lycoris_0.lokr_t2" not in tensors  # flattened kernel
    config, _ = to_peft(tensors, records, paths, shapes=shapes)
    assert config["decompose_factor"] == -1 and config["use_effective_conv2d"] is False
    bad = {"lycoris_0": (16, 16, 5, 5)}  # a wrong kernel: w2_b's width 36 is not v2·25
    with pytest.raises(HiganbanaError, match="kernel size 25"):
        to_peft(tensors, records, paths, shapes=bad)


def test_export_diffusers_target(tmp_path):
    _, _, tensors, records, paths, _ = _build_case("lora")
    config, out = to_peft(tensors, records, paths, target="diffusers-unet")
    assert set(out) >= {"unet.1.0.lora_A.weight", "unet.1.0.lora_B.weight"}
    save_peft_folder(tmp_path, config, out)
    assert set(load_file(tmp_path / "pytorch_lora_weights.safetensors")) == set(out)
    _, _, tensors, records, paths, _ = _build_case("loha")
    with pytest.raises(HiganbanaError, match="LoRA and LoKr only"):
        to_peft(tensors, records, paths, target="diffusers-unet")


@pytest.mark.parametrize(
    ("algo", "make_layer", "options", "match"),
    [
        ("oft", lambda: nn.Linear(8, 8), {"rank": 4}, "input features"),
        ("boft", lambda: nn.Linear(8, 8), {"rank": 2}, "butterfly"),
        ("glora", lambda: nn.Linear(8, 6), {"rank": 2}, "element-wise"),
        ("ia3", lambda: nn.Linear(8, 6), {}, "bias"),
        ("full", lambda: nn.Linear(8, 6), {}, "full weight"),
        ("norm", lambda: nn.LayerNorm(8), {}, "LayerNorm"),
        ("lora", lambda: nn.Conv2d(6, 4, 3), {"rank": 2, "use_tucker": True}, "lora_mid"),
        ("lora", lambda: nn.Linear(8, 6), {"rank": 2, "weight_decompose": True, "wd_on_output": False}, "input axis"),
        ("loha", lambda: nn.Linear(8, 6), {"rank": 2, "weight_decompose": True}, "no DoRA"),
        ("lokr", lambda: nn.Linear(8, 6), {"rank": 8, "weight_decompose": True}, "no DoRA"),
    ],
)
def test_export_refuses_what_peft_computes_differently(algo, make_layer, options, match):
    adapter = randomized(algo, make_layer(), **options)
    records = {"m": {"algo": adapter.algo, "options": adapter.extra_state_options()}}
    with pytest.raises(HiganbanaError, match=match):
        to_peft(keyed("m", adapter), records, {"m": "layer"})


def test_export_refuses_mixed_algorithms_and_missing_paths():
    a = randomized("lora", nn.Linear(8, 6), rank=2)
    b = randomized("loha", nn.Linear(8, 6), rank=2)
    tensors = keyed("a", a) | keyed("b", b)
    records = {"a": {"algo": "lora"}, "b": {"algo": "loha"}}
    with pytest.raises(HiganbanaError, match="mixes"):
        to_peft(tensors, records, {"a": "x", "b": "y"})
    with pytest.raises(HiganbanaError, match="no module path"):
        to_peft(keyed("a", a), records, {})
    with pytest.raises(HiganbanaError, match="unknown PEFT export target"):
        to_peft(keyed("a", a), records, {"a": "x"}, target="comfy")


def test_load_peft_lokr_both_full_folds_the_scale(tmp_path):
    """PEFT scales a both-full LoKr by α/r; ours by 1: the factor must land in lokr_w2."""
    torch.manual_seed(3)
    w1, w2 = torch.randn(2, 2), torch.randn(3, 4)
    save_file(
        {"base_model.model.0.lokr_w1": w1, "base_model.model.0.lokr_w2": w2}, tmp_path / "adapter_model.safetensors"
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOKR", "r": 4, "alpha": 6}))
    tensors, _ = load_peft_folder(tmp_path)
    layer = nn.Linear(8, 6)
    mod = group_modules(tensors)["lycoris_0"]
    adapter = make_adapter("lokr", layer, **algorithm_class("lokr").options_from_state(mod, layer))
    adapter.load_state_tensors(mod)
    expected = layer.weight + 1.5 * torch.kron(w1, w2)
    assert _close(adapter.merged_weight(1.0), expected)


def test_load_peft_folder_errors(tmp_path):
    with pytest.raises(HiganbanaError, match="no adapter_config.json"):
        load_peft_folder(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT", "r": 4}))
    with pytest.raises(HiganbanaError, match="OFT"):
        load_peft_folder(tmp_path)


# --------------------------------------------------------------------------- against the real PEFT
PEFT_SCRIPT = r"""
import json, sys, warnings
import torch
from torch import nn
from safetensors.torch import load_file, save_file
from peft import PeftModel
warnings.simplefilter("ignore")

def build(spec):
    layers = []
    for s in spec:
        if isinstance(s[0], list):
            layers.append(build(s))
        elif s[0] == "linear":
            layers.append(nn.Linear(s[1], s[2]))
        else:
            layers.append(nn.Conv2d(s[1], s[2], s[3]))
    return nn.Sequential(*layers)

for case in json.loads(sys.argv[1]):
    model = build(case["spec"])
    model.load_state_dict(load_file(case["base"]))
    peft_model = PeftModel.from_pretrained(model, case["folder"])
    merged = peft_model.merge_and_unload()
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, case["merged"])
"""


def _peft_available() -> bool:
    if not BENCH_PYTHON.exists():
        return False
    return subprocess.run([str(BENCH_PYTHON), "-c", "import peft"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_export_is_exact_in_real_peft(tmp_path):
    if not _peft_available():
        pytest.skip(f"PEFT is not importable by {BENCH_PYTHON}")
    jobs, expected = [], {}
    for case in sorted(EXPORT_CASES):
        model, adapters, tensors, records, paths, shapes = _build_case(case)
        config, out = to_peft(tensors, records, paths, shapes=shapes)
        folder = tmp_path / case
        save_peft_folder(folder, config, out)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / "base.safetensors")
        jobs.append(
            {"spec": EXPORT_CASES[case][1], "base": str(folder / "base.safetensors"), "folder": str(folder),
             "merged": str(folder / "merged.safetensors")}
        )  # fmt: skip
        expected[case] = _ours_merged(adapters, paths)
    proc = subprocess.run(
        [str(BENCH_PYTHON), "-c", PEFT_SCRIPT, json.dumps(jobs)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, job in zip(sorted(EXPORT_CASES), jobs, strict=True):
        merged = load_file(job["merged"])
        base = load_file(job["base"])
        for key, ours in expected[case].items():
            assert not _close(base[key], ours)  # the adapter changes the weight
            assert _close(merged[key], ours), f"{case}: {key}"


DIFFUSERS_SCRIPT = r"""
import json, sys, warnings
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
warnings.simplefilter("ignore")

def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, sample_size=8,
    )

args = json.loads(sys.argv[1])
save_file({k: v.contiguous() for k, v in unet().state_dict().items()}, args["base"])
for folder in args["folders"]:
    model = unet()
    model.load_lora_adapter(folder, weight_name="pytorch_lora_weights.safetensors", prefix="unet", adapter_name="x")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder + "/merged.safetensors")
"""


def _diffusers_available() -> bool:
    if not BENCH_PYTHON.exists():
        return False
    return subprocess.run([str(BENCH_PYTHON), "-c", "import diffusers, peft"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_diffusers_target_is_exact_in_real_diffusers(tmp_path):
    """diffusers' UNet ``load_lora_adapter`` + ``fuse_lora`` on our unet.-keyed export gives our merged weights."""
    if not _diffusers_available():
        pytest.skip(f"diffusers/PEFT are not importable by {BENCH_PYTHON}")
    cases = {"lora": {"rank": 2, "alpha": 3.0}, "dora": {"rank": 2, "weight_decompose": True}, "lokr": {"rank": 1}}
    paths = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_q",
        "down_blocks.1.resnets.0.conv1",
    ]
    base_file = tmp_path / "base.safetensors"
    # the subprocess writes the (seeded) base UNet first; our adapters need its weights, so run it twice
    args = {"base": str(base_file), "folders": []}
    subprocess.run([str(BENCH_PYTHON), "-c", DIFFUSERS_SCRIPT, json.dumps(args)], check=True, capture_output=True)
    base = load_file(base_file)
    expected = {}
    for case, options in cases.items():
        algo = "lokr" if case == "lokr" else "lora"
        tensors, records, pmap, shapes = {}, {}, {}, {}
        for i, path in enumerate(paths):
            w = base[f"{path}.weight"]
            if w.dim() == 2:
                layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
            else:
                layer = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], bias=False)
            with torch.no_grad():
                layer.weight.copy_(w)
            adapter = randomized(algo, layer, seed=i, **options)
            name = "lora_unet_" + path.replace(".", "_")
            tensors |= keyed(name, adapter)
            records[name] = {"algo": adapter.algo, "options": adapter.extra_state_options()}
            pmap[name], shapes[name] = path, tuple(w.shape)
            expected[(case, f"{path}.weight")] = adapter.merged_weight(1.0).detach()
        config, out = to_peft(tensors, records, pmap, target="diffusers-unet", shapes=shapes)
        save_peft_folder(tmp_path / case, config, out)
        args["folders"].append(str(tmp_path / case))
    proc = subprocess.run(
        [str(BENCH_PYTHON), "-c", DIFFUSERS_SCRIPT, json.dumps(args)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (case, key), ours in expected.items():
        merged = load_file(tmp_path / case / "merged.safetensors")
        assert not _close(base[key], ours)  # the adapter changes the weight
        assert _close(merged[key], ours), f"{case}: {key}"
