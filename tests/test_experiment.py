"""``higanbana experiment GRID.toml`` on a tiny model: configurations × seeds × epochs, one factor
varied, runs skipped on a re-run, one evaluation of every checkpoint."""

from __future__ import annotations

import pytest

from higanbana.errors import ConfigError
from higanbana.models.tiny import save_tiny_sd, tiny_sd_parts
from higanbana.workflows.experiment import Grid, run_experiment
from tests.tiny_encoders import save_tiny_encoders
from tests.train.test_trainer import make_images

TRAIN = """
[model]
pretrained = "sd1"
[network]
preset = "attn-mlp"
[data]
train_data_dir = "data"
resolution = 32
min_bucket_reso = 16
max_bucket_reso = 64
bucket_reso_steps = 8
batch_size = 2
[optimizer]
unet_lr = 1e-3
[training]
device = "cpu"
[save]
dtype = "fp32"
[logging]
log_with = "none"
"""

GRID = """
out = "exp"
train = "train.toml"
evaluate = "eval.toml"
seeds = [1]
epochs = [1, 2]

[[configs]]
name = "lora"
set = { "network.algo" = "lora", "network.options" = { rank = 2 } }

[[configs]]
name = "lokr"
set = { "network.algo" = "lokr", "network.options" = { rank = 2, factor = 4 } }

[[vary]]
from = "lora"
key = "optimizer.unet_lr"
values = [1e-2]
"""


def _setup(root):
    save_tiny_sd(tiny_sd_parts("sd1", seed=0, with_vae=True), root / "sd1")
    enc = save_tiny_encoders(root / "enc")
    make_images(root / "data" / "1_sks toy", count=2, sizes=((32, 32),), caption="sks stuffed toy, red")
    (root / "concepts.toml").write_text(
        '[[concept]]\nname = "toy"\ntrigger = "sks"\nclass_word = "stuffed toy"\ncategory = "object"\n'
        'images = "data/1_sks toy"\n',
        encoding="utf-8",
    )
    (root / "train.toml").write_text(TRAIN, encoding="utf-8")
    (root / "eval.toml").write_text(
        '[model]\npretrained = "sd1"\n[concepts]\nfile = "concepts.toml"\n[prompts]\ntypes = ["trigger", "style"]\n'
        "n_images = 2\n[generation]\nsteps = 2\nwidth = 32\nheight = 32\n"
        f'[encoders]\ndinov2 = "{enc["dinov2"]}"\nclip = "{enc["clip"]}"\nvgg19 = "{enc["vgg19"]}"\nimage_size = 56\n'
        '[report]\ndevice = "cpu"\n',
        encoding="utf-8",
    )
    (root / "grid.toml").write_text(GRID, encoding="utf-8")


@pytest.mark.slow
def test_experiment_grid_trains_evaluates_and_skips_finished_runs(tmp_path):
    _setup(tmp_path)
    logs: list[str] = []
    result = run_experiment(tmp_path / "grid.toml", progress=False, log=logs.append)
    models = set(result.raw["model"])
    runs = {"lora-s1", "lokr-s1", "lora-unet_lr=0.01-s1"}
    assert models == {"base"} | {f"{r}-e{e}" for r in runs for e in (1, 2)}
    assert (tmp_path / "exp" / "eval" / "report.html").is_file()
    assert set(result.ranking.columns) == {"lora", "lokr"}  # grouped by algorithm
    # the varied run differs from its configuration only in the learning rate
    import json

    checkpoints = {c["name"]: c["params"] for c in json.loads((tmp_path / "exp" / "checkpoints.json").read_text())}
    varied, base = checkpoints["lora-unet_lr=0.01-s1-e2"], checkpoints["lora-s1-e2"]
    assert {k for k in varied if varied[k] != base.get(k)} == {"unet_lr", "lr", "config"}
    # a finished run keeps the listed epochs' files and no resumable state
    assert sorted(p.name for p in (tmp_path / "exp" / "runs" / "lokr-s1").iterdir()) == [
        "config.toml",
        "model-000001.safetensors",
        "model.safetensors",
    ]
    # a re-run trains nothing
    logs.clear()
    run_experiment(tmp_path / "grid.toml", progress=False, log=logs.append)
    assert sum("done, skipped" in m for m in logs) == 3 and not any(m.endswith(": training") for m in logs)


@pytest.mark.slow
def test_workers_train_and_generate_in_processes_with_the_same_results(tmp_path, monkeypatch):
    """Two one-thread worker processes give the metrics one process gives (each run and image is
    seeded on its own); each run's log is kept beside it."""
    import pandas as pd
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same kernels, so the same numbers
    try:
        results = {}
        for workers in (1, 2):
            root = tmp_path / f"w{workers}"
            root.mkdir()
            _setup(root)
            monkeypatch.chdir(root)
            logs: list[str] = []
            results[workers] = run_experiment(root / "grid.toml", progress=False, log=logs.append, workers=workers)
        assert any("in 2 processes × 1 torch thread" in m for m in logs)
        assert sum(": trained (" in m for m in logs) == 3 and not any("done, skipped" in m for m in logs)
        assert (tmp_path / "w2" / "exp" / "runs" / "lokr-s1.log").read_text(encoding="utf-8").strip()
        one, two = (
            results[w].raw.sort_values(["model", "prompt_type", "metric"]).reset_index(drop=True) for w in (1, 2)
        )
        pd.testing.assert_frame_equal(one, two, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_grid_labels_become_checkpoint_parameters(tmp_path):
    grid_file = tmp_path / "g.toml"
    grid_file.write_text(
        'train = "t.toml"\nevaluate = "e.toml"\nseeds = [1, 2]\ngroup_by = "column"\n'
        '[[configs]]\nname = "native"\nset = { "network.algo" = "full" }\nlabels = { column = "native lr 1e-6" }\n'
        '[[vary]]\nfrom = "native"\nkey = "optimizer.unet_lr"\nvalues = [5e-6]\n',
        encoding="utf-8",
    )
    grid = Grid.load(grid_file)
    params = {(r.config, r.seed): r.params for r in grid.runs()}
    assert params[("native", 2)] == {"config": "native", "algo": "full", "column": "native lr 1e-6", "seed": 2}
    assert "column" not in params[("native-unet_lr=5e-06", 1)]  # a variation is not described by its base's labels
    assert grid.group_by == "column"
    grid_file.write_text(
        'train = "t.toml"\nevaluate = "e.toml"\n[[configs]]\nname = "a"\nlabels = { seed = 3 }\n', encoding="utf-8"
    )
    with pytest.raises(ConfigError, match=r"configs\[0\].labels: 'seed' is set by the grid itself"):
        Grid.load(grid_file)
    grid_file.write_text(
        'train = "t.toml"\nevaluate = "e.toml"\n[[configs]]\nname = "a"\nlabels = { x = [1] }\n', encoding="utf-8"
    )
    with pytest.raises(ConfigError, match=r"labels must be a table of numbers, strings or booleans"):
        Grid.load(grid_file)


def test_grid_errors(tmp_path):
    bad = tmp_path / "g.toml"
    bad.write_text('train = "t.toml"\nevaluate = "e.toml"\nseed = [1]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown key 'seed' \(did you mean 'seeds'\?\)"):
        Grid.load(bad)
    bad.write_text(
        'train = "t.toml"\nevaluate = "e.toml"\n[[configs]]\nname = "a"\n'
        '[[vary]]\nfrom = "b"\nkey = "x.y"\nvalues = [1]\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"vary\[0\].from 'b' is not a configuration"):
        Grid.load(bad)
    bad.write_text('train = "t.toml"\nevaluate = "e.toml"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="no \\[\\[configs\\]\\]"):
        Grid.load(bad)
