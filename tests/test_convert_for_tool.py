"""``convert --for TOOL``: a file rewritten into an exactly equivalent layout the tool reads.

Each case saves a file ``info`` says the tool fails on, converts it, and checks that ``info`` now says
the tool loads it and that every module of the output merges (at strength 1 and 0.5) to the same
weights as the source. ``tests/interop/test_lycoris_reads_ours.py`` loads the LyCORIS outputs in the
real lycoris-lora; the ComfyUI and diffusers layouts written here (dense LoKr blocks, plain conv
LoRA) are the ones the parity tests merge with those tools' reference loaders.
"""

from __future__ import annotations

import copy

import pytest
import torch

from higanbana.cli import main
from higanbana.errors import HiganbanaError
from higanbana.formats import load_network
from higanbana.formats.inspect import file_info
from higanbana.formats.reader import read_network_file
from higanbana.formats.sd_network import load_sd_network, save_sd_network, sd_network
from higanbana.models.tiny import tiny_sd_parts
from higanbana.tools.convert import convert

from .algorithms.cases import randomize


@pytest.fixture(scope="module")
def sd1():
    return tiny_sd_parts("sd1", seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sd_parts("sdxl", seed=0)


def _status(path, tool):
    return {v["tool"]: v for v in file_info(path)["compatibility"]}[tool]


def _saved(model, tmp_path, algo, preset="full", **options):
    net = sd_network(copy.deepcopy(model), preset, algo, **options)
    randomize(net, std=0.05)
    return net, save_sd_network(net, tmp_path / f"{algo}.safetensors", model.kind)


def _same_weights(source, converted, names):
    for name in names:
        for strength in (1.0, 0.5):
            torch.testing.assert_close(
                converted.adapters[names[name]].merged_weight(strength).double(),
                source.adapters[name].merged_weight(strength).double(),
                rtol=1e-5,
                atol=1e-6,
                msg=lambda m, name=name: f"{name}: {m}",
            )


@pytest.mark.parametrize(
    ("tool", "algo", "options", "rewritten"),
    [
        ("comfyui", "lokr", {"rank": 2, "factor": 2, "use_tucker": True}, "lokr"),
        ("diffusers", "lora", {"rank": 2, "use_tucker": True}, "lora"),
    ],
)
def test_convert_for_a_tool_makes_it_load_with_the_same_weights(sd1, tmp_path, tool, algo, options, rewritten):
    net, path = _saved(sd1, tmp_path, algo, **options)
    name = {"comfyui": "ComfyUI", "diffusers": "diffusers"}[tool]
    assert _status(path, name)["status"] != "loads"
    out = tmp_path / f"for-{tool}.safetensors"
    report = convert(path, out, for_tool=tool, progress=False)
    assert any(f"{rewritten} module(s) rewritten" in note for note in report.notes)
    assert f"{name}: loads" in report.notes
    assert _status(out, name)["status"] == "loads"
    converted = load_sd_network(out, copy.deepcopy(sd1))
    _same_weights(net, converted, {n: n for n in net.adapters})


def test_convert_for_lycoris_renames_drops_text_encoders_and_pads_boft_stages(sd1, tmp_path):
    net, path = _saved(sd1, tmp_path, "boft", rank=4, boft_stages=1)
    assert _status(path, "LyCORIS")["status"] == "does not load"
    out = tmp_path / "for-lycoris.safetensors"
    with pytest.raises(HiganbanaError, match="text-encoder module.*allow_lossy"):
        convert(path, out, for_tool="lycoris", progress=False)
    report = convert(path, out, for_tool="lycoris", allow_lossy=True, progress=False)
    assert report.dropped and all(n.startswith("lora_te_") for n in report.dropped)
    assert _status(out, "LyCORIS")["status"] == "loads"
    _tensors, records, metadata = read_network_file(out)
    assert all(n.startswith("lycoris_") for n in records) and metadata["higanbana.prefix"] == "lycoris"
    unet = copy.deepcopy(sd1.unet)
    converted = load_network(out, unet, prefix="lycoris")
    unet_names = {n: "lycoris_" + n.removeprefix("lora_unet_") for n in net.adapters if n.startswith("lora_unet_")}
    _same_weights(net, converted, unet_names)


def test_convert_for_lycoris_on_sdxl_takes_the_diffusers_paths_from_the_model(sdxl, tmp_path):
    net, path = _saved(sdxl, tmp_path, "lokr", rank=2, factor=2, use_tucker=True)
    out = tmp_path / "sdxl-for-lycoris.safetensors"
    with pytest.raises(HiganbanaError, match="SGM paths.*base"):
        convert(path, out, for_tool="lycoris", allow_lossy=True, progress=False)
    convert(path, out, for_tool="lycoris", allow_lossy=True, model=copy.deepcopy(sdxl), progress=False)
    assert _status(out, "LyCORIS")["status"] == "loads"
    unet = copy.deepcopy(sdxl.unet)
    converted = load_network(out, unet, prefix="lycoris")
    names = {
        n: "lycoris_" + record.path.replace(".", "_")
        for n, record in net.records.items()
        if record.prefix == "lora_unet"
    }
    assert set(names.values()) == set(converted.adapters)
    _same_weights(net, converted, names)


def test_convert_for_cli_prints_what_info_says_and_refuses_other_targets(sd1, tmp_path, capsys):
    _net, path = _saved(sd1, tmp_path, "lokr", rank=2, factor=2, use_tucker=True)
    out = tmp_path / "cli.safetensors"
    assert main(["convert", str(path), str(out), "--for", "comfyui"]) == 0
    text = capsys.readouterr().out
    assert "for ComfyUI" in text and "ComfyUI: loads" in text
    assert main(["convert", str(path), str(tmp_path / "x"), "--for", "comfyui", "--to", "peft"]) == 2
    assert "leave out --to peft" in capsys.readouterr().err


def test_info_suggests_the_conversion(sd1, tmp_path):
    _net, path = _saved(sd1, tmp_path, "lokr", rank=2, factor=2, use_tucker=True)
    notes = {tool: " ".join(_status(path, tool)["notes"]) for tool in ("ComfyUI", "LyCORIS")}
    assert "convert --for comfyui" in notes["ComfyUI"]
    assert "convert --for lycoris" in notes["LyCORIS"]


def test_convert_for_a_tool_keeps_lycoris_names_where_the_tool_reads_them(sd1, tmp_path):
    _net, path = _saved(sd1, tmp_path, "lokr", rank=2, factor=2, use_tucker=True)
    lycoris = tmp_path / "lycoris.safetensors"
    convert(path, lycoris, for_tool="lycoris", allow_lossy=True, progress=False)
    again = tmp_path / "again.safetensors"  # with the model too: the names stay LyCORIS's
    convert(lycoris, again, for_tool="lycoris", model=copy.deepcopy(sd1), progress=False)
    assert set(read_network_file(again)[1]) == set(read_network_file(lycoris)[1])
    comfy = tmp_path / "comfy.safetensors"  # ComfyUI maps lycoris_ UNet names: no model needed
    convert(lycoris, comfy, for_tool="comfyui", progress=False)
    assert all(n.startswith("lycoris_") for n in read_network_file(comfy)[1])
    assert _status(comfy, "ComfyUI")["status"] == "loads"
    with pytest.raises(HiganbanaError, match="lycoris_ prefix.*base"):  # A1111 needs kohya names
        convert(lycoris, tmp_path / "a1111.safetensors", for_tool="a1111", progress=False)
