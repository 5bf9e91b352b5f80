"""Networks on tiny SD1/SD2/SDXL models: kohya names, saved files, metadata, `info`, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from higanbana.cli import main
from higanbana.errors import HiganbanaError
from higanbana.formats import load_tensors, network_from_records, network_tensors, save_tensors
from higanbana.formats.inspect import file_info
from higanbana.formats.metadata import model_hashes
from higanbana.formats.sd_network import load_sd_network, save_sd_network, sd_network
from higanbana.models.tiny import tiny_sd_parts

from .algorithms.cases import randomize


@pytest.fixture(scope="module")
def sd1():
    return tiny_sd_parts("sd1", seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sd_parts("sdxl", seed=0)


def test_sd1_names_are_kohya_diffusers_paths(sd1):
    names = set(sd_network(sd1, "full", "lora", rank=2).adapters)
    for name in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_mid_block_resnets_0_conv1",
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
        "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lora_unet_conv_in",
        "lora_unet_time_embedding_linear_1",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_1_mlp_fc2",
    ):
        assert name in names, name


def test_sdxl_names_use_the_sgm_layout_and_two_text_encoders(sdxl):
    names = set(sd_network(sdxl, "full", "lora", rank=2).adapters)
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_4_1_proj_in",
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_input_blocks_1_0_emb_layers_1",
        "lora_unet_input_blocks_1_0_out_layers_3",
        "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_time_embed_0",
        "lora_unet_out_2",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_1_mlp_fc1",
    ):
        assert name in names, name
    assert not any("down_blocks" in n or "up_blocks" in n for n in names)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_and_reload_on_fresh_models(kind, dtype, tmp_path):
    model = tiny_sd_parts(kind, seed=0)
    net = sd_network(model, "attn-mlp", "lokr", rank=2, factor=4).attach()
    randomize(net, std=0.05)
    path = save_sd_network(net, tmp_path / "net.safetensors", kind, dtype=dtype, trigger_phrase="sks")
    tensors, meta = load_tensors(path)
    assert all(t.dtype == torch.float32 for k, t in tensors.items() if k.endswith(".alpha"))
    assert all(t.dtype == dtype for k, t in tensors.items() if not k.endswith(".alpha"))
    assert all(t.dim() == 0 and float(t) != 0 for k, t in tensors.items() if k.endswith(".alpha"))
    assert not any(k.endswith(".scale") for k in tensors)
    for key in ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha"):
        assert key in meta
    assert json.loads(meta["ss_network_args"])["algo"] == "lokr"
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.trigger_phrase"] == "sks"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == model_hashes(tensors, meta)
    assert meta["higanbana.format_version"] == "1" and json.loads(meta["higanbana.modules"])

    fresh = tiny_sd_parts(kind, seed=0)
    loaded = load_sd_network(path, fresh)
    assert set(loaded.adapters) == set(net.adapters)
    saved = network_tensors(net, dtype)
    for key, value in loaded.state_tensors().items():  # the factors, as rounded to the file's dtype
        assert torch.equal(value.detach().to(saved[key].dtype), saved[key]), key
    if dtype == torch.float32:
        for name, adapter in net:
            torch.testing.assert_close(loaded.adapters[name].merged_weight(1.0), adapter.merged_weight(1.0))


def test_foreign_kohya_file_without_metadata_is_detected(sd1, tmp_path):
    net = sd_network(sd1, "attn-mlp", "loha", rank=2)
    randomize(net, std=0.1)
    path = save_tensors(net.state_tensors(), tmp_path / "plain.safetensors")
    loaded = load_sd_network(path, sd1)
    assert set(loaded.algos.values()) == {"loha"}
    for name, adapter in net:
        torch.testing.assert_close(loaded.adapters[name].delta_weight(), adapter.delta_weight())


# --------------------------------------------------------------------------- info and compatibility
def _saved(model, tmp_path, algo, preset="attn-mlp", **options):
    net = sd_network(model, preset, algo, **options)
    randomize(net, std=0.05)
    return save_sd_network(net, tmp_path / f"{algo}.safetensors", model.kind)


def _verdicts(path):
    return {v["tool"]: v for v in file_info(path)["compatibility"]}


@pytest.mark.parametrize(
    ("algo", "options", "expected"),
    [
        ("lora", {"rank": 2}, {"ComfyUI": "loads", "A1111": "loads", "diffusers": "loads", "LyCORIS": "does not load"}),
        (
            "loha",
            {"rank": 2},
            {"ComfyUI": "loads", "A1111": "loads", "diffusers": "does not load", "LyCORIS": "does not load"},
        ),
        (
            "lokr",
            {"rank": 2},
            {"ComfyUI": "loads", "A1111": "loads", "diffusers": "does not load", "LyCORIS": "does not load"},
        ),
        (
            "ia3",
            {},
            {
                "ComfyUI": "does not load",
                "A1111": "loads partly",
                "diffusers": "does not load",
                "LyCORIS": "does not load",
            },
        ),
        (
            "glora",
            {"rank": 2},
            {"ComfyUI": "loads", "A1111": "does not load", "diffusers": "does not load", "LyCORIS": "does not load"},
        ),
        (
            "boft",
            {"rank": 2},
            {"ComfyUI": "loads", "A1111": "loads", "diffusers": "does not load", "LyCORIS": "does not load"},
        ),
        ("full", {}, {"ComfyUI": "loads", "A1111": "loads", "diffusers": "does not load", "LyCORIS": "does not load"}),
    ],
)
def test_info_compatibility_per_algorithm(sd1, tmp_path, algo, options, expected):
    verdicts = _verdicts(_saved(sd1, tmp_path, algo, **options))
    assert {tool: v["status"] for tool, v in verdicts.items()} == expected


def test_info_warns_about_each_tools_deviations(sd1, tmp_path):
    dora = _verdicts(_saved(sd1, tmp_path, "lora", rank=2, weight_decompose=True))
    assert "ComfyUI divides by ‖W0‖" in " ".join(dora["ComfyUI"]["notes"])
    assert "only the input axis" in " ".join(dora["A1111"]["notes"])
    assert "drops dora_scale" in " ".join(dora["diffusers"]["notes"])
    assert all(v["status"] == "loads with deviation" for tool, v in dora.items() if tool != "LyCORIS")
    assert "reads only lycoris_ names" in " ".join(dora["LyCORIS"]["notes"])  # kohya names: 0 modules
    legacy = _verdicts(_saved(sd1, tmp_path, "lora", rank=2, weight_decompose=True, wd_on_output=False))
    assert legacy["ComfyUI"]["status"] == legacy["A1111"]["status"] == "loads"

    net = sd_network(sd1, "attn-mlp", "oft", rank=2, constraint=1e-3)
    randomize(net, std=0.05)  # ‖Q‖ > α (ComfyUI clamps) but < α·out (we do not)
    oft = _verdicts(save_sd_network(net, tmp_path / "oft.safetensors", "sd1"))
    assert oft["ComfyUI"]["status"] == "loads with deviation"
    assert "α instead of α·out" in " ".join(oft["ComfyUI"]["notes"])


def test_info_cli_text_and_json(sd1, tmp_path, capsys):
    path = _saved(sd1, tmp_path, "lokr", rank=2, factor=4)
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    for needle in ("lokr", "lora_unet", "lora_te", "sd1", "ComfyUI", "A1111", "diffusers", "sshs_model_hash"):
        assert needle in text
    assert main(["info", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["algorithms"] == {"lokr": data["modules"]}
    assert set(data["modules_per_prefix"]) == {"lora_unet", "lora_te"}
    assert data["base_model_version"] == "sd_v1" and set(data["dtypes"]) == {"float32"}


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    model = tiny_sd_parts("sd1", seed=0)
    net = sd_network(model, "attn-mlp", "lora", rank=2)
    randomize(net, std=0.05)
    return save_sd_network(net, tmp_path_factory.mktemp("good") / "good.safetensors", "sd1")


def test_truncated_corrupt_and_empty_files_are_named(good_file, tmp_path, sd1):
    data = good_file.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[:8] + b"{not json" + data[17:])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for path in (truncated, corrupt, empty):
        with pytest.raises(HiganbanaError, match=path.name):
            load_sd_network(path, sd1)
        assert main(["info", str(path)]) == 2
    no_tensors = save_tensors({}, tmp_path / "none.safetensors")
    with pytest.raises(HiganbanaError, match="holds no tensors"):
        load_sd_network(no_tensors, sd1)


def test_nan_and_inf_are_refused_naming_the_modules(good_file, tmp_path, sd1):
    tensors, meta = load_tensors(good_file)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    path = save_tensors(tensors, tmp_path / "nan.safetensors", meta)
    module = key.partition(".")[0]
    with pytest.raises(HiganbanaError, match=f"NaN/Inf values in 1 module.*{module}"):
        load_sd_network(path, sd1)
    info = file_info(path)  # info describes the file, and says why every reader refuses it
    assert info["non_finite_modules"] == [module]
    assert main(["info", str(path)]) == 1


def test_wrong_shapes_strict_and_non_strict(good_file, tmp_path, sd1):
    tensors, meta = load_tensors(good_file)
    modules = len(tensors) // 3  # lora_down, lora_up, alpha
    key = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[key] = torch.zeros(2, tensors[key].shape[1] + 1)
    tensors["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(2, 2)
    path = save_tensors(
        tensors, tmp_path / "shapes.safetensors", {k: v for k, v in meta.items() if "higanbana" not in k}
    )
    with pytest.raises(HiganbanaError) as info:
        load_sd_network(path, sd1)
    assert "lora_unet_not_a_module" in str(info.value)
    del tensors["lora_unet_not_a_module.lora_up.weight"]
    path = save_tensors(tensors, tmp_path / "shapes2.safetensors")
    with pytest.raises(HiganbanaError, match=key.partition(".")[0]):
        load_sd_network(path, sd1)
    tensors["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(2, 2)
    tensors["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(2, 2)
    path = save_tensors(tensors, tmp_path / "shapes3.safetensors")
    net = load_sd_network(path, sd1, strict=False)
    report = net.load_report
    assert key.partition(".")[0] in report.mismatched
    assert "lora_unet_not_a_module.lora_up.weight" in report.unexpected
    assert len(report.loaded) == modules - 1


def test_unknown_suffixes_are_named(tmp_path, sd1):
    path = save_tensors({"lora_unet_conv_in.weird_key": torch.zeros(2)}, tmp_path / "weird.safetensors")
    with pytest.raises(HiganbanaError, match="lora_unet_conv_in.*weird_key"):
        load_sd_network(path, sd1)


def test_sdxl_file_on_an_sd1_model_says_so(sd1, sdxl, tmp_path):
    net = sd_network(sdxl, "attn-mlp", "lora", rank=2)
    with_meta = save_sd_network(net, tmp_path / "xl.safetensors", "sdxl")
    with pytest.raises(HiganbanaError, match="made for SDXL.*model is SD1.x"):
        load_sd_network(with_meta, sd1)
    bare = save_tensors(net.state_tensors(), tmp_path / "xl_bare.safetensors")
    with pytest.raises(HiganbanaError, match="SDXL file on an SD1.x/2.x model"):
        load_sd_network(bare, sd1)
    sd1_net = sd_network(sd1, "attn-mlp", "lora", rank=2)
    bare1 = save_tensors(sd1_net.state_tensors(), tmp_path / "sd1_bare.safetensors")
    with pytest.raises(HiganbanaError, match="SD1.x/2.x file"):
        load_sd_network(bare1, sdxl)


def test_pickles_need_the_unsafe_flag(good_file, tmp_path, sd1):
    tensors, _ = load_tensors(good_file)
    path = tmp_path / "net.pt"
    torch.save(tensors, path)
    with pytest.raises(HiganbanaError, match="unsafe-pickle"):
        load_sd_network(path, sd1)
    assert main(["info", str(path)]) == 2
    net = load_sd_network(path, sd1, unsafe_pickle=True)
    assert len(net) == len(tensors) // 3
    assert main(["info", str(path), "--unsafe-pickle"]) == 0


def test_safetensors_header_is_plain_json(good_file):
    with safe_open(str(good_file), framework="pt") as f:
        assert f.metadata()["ss_network_module"] == "higanbana.kohya"


def _diffusers_keys(net, tensors):
    """Our LoRA tensors under diffusers' native names (``unet.<diffusers path>.lora_A.weight`` …, no alpha)."""
    roots = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
    out = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix == "alpha":
            continue
        record = net.records[name]
        head = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}[suffix]
        out[f"{roots[record.prefix]}.{record.path}.{head}"] = value
    return out


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_diffusers_named_files_load_on_sd_models(kind, tmp_path):
    """diffusers names are module paths: on SDXL they are not the SGM names we write, and transformers 5
    paths lack ``text_model.``; both resolve to the same modules."""
    model = tiny_sd_parts(kind, seed=0)
    net = sd_network(model, "attn-mlp", "lora", rank=2)  # alpha = rank: scale 1, as a file without alpha
    randomize(net, std=0.1)
    path = save_tensors(_diffusers_keys(net, net.state_tensors()), tmp_path / "diffusers.safetensors")
    loaded = load_sd_network(path, tiny_sd_parts(kind, seed=0))
    assert set(loaded.adapters) == set(net.adapters)
    for name, adapter in net:
        torch.testing.assert_close(loaded.adapters[name].merged_weight(1.0), adapter.merged_weight(1.0))


def test_kohya_oft_and_simpletuner_lycoris_names_load(sd1, tmp_path):
    net = sd_network(sd1, "unet-transformer-only", "oft", rank=4)
    randomize(net, std=0.05)
    tensors = net.state_tensors()
    oft = {k.replace("lora_unet_", "oft_unet_", 1): v for k, v in tensors.items()}
    lycoris = {k.replace("lora_unet_", "lycoris_", 1): v for k, v in tensors.items()}
    for label, renamed in (("oft", oft), ("lycoris", lycoris)):
        loaded = load_sd_network(save_tensors(renamed, tmp_path / f"{label}.safetensors"), sd1)
        assert set(loaded.adapters) == set(net.adapters), label
        for name, adapter in net:
            torch.testing.assert_close(loaded.adapters[name].merged_weight(1.0), adapter.merged_weight(1.0))


def test_export_peft_round_trip(sd1, tmp_path):
    from higanbana.formats import export_peft
    from higanbana.formats.detect import load_peft_folder

    net = sd_network(sd1, "attn-mlp", "lora", rank=2, alpha=1)
    randomize(net, std=0.1)
    with pytest.raises(HiganbanaError, match="choose part"):
        export_peft(net, tmp_path / "peft")
    folder = export_peft(net, tmp_path / "peft", part="lora_unet")
    tensors, config = load_peft_folder(folder, peft_prefix="lora_unet")
    assert config["peft_type"] == "LORA" and (folder / "adapter_model.safetensors").is_file()
    unet_part = next(p for p in net.parts.values() if p.prefix == "lora_unet")
    records = {n: {"algo": "lora", "options": None} for n in {k.partition(".")[0] for k in tensors}}
    loaded = network_from_records([unet_part], records, tensors)
    unet_modules = [n for n in net.adapters if n.startswith("lora_unet")]
    assert sorted(loaded.adapters) == sorted(unet_modules)
    for name in unet_modules:
        torch.testing.assert_close(loaded.adapters[name].merged_weight(1.0), net.adapters[name].merged_weight(1.0))
    oft = sd_network(sd1, "unet-transformer-only", "oft", rank=4)
    with pytest.raises(HiganbanaError, match="(?i)oft"):
        export_peft(oft, tmp_path / "oft", part="lora_unet")
