"""Setting a run up from its config: the data, the base model, the adapter network, the output
folders, and :func:`preflight` — every check that needs neither the images nor the weights.

The loop that uses them is :mod:`higanbana.train.trainer`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, HiganbanaError
from ..formats.dit_network import dit_network_parts, read_dit_network_file
from ..formats.reader import read_network_file
from ..formats.sd_network import sd_network
from ..models.dit import DIT_KINDS, dit_kind_of, load_dit
from ..models.pipeline import default_scheduler_config, read_scheduler_config
from ..models.quantize import quantize_weights
from ..models.sd import load_sd
from ..network import AdapterNetwork, NetworkConfig
from ..safeio import writable_folder
from .config import TrainConfig
from .data import build_training_data
from .optim import make_optimizer, make_scheduler
from .sample import parse_prompt_file
from .sources import DatasetSpec, specs_from_dataset_toml, subsets_from_imagefolder, subsets_from_kohya_folder
from .state import resolve_resume


def build_data(config: TrainConfig, *, progress: bool = True):
    """The :class:`~higanbana.train.data.TrainingData` of the ``[data]`` section."""
    d = config.data
    subset_defaults = {
        "keep_tokens": d.keep_tokens,
        "shuffle_caption": d.shuffle_caption,
        "caption_dropout_rate": d.caption_dropout_rate,
        "flip_aug": d.flip_aug,
    }
    dataset_defaults = {
        "resolution": config.resolution,
        "enable_bucket": d.enable_bucket,
        "min_bucket_reso": d.min_bucket_reso,
        "max_bucket_reso": d.max_bucket_reso,
        "bucket_reso_steps": d.bucket_reso_steps,
        "bucket_no_upscale": d.bucket_no_upscale,
        "batch_size": d.batch_size,
    }
    if d.dataset_config:
        defaults = {**subset_defaults, **dataset_defaults, "caption_extension": d.caption_extension}
        defaults["resolution"] = list(config.resolution)
        if d.class_tokens:
            defaults["class_tokens"] = d.class_tokens
        specs = specs_from_dataset_toml(d.dataset_config, defaults=defaults)
    else:
        if d.train_data_dir:
            subsets = subsets_from_kohya_folder(
                d.train_data_dir, caption_extension=d.caption_extension, **subset_defaults
            )
            if d.class_tokens:
                for s in subsets:
                    s.class_tokens = s.class_tokens or d.class_tokens
        else:
            subsets = subsets_from_imagefolder(d.imagefolder, **subset_defaults)
        specs = [DatasetSpec(subsets=subsets, **dataset_defaults)]
    sizes = {s.batch_size for s in specs}
    if sizes != {d.batch_size}:
        raise ConfigError(
            f"{d.dataset_config}: every dataset must use data.batch_size = {d.batch_size} (found {sorted(sizes)})"
        )
    return build_training_data(specs, progress=progress)


#: [training] options of the UNet objective, and their defaults, which the flow-matching families refuse
_UNET_ONLY = {"noise_offset": 0.0, "min_snr_gamma": 0.0, "prediction_type": "auto", "clip_skip": 1}


def is_dit(config: TrainConfig) -> bool:
    """Whether the run trains an SD3/Flux transformer (by ``model.kind`` or what the model path holds)."""
    kind = config.model.kind
    return kind in DIT_KINDS or (kind == "auto" and dit_kind_of(config.model.pretrained) is not None)


def load_model(config: TrainConfig):
    """The base model's parts (never downloads), its noise-schedule config and its prediction
    (``"flow"`` for SD3/Flux, whose scheduler config is ``parts.scheduler_config``)."""
    m = config.model
    if is_dit(config):
        for key, default in _UNET_ONLY.items():
            if getattr(config.training, key) != default:
                raise ConfigError(
                    f"training.{key} belongs to the UNet families' objective; SD3/Flux train with flow matching "
                    "(training.timestep_sampling, weighting_scheme, discrete_flow_shift)"
                )
        # loaded straight in the run's precision: a 12B Flux in float32 would not fit where its bf16 does
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.training.mixed_precision, torch.float32)
        parts = load_dit(
            m.pretrained, None if m.kind == "auto" else m.kind, dtype, config=m.config or None, quantize=m.quantize
        )
        if parts.vae is None or parts.tokenizers is None:
            raise HiganbanaError(f"{m.pretrained}: the model needs its VAE and tokenizers for training")
        return parts, dict(parts.scheduler_config), "flow"
    parts = load_sd(m.pretrained, None if m.kind == "auto" else m.kind, config=m.config or None)
    if parts.vae is None:
        raise HiganbanaError(f"{m.pretrained}: the model has no VAE; training needs one to encode the images")
    if parts.tokenizers is None:
        raise HiganbanaError(f"{m.pretrained}: the model has no tokenizer(s); give a folder that has them")
    scheduler_config = read_scheduler_config(m.pretrained)
    if scheduler_config is None and m.config:
        scheduler_config = read_scheduler_config(m.config)
    v_pred = m.v_parameterization or parts.v_parameterization
    if scheduler_config is None:
        scheduler_config = default_scheduler_config(parts.kind, v_pred)
    quantize_weights(parts.unet, m.quantize)
    prediction = config.training.prediction_type
    if prediction == "auto":
        prediction = "v_prediction" if v_pred else scheduler_config.get("prediction_type", "epsilon")
    return parts, dict(scheduler_config), prediction


def build_network(config: TrainConfig, parts):
    """The adapter network the ``[network]`` section describes, attached to ``parts``."""
    n = config.network
    dit = parts.kind in DIT_KINDS
    # the default preset names the UNet's blocks; a transformer's default is its family's
    preset = f"{parts.kind}-attn-mlp" if dit and n.preset == "attn-mlp" else n.preset
    if n.config:
        net_config: Any = dict(n.config)
        net_config.setdefault("preset", preset)
    else:
        net_config = preset
    try:
        if dit:
            dit_parts = dit_network_parts(
                parts.transformer if n.train_unet else None,
                parts.text_encoders if n.train_text_encoder else (),
                family=parts.kind,
            )
            net = AdapterNetwork(dit_parts, n.algo, config=net_config, **n.options)
        else:
            net = sd_network(
                parts,
                net_config,
                n.algo,
                train_unet=n.train_unet,
                train_text_encoder=n.train_text_encoder,
                **n.options,
            )
    except HiganbanaError as exc:  # name the section: the option's value does not fit a module
        raise ConfigError(f"network: {exc}") from None
    net.attach()
    if not net.adapters:
        raise ConfigError(
            f"network: preset {n.preset!r} with algo {n.algo!r} adapted no module of the "
            f"{parts.kind} model (check network.preset / network.config rules)"
        )
    if n.network_weights:
        if dit:  # kohya's fused names are split onto the transformer's layers first
            tensors, _records = read_dit_network_file(n.network_weights, parts.transformer)
        else:
            tensors, _records, _meta = read_network_file(n.network_weights)
        report = net.load_state_tensors(tensors, source=n.network_weights, strict=False)
        if not report.ok:
            problems = [*report.missing[:3], *list(report.mismatched)[:3], *report.unexpected[:3]]
            raise HiganbanaError(
                f"network.network_weights: {n.network_weights} does not fit the configured network "
                f"({len(report.missing)} missing, {len(report.mismatched)} mismatched, "
                f"{len(report.unexpected)} unexpected; e.g. {', '.join(problems)})"
            )
    return net


def output_folders(config: TrainConfig) -> dict[str, Path]:
    """``{config field: folder}`` of every folder a run writes."""
    out = Path(config.save.output_dir)
    folders = {"save.output_dir": out}
    if config.logging.log_with != "none":
        folders["logging.logging_dir"] = (
            Path(config.logging.logging_dir) if config.logging.logging_dir else out / "logs"
        )
    if config.data.cache_latents == "disk":
        folders["data.cache_dir"] = Path(config.data.cache_dir) if config.data.cache_dir else out / "cache"
    return folders


def _exists(path: str, where: str, kind: str = "any") -> None:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{where}: {path} does not exist")
    if kind == "file" and not p.is_file():
        raise ConfigError(f"{where}: {path} is a folder, not a file")
    if kind == "folder" and not p.is_dir():
        raise ConfigError(f"{where}: {path} is not a folder")


def preflight(config: TrainConfig) -> None:
    """Every check that needs neither the images nor the model's weights, before any work or write:
    the config's values and names (again: a library caller may have changed fields), the paths it
    names, the sample prompt file, the network's preset/rules/options, the optimizer and schedule
    (built on a stand-in parameter), the resume state, and that the output folders can be written.
    ``--dry-run`` runs it too, and creates nothing."""
    config.validate()
    c = config
    _exists(c.model.pretrained, "model.pretrained")
    if c.model.config:
        _exists(c.model.config, "model.config", "folder")
    if c.network.network_weights:
        _exists(c.network.network_weights, "network.network_weights", "file")
    for key in ("train_data_dir", "imagefolder"):
        if getattr(c.data, key):
            _exists(getattr(c.data, key), f"data.{key}", "folder")
    if c.data.dataset_config:
        _exists(c.data.dataset_config, "data.dataset_config", "file")
    if c.sample.prompts:
        try:
            parse_prompt_file(c.sample.prompts)
        except ConfigError as exc:
            raise ConfigError(f"sample.prompts: {exc}") from None
    # the network's preset, rules, algorithm and option names (option values are checked per layer)
    n = c.network
    net_config: Any = {**n.config, "preset": n.config.get("preset", n.preset)} if n.config else n.preset
    try:
        NetworkConfig.load(net_config).with_options(n.algo, **n.options)
    except HiganbanaError as exc:
        raise type(exc)(f"network: {exc}") from None
    # the optimizer's and the schedule's arguments, on a stand-in parameter
    stand_in = torch.nn.Parameter(torch.zeros(1))
    lr = c.optimizer.unet_lr if c.optimizer.unet_lr > 0 else 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = make_optimizer([{"params": [stand_in], "lr": lr}], c.optimizer)
        make_scheduler(optimizer, c.scheduler, 1000)
    if c.training.resume and c.training.resume != "latest":
        state = resolve_resume(c.training.resume, c.save.output_dir)
        if state is not None and not (state / "train_state.json").is_file():
            raise ConfigError(f"training.resume: {state} is not a training state (no train_state.json)")
    for where, folder in output_folders(c).items():
        writable_folder(folder, where=where, create=False)


def check_clip_skip(config: TrainConfig, parts) -> None:
    """``training.clip_skip`` must name a layer the text encoder(s) have."""
    layers = []
    for te in parts.text_encoders:
        cfg = getattr(te, "config", None)
        cfg = getattr(cfg, "text_config", cfg)
        n = getattr(cfg, "num_hidden_layers", None)
        if isinstance(n, int):
            layers.append(n)
    if layers and config.training.clip_skip > min(layers):
        raise ConfigError(
            f"training.clip_skip = {config.training.clip_skip} is more than the text encoder's "
            f"{min(layers)} layers (1 = the last layer, 2 = the one before it)"
        )
