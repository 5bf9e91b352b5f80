"""The trainer's configuration: a TOML file validated against a typed schema.

The file has one table per section (``[model]``, ``[network]``, ``[data]``, ``[optimizer]``,
``[scheduler]``, ``[training]``, ``[save]``, ``[sample]``, ``[logging]``); every field is listed in
the dataclasses below with its default and meaning. Validation is strict and readable: an unknown
key says which section it was in and suggests the nearest valid one ("did you mean …"), a wrong
type or value names ``section.key``. Command-line overrides are ``section.key=value`` with the
value parsed as a TOML literal (``training.max_train_steps=10``, ``network.options={rank=4}``).
The resolved configuration (every default filled in) is written beside the outputs, so a run can
be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models.pipeline import canonical_sampler
from ..safeio import check_name
from ..schema import (
    SEED,
    apply_override,
    at_least,
    build_sections,
    check_fields,
    check_range,
    choice,
    fraction,
    limits,
    load_toml,
    positive,
    resolve_paths,
    sections_to_toml,
)
from .flow import MODE_SCALE_LIMITS

OPTIMIZERS = ("adamw", "adamw8bit", "lion", "lion8bit", "prodigy", "sgd", "adafactor")
SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
PRECISIONS = ("no", "fp16", "bf16")
PREDICTIONS = ("auto", "epsilon", "v_prediction")
CACHE_MODES = ("none", "memory", "disk")
SAVE_DTYPES = ("fp32", "fp16", "bf16")
LOSS_TYPES = ("l2", "l1", "huber")


@dataclass
class ModelSection:
    """The base model: a local diffusers folder or a single ``.safetensors`` checkpoint."""

    pretrained: str = ""  # path (required)
    kind: str = field(default="auto", metadata=choice("auto", "sd1", "sd2", "sdxl", "sd3", "flux"))
    config: str = ""  # a local diffusers folder with the configs, for single files that need one
    v_parameterization: bool = False  # the model predicts v (SD2-768); also read from the scheduler config
    # "int8": the UNet/transformer's Linear weights frozen in int8 (torchao; adapters run in bypass)
    quantize: str = field(default="none", metadata=choice("none", "int8"))


@dataclass
class NetworkSection:
    """What to train: an algorithm on the modules a preset (or rules) selects."""

    algo: str = "lora"
    preset: str = "attn-mlp"  # a built-in preset name or a TOML file (higanbana presets)
    options: dict = field(default_factory=dict)  # algorithm options: rank, alpha, factor, dropout, ...
    config: dict = field(default_factory=dict)  # a full network config table (rules, targets), overrides preset
    train_unet: bool = True
    train_text_encoder: bool = False
    network_weights: str = ""  # warm start from an existing file (weights only; not a resume)


@dataclass
class DataSection:
    """Where the images are and how they become batches (kohya's dataset options)."""

    train_data_dir: str = ""  # kohya layout: the parent of `N_name` folders
    dataset_config: str = ""  # a kohya dataset TOML ([general] / [[datasets]] / [[datasets.subsets]])
    imagefolder: str = ""  # a diffusers imagefolder with metadata.jsonl
    caption_extension: str = ".txt"
    class_tokens: str = ""  # caption for images with no caption file (kohya folders set it from the name)
    keep_tokens: int = field(default=0, metadata=at_least(0))
    shuffle_caption: bool = False
    caption_dropout_rate: float = field(default=0.0, metadata=fraction())
    flip_aug: bool = False
    # [w, h] (an int means square)
    resolution: list = field(default_factory=lambda: [512, 512], metadata=at_least(1, items=True))
    enable_bucket: bool = True
    min_bucket_reso: int = field(default=256, metadata=at_least(1))
    max_bucket_reso: int = field(default=1024, metadata=at_least(1))
    bucket_reso_steps: int = field(default=64, metadata=at_least(1))
    bucket_no_upscale: bool = False
    batch_size: int = field(default=1, metadata=at_least(1))  # per process
    cache_latents: str = field(default="memory", metadata=choice(*CACHE_MODES))
    cache_dir: str = ""  # disk cache folder (default: <output_dir>/cache)
    cache_text_encoder_outputs: bool = False  # only when the text encoders are frozen and captions fixed


#: a learning rate: > 0 unless ``optimizer.allow_nonpositive_lr`` (0 freezes a part, < 0 trains backwards)
_LR_HINT = "0 leaves the part untrained and a negative rate trains by gradient ascent"


def _lr(**kw: Any) -> dict[str, Any]:
    return positive(unless="allow_nonpositive_lr", hint=_LR_HINT, **kw)


@dataclass
class OptimizerSection:
    type: str = field(default="adamw", metadata=choice(*OPTIMIZERS))
    unet_lr: float = field(default=1e-4, metadata=_lr())
    text_encoder_lr: float = field(default=5e-5, metadata=_lr())  # SD1/SD2 text encoder, and SDXL's first
    # SDXL's second text encoder (-1: same as text_encoder_lr)
    text_encoder_lr2: float = field(default=-1.0, metadata=_lr(special=(-1.0,)))
    allow_nonpositive_lr: bool = False  # opt in to learning rates <= 0 (0: freeze that part; < 0: ascent)
    weight_decay: float = field(default=0.01, metadata=at_least(0))
    betas: list = field(
        default_factory=lambda: [0.9, 0.999], metadata=limits(0, 1, high_open=True, items=True, length=2)
    )
    eps: float = field(default=1e-8, metadata=positive())
    max_grad_norm: float = field(default=1.0, metadata=at_least(0))  # 0 disables clipping
    # LoRA+: the "up" factors learn this many times faster (0: off)
    loraplus_ratio: float = field(default=0.0, metadata=at_least(0))
    args: dict = field(default_factory=dict)  # extra keyword arguments for the optimizer class


@dataclass
class SchedulerSection:
    type: str = field(default="constant", metadata=choice(*SCHEDULERS))
    warmup_steps: float = field(default=0.0, metadata=at_least(0))  # below 1: a fraction of the total steps
    num_cycles: int = field(default=1, metadata=at_least(1))  # cosine_with_restarts
    power: float = field(default=1.0, metadata=positive())  # polynomial


@dataclass
class TrainingSection:
    max_train_steps: int = field(default=0, metadata=at_least(0))  # 0: decided by max_train_epochs
    max_train_epochs: int = field(default=1, metadata=at_least(0))
    gradient_accumulation_steps: int = field(default=1, metadata=at_least(1))
    mixed_precision: str = field(default="no", metadata=choice(*PRECISIONS))
    vae_fp32: bool = True  # keep the VAE in float32 (the SDXL fp16 VAE gives NaN)
    gradient_checkpointing: bool = False
    seed: int = field(default=42, metadata=SEED)
    noise_offset: float = field(default=0.0, metadata=at_least(0))
    min_snr_gamma: float = field(default=0.0, metadata=at_least(0))  # 0: off (the paper-recommended value is 5)
    prediction_type: str = field(default="auto", metadata=choice(*PREDICTIONS))
    loss_type: str = field(default="l2", metadata=choice(*LOSS_TYPES))
    huber_c: float = field(default=0.1, metadata=positive())
    # scale down modules whose ‖ΔW‖ exceeds this (kohya's --scale_weight_norms; 0: off)
    max_norm: float = field(default=0.0, metadata=at_least(0))
    # use the output of the n-th last text-encoder layer (SD1: 2 for anime models)
    clip_skip: int = field(default=1, metadata=at_least(1))
    device: str = field(default="", metadata=choice("", "cpu"))  # "cpu" forces the CPU; "": what accelerate picks
    # SD3/Flux (flow matching, docs/training.md): how a sample's noise level σ is drawn and weighted
    timestep_sampling: str = field(default="logit_normal", metadata=choice("uniform", "logit_normal", "mode"))
    logit_mean: float = field(default=0.0, metadata=limits(-10.0, 10.0))  # σ = sigmoid(N(mean, std²))
    logit_std: float = field(default=1.0, metadata=positive())
    mode_scale: float = field(
        default=1.29,
        metadata=limits(*MODE_SCALE_LIMITS, hint="σ(u) stays monotone only in this range (SD3 §3.1)"),
    )
    weighting_scheme: str = field(default="none", metadata=choice("none", "sigma_sqrt", "cosmap"))
    # σ' = s·σ/(1 + (s−1)σ); 0: the model's scheduler (SD3: 3.0; Flux: its resolution-dependent shift)
    discrete_flow_shift: float = field(default=0.0, metadata=at_least(0))
    guidance_scale: float = field(default=1.0, metadata=at_least(0))  # Flux [dev]'s guidance input in training
    max_sequence_length: int = field(default=0, metadata=at_least(0))  # T5 tokens (0: Flux 512, SD3 256)
    resume: str = ""  # a saved state folder, or "latest" (the newest under save.output_dir)


@dataclass
class SaveSection:
    output_dir: str = "output"
    output_name: str = "adapter"
    every_n_steps: int = field(default=0, metadata=at_least(0))
    every_n_epochs: int = field(default=1, metadata=at_least(0))
    # keep only the last K intermediate files and states (0: keep all)
    keep_last: int = field(default=0, metadata=at_least(0))
    save_state: bool = True  # also save a resumable state (optimizer, scheduler, step) with each file
    dtype: str = field(default="fp16", metadata=choice(*SAVE_DTYPES))
    trigger_phrase: str = ""  # written to modelspec.trigger_phrase
    # SD3/Flux: "original" (kohya's fused qkv names; LoRA/full/IA3), "split" (diffusers names, every
    # algorithm) or "auto" (original where every module stacks, else split)
    layout: str = field(default="auto", metadata=choice("auto", "split", "original"))


@dataclass
class SampleSection:
    prompts: str = ""  # a prompt file (.txt with kohya --n/--w/--h/--d/--l/--s options, .toml, .json)
    every_n_steps: int = field(default=0, metadata=at_least(0))
    every_n_epochs: int = field(default=0, metadata=at_least(0))
    at_first: bool = False
    sampler: str = "ddim"
    steps: int = field(default=20, metadata=at_least(1))
    cfg_scale: float = field(default=7.0, metadata=at_least(0))
    width: int = field(default=0, metadata=at_least(0))  # 0: the training resolution
    height: int = field(default=0, metadata=at_least(0))


@dataclass
class LoggingSection:
    log_with: str = field(default="tensorboard", metadata=choice("tensorboard", "none"))
    logging_dir: str = ""  # default: <output_dir>/logs


@dataclass
class TrainConfig:
    """The whole configuration; ``TrainConfig.load(path, overrides)`` is the usual way in."""

    model: ModelSection = field(default_factory=ModelSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    save: SaveSection = field(default_factory=SaveSection)
    sample: SampleSection = field(default_factory=SampleSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    source: str = field(default="", compare=False)  # where it was read from (for messages)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> TrainConfig:
        config = cls(**build_sections(cls, data, where), source=where)
        config.validate()
        return config

    @classmethod
    def load(cls, path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        """Read a TOML file (or start from the defaults when ``path`` is None) and apply overrides."""
        data: dict[str, Any] = {}
        where = "config"
        if path is not None:
            path = Path(path)
            where = str(path)
            data = load_toml(path)
            _resolve_paths(data, path.parent)
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data, where)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def to_toml(self) -> str:
        """The resolved configuration as TOML (every field, defaults included)."""
        return sections_to_toml(self.to_dict())

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Cross-field checks (types and choices were checked while building)."""
        where = self.source or "config"
        if not self.model.pretrained:
            raise ConfigError(f"{where}: model.pretrained is required (a diffusers folder or a .safetensors file)")
        sources = [k for k in ("train_data_dir", "dataset_config", "imagefolder") if getattr(self.data, k)]
        if len(sources) != 1:
            raise ConfigError(
                f"{where}: give exactly one of data.train_data_dir, data.dataset_config, data.imagefolder"
                + (f" (got {', '.join('data.' + s for s in sources)})" if sources else "")
            )
        for section in dataclasses.fields(self):
            if section.name != "source":
                check_fields(getattr(self, section.name), f"{where}: {section.name}")
        check_name(self.save.output_name, f"{where}: save.output_name")
        _check_optimizer_args(self.optimizer.args, f"{where}: optimizer.args")
        warmup = self.scheduler.warmup_steps
        if warmup >= 1 and not float(warmup).is_integer():
            raise ConfigError(
                f"{where}: scheduler.warmup_steps must be a whole number of steps or a fraction below 1, got {warmup}"
            )
        if self.data.min_bucket_reso > self.data.max_bucket_reso:
            raise ConfigError(
                f"{where}: data.min_bucket_reso ({self.data.min_bucket_reso}) is larger than "
                f"data.max_bucket_reso ({self.data.max_bucket_reso})"
            )
        if self.training.max_train_steps == 0 and self.training.max_train_epochs == 0:
            raise ConfigError(f"{where}: set training.max_train_steps or training.max_train_epochs")
        if not (self.network.train_unet or self.network.train_text_encoder):
            raise ConfigError(f"{where}: network.train_unet and network.train_text_encoder are both false")
        if self.data.cache_text_encoder_outputs:
            if self.network.train_text_encoder:
                raise ConfigError(
                    f"{where}: data.cache_text_encoder_outputs needs frozen text encoders "
                    "(network.train_text_encoder = false)"
                )
            if self.data.shuffle_caption or self.data.caption_dropout_rate > 0:
                raise ConfigError(
                    f"{where}: data.cache_text_encoder_outputs needs fixed captions "
                    "(data.shuffle_caption = false, data.caption_dropout_rate = 0)"
                )
        if (
            self.sample.every_n_steps or self.sample.every_n_epochs or self.sample.at_first
        ) and not self.sample.prompts:
            raise ConfigError(f"{where}: sampling is scheduled but sample.prompts (a prompt file) is empty")
        res = self.data.resolution
        if not (1 <= len(res) <= 2 and all(isinstance(v, int) and v > 0 for v in res)):
            raise ConfigError(f"{where}: data.resolution must be an int or [width, height], got {res!r}")
        if len(res) == 1:
            self.data.resolution = [res[0], res[0]]

        try:
            canonical_sampler(self.sample.sampler)
        except ConfigError as exc:
            raise ConfigError(f"{where}: sample.sampler: {exc}") from None

    @property
    def resolution(self) -> tuple[int, int]:
        return int(self.data.resolution[0]), int(self.data.resolution[-1])


# ---------------------------------------------------------------------------- helpers
#: ranges of the optimizer keyword arguments ``optimizer.args`` may set (any other number: finite)
_ARG_RANGES = {
    "betas": limits(0, 1, high_open=True, items=True),
    "beta1": limits(0, 1, high_open=True),
    "beta2": limits(0, 1, high_open=True),
    "beta3": limits(0, 1, high_open=True),
    "eps": positive(items=True),
    "weight_decay": at_least(0),
    "momentum": limits(0, 1, high_open=True),
    "dampening": fraction(),
    "d0": positive(),
    "d_coef": positive(),
    "growth_rate": positive(),
    "clip_threshold": positive(),
}
#: keys the trainer sets itself: in optimizer.args they would be ignored or break the parameter groups
_ARG_OWNED = {
    "lr": "the learning rates are optimizer.unet_lr, optimizer.text_encoder_lr and optimizer.text_encoder_lr2",
    "params": "the trainer passes the network's parameters itself",
}


def _check_optimizer_args(args: dict[str, Any], where: str) -> None:
    """Numbers in ``optimizer.args`` are finite (checked with the section) and in the known ranges."""
    for key, value in args.items():
        if key in _ARG_OWNED:
            raise ConfigError(f"{where}.{key}: not allowed here ({_ARG_OWNED[key]})")
        spec = _ARG_RANGES.get(key)
        if spec is None:
            continue
        limit = spec["range"]
        if isinstance(value, bool) or not isinstance(value, int | float | list):
            raise ConfigError(f"{where}.{key} must be a number, got {value!r}")
        check_range(value, limit, f"{where}.{key}")


_PATH_FIELDS = {
    "model": ("pretrained", "config"),
    "network": ("network_weights",),
    "training": ("resume",),
    "data": ("train_data_dir", "dataset_config", "imagefolder", "cache_dir"),
    "save": ("output_dir",),
    "sample": ("prompts",),
    "logging": ("logging_dir",),
}


def _resolve_paths(data: dict[str, Any], root: Path) -> None:
    """Relative paths in a config file are relative to the file's folder (as in kohya's dataset TOML)."""
    resolve_paths(data, root, _PATH_FIELDS)
    preset = data.get("network", {}).get("preset") if isinstance(data.get("network"), dict) else None
    if isinstance(preset, str) and preset.endswith(".toml") and not Path(preset).is_absolute():
        data["network"]["preset"] = str(root / preset)
