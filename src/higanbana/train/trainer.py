"""The training loop: one function, :func:`train`, from a validated :class:`TrainConfig` to files.

What the loop is given comes from :mod:`.setup` (data, model, network, preflight); what one step
computes is :mod:`.step` (text conditioning, the loss); here: the run's plan, placement, the
randomness, the loop, saving, sampling and resuming.

One file over ~500 lines on purpose: what is left is one object, the run (:class:`_Run`), whose
methods share its state — placement, the step counter, the optimizer and the files it writes.

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

from ..errors import ConfigError, HiganbanaError
from ..formats.dit_network import save_dit_network
from ..formats.sd_network import save_sd_network
from ..models.dit import DIT_KINDS, dit_pipeline
from ..models.pipeline import build_pipeline
from ..safeio import discard, writable_folder, write_text
from .config import TrainConfig
from .flow_step import DitConditioner, FlowSettings, flow_matching_loss
from .latents import LatentCache, sample_latents
from .optim import make_optimizer, make_scheduler, warmup_steps
from .sample import generate_samples, log_samples, parse_prompt_file, save_samples
from .setup import build_data, build_network, check_clip_skip, load_model, output_folders, preflight
from .state import TrainState, list_states, load_state, resolve_resume, save_state
from .step import TextEncoder, diffusion_loss

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


def _fingerprint(config: TrainConfig, world: int) -> str:
    """What must not change between a run and its resume (paths of outputs and step counts may)."""
    d = config.to_dict()
    keep = {k: d[k] for k in ("model", "network", "data", "optimizer", "scheduler")}
    keep["training"] = {
        k: v for k, v in d["training"].items() if k not in ("resume", "device", "gradient_checkpointing")
    }
    keep["world"] = world
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def _modules_text(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return f"{len(names)} module(s) ({shown}{', …' if len(names) > 5 else ''})"


# ------------------------------------------------------------------------------- randomness
def _sample_seed(seed: int, micro: int, position: int) -> int:
    return (seed * 1_000_003 + micro * 65_537 + position) % (2**63 - 1)


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
        check_clip_skip(c, self.parts)
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
            if c.model.quantize != "none" and module is (parts.transformer if self.dit else parts.unet):
                return  # its quantized weights stay as they are (adapters run in bypass over them)
            if module.dtype != dtype:  # (diffusers warns about casting even when nothing changes)
                module.to(dtype)

        self.dit = parts.kind in DIT_KINDS
        denoiser = parts.transformer if self.dit else parts.unet
        place(denoiser, weight_dtype)
        for te in parts.text_encoders:
            place(te, weight_dtype if not c.network.train_text_encoder else torch.float32)
        place(parts.vae, torch.float32 if t.vae_fp32 else weight_dtype)
        self.net.to(self.device)
        for module in (denoiser, parts.vae, *parts.text_encoders):
            module.requires_grad_(False)
            module.eval()
        self.net.train()
        if t.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
            if c.network.train_text_encoder:
                for te in parts.text_encoders:
                    enable = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
                    enable()
                    te.train()  # transformers checkpoints only in train mode (CLIP has no dropout to switch on)
        if self.dit:
            self.flow = FlowSettings(
                scheme=t.timestep_sampling,
                logit_mean=t.logit_mean,
                logit_std=t.logit_std,
                mode_scale=t.mode_scale,
                weighting=t.weighting_scheme,
                shift=t.discrete_flow_shift,
                guidance=t.guidance_scale,
            )
            self.text = DitConditioner(
                parts,
                max_sequence_length=t.max_sequence_length,
                trainable=c.network.train_text_encoder,
                cache=c.data.cache_text_encoder_outputs,
            )
        else:
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
            if prefix in ("lora_unet", "lora_transformer"):
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
            if self.dit:
                t = c.training
                return flow_matching_loss(
                    self.parts, latents, hidden, pooled, gens, self.flow, loss_type=t.loss_type, huber_c=t.huber_c
                )
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
        if self.accelerator.is_main_process and self.parts.kind in DIT_KINDS:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_dit_network(
                self.net,
                path,
                layout=c.save.layout,
                dtype=_SAVE_DTYPES[c.save.dtype],
                metadata={"modelspec.trigger_phrase": c.save.trigger_phrase} if c.save.trigger_phrase else None,
                training=self._training_facts(state),
            )
        elif self.accelerator.is_main_process:
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
        if self.accelerator.is_main_process and with_state:
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
        dit = self.parts.kind in DIT_KINDS
        if dit:  # the family's own flow-matching Euler sampler
            pipeline = dit_pipeline(self.parts)
        else:
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
                sampler=None if dit else c.sample.sampler,
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
