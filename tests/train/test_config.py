"""The trainer's config schema: defaults, types, choices, did-you-mean, overrides, round trip."""

from __future__ import annotations

import tomllib

import pytest

from higanbana.errors import ConfigError
from higanbana.train.config import TrainConfig
from higanbana.train.optim import make_optimizer, make_scheduler, warmup_steps

BASE = """
[model]
pretrained = "model"
[data]
train_data_dir = "images"
"""


def _write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_relative_paths_and_round_trip(tmp_path):
    config = TrainConfig.load(_write(tmp_path, BASE))
    assert config.model.pretrained == str(tmp_path / "model")  # relative to the config file
    assert config.data.train_data_dir == str(tmp_path / "images")
    assert config.network.algo == "lora" and config.resolution == (512, 512)
    again = TrainConfig.from_dict(tomllib.loads(config.to_toml()))
    assert again == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[trainig]\nseed = 1", r"unknown section \[trainig\] \(did you mean 'training'\?\)"),
        ("seed = 1", r"data.seed: unknown key \(it belongs in \[training\]\)"),
        (
            "[training]\nmax_train_step = 10",
            r"training.max_train_step: unknown key \(did you mean 'max_train_steps'\?\)",
        ),
        ("[training]\nseed = 'x'", r"training.seed: expected int, got 'x'"),
        ("[training]\nseed = true", r"training.seed: expected int, got True"),
        ("[optimizer]\ntype = 'adamw9bit'", r"optimizer.type: 'adamw9bit' is not one of .*did you mean 'adamw8bit'"),
        ("batch_size = 0", r"data.batch_size must be at least 1"),
        ("imagefolder = 'x'", r"exactly one of data.train_data_dir, data.dataset_config, data.imagefolder"),
        ("[network]\ntrain_unet = false", r"both false"),
        ("[sample]\nevery_n_steps = 5", r"sample.prompts"),
        ("[sample]\nsampler = 'eular_a'", r"sample.sampler: unknown sampler 'eular_a' \(did you mean 'euler_a'\?\)"),
        (
            "cache_text_encoder_outputs = true\n[network]\ntrain_text_encoder = true",
            r"needs frozen text encoders",
        ),
    ],
)
def test_bad_configs_name_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(_write(tmp_path, BASE + text))


def test_top_level_key_names_its_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[seed\] \(it belongs in \[training\]\)"):
        TrainConfig.load(_write(tmp_path, "seed = 1\n" + BASE))


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        TrainConfig.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        TrainConfig.load(_write(tmp_path, "[model\n"))
    with pytest.raises(ConfigError, match="model.pretrained is required"):
        TrainConfig.load(_write(tmp_path, "[data]\ntrain_data_dir='x'"))


def test_overrides_are_toml_literals(tmp_path):
    config = TrainConfig.load(
        _write(tmp_path, BASE),
        [
            "training.max_train_steps=7",
            "--optimizer.unet_lr=2e-4",
            "network.options={rank=16, alpha=8}",
            "save.output_name=run one",
        ],
    )
    assert config.training.max_train_steps == 7 and config.optimizer.unet_lr == 2e-4
    assert config.network.options == {"rank": 16, "alpha": 8}
    assert config.save.output_name == "run one"  # not a TOML literal: a bare string
    assert config.data.resolution == [512, 512]
    config = TrainConfig.load(_write(tmp_path, BASE), ["data.resolution=64"])
    assert config.resolution == (64, 64)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        TrainConfig.load(_write(tmp_path, BASE), ["max_train_steps=7"])


def test_optimizers_and_schedules():
    import torch

    config = TrainConfig.from_dict({"model": {"pretrained": "m"}, "data": {"train_data_dir": "d"}})
    p = torch.nn.Parameter(torch.zeros(3))
    groups = [{"params": [p], "lr": 1e-3, "name": "x"}]
    for kind in ("adamw", "sgd", "adafactor"):
        config.optimizer.type = kind
        assert make_optimizer(groups, config.optimizer).param_groups[0]["lr"] == 1e-3
    for kind in ("lion", "prodigy"):
        config.optimizer.type = kind
        try:
            __import__({"lion": "lion_pytorch", "prodigy": "prodigyopt"}[kind])
        except ImportError:
            with pytest.raises(ConfigError, match="pip install 'higanbana"):
                make_optimizer(groups, config.optimizer)
    config.optimizer.type = "adamw"
    config.optimizer.args = {"bogus": 1}
    with pytest.raises(ConfigError, match="optimizer.args"):
        make_optimizer(groups, config.optimizer)
    config.optimizer.args = {}
    opt = make_optimizer(groups, config.optimizer)
    config.scheduler.type, config.scheduler.warmup_steps = "cosine", 0.1
    assert warmup_steps(config.scheduler, 100) == 10
    sched = make_scheduler(opt, config.scheduler, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and max(lrs) == pytest.approx(1e-3) and lrs[-1] < 1e-4
    config.scheduler.type = "constant"
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        make_scheduler(opt, config.scheduler, 100)


def test_every_field_is_documented():
    """docs/training.md lists every section and field of the schema."""
    import dataclasses
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text(encoding="utf-8")
    for section in dataclasses.fields(TrainConfig):
        if section.name == "source":
            continue
        assert f"`[{section.name}]`" in text, section.name
        for f in dataclasses.fields(section.default_factory):
            assert f"`{f.name}`" in text, f"{section.name}.{f.name}"
