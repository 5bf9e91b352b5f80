"""The training loop: one function, :func:`train`, from a validated :class:`TrainConfig` to files.

Decisions that make runs reproducible and resumable:

- **Randomness is a function of position.** Every sample of a global batch draws its latent
  sample, noise, noise offset and timestep from a generator seeded by ``(seed, global micro-batch
  index, position in the global batch)``; captions and flips by ``(seed, epoch, position in the
  epoch)``; the global RNG (adapter dropout) is re-seeded per micro-batch and process, and the
  adapters' initialisation by ``seed``. So a resumed run, or the same global batch split over
  several processes, sees exactly the same numbers — there is no RNG state to save or to drift.
- **Processes share one data order.** The epoch order is built for the *global* batch
  (``batch_size × processes``); process ``r`` takes its slice. Gradients of the (small) adapter
  parameters are averaged across processes explicitly after each backward pass, so no DDP wrapper is
  needed around a model whose forward runs through the frozen UNet.
- **Steps are optimizer steps.** ``gradient_accumulation_steps`` micro-batches make one step; the LR
  schedule, saving, sampling and resume count steps; the state stores the step only.
- **A NaN/Inf loss stops the run** before it can reach the weights: the current (still finite)
  adapter is saved as ``<name>-last-good.safetensors`` with a state, and the error says so.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, HiganbanaError
from ..formats.reader import read_network_file
from ..models.pipeline import build_pipeline, default_scheduler_config, read_scheduler_config
from ..models.sd import load_sd
from ..network import NetworkConfig
from ..safeio import discard, writable_folder, write_text
from ..stable_diffusion import save_sd_network, sd_network
from .config import TrainConfig
from .data import (
    DatasetSpec,
    build_training_data,
    specs_from_dataset_toml,
    subsets_from_imagefolder,
    subsets_from_kohya_folder,
)
from .latents import LatentCache, sample_latents
from .optim import make_optimizer, make_scheduler, warmup_steps
from .sample import generate_samples, log_samples, parse_prompt_file, save_samples
from .state import TrainState, list_states, load_state, resolve_resume, save_state

_SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_MIXED = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingError(HiganbanaError):
    """Training cannot go on (a non-finite loss); the message names the step and what was kept."""


@dataclass
class TrainResult:
    """What a run did: the final file, every file written, the loss per step."""

    output: Path | None
    steps: int
    epochs: int
    losses: list[float] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    states: list[Path] = field(default_factory=list)
    plan: str = ""


# ----------------------------------------------------------------------------------- set-up
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


def load_model(config: TrainConfig):
    """The base model's parts (never downloads) and its noise-schedule config."""
    m = config.model
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
    prediction = config.training.prediction_type
    if prediction == "auto":
        prediction = "v_prediction" if v_pred else scheduler_config.get("prediction_type", "epsilon")
    return parts, dict(scheduler_config), prediction


def build_network(config: TrainConfig, parts):
    """The adapter network the ``[network]`` section describes, attached to ``parts``."""
    n = config.network
    if n.config:
        net_config: Any = dict(n.config)
        net_config.setdefault("preset", n.preset)
    else:
        net_config = n.preset
    try:
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


def _fingerprint(config: TrainConfig, world: int) -> str:
    """What must not change between a run and its resume (paths of outputs and step counts may)."""
    d = config.to_dict()
    keep = {k: d[k] for k in ("model", "network", "data", "optimizer", "scheduler")}
    keep["training"] = {
        k: v for k, v in d["training"].items() if k not in ("resume", "device", "gradient_checkpointing")
    }
    keep["world"] = world
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def _check_clip_skip(config: TrainConfig, parts) -> None:
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


def _modules_text(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return f"{len(names)} module(s) ({shown}{', …' if len(names) > 5 else ''})"


# ------------------------------------------------------------------------------- text
class TextEncoder:
    """Captions → UNet conditioning, as the diffusers pipelines compute it (with ``clip_skip``).

    SD1/SD2: the last hidden state (or the ``clip_skip``-th last, through the final layer norm).
    SDXL: both encoders' penultimate hidden states concatenated, and the second one's pooled
    projection. Frozen encoders run without gradients; ``cache`` keeps outputs per caption.
    """

    def __init__(self, parts, clip_skip: int, *, trainable: bool, cache: bool) -> None:
        self.parts = parts
        self.clip_skip = clip_skip
        self.trainable = trainable
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = {} if cache else None

    def _ids(self, tokenizer, captions: list[str], device) -> torch.Tensor:
        out = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        return out.input_ids.to(device)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts = self.parts
        device = parts.unet.device
        if parts.kind != "sdxl":
            te = parts.text_encoders[0]
            ids = self._ids(parts.tokenizers[0], captions, device)
            if self.clip_skip == 1:
                return te(input_ids=ids).last_hidden_state, None
            out = te(input_ids=ids, output_hidden_states=True)
            hidden = out.hidden_states[-self.clip_skip]
            norm = te.text_model.final_layer_norm if hasattr(te, "text_model") else te.final_layer_norm
            return norm(hidden), None
        hiddens, pooled = [], None
        for i, (te, tok) in enumerate(zip(parts.text_encoders, parts.tokenizers, strict=True)):
            out = te(input_ids=self._ids(tok, captions, device), output_hidden_states=True)
            hiddens.append(out.hidden_states[-(self.clip_skip + 1)])
            if i == 1:
                pooled = out.text_embeds
        return torch.cat(hiddens, dim=-1), pooled

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cache is None:
            with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
                return self._encode(captions)
        todo = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if todo:
            with torch.no_grad():
                hidden, pooled = self._encode(todo)
            for i, c in enumerate(todo):
                self.cache[c] = (hidden[i], None if pooled is None else pooled[i])
        hidden = torch.stack([self.cache[c][0] for c in captions])
        pooled = None if self.parts.kind != "sdxl" else torch.stack([self.cache[c][1] for c in captions])
        return hidden, pooled


# ------------------------------------------------------------------------------- loss
def _sample_seed(seed: int, micro: int, position: int) -> int:
    return (seed * 1_000_003 + micro * 65_537 + position) % (2**63 - 1)


def diffusion_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    hidden: torch.Tensor,
    generators: list[torch.Generator],
    *,
    prediction: str,
    noise_offset: float = 0.0,
    min_snr_gamma: float = 0.0,
    loss_type: str = "l2",
    huber_c: float = 0.1,
    added_cond: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The denoising loss of one batch, averaged over its samples.

    Per sample (its own generator): noise ``ε ~ N(0, I)`` (+ ``noise_offset · N(0,1)`` per channel),
    timestep ``t ~ U{0..T-1}``, ``x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε``; the target is ε (epsilon) or
    ``v = √ᾱ_t ε − √(1-ᾱ_t) x_0`` (v-prediction). min-SNR-γ weights each sample by
    ``min(SNR, γ)/SNR`` (epsilon) or ``min(SNR, γ)/(SNR+1)`` (v), with ``SNR = ᾱ_t/(1-ᾱ_t)``.
    """
    b = latents.shape[0]
    device = latents.device
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(device)
    if noise_offset:
        offsets = torch.stack([torch.randn(latents.shape[1], 1, 1, generator=g) for g in generators]).to(device)
        noise = noise + noise_offset * offsets
    steps = noise_scheduler.config.num_train_timesteps
    t = torch.stack([torch.randint(0, steps, (), generator=g) for g in generators]).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
    model_in = noisy if dtype is None else noisy.to(dtype)
    kwargs = {"added_cond_kwargs": added_cond} if added_cond is not None else {}
    pred = unet(model_in, t, hidden if dtype is None else hidden.to(dtype), **kwargs).sample.float()
    if loss_type == "l2":
        per = F.mse_loss(pred, target.float(), reduction="none")
    elif loss_type == "l1":
        per = F.l1_loss(pred, target.float(), reduction="none")
    else:
        per = F.huber_loss(pred, target.float(), reduction="none", delta=huber_c)
    per = per.reshape(b, -1).mean(dim=1)
    if min_snr_gamma:
        ac = noise_scheduler.alphas_cumprod.to(device)[t].float()
        snr = ac / (1 - ac)
        weight = torch.clamp(snr, max=min_snr_gamma) / (snr if prediction == "epsilon" else snr + 1)
        per = per * weight
    return per.mean()


# ------------------------------------------------------------------------------- the loop
class _Run:
    """Everything one training run holds; :func:`train` builds it and calls :meth:`run`."""

    def __init__(self, config: TrainConfig, *, progress: bool, log: Callable[[str], None]) -> None:
        self.config = config
        self.progress = progress
        self.log = log

    # ----------------------------------------------------------------- plan
    def setup(self, dry_run: bool) -> str:
        from accelerate import Accelerator

        c = self.config
        t = c.training
        preflight(c)
        tracker = c.logging.log_with if (c.logging.log_with != "none" and not dry_run) else None
        self.out_dir = Path(c.save.output_dir)
        logging_dir = Path(c.logging.logging_dir) if c.logging.logging_dir else self.out_dir / "logs"
        self.accelerator = Accelerator(
            cpu=t.device == "cpu",
            log_with=tracker,
            project_dir=str(logging_dir),
        )
        acc = self.accelerator
        self.world, self.rank = acc.num_processes, acc.process_index
        self.device = acc.device
        self.data = build_data(c, progress=self.progress and acc.is_main_process)
        self.parts, self.scheduler_config, self.prediction = load_model(c)
        _check_clip_skip(c, self.parts)
        from accelerate.utils import set_seed

        set_seed(t.seed)  # the adapters' random initialisation (the same on every process)
        self.net = build_network(c, self.parts)
        self.global_batch = c.data.batch_size * self.world
        self.micro_per_epoch = self.data.epoch_length(self.global_batch)
        accum = t.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / accum)
        self.total_steps = t.max_train_steps or t.max_train_epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)

        warmup = warmup_steps(c.scheduler, self.total_steps)
        if c.scheduler.type != "constant" and warmup >= self.total_steps:
            raise ConfigError(
                f"scheduler.warmup_steps: the warm-up ({warmup} steps) is not shorter than the run "
                f"({self.total_steps} steps), so the learning rate would never reach its value"
            )
        if not dry_run and acc.is_main_process:  # the folders are made (and probed) only now, after every check
            for where, folder in output_folders(c).items():
                writable_folder(folder, where=where, create=True)
        return self.plan()

    def plan(self) -> str:
        c = self.config
        algos = Counter(a.algo for a in self.net.adapters.values())
        prefixes = Counter(rec.prefix for rec in self.net.records.values())
        lines = [
            self.data.summary(),
            "",
            f"model: {c.model.pretrained} ({self.parts.kind}, {self.prediction})",
            f"network: {len(self.net.adapters)} module(s) wrapped — "
            + ", ".join(f"{a} {n}" for a, n in sorted(algos.items()))
            + " — per part: "
            + ", ".join(f"{p} {n}" for p, n in sorted(prefixes.items())),
            f"trainable parameters: {sum(p.numel() for p in self.net.parameters() if p.requires_grad):,}",
            f"processes: {self.world}, batch per process: {c.data.batch_size}, global batch: {self.global_batch}, "
            f"gradient accumulation: {c.training.gradient_accumulation_steps}",
            f"steps per epoch: {self.steps_per_epoch} ({self.micro_per_epoch} batches), "
            f"total steps: {self.total_steps}, epochs: {self.epochs}",
            f"output: {self.out_dir / (c.save.output_name + '.safetensors')} (every check passed: values, names, "
            "paths, prompts, network, optimizer, output folders)",
        ]
        return "\n".join(lines)

    # ----------------------------------------------------------------- model placement
    def prepare(self) -> None:
        from diffusers import DDPMScheduler

        c, t, acc = self.config, self.config.training, self.accelerator
        parts = self.parts
        self.mixed = _MIXED.get(t.mixed_precision)
        if self.mixed is not None and self.device.type == "cpu" and t.mixed_precision == "fp16":
            warnings.warn("fp16 on CPU is slow and poorly supported; bf16 is the CPU choice", stacklevel=2)
        weight_dtype = self.mixed or torch.float32

        def place(module, dtype):
            module.to(self.device)
            if module.dtype != dtype:  # (diffusers warns about casting even when nothing changes)
                module.to(dtype)

        place(parts.unet, weight_dtype)
        for te in parts.text_encoders:
            place(te, weight_dtype if not c.network.train_text_encoder else torch.float32)
        place(parts.vae, torch.float32 if t.vae_fp32 else weight_dtype)
        self.net.to(self.device)
        for module in (parts.unet, parts.vae, *parts.text_encoders):
            module.requires_grad_(False)
            module.eval()
        self.net.train()
        if t.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if c.network.train_text_encoder:
                for te in parts.text_encoders:
                    enable = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
                    enable()
                    te.train()  # transformers checkpoints only in train mode (CLIP has no dropout to switch on)
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.text = TextEncoder(
            parts,
            t.clip_skip,
            trainable=c.network.train_text_encoder,
            cache=c.data.cache_text_encoder_outputs,
        )

        self.latents = None
        if c.data.cache_latents != "none":
            folder = Path(c.data.cache_dir) if c.data.cache_dir else self.out_dir / "cache"
            self.latents = LatentCache(
                parts.vae,
                self.data,
                mode=c.data.cache_latents,
                folder=folder,
                device=self.device,
                progress=self.progress and acc.is_main_process,
            )
            if c.data.cache_latents == "disk" and self.world > 1:  # the main process encodes, the others read
                if acc.is_main_process:
                    self.latents.fill()
                acc.wait_for_everyone()
            self.latents.fill()
        lrs = {}
        o = c.optimizer
        for prefix in self.net.parts:
            if prefix == "lora_unet":
                lrs[prefix] = o.unet_lr
            elif prefix == "lora_te2":
                lrs[prefix] = o.text_encoder_lr2 if o.text_encoder_lr2 >= 0 else o.text_encoder_lr
            else:
                lrs[prefix] = o.text_encoder_lr

        groups = self.net.param_groups(o.unet_lr, lrs=lrs, loraplus_ratio=o.loraplus_ratio or None)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = make_optimizer(groups, o)
        self.lr_scheduler = make_scheduler(self.optimizer, c.scheduler, self.total_steps)
        self.group_names = [g.get("name", str(i)) for i, g in enumerate(groups)]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.mixed_precision == "fp16")
        self.fingerprint = _fingerprint(c, self.world)

    # ----------------------------------------------------------------- one step
    def _latents_for(self, indices: list[int], flips: list[bool], gens: list[torch.Generator]) -> torch.Tensor:
        vae = self.parts.vae
        if self.latents is not None:
            params = [self.latents.get(i, f).to(self.device) for i, f in zip(indices, flips, strict=True)]
        else:
            pixels = torch.stack([self.data.load_pixels(i, f) for i, f in zip(indices, flips, strict=True)])
            with torch.no_grad():
                dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
            params = list(dist.parameters.float())
        scaling = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        return torch.stack(
            [sample_latents(p.float(), g, scaling, shift).to(self.device) for p, g in zip(params, gens, strict=True)]
        )

    def _micro_loss(self, epoch: int, micro_in_epoch: int, micro_global: int, batch: list[int]) -> torch.Tensor:
        c = self.config
        bs = c.data.batch_size
        mine = range(self.rank * bs, (self.rank + 1) * bs)
        positions = [micro_in_epoch * self.global_batch + j for j in mine]
        indices = [batch[j] for j in mine]
        seed = c.training.seed
        captions = [self.data.caption(i, epoch, seed, p) for i, p in zip(indices, positions, strict=True)]
        flips = [self.data.flip_for(i, epoch, seed, p) for i, p in zip(indices, positions, strict=True)]
        gens = [torch.Generator().manual_seed(_sample_seed(seed, micro_global, j)) for j in mine]
        latents = self._latents_for(indices, flips, gens)
        added = None
        with torch.autocast(self.device.type, dtype=self.mixed, enabled=self.mixed is not None):
            hidden, pooled = self.text(captions)
            if self.parts.kind == "sdxl":
                added = {
                    "text_embeds": pooled,
                    "time_ids": torch.stack([self._time_ids(i) for i in indices]).to(self.device, hidden.dtype),
                }
            t = c.training
            return diffusion_loss(
                self.parts.unet,
                self.noise_scheduler,
                latents,
                hidden,
                gens,
                prediction=self.prediction,
                noise_offset=t.noise_offset,
                min_snr_gamma=t.min_snr_gamma,
                loss_type=t.loss_type,
                huber_c=t.huber_c,
                added_cond=added,
            )

    def _time_ids(self, index: int) -> torch.Tensor:
        """SDXL's size conditioning: original (h, w), crop (top, left), target (h, w)."""
        item = self.data.items[index]
        w, h = item.size
        bw, bh = item.bucket
        scale = max(bw / w, bh / h)
        nw, nh = round(w * scale), round(h * scale)
        return torch.tensor([h, w, (nh - bh) // 2, (nw - bw) // 2, bh, bw], dtype=torch.float32)

    def _reduce_grads(self) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p, g in zip(self.params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=self.device)
        if self.world > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return float(flag.item()) == 0.0

    # ----------------------------------------------------------------- saving
    def _training_facts(self, state: TrainState) -> dict[str, Any]:
        c = self.config
        tags: dict[str, Counter] = {}
        dirs: dict[str, dict[str, int]] = {}
        for item in self.data.items:
            subset = self.data.subsets[item.subset]
            key = Path(subset.image_dir).name
            dirs.setdefault(key, {"n_repeats": subset.num_repeats, "img_count": 0})["img_count"] += 1
            counter = tags.setdefault(key, Counter())
            for tag in (x.strip() for x in item.caption.split(subset.caption_separator)):
                if tag:
                    counter[tag] += 1
        buckets = Counter(item.bucket for item in self.data.items)
        return {
            "ss_session_id": self.session,
            "ss_training_started_at": self.started,
            "ss_training_finished_at": time.time(),
            "ss_sd_model_name": Path(c.model.pretrained).name,
            "ss_learning_rate": c.optimizer.unet_lr,
            "ss_unet_lr": c.optimizer.unet_lr if c.network.train_unet else 0,
            "ss_text_encoder_lr": c.optimizer.text_encoder_lr if c.network.train_text_encoder else 0,
            "ss_optimizer": c.optimizer.type,
            "ss_lr_scheduler": c.scheduler.type,
            "ss_lr_warmup_steps": c.scheduler.warmup_steps,
            "ss_epoch": state.epoch,
            "ss_steps": state.step,
            "ss_max_train_steps": self.total_steps,
            "ss_num_epochs": self.epochs,
            "ss_num_batches_per_epoch": self.micro_per_epoch,
            "ss_batch_size_per_device": c.data.batch_size,
            "ss_total_batch_size": self.global_batch * c.training.gradient_accumulation_steps,
            "ss_gradient_accumulation_steps": c.training.gradient_accumulation_steps,
            "ss_num_train_images": sum(self.data.subsets[i.subset].num_repeats for i in self.data.items),
            "ss_resolution": json.dumps(list(self.config.resolution)),
            "ss_enable_bucket": c.data.enable_bucket,
            "ss_min_bucket_reso": c.data.min_bucket_reso,
            "ss_max_bucket_reso": c.data.max_bucket_reso,
            "ss_bucket_info": {"buckets": {f"{w}x{h}": n for (w, h), n in sorted(buckets.items())}},
            "ss_dataset_dirs": dirs,
            "ss_tag_frequency": {k: dict(v) for k, v in tags.items()},
            "ss_seed": c.training.seed,
            "ss_mixed_precision": c.training.mixed_precision,
            "ss_noise_offset": c.training.noise_offset,
            "ss_min_snr_gamma": c.training.min_snr_gamma,
            "ss_max_grad_norm": c.optimizer.max_grad_norm,
            "ss_scale_weight_norms": c.training.max_norm,
            "ss_clip_skip": c.training.clip_skip,
            "ss_keep_tokens": c.data.keep_tokens,
            "ss_shuffle_caption": c.data.shuffle_caption,
            "ss_caption_dropout_rate": c.data.caption_dropout_rate,
            "ss_flip_aug": c.data.flip_aug,
            "ss_cache_latents": c.data.cache_latents != "none",
            "ss_prediction_type": self.prediction,
            "ss_loss_type": c.training.loss_type,
        }

    def save(self, name: str, state: TrainState, *, with_state: bool) -> tuple[Path, Path | None]:
        c = self.config
        path = self.out_dir / f"{name}.safetensors"
        state_path = None
        if self.accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_sd_network(
                self.net,
                path,
                self.parts.kind,
                dtype=_SAVE_DTYPES[c.save.dtype],
                output_name=name,
                v_parameterization=self.prediction == "v_prediction",
                trigger_phrase=c.save.trigger_phrase or None,
                resolution=self.config.resolution,
                training=self._training_facts(state),
            )
            if with_state:
                state_path = save_state(
                    self.out_dir / f"state-{state.step:08d}",
                    network=self.net,
                    optimizer=self.optimizer,
                    scheduler=self.lr_scheduler,
                    scaler=self.scaler,
                    state=state,
                    fingerprint=self.fingerprint,
                )
        self.accelerator.wait_for_everyone()
        return path, state_path

    def _prune(self, files: list[Path]) -> None:
        keep = self.config.save.keep_last
        if not keep or not self.accelerator.is_main_process:
            return
        for old in files[:-keep]:
            old.unlink(missing_ok=True)
        del files[:-keep]
        for old in list_states(self.out_dir)[:-keep]:
            discard(old)

    # ----------------------------------------------------------------- sampling
    def sample(self, step: int, epoch: int) -> None:
        c = self.config
        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return
        prompts = parse_prompt_file(c.sample.prompts)
        pipeline = build_pipeline(self.parts, sampler=c.sample.sampler, scheduler_config=self.scheduler_config)
        w, h = c.sample.width or self.config.resolution[0], c.sample.height or self.config.resolution[1]
        # a mixed-precision UNet beside the float32 VAE: autocast lets the pipeline pass tensors between them
        with torch.autocast(self.device.type, dtype=self.mixed, enabled=self.mixed is not None):
            images = generate_samples(
                pipeline,
                prompts,
                width=w,
                height=h,
                steps=c.sample.steps,
                cfg_scale=c.sample.cfg_scale,
                seed=c.training.seed,
                device=self.device,
                sampler=c.sample.sampler,
                scheduler_config=self.scheduler_config,
            )
        save_samples(images, prompts, self.out_dir / "samples", step=step, epoch=epoch, name=c.save.output_name)
        if c.logging.log_with == "tensorboard":
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            log_samples(writer, images, prompts, step)
        self.accelerator.wait_for_everyone()

    # ----------------------------------------------------------------- run
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        c, acc = self.config, self.accelerator
        t = c.training
        self.session = hashlib.sha1(f"{time.time()}-{os.getpid()}".encode()).hexdigest()[:16]
        self.started = time.time()
        state = TrainState()
        resume = resolve_resume(t.resume, self.out_dir)
        if t.resume == "latest" and resume is None:
            self.log(f"no saved state in {self.out_dir}: starting from step 0")
        if resume is not None:
            state = load_state(
                resume,
                network=self.net,
                optimizer=self.optimizer,
                scheduler=self.lr_scheduler,
                scaler=self.scaler,
                fingerprint=self.fingerprint,
            )
            params = list(self.net.parameters())
            bad = self._nonfinite_modules(params, params)
            if bad:
                raise HiganbanaError(f"training.resume: {resume} holds NaN/Inf weights in {_modules_text(bad)}")
            self.log(f"resumed from {resume} at step {state.step} (epoch {state.epoch})")
        if acc.is_main_process:
            write_text(self.out_dir / "config.toml", c.to_toml())
        if c.logging.log_with != "none":
            acc.init_trackers("higanbana", config={k: str(v) for k, v in c.to_dict()["training"].items()})
        result = TrainResult(None, state.step, self.epochs)
        if c.sample.at_first and state.step == 0:
            self.sample(0, 0)
        accum = t.gradient_accumulation_steps
        bar = tqdm(
            total=self.total_steps,
            initial=state.step,
            desc="train",
            unit="step",
            disable=not (self.progress and acc.is_main_process),
            dynamic_ncols=True,
        )
        try:
            while state.step < self.total_steps:
                epoch = state.step // self.steps_per_epoch
                state.epoch = epoch
                batches = self.data.epoch_batches(epoch, t.seed, self.global_batch)
                step_in_epoch = state.step % self.steps_per_epoch
                start = step_in_epoch * accum
                micro_range = range(start, min(start + accum, len(batches)))
                loss_sum = 0.0
                for mi in micro_range:
                    micro_global = epoch * self.micro_per_epoch + mi
                    # the global RNG (adapter dropout) is re-seeded per micro-batch and process: resumable
                    torch.manual_seed(_sample_seed(t.seed, micro_global, 1_000_000 + self.rank))
                    loss = self._micro_loss(epoch, mi, micro_global, batches[mi])
                    if not self._all_finite(loss):
                        self._nan_stop(state, loss, result)
                    loss_sum += float(loss.detach())
                    self.scaler.scale(loss / len(micro_range)).backward()
                self._reduce_grads()
                self.scaler.unscale_(self.optimizer)
                if c.optimizer.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, c.optimizer.max_grad_norm)
                if not self.scaler.is_enabled():  # (fp16: the grad scaler skips a step with Inf gradients itself)
                    self._check_before_step(state)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if t.max_norm > 0:
                    self.net.apply_max_norm(t.max_norm)
                state.step += 1
                self._check_weights(state, result)
                step_loss = loss_sum / len(micro_range)
                if self.world > 1:
                    step_loss = float(acc.reduce(torch.tensor([step_loss], device=self.device), "mean").item())
                result.losses.append(step_loss)
                lrs = self.lr_scheduler.get_last_lr()
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lrs[0]:.2e}", epoch=epoch + 1, refresh=False)
                if c.logging.log_with != "none":
                    logs = {"loss": step_loss, "epoch": epoch}
                    logs.update({f"lr/{n}": lr for n, lr in zip(self.group_names, lrs, strict=False)})
                    acc.log(logs, step=state.step)
                end_of_epoch = state.step % self.steps_per_epoch == 0
                if state.step >= self.total_steps:
                    break
                done_epoch = state.step // self.steps_per_epoch
                if (c.save.every_n_steps and state.step % c.save.every_n_steps == 0) or (
                    end_of_epoch and c.save.every_n_epochs and done_epoch % c.save.every_n_epochs == 0
                ):
                    state.epoch = done_epoch
                    name = (
                        f"{c.save.output_name}-{done_epoch:06d}"
                        if end_of_epoch and not (c.save.every_n_steps and state.step % c.save.every_n_steps == 0)
                        else f"{c.save.output_name}-step{state.step:08d}"
                    )
                    path, st = self.save(name, state, with_state=c.save.save_state)
                    result.files.append(path)
                    if st is not None:
                        result.states.append(st)
                    self._prune(result.files)
                if (c.sample.every_n_steps and state.step % c.sample.every_n_steps == 0) or (
                    end_of_epoch and c.sample.every_n_epochs and done_epoch % c.sample.every_n_epochs == 0
                ):
                    self.sample(state.step, done_epoch)
        finally:
            bar.close()
        state.epoch = math.ceil(state.step / self.steps_per_epoch)
        path, st = self.save(c.save.output_name, state, with_state=c.save.save_state)
        if st is not None:
            result.states.append(st)
        if c.sample.every_n_steps or c.sample.every_n_epochs:
            self.sample(state.step, state.epoch)
        if c.logging.log_with != "none":
            acc.end_training()
        result.output, result.steps, result.epochs = path, state.step, state.epoch
        result.files.append(path)
        return result

    # ----------------------------------------------------------------- non-finite weights
    def _owners(self) -> dict[int, str]:
        """``id(parameter)`` → the module (adapter) name it belongs to."""
        if not hasattr(self, "_owner_names"):
            self._owner_names = {id(p): name for name, a in self.net.adapters.items() for p in a.parameters()}
        return self._owner_names

    def _nonfinite_modules(self, tensors: list[torch.Tensor], params: list[torch.nn.Parameter]) -> list[str]:
        """The modules whose ``tensors`` (one per parameter of ``params``) hold NaN or Inf; one fused
        max-abs reduction per tensor list, a single host sync."""
        if not tensors:
            return []
        try:
            peaks = torch._foreach_norm([t.detach() for t in tensors], float("inf"))
        except (AttributeError, RuntimeError, TypeError):  # pragma: no cover - an older torch
            peaks = [t.detach().abs().amax() for t in tensors]
        bad = torch.nonzero(~torch.isfinite(torch.stack([p.float().to(peaks[0].device) for p in peaks])))
        if not len(bad):
            return []
        owners = self._owners()
        return list(dict.fromkeys(owners.get(id(params[int(i)]), "?") for i in bad.flatten().tolist()))

    def _check_before_step(self, state: TrainState) -> None:
        """Gradients and learning rates must be finite before the optimizer applies them: otherwise stop
        with the (still finite) adapter saved as ``<name>-last-good``, as a NaN loss does."""
        with_grad = [p for p in self.params if p.grad is not None]
        bad = self._nonfinite_modules([p.grad for p in with_grad], with_grad)
        lrs = [(self.group_names[i], g["lr"]) for i, g in enumerate(self.optimizer.param_groups)]
        bad_lr = [f"{name} = {lr}" for name, lr in lrs if not math.isfinite(float(lr))]
        if not (bad or bad_lr):
            return
        self.optimizer.zero_grad(set_to_none=True)
        what = (
            f"the gradients of {_modules_text(bad)} became NaN/Inf"
            if bad
            else f"the learning rate became non-finite ({', '.join(bad_lr)})"
        )
        self._stop(state, f"{what} at step {state.step + 1} (epoch {state.epoch + 1})")

    def _check_weights(self, state: TrainState, result: TrainResult) -> None:
        """After every optimizer step: a NaN/Inf adapter weight stops the run; nothing non-finite is saved."""
        params = list(self.net.parameters())
        bad = self._nonfinite_modules(params, params)
        if not bad:
            return
        kept = [p for p in result.files if p.is_file()]
        states = list_states(self.out_dir)
        if kept or states:
            what = f"the last saved adapter is {kept[-1]}" if kept else "no adapter file was saved by this run"
            if states:
                what += f" (resumable state {states[-1]})"
        else:
            what = "nothing was saved by this run"
        raise TrainingError(
            f"the adapter weights of {_modules_text(bad)} became NaN/Inf at step {state.step} (epoch "
            f"{state.epoch + 1}); stopped without saving them: {what}. Usual causes: a learning rate too high, "
            "optimizer.args that make the update overflow, fp16 overflow (try training.mixed_precision = 'bf16')."
        )

    def _stop(self, state: TrainState, what: str) -> None:
        name = f"{self.config.save.output_name}-last-good"
        path, _ = self.save(name, state, with_state=True)
        raise TrainingError(
            f"{what}; stopped before it reached the weights. The last good adapter is {path} (resumable state "
            f"{self.out_dir / f'state-{state.step:08d}'}). Usual causes: a learning rate too high, fp16 "
            "overflow (try training.mixed_precision = 'bf16', keep training.vae_fp32 = true), or NaN in the data."
        )

    def _nan_stop(self, state: TrainState, loss: torch.Tensor, result: TrainResult) -> None:
        self._stop(state, f"the loss became {float(loss.detach())} at step {state.step + 1} (epoch {state.epoch + 1})")


def train(
    config: TrainConfig,
    *,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train the adapter ``config`` describes; with ``dry_run`` only print the plan (data, buckets,
    captions, steps, wrapped modules) and return it, without encoding latents or training."""
    run = _Run(config, progress=progress, log=log)
    plan = run.setup(dry_run)
    if dry_run:
        if run.accelerator.is_main_process:
            log(plan)
        return TrainResult(None, 0, run.epochs, plan=plan)
    if run.accelerator.is_main_process:
        log(plan)
    run.prepare()
    try:
        result = run.run()
    finally:
        # adapters and the layers they wrap reference each other: free the model now, not at the next GC
        del run
        gc.collect()
    result.plan = plan
    return result
