"""The bad-input corpus for the file tools' arguments: merge, extract, resize, convert and info.

Each case is a command line a user could type; each must end in one ``error:`` line naming what is
wrong (exit 2), leave nothing behind, and never show a traceback. Ctrl-C, a closed pipe and
unwritable outputs are covered at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from higanbana.formats import load_tensors, save_tensors
from higanbana.formats.sd_network import save_sd_network, sd_network
from higanbana.models.tiny import save_tiny_sd, tiny_sd_parts

from ..algorithms.cases import randomize
from .conftest import assert_refused, cli


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Base and tuned tiny SD1 folders, a LoRA and a LoHa file, a PEFT folder, a NaN-weight model."""
    root = tmp_path_factory.mktemp("tools")
    parts = tiny_sd_parts("sd1", seed=0)
    base = save_tiny_sd(parts, root / "base")
    net = sd_network(parts, "attn-only", "lora", rank=2, train_text_encoder=False)
    randomize(net, std=0.05)
    lora = save_sd_network(net, root / "lora.safetensors", "sd1")
    net.detach()
    net = sd_network(parts, "attn-only", "loha", rank=2, train_text_encoder=False)
    randomize(net, std=0.05)
    loha = save_sd_network(net, root / "loha.safetensors", "sd1")
    net.detach()
    tuned = save_tiny_sd(tiny_sd_parts("sd1", seed=1), root / "tuned")
    nan_parts = tiny_sd_parts("sd1", seed=1)
    with torch.no_grad():
        nan_parts.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    nan_model = save_tiny_sd(nan_parts, root / "nan-model")
    sdxl = tiny_sd_parts("sdxl", seed=0)
    net = sd_network(sdxl, "attn-only", "lora", rank=2, train_text_encoder=False)
    sdxl_file = save_sd_network(net, root / "sdxl.safetensors", "sdxl")
    net.detach()
    assert cli("convert", lora, root / "peft", "--to", "peft", "--base", base).code == 0
    (root / "afile").write_text("a file, not a folder")
    return {
        "root": root,
        "base": base,
        "tuned": tuned,
        "lora": lora,
        "loha": loha,
        "peft": root / "peft",
        "nan_model": nan_model,
        "sdxl_file": sdxl_file,
        "afile": root / "afile",
    }


def _args(world, tmp_path, template: tuple[str, ...]) -> list[str]:
    return [str(a).format(**{k: str(v) for k, v in world.items()}, out=tmp_path) for a in template]


#: (id, command line with {placeholders}, fragments of the error line)
CASES = [
    # ---- merge
    ("merge-strength-nan", ("merge", "{base}", "{out}/m", "--lora", "{lora}:nan"), ("strength nan",)),
    ("merge-strength-inf", ("merge", "{base}", "{out}/m", "--lora", "{lora}:inf"), ("strength inf",)),
    ("merge-strength-minf", ("merge", "{base}", "{out}/m", "--lora", "{lora}:-inf"), ("finite",)),
    ("merge-strength-overflow", ("merge", "{base}", "{out}/m", "--lora", "{lora}:1e39", "--dtype", "fp16"), ("overflow",)),
    ("merge-missing-lora", ("merge", "{base}", "{out}/m", "--lora", "{out}/nope.safetensors"), ("no such file",)),
    ("merge-lora-folder", ("merge", "{base}", "{out}/m", "--lora", "{out}"), ("is a folder",)),
    ("merge-missing-base", ("merge", "{out}/nobase", "{out}/m", "--lora", "{lora}"), ("nobase",)),
    ("merge-base-is-lora", ("merge", "{lora}", "{out}/m", "--lora", "{lora}"), ("lora.safetensors",)),
    ("merge-no-lora", ("merge", "{base}", "{out}/m"), ("--lora",)),
    ("merge-bad-dtype", ("merge", "{base}", "{out}/m", "--lora", "{lora}", "--dtype", "fp8"), ("--dtype", "fp8")),
    ("merge-bad-kind", ("merge", "{base}", "{out}/m", "--lora", "{lora}", "--kind", "sd3"), ("--kind",)),
    ("merge-out-exists", ("merge", "{base}", "{base}", "--lora", "{lora}"), ("already exists",)),
    ("merge-out-is-input", ("merge", "{base}", "{base}", "--lora", "{lora}", "--overwrite"), ("would replace",)),
    ("merge-parent-is-file", ("merge", "{base}", "{afile}/m", "--lora", "{lora}"), ("cannot write", "afile")),
    ("merge-sdxl-file", ("merge", "{base}", "{out}/m", "--lora", "{sdxl_file}"), ("SDXL",)),
    ("merge-pickle", ("merge", "{base}", "{out}/m", "--lora", "{out}/x.pt"), ("pickle",)),
    # ---- extract
    ("extract-nan-param", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--linear-param", "nan"), ("nan",)),
    ("extract-inf-param", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--linear-param", "inf"), ("inf",)),
    ("extract-conv-nan", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--conv-param", "nan"), ("conv_param",)),
    ("extract-rank-0", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--linear-param", "0"), ("positive",)),
    ("extract-rank-frac", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--linear-param", "2.5"), ("integer",)),
    ("extract-ratio-2", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--mode", "ratio", "--linear-param", "2"), ("ratio",)),
    ("extract-quantile-neg", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--mode", "quantile", "--linear-param", "-1"), ("quantile",)),
    ("extract-threshold-neg", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--mode", "threshold", "--linear-param", "-1"), ("threshold",)),
    ("extract-randomized-ratio", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--mode", "ratio", "--linear-param", "0.5", "--randomized"), ("randomized",)),
    ("extract-oversample", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--oversample", "-1"), ("oversample",)),
    ("extract-niter", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--niter", "-2"), ("niter",)),
    ("extract-min-diff-nan", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--min-diff", "nan"), ("min_diff",)),
    ("extract-min-diff-neg", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--min-diff", "-1"), ("min_diff",)),
    ("extract-not-safetensors", ("extract", "{base}", "{tuned}", "{out}/e.pt"), (".safetensors",)),
    ("extract-parent-is-file", ("extract", "{base}", "{tuned}", "{afile}/e.safetensors"), ("cannot write", "afile")),
    ("extract-out-exists", ("extract", "{base}", "{tuned}", "{lora}"), ("exists",)),
    ("extract-missing-tuned", ("extract", "{base}", "{out}/nothing", "{out}/e.safetensors"), ("nothing",)),
    ("extract-nan-weights", ("extract", "{base}", "{nan_model}", "{out}/e.safetensors", "--linear-param", "2"), ("NaN/Inf",)),
    ("extract-same-model", ("extract", "{base}", "{base}", "{out}/e.safetensors", "--linear-param", "2"), ("does not differ",)),
    ("extract-bad-mode", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--mode", "best"), ("--mode",)),
    ("extract-param-text", ("extract", "{base}", "{tuned}", "{out}/e.safetensors", "--linear-param", "big"), ("--linear-param",)),
    # ---- resize
    ("resize-nan", ("resize", "{lora}", "{out}/r.safetensors", "--rank", "nan"), ("finite",)),
    ("resize-inf", ("resize", "{lora}", "{out}/r.safetensors", "--rank", "inf"), ("finite",)),
    ("resize-conv-nan", ("resize", "{lora}", "{out}/r.safetensors", "--rank", "1", "--conv-param", "nan"), ("conv_param",)),
    ("resize-rank-0", ("resize", "{lora}", "{out}/r.safetensors", "--rank", "0"), ("rank ≥ 1",)),
    ("resize-rank-frac", ("resize", "{lora}", "{out}/r.safetensors", "--rank", "1.5"), ("whole rank",)),
    ("resize-ratio-2", ("resize", "{lora}", "{out}/r.safetensors", "--mode", "ratio", "--param", "2"), ("ratio",)),
    ("resize-ratio-0", ("resize", "{lora}", "{out}/r.safetensors", "--mode", "ratio", "--param", "0"), ("ratio",)),
    ("resize-threshold-neg", ("resize", "{lora}", "{out}/r.safetensors", "--mode", "threshold", "--param", "-1"), ("threshold",)),
    ("resize-quantile-0", ("resize", "{lora}", "{out}/r.safetensors", "--mode", "quantile", "--param", "0"), ("quantile",)),
    ("resize-loha", ("resize", "{loha}", "{out}/r.safetensors", "--rank", "1"), ("--skip-other",)),
    ("resize-not-safetensors", ("resize", "{lora}", "{out}/r.ckpt", "--rank", "1"), (".safetensors",)),
    ("resize-out-exists", ("resize", "{lora}", "{loha}", "--rank", "1"), ("exists",)),
    ("resize-parent-is-file", ("resize", "{lora}", "{afile}/r.safetensors", "--rank", "1"), ("cannot write", "afile")),
    ("resize-missing-input", ("resize", "{out}/none.safetensors", "{out}/r.safetensors", "--rank", "1"), ("no such file",)),
    ("resize-no-param", ("resize", "{lora}", "{out}/r.safetensors"), ("--param",)),
    ("resize-bad-dtype", ("resize", "{lora}", "{out}/r.safetensors", "--rank", "1", "--dtype", "int8"), ("--dtype",)),
    # ---- convert
    ("convert-same-file", ("convert", "{lora}", "{lora}", "--overwrite"), ("the output is the input",)),
    ("convert-to-folder-kohya", ("convert", "{lora}", "{out}"), ("is a folder",)),
    ("convert-kohya-suffix", ("convert", "{lora}", "{out}/x.bin"), (".safetensors",)),
    ("convert-peft-into-file", ("convert", "{lora}", "{loha}", "--to", "peft", "--base", "{base}"), ("is a file",)),
    ("convert-peft-no-base", ("convert", "{lora}", "{out}/p", "--to", "peft"), ("--base",)),
    ("convert-peft-exists", ("convert", "{lora}", "{peft}", "--to", "peft", "--base", "{base}"), ("exist",)),
    ("convert-bad-target", ("convert", "{lora}", "{out}/p", "--to", "onnx"), ("--to",)),
    ("convert-prefix-map", ("convert", "{lora}", "{out}/x.safetensors", "--prefix-map", "lycoris"), ("OLD=NEW",)),
    ("convert-prefix-clash", ("convert", "{lora}", "{out}/x.safetensors", "--prefix-map", "lora_unet=lycoris"), ("lycoris_ prefix",)),
    ("convert-loha-to-diffusers", ("convert", "{loha}", "{out}/d", "--to", "diffusers", "--base", "{base}"), ("diffusers",)),
    ("convert-parent-is-file", ("convert", "{lora}", "{afile}/x.safetensors"), ("cannot write", "afile")),
    ("convert-missing-src", ("convert", "{out}/none", "{out}/x.safetensors"), ("none",)),
    ("convert-empty-folder", ("convert", "{out}", "{out}/x.safetensors"), ("adapter_model.safetensors",)),
    ("convert-bad-part", ("convert", "{lora}", "{out}/p", "--to", "peft", "--base", "{base}", "--part", "lora_vae"), ("lora_vae",)),
    # ---- info and the top level
    ("info-missing", ("info", "{out}/none.safetensors"), ("no such file",)),
    ("info-no-args", ("info",), ("file",)),
    ("unknown-command", ("mrege",), ("mrege",)),
    ("unknown-option", ("info", "{lora}", "--jsonn"), ("--jsonn",)),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused(case, world, tmp_path, unchanged):
    _id, template, fragments = case
    args = _args(world, tmp_path, template)
    if "x.pt" in " ".join(args):
        torch.save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    with unchanged(tmp_path, world["root"]):
        assert_refused(cli(*args), *fragments)


def test_peft_sources(world, tmp_path, unchanged):
    """PEFT folders with a damaged config, an unknown peft_type, NaN weights: one error line each."""
    cases = {
        "bad-json": ("{not json", None, "not valid JSON"),
        "oft": (json.dumps({"peft_type": "OFT", "r": 2}), None, "peft_type"),
        "alpha-0": (json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 0}), None, "alpha 0"),
        "nan": (None, "nan", "NaN/Inf"),
        "int": (None, "int", "int32"),
    }
    for name, (config, change, fragment) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        cfg = (world["peft"] / "adapter_config.json").read_text()
        (folder / "adapter_config.json").write_text(config if config is not None else cfg)
        tensors, meta = load_tensors(world["peft"] / "adapter_model.safetensors")
        key = sorted(tensors)[0]
        if change == "nan":
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] = float("nan")
        elif change == "int":
            tensors[key] = tensors[key].to(torch.int32)
        save_tensors(tensors, folder / "adapter_model.safetensors", meta)
        with unchanged(tmp_path):
            assert_refused(cli("convert", folder, tmp_path / "out.safetensors"), fragment)


def test_ctrl_c_is_one_line_and_leaves_nothing(world, tmp_path, unchanged, monkeypatch):
    """Ctrl-C in the middle of a merge: one line (exit 130), no temporary and no output left."""
    from higanbana.formats import streaming

    calls = {"n": 0}
    real = streaming._write_bytes

    def interrupt(f, data):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real(f, data)

    monkeypatch.setattr(streaming, "_write_bytes", interrupt)
    with unchanged(tmp_path):
        result = cli("merge", world["base"], tmp_path / "merged", "--lora", world["lora"])
    assert result.code == 130 and calls["n"] == 5
    assert result.err.strip().splitlines()[-1] == "interrupted; nothing was written"
    assert "Traceback" not in result.err


def test_a_closed_pipe_is_a_quiet_exit(world):
    """`higanbana info F | head -1`: no BrokenPipeError traceback."""
    proc = subprocess.run(
        f"{sys.executable} -m higanbana info {world['lora']} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=300,
    )
    assert proc.stdout.startswith("file ") and proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_info_json_of_a_damaged_file(world, tmp_path):
    tensors, meta = load_tensors(world["lora"])
    key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    path = save_tensors(tensors, tmp_path / "inf.safetensors", meta)
    result = cli("info", path, "--json")
    info = json.loads(result.out)
    assert result.code == 1 and info["non_finite_modules"] == [key.partition(".")[0]]
    assert {v["status"] for v in info["compatibility"]} <= {"loads with deviation", "loads partly", "does not load"}
