"""Bad input to ``higanbana train``: every case is refused with one ``error:`` line naming the field,
file or section.key, before anything is written (and the same checks run under ``--dry-run``)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from higanbana.schema import numeric_fields_without_range, sections_of, toml_value
from higanbana.train.config import TrainConfig
from tests.bad_input.conftest import assert_refused, cli


@dataclass
class World:
    root: Path
    model: Path
    data: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from higanbana.models.tiny import save_tiny_sd, tiny_sd_parts
    from tests.train.test_trainer import make_images

    root = tmp_path_factory.mktemp("train_world")
    model = save_tiny_sd(tiny_sd_parts("sd1", seed=0, with_vae=True), root / "sd1")
    make_images(root / "data" / "2_sks toy")
    return World(root, model, root / "data")


def base_toml(world: World, out: Path) -> str:
    return f"""
[model]
pretrained = {toml_value(str(world.model))}
[network]
algo = "lora"
preset = "attn-mlp"
options = {{ rank = 2 }}
[data]
train_data_dir = {toml_value(str(world.data))}
resolution = 32
min_bucket_reso = 16
max_bucket_reso = 64
bucket_reso_steps = 8
batch_size = 2
[optimizer]
unet_lr = 1e-3
[training]
max_train_steps = 2
device = "cpu"
[save]
output_dir = {toml_value(str(out))}
output_name = "tiny"
dtype = "fp32"
every_n_epochs = 0
[logging]
log_with = "none"
"""


def write_config(tmp_path: Path, world: World, extra: str = "", name: str = "train.toml") -> Path:
    path = tmp_path / name
    path.write_text(base_toml(world, tmp_path / "out") + extra, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ overrides
#: (id, overrides, fragments of the error line); "{tmp}" is the test's folder
OVERRIDES = [
    # learning rates: finite, > 0 unless optimizer.allow_nonpositive_lr
    ("unet_lr-nan", ["optimizer.unet_lr=nan"], ["optimizer.unet_lr", "finite", "nan"]),
    ("unet_lr-inf", ["optimizer.unet_lr=inf"], ["optimizer.unet_lr", "finite"]),
    ("unet_lr-minus-inf", ["optimizer.unet_lr=-inf"], ["optimizer.unet_lr", "finite"]),
    ("unet_lr-negative", ["optimizer.unet_lr=-1e-4"], ["optimizer.unet_lr", "greater than 0", "allow_nonpositive_lr"]),
    ("unet_lr-zero", ["optimizer.unet_lr=0"], ["optimizer.unet_lr", "greater than 0", "allow_nonpositive_lr"]),
    ("text_encoder_lr-negative", ["optimizer.text_encoder_lr=-1e-5"], ["optimizer.text_encoder_lr", "greater than 0"]),
    ("text_encoder_lr2-minus-2", ["optimizer.text_encoder_lr2=-2"], ["optimizer.text_encoder_lr2", "or -1"]),
    ("text_encoder_lr2-nan", ["optimizer.text_encoder_lr2=nan"], ["optimizer.text_encoder_lr2", "finite"]),
    ("allow_nonpositive_lr-not-bool", ["optimizer.allow_nonpositive_lr=1"], ["optimizer.allow_nonpositive_lr"]),
    # the other optimizer values
    ("betas-one", ["optimizer.betas=[0.9, 1.0]"], ["optimizer.betas", "[0, 1)"]),
    ("betas-negative", ["optimizer.betas=[-0.1, 0.99]"], ["optimizer.betas", "[0, 1)"]),
    ("betas-one-number", ["optimizer.betas=[0.9]"], ["optimizer.betas", "2 numbers"]),
    ("betas-nan", ["optimizer.betas=[0.9, nan]"], ["optimizer.betas[1]", "finite"]),
    ("betas-strings", ["optimizer.betas=['a', 'b']"], ["optimizer.betas", "numbers"]),
    ("eps-zero", ["optimizer.eps=0"], ["optimizer.eps", "greater than 0"]),
    ("eps-negative", ["optimizer.eps=-1e-8"], ["optimizer.eps", "greater than 0"]),
    ("weight_decay-negative", ["optimizer.weight_decay=-0.01"], ["optimizer.weight_decay", "at least 0"]),
    ("max_grad_norm-negative", ["optimizer.max_grad_norm=-1"], ["optimizer.max_grad_norm", "at least 0"]),
    ("max_grad_norm-nan", ["optimizer.max_grad_norm=nan"], ["optimizer.max_grad_norm", "finite"]),
    ("loraplus_ratio-negative", ["optimizer.loraplus_ratio=-16"], ["optimizer.loraplus_ratio", "at least 0"]),
    ("args-eps-zero", ["optimizer.args={eps=0}"], ["optimizer.args.eps", "greater than 0"]),
    ("args-momentum", ["optimizer.type='sgd'", "optimizer.args={momentum=1.5}"], ["optimizer.args.momentum"]),
    ("args-betas", ["optimizer.args={betas=[0.9, 1.2]}"], ["optimizer.args.betas", "[0, 1)"]),
    ("args-weight_decay", ["optimizer.args={weight_decay=-1}"], ["optimizer.args.weight_decay"]),
    ("args-lr", ["optimizer.args={lr=1e-3}"], ["optimizer.args.lr", "optimizer.unet_lr"]),
    ("args-nan", ["optimizer.args={amsgrad=true, foo=nan}"], ["optimizer.args.foo", "finite"]),
    ("args-unknown", ["optimizer.args={bogus=1}"], ["optimizer.args", "bogus"]),
    ("optimizer-type", ["optimizer.type='adamw9bit'"], ["optimizer.type", "adamw8bit"]),
    # network options: finite everywhere, names known
    ("options-alpha-nan", ["network.options={rank=2, alpha=nan}"], ["network.options.alpha", "finite"]),
    ("options-dropout-inf", ["network.options={rank=2, dropout=inf}"], ["network.options.dropout", "finite"]),
    (
        "config-rule-nan",
        ["network.config={rules=[{names=['*'], options={alpha=nan}}]}"],
        ["network.config.rules[0].options.alpha", "finite"],
    ),
    ("options-typo", ["network.options={rnak=2}"], ["network", "rnak", "rank"]),
    ("options-rank-zero", ["network.options={rank=0}"], ["network:", "rank=0"]),
    ("options-dropout-above-one", ["network.options={rank=2, dropout=2.0}"], ["network:", "dropout"]),
    (
        "rule-matches-nothing",
        ["network.config={rules=[{names=['nomatch*'], options={rank=4}}]}"],
        ["network:", "rules[0]", "matches none"],
    ),
    ("algo-typo", ["network.algo='lorra'"], ["network", "lorra"]),
    ("preset-unknown", ["network.preset='nope'"], ["network", "nope"]),
    ("preset-file-missing", ["network.preset='{tmp}/missing.toml'"], ["network", "missing.toml"]),
    # the schedule
    ("warmup-negative", ["scheduler.warmup_steps=-1"], ["scheduler.warmup_steps", "at least 0"]),
    (
        "warmup-fractional",
        ["scheduler.type='cosine'", "scheduler.warmup_steps=2.5"],
        ["scheduler.warmup_steps", "whole"],
    ),
    ("warmup-nan", ["scheduler.warmup_steps=nan"], ["scheduler.warmup_steps", "finite"]),
    ("warmup-constant", ["scheduler.warmup_steps=1"], ["constant_with_warmup"]),
    ("warmup-longer-than-run", ["scheduler.type='cosine'", "scheduler.warmup_steps=10"], ["scheduler.warmup_steps"]),
    ("num_cycles-zero", ["scheduler.num_cycles=0"], ["scheduler.num_cycles", "at least 1"]),
    ("power-zero", ["scheduler.type='polynomial'", "scheduler.power=0"], ["scheduler.power", "greater than 0"]),
    ("scheduler-type", ["scheduler.type='cosin'"], ["scheduler.type", "cosine"]),
    # training
    ("seed-negative", ["training.seed=-1"], ["training.seed", "-1"]),
    ("seed-too-large", ["training.seed=4294967296"], ["training.seed", "4294967295"]),
    ("seed-float", ["training.seed=1.5"], ["training.seed", "int"]),
    ("noise_offset-negative", ["training.noise_offset=-0.1"], ["training.noise_offset", "at least 0"]),
    ("noise_offset-nan", ["training.noise_offset=nan"], ["training.noise_offset", "finite"]),
    ("min_snr_gamma-negative", ["training.min_snr_gamma=-5"], ["training.min_snr_gamma", "at least 0"]),
    ("huber_c-zero", ["training.loss_type='huber'", "training.huber_c=0"], ["training.huber_c", "greater than 0"]),
    ("max_norm-negative", ["training.max_norm=-1"], ["training.max_norm", "at least 0"]),
    ("max_norm-inf", ["training.max_norm=inf"], ["training.max_norm", "finite"]),
    ("clip_skip-zero", ["training.clip_skip=0"], ["training.clip_skip", "at least 1"]),
    ("clip_skip-beyond-layers", ["training.clip_skip=99"], ["training.clip_skip", "layers"]),
    ("accumulation-zero", ["training.gradient_accumulation_steps=0"], ["training.gradient_accumulation_steps"]),
    ("max_train_steps-negative", ["training.max_train_steps=-5"], ["training.max_train_steps", "at least 0"]),
    ("max_train_epochs-negative", ["training.max_train_epochs=-1"], ["training.max_train_epochs"]),
    ("no-length", ["training.max_train_steps=0", "training.max_train_epochs=0"], ["training.max_train_steps"]),
    ("device-unknown", ["training.device='gpu'"], ["training.device", "gpu"]),
    ("precision-unknown", ["training.mixed_precision='fp8'"], ["training.mixed_precision"]),
    ("key-typo", ["training.max_train_stepz=3"], ["training.max_train_stepz", "max_train_steps"]),
    ("override-without-section", ["max_train_steps=3"], ["section.key=value"]),
    # data
    ("batch_size-zero", ["data.batch_size=0"], ["data.batch_size", "at least 1"]),
    ("caption_dropout-above-one", ["data.caption_dropout_rate=1.5"], ["data.caption_dropout_rate", "[0, 1]"]),
    ("caption_dropout-nan", ["data.caption_dropout_rate=nan"], ["data.caption_dropout_rate", "finite"]),
    ("keep_tokens-negative", ["data.keep_tokens=-1"], ["data.keep_tokens", "at least 0"]),
    ("resolution-zero", ["data.resolution=[0, 32]"], ["data.resolution", "at least 1"]),
    ("resolution-three", ["data.resolution=[32, 32, 3]"], ["data.resolution", "[width, height]"]),
    ("resolution-float", ["data.resolution=32.5"], ["data.resolution"]),
    ("min_bucket-zero", ["data.min_bucket_reso=0"], ["data.min_bucket_reso", "at least 1"]),
    ("min_bucket-above-max", ["data.min_bucket_reso=2048"], ["data.min_bucket_reso", "data.max_bucket_reso"]),
    ("bucket_steps-zero", ["data.bucket_reso_steps=0"], ["data.bucket_reso_steps", "at least 1"]),
    ("two-data-sources", ["data.imagefolder='{tmp}'"], ["data.train_data_dir", "data.imagefolder"]),
    ("data-dir-missing", ["data.train_data_dir='{tmp}/missing'"], ["data.train_data_dir", "does not exist"]),
    ("data-dir-is-file", ["data.train_data_dir='{tmp}/train.toml'"], ["data.train_data_dir", "not a folder"]),
    ("cache-mode", ["data.cache_latents='ram'"], ["data.cache_latents", "memory"]),
    # save: names become files only after validation; counts are not negative
    ("output_name-escapes", ["save.output_name='../../x'"], ["save.output_name", "'/'"]),
    ("output_name-empty", ["save.output_name=''"], ["save.output_name", "required"]),
    ("output_name-slash", ["save.output_name='a/b'"], ["save.output_name"]),
    ("output_name-dotdot", ["save.output_name='..'"], ["save.output_name", "relative folder"]),
    ("output_name-hidden", ["save.output_name='.hidden'"], ["save.output_name", "dot"]),
    ("output_name-colon", ["save.output_name='a:b'"], ["save.output_name", "':'"]),
    ("output_name-newline", ['save.output_name="a\\nb"'], ["save.output_name"]),
    ("every_n_steps-negative", ["save.every_n_steps=-1"], ["save.every_n_steps", "at least 0"]),
    ("keep_last-negative", ["save.keep_last=-2"], ["save.keep_last", "at least 0"]),
    ("save-dtype", ["save.dtype='fp8'"], ["save.dtype"]),
    # samples
    ("sample-steps-zero", ["sample.steps=0"], ["sample.steps", "at least 1"]),
    ("sample-cfg-nan", ["sample.cfg_scale=nan"], ["sample.cfg_scale", "finite"]),
    ("sample-cfg-negative", ["sample.cfg_scale=-1"], ["sample.cfg_scale", "at least 0"]),
    ("sample-width-negative", ["sample.width=-8"], ["sample.width", "at least 0"]),
    ("sample-every-negative", ["sample.every_n_steps=-1"], ["sample.every_n_steps"]),
    ("sample-no-prompts", ["sample.every_n_steps=1"], ["sample.prompts"]),
    ("sample-prompts-missing", ["sample.every_n_steps=1", "sample.prompts='{tmp}/p.txt'"], ["sample.prompts", "p.txt"]),
    ("sample-sampler", ["sample.sampler='eular_a'"], ["sample.sampler", "euler_a"]),
    # paths the config names
    ("model-missing", ["model.pretrained='{tmp}/nope'"], ["model.pretrained", "does not exist"]),
    ("model-config-missing", ["model.config='{tmp}/nope'"], ["model.config"]),
    ("weights-missing", ["network.network_weights='{tmp}/w.safetensors'"], ["network.network_weights"]),
    ("resume-missing", ["training.resume='{tmp}/state-1'"], ["training.resume"]),
    ("resume-not-a-state", ["training.resume='{tmp}'"], ["training.resume", "train_state.json"]),
    ("dataset_config-folder", ["data.train_data_dir=''", "data.dataset_config='{tmp}'"], ["data.dataset_config"]),
]


def _args(overrides: list[str], tmp_path: Path) -> list[str]:
    return [o.replace("{tmp}", tmp_path.as_posix()) for o in overrides]


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize(("overrides", "fragments"), [pytest.param(o, f, id=i) for i, o, f in OVERRIDES])
def test_bad_values_are_refused(world, tmp_path, unchanged, overrides, fragments, dry_run):
    config = write_config(tmp_path, world)
    with unchanged(tmp_path, world.root):
        result = cli("train", config, *_args(overrides, tmp_path), "--no-progress", *(["--dry-run"] * dry_run))
    assert_refused(result, *fragments)


# ------------------------------------------------------------------------------ files
def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _dataset(tmp: Path, world: World, body: str) -> list[str]:
    path = _text(
        tmp / "dataset.toml",
        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = {toml_value(str(world.data / '2_sks toy'))}\n{body}",
    )
    return [f"data.dataset_config='{path.as_posix()}'", "data.train_data_dir=''"]


def _dataset_bytes(tmp: Path, data: bytes) -> list[str]:
    path = _bytes(tmp / "d.toml", data)
    return [f"data.dataset_config='{path.as_posix()}'", "data.train_data_dir=''"]


def _prompt_folder(tmp: Path) -> list[str]:
    (tmp / "p.txt").mkdir()
    return [f"sample.prompts='{(tmp / 'p.txt').as_posix()}'", "sample.every_n_steps=1"]


def _bad_caption(tmp: Path) -> list[str]:
    from tests.train.test_trainer import make_images

    make_images(tmp / "data" / "1_toy", count=1)
    (tmp / "data" / "1_toy" / "img0.txt").write_bytes(b"a \xff toy")
    return [f"data.train_data_dir='{(tmp / 'data').as_posix()}'"]


def _bad_metadata(tmp: Path) -> list[str]:
    from tests.train.test_trainer import make_images

    make_images(tmp / "folder", count=1)
    (tmp / "folder" / "metadata.jsonl").write_text('{"file_name": "img0.png", "text": \n', encoding="utf-8")
    return [f"data.imagefolder='{(tmp / 'folder').as_posix()}'", "data.train_data_dir=''"]


def _prompts(tmp: Path, name: str, data: bytes) -> list[str]:
    path = _bytes(tmp / name, data)
    return [f"sample.prompts='{path.as_posix()}'", "sample.every_n_steps=1"]


#: (id, setup(tmp, world) -> command line after "train", fragments)
FILES = [
    ("config-is-a-folder", lambda t, w: [t], ["is a folder"]),
    ("config-missing", lambda t, w: [t / "nope.toml"], ["nope.toml", "no such config file"]),
    (
        "config-not-utf8",
        lambda t, w: [_bytes(t / "c.toml", b"[model]\npretrained = '\xff\xfe'\n")],
        ["c.toml", "UTF-8"],
    ),
    ("config-not-toml", lambda t, w: [_text(t / "c.toml", "[model\n")], ["c.toml", "not valid TOML"]),
    (
        "config-top-level-key",  # a key at the top of the file says which section it belongs in
        lambda t, w: [_text(t / "c.toml", "unet_lr = nan\n" + base_toml(w, t / "out"))],
        ["[unet_lr]", "optimizer"],
    ),
    (
        "config-nan-in-section",
        lambda t, w: [_text(t / "c.toml", base_toml(w, t / "out").replace("unet_lr = 1e-3", "unet_lr = nan"))],
        ["c.toml", "optimizer.unet_lr", "finite"],
    ),
    (
        "config-negative-lr-in-section",
        lambda t, w: [_text(t / "c.toml", base_toml(w, t / "out").replace("unet_lr = 1e-3", "unet_lr = -1e-3"))],
        ["c.toml", "optimizer.unet_lr", "allow_nonpositive_lr"],
    ),
    (
        "config-unknown-section",
        lambda t, w: [write_config(t, w, "[trainig]\nseed = 1\n", "c.toml")],
        ["unknown section [trainig]", "training"],
    ),
    (
        "dataset-nan",
        lambda t, w: [write_config(t, w), *_dataset(t, w, "caption_dropout_rate = nan\n")],
        ["caption_dropout_rate"],
    ),
    ("dataset-repeats", lambda t, w: [write_config(t, w), *_dataset(t, w, "num_repeats = 0\n")], ["num_repeats"]),
    ("dataset-kohya-key", lambda t, w: [write_config(t, w), *_dataset(t, w, "color_aug = true\n")], ["color_aug"]),
    ("dataset-not-utf8", lambda t, w: [write_config(t, w), *_dataset_bytes(t, b"\xff")], ["d.toml", "UTF-8"]),
    ("caption-not-utf8", lambda t, w: [write_config(t, w), *_bad_caption(t)], ["img0.txt", "caption"]),
    ("metadata-not-json", lambda t, w: [write_config(t, w), *_bad_metadata(t)], ["metadata.jsonl:1", "JSON"]),
    ("prompts-not-utf8", lambda t, w: [write_config(t, w), *_prompts(t, "p.txt", b"a cat \xff\n")], ["p.txt", "UTF-8"]),
    (
        "prompts-cfg-nan",
        lambda t, w: [write_config(t, w), *_prompts(t, "p.txt", b"a cat --l nan\n")],
        ["p.txt:1", "--l"],
    ),
    (
        "prompts-steps-zero",
        lambda t, w: [write_config(t, w), *_prompts(t, "p.txt", b"a cat --s 0\n")],
        ["p.txt:1", "--s"],
    ),
    (
        "prompts-empty",
        lambda t, w: [write_config(t, w), *_prompts(t, "p.txt", b"# nothing\n")],
        ["p.txt", "no prompts"],
    ),
    ("prompts-kind", lambda t, w: [write_config(t, w), *_prompts(t, "p.yaml", b"- a cat\n")], ["p.yaml", ".txt"]),
    ("prompts-is-a-folder", lambda t, w: [write_config(t, w), *_prompt_folder(t)], ["p.txt", "is a folder"]),
    (
        "output-under-a-file",
        lambda t, w: [write_config(t, w), f"save.output_dir='{_text(t / 'blocker', 'x').as_posix()}/out'"],
        ["save.output_dir", "cannot write", "is a file"],
    ),
    (
        "output-is-a-file",
        lambda t, w: [write_config(t, w), f"save.output_dir='{_text(t / 'blocker', 'x').as_posix()}'"],
        ["save.output_dir", "cannot write"],
    ),
    (
        "logging-under-a-file",
        lambda t, w: [
            write_config(t, w),
            "logging.log_with='tensorboard'",
            f"logging.logging_dir='{_text(t / 'blocker', 'x').as_posix()}/logs'",
        ],
        ["logging.logging_dir", "cannot write"],
    ),
    (
        "cache-under-a-file",
        lambda t, w: [
            write_config(t, w),
            "data.cache_latents='disk'",
            f"data.cache_dir='{_text(t / 'blocker', 'x').as_posix()}/cache'",
        ],
        ["data.cache_dir", "cannot write"],
    ),
]


@pytest.mark.parametrize(("setup", "fragments"), [pytest.param(s, f, id=i) for i, s, f in FILES])
def test_bad_files_are_refused(world, tmp_path, unchanged, setup, fragments):
    args = setup(tmp_path, world)
    with unchanged(tmp_path, world.root):
        result = cli("train", *args, "--no-progress")
    assert_refused(result, *fragments)


def test_read_only_output_folder_is_refused_before_any_work(world, tmp_path, unchanged, monkeypatch):
    """A read-only folder, simulated (root writes anywhere, so chmod cannot show it in CI)."""
    import errno

    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    locked = tmp_path / "locked"
    locked.mkdir()
    config = write_config(tmp_path, world)
    monkeypatch.setattr(Path, "touch", refuse)
    with unchanged(tmp_path):
        result = cli("train", config, f"save.output_dir='{(locked / 'out').as_posix()}'", "--no-progress")
    assert_refused(result, "save.output_dir", "cannot write", "Read-only file system")


# ------------------------------------------------------------------------------ documented behaviour
def test_dry_run_checks_everything_and_writes_nothing(world, tmp_path, unchanged):
    config = write_config(tmp_path, world)
    with unchanged(tmp_path, world.root):
        result = cli("train", config, "--dry-run", "--no-progress")
    assert result.code == 0, result.err
    assert "every check passed" in result.out and not (tmp_path / "out").exists()


def test_nonpositive_learning_rates_are_an_opt_in(world, tmp_path, unchanged):
    """``optimizer.allow_nonpositive_lr = true`` accepts 0 (the part is not trained) and negative rates."""
    config = write_config(tmp_path, world)
    with unchanged(tmp_path, world.root):
        result = cli(
            "train",
            config,
            "optimizer.allow_nonpositive_lr=true",
            "optimizer.unet_lr=-1e-4",
            "optimizer.text_encoder_lr=0",
            "--dry-run",
        )
    assert result.code == 0, result.err
    # the sentinel -1 of text_encoder_lr2 ("same as text_encoder_lr") is not a learning rate
    assert TrainConfig.load(config, ["optimizer.text_encoder_lr2=-1"]).optimizer.text_encoder_lr2 == -1


def test_every_numeric_field_declares_its_range():
    """A new int/float field cannot forget its range: the schema walk finds it here."""
    from higanbana.evaluate.config import Checkpoint, EvalConfig

    missing = {
        f"{name}.{key}"
        for config in (TrainConfig, EvalConfig)
        for name, cls in sections_of(config).items()
        for key in numeric_fields_without_range(cls)
    }
    missing |= {f"checkpoints.{key}" for key in numeric_fields_without_range(Checkpoint)}
    assert not missing
    assert {f.name for f in dataclasses.fields(TrainConfig.__dataclass_fields__["optimizer"].default_factory)} >= {
        "allow_nonpositive_lr"
    }


def _dead_pid() -> int:
    """The pid of a process that has finished (a killed writer's temporaries carry such a pid)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_killed_runs_temporaries_are_removed_by_the_next_run(world, tmp_path):
    """Temporaries of a dead process in the output, state, sample and latent-cache folders go at the next run."""
    pid = _dead_pid()
    out = tmp_path / "out"
    prompts = _text(tmp_path / "p.txt", "sks toy --w 32 --h 32 --s 2\n")
    stale = [
        _text(out / f".tiny.safetensors.{pid}.tmp", "half"),
        _text(out / "samples" / f".tiny_e0001_s0000001_00.png.{pid}.tmp", "half"),
        _text(out / "cache" / f".entry.safetensors.{pid}.tmp", "half"),
        _text(out / f".state-00000001.{pid}.tmpdir" / "network.safetensors", "half").parent,
    ]
    config = write_config(tmp_path, world)
    result = cli(
        "train",
        config,
        "data.cache_latents='disk'",
        f"sample.prompts='{prompts.as_posix()}'",
        "sample.every_n_steps=1",
        "sample.steps=2",
        "save.every_n_steps=1",
        "--no-progress",
    )
    assert result.code == 0, result.err
    assert not [p for p in stale if p.exists()]
    assert (out / "tiny.safetensors").is_file() and (out / "state-00000001").is_dir()
    leftovers = [p for p in out.rglob(".*") if ".tmp" in p.name]
    assert not leftovers
