"""The offline parts of ``scripts/kohya_sd_scripts_check.py`` (no sd-scripts needed): the model,
tokenizer and dataset builder writes what sd-scripts' loaders read, and the post-run checker tells a
trained, faithfully saved file from one that was not trained, does not load or differs from the network."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def mods():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield {name: importlib.import_module(name) for name in ("kohya_fixture", "kohya_verify", "kohya_probe")}
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def check(mods):
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("kohya_sd_scripts_check")
    finally:
        sys.path.remove(str(SCRIPTS))


# --------------------------------------------------------------------------- builder
def test_tokenizer_cache_is_what_sd_scripts_reads(mods, tmp_path):
    from transformers import CLIPTokenizer

    from higanbana.models.tiny import tiny_clip_tokenizer

    fixture = mods["kohya_fixture"]
    folder = fixture.write_tokenizer_cache(tmp_path)
    # library/strategy_base.py: os.path.join(tokenizer_cache_dir, "openai/clip-vit-large-patch14".replace("/", "_"))
    assert folder == tmp_path / "openai_clip-vit-large-patch14"
    tok = CLIPTokenizer.from_pretrained(str(folder))
    assert tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (fixture.BOS_ID, fixture.EOS_ID, fixture.EOS_ID)
    text = "a photo of sks, red square"
    ids = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == fixture.BOS_ID and ids[-1] == fixture.EOS_ID
    assert tok(text).input_ids == tiny_clip_tokenizer()(text).input_ids  # the project's offline vocabulary
    assert max(ids) < fixture.SD15_TEXT_ENCODER["vocab_size"]


def test_dataset_is_a_kohya_folder(mods, tmp_path):
    from PIL import Image

    folder = mods["kohya_fixture"].write_dataset(tmp_path / "data")
    assert folder.parent == tmp_path / "data" and folder.name == "1_sks"  # <repeats>_<concept>
    images = sorted(folder.glob("*.png"))
    assert len(images) == 4
    for image in images:
        with Image.open(image) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
            assert len(set(im.tobytes())) > 1
        assert image.with_suffix(".txt").read_text(encoding="utf-8").startswith("a photo of sks")


def test_full_size_configs_are_sd15(mods):
    """The full-size model is SD1.5's architecture (parameter counts of the real model), built on meta."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    fixture = mods["kohya_fixture"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**fixture.SD15_UNET)
        te = CLIPTextModel(CLIPTextConfig(**fixture.SD15_TEXT_ENCODER))
        vae = AutoencoderKL(**fixture.SD15_VAE)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    assert count(te) == 123_060_480
    assert count(vae) == 83_653_863
    # sd-scripts' own UNet (library/original_unet.py) hard-codes these widths
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)


def test_tiny_model_folder_loads_as_sd_scripts_loads_it(mods, tmp_path):
    from diffusers import StableDiffusionPipeline

    root = mods["kohya_fixture"].write_model(tmp_path / "model", size="tiny")
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "text_encoder", "vae", "scheduler", "tokenizer"):
        assert (root / sub).is_dir()
    config = json.loads((root / "unet" / "config.json").read_text(encoding="utf-8"))
    # train_util._load_target_model rebuilds the UNet from these config fields
    for key in (
        "sample_size",
        "attention_head_dim",
        "cross_attention_dim",
        "use_linear_projection",
        "upcast_attention",
    ):
        assert key in config
    pipe = StableDiffusionPipeline.from_pretrained(str(root), tokenizer=None, safety_checker=None)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.eos_token_id == mods["kohya_fixture"].EOS_ID


# --------------------------------------------------------------------------- post-run checker
@pytest.fixture
def trained_run(mods, tmp_path, monkeypatch):
    """A tiny SD1 network driven the way train_network.py drives it, under the probe; returns a
    function that "trains" (perturbs) it or not and saves, giving ``(file, probe_dir, net)``."""
    from higanbana.integrations import kohya
    from higanbana.models.tiny import tiny_sd_parts

    original = {
        "prepare": kohya.KohyaNetwork.prepare_optimizer_params,
        "save": kohya.KohyaNetwork.save_weights,
    }
    parts = tiny_sd_parts("sd1")
    te, unet = parts.text_encoders[0], parts.unet

    def run(name: str = "lora", train: bool = True, algo: str = "lora", weights: Path | None = None, **net_args):
        probe = tmp_path / name / "probe"
        probe.mkdir(parents=True)
        monkeypatch.setattr(kohya.KohyaNetwork, "prepare_optimizer_params", original["prepare"])
        monkeypatch.setattr(kohya.KohyaNetwork, "save_weights", original["save"])
        mods["kohya_probe"].install(probe)  # wraps the originals; monkeypatch restores them after the test
        net = kohya.create_network(1.0, 4, 2, None, te, unet, algo=algo, conv_dim="4", **net_args)
        net.apply_to(te, unet, True, True)
        if weights is not None:
            net.load_weights(weights)
        net.prepare_optimizer_params(1e-4, 1e-4, 1e-4)
        if train:
            gen = torch.Generator().manual_seed(len(name))
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 1e-2)
        file = tmp_path / name / f"{name}.safetensors"
        net.save_weights(file, None, {"ss_network_module": "higanbana.kohya"})
        net.detach()
        return file, probe, net

    return run


def test_trained_and_faithful_file_passes(mods, trained_run):
    file, probe, _ = trained_run("lora", algo="lokr")
    saves = json.loads((probe / "save.json").read_text(encoding="utf-8"))["saves"]
    assert "error" not in saves[-1], saves[-1].get("traceback")
    rebuilt = saves[-1]["rebuilt"]
    assert rebuilt["records_equal"] and rebuilt["modules_rebuilt"] == rebuilt["modules_live"] > 0
    assert rebuilt["merged_weight_max_abs_diff"] == 0.0 and rebuilt["forward_modules_compared"] > 0
    verdict = mods["kohya_verify"].verify_run(file, probe, run_cli=True)
    assert verdict.ok, verdict.notes
    assert verdict.details["info"]["format"] == "higanbana"
    moved, total = verdict.details["moved"].split("/")
    assert moved == total and int(total) > 0


def test_untrained_file_is_caught(mods, trained_run):
    file, probe, _ = trained_run("idle", train=False)
    verdict = mods["kohya_verify"].verify_run(file, probe, run_cli=False)
    assert verdict.loads and verdict.equal and not verdict.trained
    assert any("did not move" in n for n in verdict.notes)


def test_part_with_nothing_adapted_is_caught(mods, trained_run):
    """A preset that matches no layer of a trained part (here: the text encoder) is not "trained"."""
    file, probe, _ = trained_run("no-te", preset="unet-transformer-only")
    verdict = mods["kohya_verify"].verify_run(file, probe, run_cli=False)
    assert verdict.loads and verdict.equal and not verdict.trained
    assert any("no module on lora_te" in n for n in verdict.notes)


def test_file_that_does_not_load_is_caught(mods, trained_run):
    file, probe, _ = trained_run("broken")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = next(k for k in tensors if tensors[k].is_floating_point() and not k.endswith(".alpha"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(file), metadata=meta)
    verdict = mods["kohya_verify"].verify_run(file, probe, run_cli=False)
    assert not verdict.loads and not verdict.ok

    file.write_bytes(b"not a safetensors file")
    verdict = mods["kohya_verify"].verify_run(file, probe, run_cli=False)
    assert not verdict.loads and any("does not load" in n for n in verdict.notes)


def test_file_that_differs_from_the_network_is_caught(mods, trained_run):
    file, probe, _ = trained_run("tampered")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, str(file), metadata=meta)
    verdict = mods["kohya_verify"].verify_run(file, probe, run_cli=False)
    assert verdict.loads and not verdict.equal
    assert any("differ from the live network" in n for n in verdict.notes)


def test_rebuilt_comparison_sees_a_different_network(mods, trained_run):
    file, _, net = trained_run("drift")
    with torch.no_grad():
        next(iter(net.parameters())).add_(1.0)
    out = mods["kohya_probe"].compare_rebuilt(net, str(file))
    assert out["records_equal"] and out["merged_weight_max_abs_diff"] > 0


def test_resume_must_start_from_its_file(mods, trained_run):
    first, _, _ = trained_run("first")
    resumed, probe, _ = trained_run("resumed", weights=first)
    verdict = mods["kohya_verify"].verify_run(resumed, probe, resumed_from=first, run_cli=False)
    assert verdict.ok and verdict.details["resumed_exactly"], verdict.notes
    other, _, _ = trained_run("other")
    verdict = mods["kohya_verify"].verify_run(resumed, probe, resumed_from=other, run_cli=False)
    assert not verdict.trained and any("resume did not start" in n for n in verdict.notes)


# --------------------------------------------------------------------------- the runner's plumbing
def test_cases_cover_every_algorithm_and_commands_use_the_plug_in(check, tmp_path):
    cases = {c.name: c for c in check.default_cases()}
    assert {"lora", "loha", "lokr", "ia3", "glora", "dora", "diag-oft", "boft", "full", "mixed", "resume"} <= set(cases)
    from higanbana.integrations.kohya import parse_network_args

    for case in cases.values():
        args = dict(a.replace("{work}", str(tmp_path)).split("=", 1) for a in case.network_args)
        parse_network_args(args)  # every case's network_args are valid for the plug-in
    cmd = check.train_command(
        cases["resume"],
        python="py",
        sd_scripts=tmp_path / "sd",
        work=tmp_path,
        steps=3,
        probe_dir=tmp_path / "p",
        out_dir=tmp_path / "o",
        extra=[],
    )
    assert cmd[cmd.index("--network_module") + 1] == "higanbana.kohya"
    assert cmd[cmd.index("--save_model_as") + 1] == "safetensors"
    assert cmd[cmd.index("--network_weights") + 1].endswith("runs/lora/out/lora.safetensors")
    assert cmd[1].endswith("kohya_probe.py") and cmd[4].endswith("train_network.py")


def test_cases_build_on_sd15_shapes(check, mods):
    """Each case's network_args and dim build a network on SD1.5's full-width UNet and text encoder
    (meta tensors: shapes only). OFT/BOFT initialise from tensor values, so their cases are left to the
    real run; their block sizes are checked against SD1.5's widths directly."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from higanbana.integrations import kohya

    fixture = mods["kohya_fixture"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**fixture.SD15_UNET)
        te = CLIPTextModel(CLIPTextConfig(**fixture.SD15_TEXT_ENCODER))
    for case in check.default_cases():
        args = dict(a.split("=", 1) for a in case.network_args)
        if "oft" in args.get("algo", "") or args.get("preset", "").endswith(".toml"):
            continue
        with torch.device("meta"):
            net = kohya.create_network(1.0, case.dim, case.alpha, None, te, unet, **args)
        assert len(net.adapters) > 0, case.name
    boft = next(c for c in check.default_cases() if c.name == "boft")
    # BOFT needs an even block size b <= dim with width/b a power of two, for every adapted width
    for width in (4, 320, 640, 1280, 768, 3072):
        assert any(
            b % 2 == 0 and width % b == 0 and (width // b) & (width // b - 1) == 0 for b in range(2, boft.dim + 1)
        ), width


def test_mixed_preset_mixes_algorithms(check, tmp_path):
    from collections import Counter

    from higanbana.integrations import kohya
    from higanbana.models.tiny import tiny_sd_parts

    (tmp_path / "mixed.toml").write_text(check.MIXED_PRESET, encoding="utf-8")
    parts = tiny_sd_parts("sd1")
    net = kohya.create_network(1.0, 4, 2, None, parts.text_encoders[0], parts.unet, preset=str(tmp_path / "mixed.toml"))
    algos = Counter(r["algo"] for r in net.module_records().values())
    assert set(algos) == {"lora", "lokr", "ia3", "loha", "oft"}
    (tmp_path / "attention.toml").write_text(check.ATTENTION_PRESET, encoding="utf-8")
    net = kohya.create_network(
        1.0, 4, 2, None, parts.text_encoders[0], parts.unet, algo="full", preset=str(tmp_path / "attention.toml")
    )
    paths = [r.path for r in net.records.values()]
    assert any(p.endswith("attn1.to_q") for p in paths) and any(p.endswith("self_attn.k_proj") for p in paths)
    assert all(
        p.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0", "q_proj", "k_proj", "v_proj", "out_proj"} for p in paths
    )


def test_run_process_times_out_and_table_reports(check, tmp_path):
    log = tmp_path / "log.txt"
    code, seconds, _ = check.run_process(
        [sys.executable, "-c", "import time; time.sleep(30)"], cwd=tmp_path, env={}, log=log, timeout=1
    )
    assert code == 124 and seconds < 20 and "killed after" in log.read_text(encoding="utf-8")
    code, _, rss = check.run_process(
        [sys.executable, "-c", "raise SystemExit(3)"], cwd=tmp_path, env={}, log=log, timeout=60
    )
    assert code == 3 and rss > 0
    outcome = check.Outcome(check.default_cases()[0], exit_code=3, seconds=1.0, notes=["trainer failed:\nBoom: x"])
    text = check.table([outcome])
    assert text.splitlines()[0].startswith("| algorithm | exit code | seconds | file loads")
    assert "| lora | 3 |" in text and "Boom: x" in text
