"""``higanbana train`` end to end on tiny SD1/SDXL models saved as diffusers folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from higanbana.errors import HiganbanaError
from higanbana.formats.inspect import file_info
from higanbana.models.tiny import save_tiny_sd, tiny_sd_parts
from higanbana.train import TrainConfig, TrainingError, train

ROOT = Path(__file__).resolve().parents[2]

#: (label, algo, options) — every algorithm family, at tiny sizes
ALGOS = [
    ("lora", "lora", {"rank": 2, "alpha": 1}),
    ("locon", "lora", {"rank": 2, "conv_rank": 2}),
    ("loha", "loha", {"rank": 2}),
    ("lokr", "lokr", {"rank": 2, "factor": 4}),
    ("ia3", "ia3", {}),
    ("glora", "glora", {"rank": 2}),
    ("dora", "lora", {"rank": 2, "weight_decompose": True}),
    ("oft", "oft", {"rank": 4}),
    ("boft", "boft", {"rank": 2}),
    ("full", "full", {}),
]


def make_images(folder: Path, count: int = 3, sizes=((32, 32), (40, 32), (32, 48)), caption="sks toy, red") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        pixels[: h // 2] = (200, 40 + 50 * i, 40)  # some structure to learn
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"{caption}, view {i}", encoding="utf-8")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: save_tiny_sd(tiny_sd_parts(kind, seed=0, with_vae=True), root / kind) for kind in ("sd1", "sdxl")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_images(root / "2_sks toy")
    return root


def config_for(model_dir: Path, data_dir: Path, out: Path, **sections) -> TrainConfig:
    base = {
        "model": {"pretrained": str(model_dir)},
        "network": {"algo": "lora", "preset": "attn-mlp", "options": {"rank": 2}},
        "data": {
            "train_data_dir": str(data_dir),
            "resolution": 32,
            "min_bucket_reso": 16,
            "max_bucket_reso": 64,
            "bucket_reso_steps": 8,
            "batch_size": 2,
        },
        "optimizer": {"unet_lr": 1e-3, "text_encoder_lr": 1e-3},
        "training": {"max_train_steps": 2, "device": "cpu", "seed": 1},
        "save": {"output_dir": str(out), "output_name": "tiny", "dtype": "fp32", "every_n_epochs": 0},
        "logging": {"log_with": "none"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return TrainConfig.from_dict(base)


def _adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize(("label", "algo", "options"), ALGOS, ids=[a[0] for a in ALGOS])
def test_every_algorithm_trains_and_the_file_loads_everywhere(models, images, tmp_path, label, algo, options, kind):
    from tests.interop.test_parity import _layer_weights, comfy_merge

    config = config_for(
        models[kind],
        images,
        tmp_path / "out",
        network={"algo": algo, "options": options, "preset": "full", "train_text_encoder": True},
    )
    result = train(config, progress=False, log=lambda _m: None)
    assert result.steps == 2 and all(np.isfinite(result.losses))
    info = file_info(result.output)
    assert info["algorithms"] and info["base_model"] == kind
    weights = _adapter_weights(result.output)
    assert any(float(t.abs().sum()) > 0 for k, t in weights.items() if not k.endswith(".alpha"))
    # the file's update, read by ComfyUI's reference loader, equals our own merge
    from higanbana.formats.sd_network import load_sd_network

    model = tiny_sd_parts(kind, seed=0)
    parts = [model.unet, *model.text_encoders]
    before = [_layer_weights(p) for p in parts]
    verdict = {v["tool"]: v for v in info["compatibility"]}["ComfyUI"]
    if verdict["status"] == "does not load":
        assert algo == "ia3"
        return
    if verdict["deviating"]:  # output-axis DoRA: ComfyUI normalises another axis, and info says so
        assert label == "dora"
        return
    merged, _unloaded = comfy_merge(model, result.output, before)
    net = load_sd_network(result.output, model)
    net.merge()
    after = [_layer_weights(p) for p in parts]
    assert merged
    for (index, path), (w, _b) in merged.items():
        torch.testing.assert_close(w, after[index][path][0], rtol=1e-5, atol=1e-6)


def _fixed_loss(model_dir: Path, adapter: Path | None, data_dir: Path) -> float:
    """The denoising loss on fixed noise/timesteps (so before/after compare the model, not the draw)."""
    from diffusers import DDPMScheduler

    from higanbana.formats.sd_network import load_sd_network
    from higanbana.models.sd import load_sd
    from higanbana.train.step import TextEncoder, diffusion_loss

    parts = load_sd(model_dir)
    if adapter is not None:
        load_sd_network(adapter, parts).attach()
    sched = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    img = Image.open(next(data_dir.glob("*/img0.png"))).convert("RGB").resize((32, 32))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(127.5).sub(1)[None]
    with torch.no_grad():
        lat = parts.vae.encode(x).latent_dist.mean * parts.vae.config.scaling_factor
        hidden, _ = TextEncoder(parts, 1, trainable=False, cache=False)(["sks toy, red, view 0"])
        gens = [torch.Generator().manual_seed(i) for i in range(16)]
        return float(
            diffusion_loss(
                parts.unet, sched, lat.repeat(16, 1, 1, 1), hidden.repeat(16, 1, 1), gens, prediction="epsilon"
            )
        )


@pytest.mark.slow
def test_overfit_run_lowers_the_loss(models, tmp_path):
    data = tmp_path / "data"
    make_images(data / "10_sks toy", count=1, sizes=((32, 32),))
    config = config_for(
        models["sd1"],
        data,
        tmp_path / "out",
        network={"options": {"rank": 4}},
        data={"batch_size": 4},
        optimizer={"unet_lr": 3e-3},
        training={"max_train_steps": 30},
    )
    result = train(config, progress=False, log=lambda _m: None)
    before = _fixed_loss(models["sd1"], None, data)
    after = _fixed_loss(models["sd1"], result.output, data)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("algo", ["lora", "lokr", "full"])
def test_sdxl_trains_with_both_text_encoders(models, images, tmp_path, algo):
    config = config_for(
        models["sdxl"],
        images,
        tmp_path / "out",
        network={"algo": algo, "options": {"rank": 2} if algo != "full" else {}, "train_text_encoder": True},
        optimizer={"text_encoder_lr2": 2e-4},
    )
    result = train(config, progress=False, log=lambda _m: None)
    names = {k.partition(".")[0] for k in _adapter_weights(result.output)}
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    with safe_open(str(result.output), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"].startswith("sdxl")


def test_resume_continues_the_same_run_exactly(models, images, tmp_path):
    """4 steps straight == 2 steps, stop, resume from the saved state, 2 more steps (bit for bit on CPU)."""
    common = {
        "network": {"algo": "loha", "options": {"rank": 2, "dropout": 0.0}},
        "data": {"shuffle_caption": True, "caption_dropout_rate": 0.2, "flip_aug": True},
        "training": {"max_train_steps": 4, "noise_offset": 0.05, "min_snr_gamma": 5.0},
        "scheduler": {"type": "cosine", "warmup_steps": 1},
    }
    straight = train(config_for(models["sd1"], images, tmp_path / "a", **common), progress=False, log=lambda _m: None)
    first = config_for(models["sd1"], images, tmp_path / "b", save={"every_n_steps": 2}, **common)
    first_result = train(first, progress=False, log=lambda _m: None)
    state = tmp_path / "b" / "state-00000002"
    assert state.is_dir() and (state / "optimizer.safetensors").is_file()
    # a fresh process-like run, from the state only (its own output folder)
    resumed_cfg = config_for(models["sd1"], images, tmp_path / "c", **common)
    resumed_cfg.training.resume = str(state)
    logs = []
    resumed = train(resumed_cfg, progress=False, log=logs.append)
    assert any("resumed from" in m and "step 2" in m for m in logs)
    assert resumed.steps == 4 and len(resumed.losses) == 2
    assert resumed.losses == straight.losses[2:]
    a, c = _adapter_weights(straight.output), _adapter_weights(resumed.output)
    assert a.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], c[key]), key
    assert first_result.losses == straight.losses
    # a state from another configuration is refused
    other = config_for(models["sd1"], images, tmp_path / "d", **{**common, "optimizer": {"unet_lr": 5e-3}})
    other.training.resume = str(state)
    with pytest.raises(HiganbanaError, match="different configuration"):
        train(other, progress=False, log=lambda _m: None)


def test_dry_run_prints_the_plan(models, images, tmp_path, capsys):
    from higanbana.cli import main

    path = tmp_path / "run.toml"
    path.write_text(config_for(models["sd1"], images, tmp_path / "out").to_toml(), encoding="utf-8")
    assert main(["train", str(path), "--dry-run", "--network.algo=lokr", "network.options={rank=2}"]) == 0
    out = capsys.readouterr().out
    assert "2_sks toy" in out and "steps per epoch" in out and "lokr" in out
    assert not (tmp_path / "out" / "tiny.safetensors").exists()
    assert main(["train", str(path), "--dry-run", "training.max_train_stepz=3"]) == 2
    assert "did you mean 'max_train_steps'" in capsys.readouterr().err


def test_metadata_saving_schedule_and_keep_last(models, images, tmp_path):
    config = config_for(
        models["sd1"],
        images,
        tmp_path / "out",
        training={"max_train_steps": 5},
        save={"every_n_steps": 1, "keep_last": 2, "trigger_phrase": "sks toy"},
    )
    result = train(config, progress=False, log=lambda _m: None)
    out = tmp_path / "out"
    kept = sorted(p.name for p in out.glob("tiny-step*.safetensors"))
    assert kept == ["tiny-step00000003.safetensors", "tiny-step00000004.safetensors"]
    assert sorted(p.name for p in out.glob("state-*")) == ["state-00000003", "state-00000004", "state-00000005"]
    assert (out / "config.toml").is_file() and TrainConfig.load(out / "config.toml") == config
    with safe_open(str(result.output), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "5" and meta["ss_seed"] == "1" and meta["modelspec.trigger_phrase"] == "sks toy"
    assert json.loads(meta["ss_tag_frequency"])["2_sks toy"]["sks toy"] == 3
    assert json.loads(meta["ss_dataset_dirs"])["2_sks toy"] == {"n_repeats": 2, "img_count": 3}
    assert meta["ss_network_module"] == "higanbana.kohya" and "higanbana.modules" in meta


def test_nan_loss_stops_with_the_last_good_adapter(models, images, tmp_path):
    config = config_for(models["sd1"], images, tmp_path / "out", training={"max_train_steps": 3})
    from higanbana.train import trainer as trainer_module

    original = trainer_module.diffusion_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    trainer_module.diffusion_loss = poisoned
    try:
        with pytest.raises(TrainingError, match=r"became nan at step 2 .*tiny-last-good.safetensors"):
            train(config, progress=False, log=lambda _m: None)
    finally:
        trainer_module.diffusion_loss = original
    good = load_file(str(tmp_path / "out" / "tiny-last-good.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())
    assert (tmp_path / "out" / "state-00000001").is_dir()


def test_nan_weights_after_a_step_stop_the_run_and_are_never_saved(models, images, tmp_path, monkeypatch):
    """A finite loss and gradients, but the optimizer step makes a weight NaN: the run stops at that step,
    names the module and the last file saved, and writes nothing non-finite."""
    config = config_for(
        models["sd1"], images, tmp_path / "out", training={"max_train_steps": 3}, save={"every_n_steps": 1}
    )
    original = torch.optim.AdamW.step
    calls = []

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(TrainingError, match=r"weights of 1 module\(s\) \(lora_\w+\) became NaN/Inf at step 2") as stop:
        train(config, progress=False, log=lambda _m: None)
    assert "tiny-step00000001.safetensors" in str(stop.value) and "state-00000001" in str(stop.value)
    out = tmp_path / "out"
    assert not (out / "tiny.safetensors").exists() and not (out / "tiny-step00000002.safetensors").exists()
    for path in out.rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values()), path


def test_nan_gradients_and_learning_rates_stop_before_the_step(models, images, tmp_path, monkeypatch):
    """Non-finite gradients (or a non-finite learning rate) stop the run before the optimizer applies them,
    with the still finite adapter saved as <name>-last-good, as a NaN loss does."""
    config = config_for(models["sd1"], images, tmp_path / "out", training={"max_train_steps": 3})
    original = torch.nn.utils.clip_grad_norm_
    calls = []

    def poisoned(params, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            params[0].grad.view(-1)[0] = float("inf")
        return original(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    with pytest.raises(TrainingError, match=r"gradients of 1 module\(s\) .* became NaN/Inf at step 2 .*tiny-last-good"):
        train(config, progress=False, log=lambda _m: None)
    good = load_file(str(tmp_path / "out" / "tiny-last-good.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())
    assert (tmp_path / "out" / "state-00000001").is_dir() and not (tmp_path / "out" / "tiny.safetensors").exists()
    monkeypatch.undo()

    scheduler_step = torch.optim.lr_scheduler.LRScheduler.step

    def nan_after_first_step(self, *args, **kwargs):
        scheduler_step(self, *args, **kwargs)
        if self.last_epoch >= 1:  # (0: the step a scheduler takes when it is built)
            for group in self.optimizer.param_groups:
                group["lr"] = float("nan")

    monkeypatch.setattr(torch.optim.lr_scheduler.LRScheduler, "step", nan_after_first_step)
    config = config_for(models["sd1"], images, tmp_path / "lr", training={"max_train_steps": 3})
    with pytest.raises(TrainingError, match=r"learning rate became non-finite \(lora_unet = nan\) at step 2"):
        train(config, progress=False, log=lambda _m: None)
    assert (tmp_path / "lr" / "tiny-last-good.safetensors").is_file()


def test_a_state_with_nan_weights_is_not_resumed(models, images, tmp_path):
    train(config_for(models["sd1"], images, tmp_path / "a", save={"every_n_steps": 1}), progress=False, log=print)
    state = tmp_path / "a" / "state-00000001"
    weights = load_file(str(state / "network.safetensors"))
    next(iter(weights.values())).view(-1)[0] = float("nan")
    from safetensors.torch import save_file

    save_file(weights, str(state / "network.safetensors"))
    resumed = config_for(models["sd1"], images, tmp_path / "b", training={"resume": str(state)})
    with pytest.raises(HiganbanaError, match=r"training.resume: .*state-00000001 holds NaN/Inf weights in 1 module"):
        train(resumed, progress=False, log=lambda _m: None)


def test_library_callers_get_the_same_checks(models, images, tmp_path):
    """train() validates again: a field changed after loading cannot slip past the config's checks."""
    config = config_for(models["sd1"], images, tmp_path / "out")
    config.optimizer.unet_lr = float("nan")
    with pytest.raises(HiganbanaError, match=r"optimizer.unet_lr must be a finite number"):
        train(config, progress=False, log=lambda _m: None)
    config.optimizer.unet_lr = 1e-3
    config.save.output_name = "../escape"
    with pytest.raises(HiganbanaError, match=r"save.output_name"):
        train(config, progress=False, log=lambda _m: None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.safetensors").exists()


def test_empty_dataset_and_corrupt_image(models, tmp_path):
    empty = tmp_path / "empty"
    (empty / "3_thing").mkdir(parents=True)
    with pytest.raises(HiganbanaError, match="empty dataset|no usable images|no images"):
        train(config_for(models["sd1"], empty, tmp_path / "o1"), progress=False, log=lambda _m: None)
    data = tmp_path / "data"
    make_images(data / "1_thing", count=2)
    (data / "1_thing" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    with pytest.warns(UserWarning, match="broken.png"):
        result = train(config_for(models["sd1"], data, tmp_path / "o2"), progress=False, log=lambda _m: None)
    assert result.steps == 2


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(models, images, tmp_path):
    """torchrun with gloo on CPU: 2 processes × batch 1 == 1 process × batch 2 (float tolerance)."""
    path = tmp_path / "run.toml"
    # Adam's eps 1e-6 (not 1e-8): a gradient at rounding-noise level (~1e-9, whose bits differ with
    # the summation order) then moves its element by ~g/eps, not by up to a whole step of ±lr
    adam = {"args": {"eps": 1e-6}}
    cfg = config_for(
        models["sd1"], images, tmp_path / "two", data={"batch_size": 1}, training={"max_train_steps": 3}, optimizer=adam
    )
    path.write_text(cfg.to_toml(), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "-m",
        "higanbana",
        "train",
        str(path),
        "--no-progress",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = train(
        config_for(
            models["sd1"],
            images,
            tmp_path / "one",
            data={"batch_size": 2},
            training={"max_train_steps": 3},
            optimizer=adam,
        ),
        progress=False,
        log=lambda _m: None,
    )
    a, b = _adapter_weights(tmp_path / "two" / "tiny.safetensors"), _adapter_weights(one.output)
    assert a.keys() == b.keys()
    # the gloo all-reduce sums in another order than one batch of 2: last-bit differences, which
    # Adam divides by √v + eps (see eps above)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_samples_and_tensorboard_logs(models, images, tmp_path):
    prompts = tmp_path / "prompts.txt"
    lines = ["# comment", "sks toy, red --n blurry --w 32 --h 32 --d 5 --s 2", "sks toy --s 2"]
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = config_for(
        models["sd1"],
        images,
        tmp_path / "out",
        sample={"prompts": str(prompts), "every_n_steps": 2, "at_first": True, "steps": 2},
        logging={"log_with": "tensorboard"},
        training={"max_train_steps": 2},
    )
    train(config, progress=False, log=lambda _m: None)
    samples = sorted(p.name for p in (tmp_path / "out" / "samples").glob("*.png"))
    assert samples == [
        "tiny_e0000_s0000000_00.png",
        "tiny_e0000_s0000000_01.png",
        "tiny_e0001_s0000002_00.png",
        "tiny_e0001_s0000002_01.png",
    ], samples
    assert "Seed: 5" in Image.open(tmp_path / "out" / "samples" / samples[0]).text["parameters"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "out" / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "loss" in events.Tags()["scalars"] and any(t.startswith("lr/") for t in events.Tags()["scalars"])
    assert [s.step for s in events.Scalars("loss")] == [1, 2]
    assert len(events.Tags()["images"]) == 2


@pytest.mark.parametrize(
    "variant",
    [
        "bf16",
        "checkpointing",
        "te_cache",
        "dataset_toml",
        "imagefolder",
        "warm_start",
        "v_prediction",
        "accumulate",
        "single_file",
        "max_norm",
    ],
)
def test_training_options(models, images, tmp_path, variant):
    model_dir, data_dir = models["sd1"], images
    sections: dict = {}
    if variant == "bf16":  # with samples: the pipeline runs a bf16 UNet beside the fp32 VAE
        sections["training"] = {"mixed_precision": "bf16"}
        (tmp_path / "p.txt").write_text("sks toy --s 2\n", encoding="utf-8")
        sections["sample"] = {"prompts": str(tmp_path / "p.txt"), "every_n_steps": 1}
    elif variant == "checkpointing":
        sections["training"] = {"gradient_checkpointing": True}
        sections["network"] = {"train_text_encoder": True}
    elif variant == "te_cache":
        sections["data"] = {"cache_text_encoder_outputs": True, "cache_latents": "disk"}
    elif variant == "dataset_toml":
        toml = tmp_path / "ds.toml"
        toml.write_text(
            f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 32\nbatch_size = 2\n'
            f'[[datasets.subsets]]\nimage_dir = "{(images / "2_sks toy").as_posix()}"\nnum_repeats = 3\n',
            encoding="utf-8",
        )
        sections["data"] = {"train_data_dir": "", "dataset_config": str(toml)}
    elif variant == "imagefolder":
        folder = tmp_path / "imagefolder"
        make_images(folder, count=2)
        lines = [json.dumps({"file_name": f"img{i}.png", "text": f"a toy {i}"}) for i in range(2)]
        (folder / "metadata.jsonl").write_text("\n".join(lines), encoding="utf-8")
        sections["data"] = {"train_data_dir": "", "imagefolder": str(folder)}
    elif variant == "warm_start":
        first = train(config_for(model_dir, data_dir, tmp_path / "first"), progress=False, log=lambda _m: None)
        sections["network"] = {"network_weights": str(first.output)}
        sections["training"] = {"max_train_steps": 1}
        sections["optimizer"] = {"unet_lr": 1e-7}  # one tiny step: the output stays at the warm start
        sections["training"]["seed"] = 7  # another initialisation, replaced by the file's weights
    elif variant == "v_prediction":
        parts = tiny_sd_parts("sd2", seed=0, with_vae=True)
        parts.v_parameterization = True
        model_dir = save_tiny_sd(parts, tmp_path / "sd2v")
    elif variant == "single_file":  # an original-layout checkpoint, configs from a local folder
        from safetensors.torch import save_file

        from tests.test_checkpoint_and_merge import to_original

        model_dir = tmp_path / "sd15.safetensors"
        save_file(to_original(tiny_sd_parts("sd1", seed=0, with_vae=True)), str(model_dir))
        sections["model"] = {"config": str(models["sd1"])}
    elif variant == "max_norm":
        sections["training"] = {"max_norm": 1e-3}
        sections["optimizer"] = {"unet_lr": 1e-2}
    elif variant == "accumulate":
        sections["training"] = {"gradient_accumulation_steps": 2, "max_train_steps": 2}
        sections["data"] = {"batch_size": 1}
    config = config_for(model_dir, data_dir, tmp_path / "out", **sections)
    result = train(config, progress=False, log=lambda _m: None)
    assert all(np.isfinite(result.losses)) and result.output.is_file()
    with safe_open(str(result.output), "pt") as f:
        meta = f.metadata()
    if variant == "warm_start":
        warm, out = _adapter_weights(first.output), _adapter_weights(result.output)
        assert warm.keys() == out.keys()
        for k in warm:
            torch.testing.assert_close(out[k], warm[k], rtol=0, atol=1e-6)
    if variant == "v_prediction":
        assert meta["ss_prediction_type"] == "v_prediction" and meta["ss_base_model_version"] == "sd_v2_v"
    if variant == "checkpointing":  # the same numbers as without checkpointing
        plain = config_for(model_dir, data_dir, tmp_path / "plain", network={"train_text_encoder": True})
        reference = _adapter_weights(train(plain, progress=False, log=lambda _m: None).output)
        got = _adapter_weights(result.output)
        for k in reference:
            torch.testing.assert_close(got[k], reference[k], rtol=1e-4, atol=1e-6)
    if variant == "max_norm":  # every module's ‖s·ΔW‖ was scaled down to the limit
        from higanbana.formats.sd_network import load_sd_network

        net = load_sd_network(result.output, tiny_sd_parts("sd1", seed=0))
        scaled, _mean, largest = net.apply_max_norm(1e-3 * 1.001)
        assert scaled == 0 and 0 < largest <= 1e-3 * 1.001
    if variant == "te_cache":
        assert list((tmp_path / "out" / "cache").glob("*.safetensors"))
    if variant == "dataset_toml":
        assert json.loads(meta["ss_dataset_dirs"])["2_sks toy"]["n_repeats"] == 3
