"""Pretraining of the miniature world's tiny models: a CLIP, a VAE and a Stable Diffusion UNet.

One file on purpose: the three stages share their helpers (step budget, optimizer, batches) and
feed one another (the CLIP's text tower conditions the UNet, the VAE encodes its latents).

Three stages, each deterministic given its seed and sized for a laptop CPU (32 px images):

1. :func:`train_clip` — a transformers ``CLIPModel`` trained contrastively (InfoNCE with a learnable
   temperature) on world images and captions. Its text tower becomes the SD text encoder (frozen);
   the whole model is the evaluation encoder (``ClipEncoder``; its vision tower is the DINO-like
   image feature).
2. :func:`train_vae` — a diffusers ``AutoencoderKL`` (reconstruction + tiny KL); its
   ``scaling_factor`` is set to 1/std of the latents. Its encoder's conv layers are the Gram feature
   stack of the style loss (:class:`VaeStyleEncoder`).
3. :func:`train_unet` — a diffusers ``UNet2DConditionModel`` trained with the DDPM epsilon objective
   (SD's ``scaled_linear`` schedule, so the project's default samplers apply unchanged) on cached
   latents and frozen text states, 10 % empty captions for classifier-free guidance, EMA weights.

:func:`save_miniworld` writes an SD folder that :func:`higanbana.models.sd.load_sd` loads and a CLIP
folder that ``load_encoder("clip", ...)`` loads; :func:`prompt_following` scores a pipeline with the
world's attribute checker; :func:`pretrain` runs everything at a named :data:`SCALES` entry.
Held-out concepts never enter: the data is :func:`~higanbana.miniworld.world.dataset` (base only).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConfigError
from ..evaluate.encoders import (  # images_to_tensor and VaeStyleEncoder: re-exported
    CLIP_MEAN,
    CLIP_STD,
    VaeStyleEncoder,
    images_to_tensor,
)
from ..models.pipeline import build_pipeline, read_scheduler_config
from ..models.sd import SDParts, load_sd
from ..models.tiny import save_tiny_sd
from ..safeio import atomic_folder, write_text
from .checker import check
from .tokenizer import MAX_LENGTH, world_tokenizer
from .world import dataset, render, sample_scene

__all__ = [
    "CLIP_TEXT",
    "CLIP_VISION",
    "SCALES",
    "UNET",
    "VAE",
    "VaeStyleEncoder",
    "encode_latents",
    "encode_texts",
    "folder_size_mb",
    "images_to_tensor",
    "make_noise_scheduler",
    "pretrain",
    "prompt_following",
    "reconstruction_accuracy",
    "save_miniworld",
    "text_encoder_of",
    "train_clip",
    "train_unet",
    "train_vae",
]

#: The CLIP text tower (= the SD text encoder): quick_gelu as CLIP-L, so the SD folder is detected as SD1.
CLIP_TEXT: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
#: The CLIP vision tower: a ViT on 32 px images with 4 px patches (64 tokens).
CLIP_VISION: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=4,
    hidden_act="quick_gelu",
)
#: AutoencoderKL: two levels, so 32 px images become 16 x 16 x 4 latents (factor 2).
VAE: dict[str, Any] = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
)
#: UNet2DConditionModel on the 16 x 16 latents: three levels (16, 8, 4), cross-attention at 8 x 8,
#: 4 x 4 and in the middle (the shipped model; the two-level variant learned shapes far more slowly).
UNET: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=CLIP_TEXT["hidden_size"],
    attention_head_dim=8,
    norm_num_groups=32,
)

#: Named run sizes: ``tiny`` is a seconds-long smoke run; ``full`` fits ~25 min on 2 CPU cores;
#: ``gpu`` is the plan of the shipped models (one accelerator, wall-clock budgets per stage).
SCALES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        n_images=128,
        clip=dict(steps=10, batch_size=32),
        vae=dict(steps=10, batch_size=16),
        unet=dict(steps=10, batch_size=16),
        eval=dict(n=10, steps=5),
    ),
    "full": dict(
        n_images=16000,
        clip=dict(steps=600, batch_size=128),
        vae=dict(steps=400, batch_size=32),
        unet=dict(steps=1700, batch_size=32),
        eval=dict(n=100, steps=20),
    ),
    # one accelerator, minutes (the stages stop at their ``max_seconds``): the shipped models' plan
    "gpu": dict(
        n_images=50000,
        clip=dict(steps=4000, batch_size=256, max_seconds=45),
        vae=dict(steps=4000, batch_size=128, max_seconds=75),
        unet=dict(steps=40000, batch_size=256, lr=1e-3, max_seconds=270),
        eval=dict(n=200, steps=20),
    ),
}

_FORK = dict(devices=[])


# ---------------------------------------------------------------------------------------------
# helpers


def _clip_pixels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to CLIP's normalisation, exactly what ``ClipEncoder`` feeds at 32 px."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def _progress(steps: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(range(steps), desc=desc, unit="step", disable=not progress, mininterval=2.0)


def _optimizer(params, lr: float, steps: int, warmup: int = 100, weight_decay: float = 0.01, total=None):
    """AdamW with linear warm-up and a cosine decay to 10 % of ``lr`` at step ``total[0]`` (a
    one-item list, default ``[steps]``, that a time budget may shorten while training)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, min(warmup, steps // 10))
    total = total if total is not None else [steps]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total[0] - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class _Budget:
    """Shortens a run of ``steps`` steps to what fits ``max_seconds`` of wall-clock time: the step
    rate is measured after a warm-up and every ``every`` steps, and ``total[0]`` (the cosine
    schedule's end) is lowered to the steps that fit. ``None`` keeps ``steps`` (deterministic)."""

    def __init__(self, steps: int, max_seconds: float | None, every: int = 250) -> None:
        if max_seconds is not None and max_seconds <= 0:
            raise ConfigError(f"max_seconds must be > 0, got {max_seconds}")
        self.total, self.max_seconds, self.every = [steps], max_seconds, every
        self.start = time.perf_counter()

    def done(self, step: int) -> bool:
        """Whether step ``step`` (0-based) should not run."""
        if step >= self.total[0]:
            return True
        if self.max_seconds is None or step == 0 or step % self.every:
            return False
        elapsed = time.perf_counter() - self.start
        if elapsed >= self.max_seconds:
            self.total[0] = step
            return True
        fits = int(step * self.max_seconds / elapsed)
        self.total[0] = max(step + 1, min(self.total[0], fits))
        return False


def _check_steps(steps: int, batch_size: int, n: int) -> None:
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if n < 2:
        raise ConfigError(f"training needs at least 2 examples, got {n}")


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    """``steps`` index batches from reshuffled epochs (deterministic in ``gen``)."""
    batch_size = min(batch_size, n)
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def _training_steps(stage: str, n: int, batch_size: int, budget: _Budget, gen: torch.Generator, progress: bool):
    """(step, index batch) pairs of a stage's loop, under its progress bar, until ``budget`` says stop."""
    steps = budget.total[0]
    bar = _progress(steps, stage, progress)
    try:
        for step, idx in zip(bar, _batches(n, batch_size, steps, gen), strict=True):
            if budget.done(step):
                return
            yield step, idx
    finally:
        bar.close()


def _finite(loss: torch.Tensor, stage: str, step: int) -> None:
    """Stop on a non-finite loss. On an accelerator this reads the loss back every 50 steps only
    (each read waits for the device), so a bad step is caught within 50 steps."""
    if (loss.device.type == "cpu" or step % 50 == 0) and not torch.isfinite(loss):
        raise FloatingPointError(f"{stage}: the loss became {loss.item()} at step {step}")


def _to_floats(log: list | None) -> None:
    """Losses are logged as detached tensors (no device sync per step); turn them into floats."""
    if log:
        values = torch.stack([torch.as_tensor(v).float() for v in log]).cpu()
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).nonzero()[0, 0])
            raise FloatingPointError(f"the loss became {values[bad].item()} at step {bad}")
        log[:] = values.tolist()


# ---------------------------------------------------------------------------------------------
# 1. CLIP


def train_clip(
    images: torch.Tensor,
    captions: list[str],
    tokenizer,
    *,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    text_config: dict | None = None,
    vision_config: dict | None = None,
    projection_dim: int = 64,
    progress: bool = True,
    log: list | None = None,
    device: str | torch.device = "cpu",
    max_seconds: float | None = None,
):
    """A ``CLIPModel`` trained with CLIP's symmetric InfoNCE loss (learnable temperature) on
    ``images`` ((n, 3, 32, 32) in [-1, 1]) and their ``captions``, on ``device`` (``max_seconds``: as in
    :func:`train_unet`). Returns it on the CPU, in eval mode."""
    from transformers import CLIPConfig, CLIPModel

    _check_steps(steps, batch_size, len(captions))
    if len(images) != len(captions):
        raise ConfigError(f"train_clip: {len(images)} images but {len(captions)} captions")
    text_cfg = {**CLIP_TEXT, "vocab_size": len(tokenizer), **(text_config or {})}
    vision_cfg = {**CLIP_VISION, **(vision_config or {})}
    tok = tokenizer(captions, padding="max_length", max_length=text_cfg["max_position_embeddings"],
                    truncation=True, return_tensors="pt")  # fmt: skip
    dev = torch.device(device)
    pixels = _clip_pixels(images).to(dev)
    ids, mask = tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
    with torch.random.fork_rng(**_FORK):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=projection_dim))
        model.to(dev).train()
        budget = _Budget(steps, max_seconds)
        opt, sched = _optimizer(model.parameters(), lr, steps, total=budget.total)
        gen = torch.Generator().manual_seed(seed)
        for step, idx in _training_steps("clip", len(captions), batch_size, budget, gen, progress):
            idx = idx.to(dev)
            out = model(input_ids=ids[idx], attention_mask=mask[idx], pixel_values=pixels[idx], return_loss=True)
            _finite(out.loss, "clip", step)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            if log is not None:
                log.append(out.loss.detach())
    _to_floats(log)
    return model.cpu().eval()


def text_encoder_of(clip):
    """The CLIP text tower as a standalone ``CLIPTextModel`` (the SD text encoder), same weights."""
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip.config.text_config)
    getattr(te, "text_model", te).load_state_dict(clip.text_model.state_dict())  # transformers 5 has no .text_model
    return te.eval()


@torch.no_grad()
def encode_texts(text_encoder, tokenizer, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """(n, max_length, hidden) last hidden states, tokenized exactly as ``StableDiffusionPipeline``
    does (padded to ``model_max_length``, no attention mask)."""
    out = []
    for i in range(0, len(captions), batch_size):
        ids = tokenizer(captions[i : i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids  # fmt: skip
        out.append(text_encoder(input_ids=ids.to(text_encoder.device)).last_hidden_state)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# 2. VAE


def train_vae(
    images: torch.Tensor,
    *,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    config: dict | None = None,
    progress: bool = True,
    log: list | None = None,
    device: str | torch.device = "cpu",
    max_seconds: float | None = None,
):
    """An ``AutoencoderKL`` trained with L1 + MSE reconstruction and a tiny KL term on ``images``
    ((n, 3, h, w) in [-1, 1]) on ``device`` (``max_seconds``: as in :func:`train_unet`); its
    ``scaling_factor`` is set to 1/std of the training latents. Returned on the CPU, in eval mode."""
    from diffusers import AutoencoderKL

    _check_steps(steps, batch_size, len(images))
    dev = torch.device(device)
    data = images.to(dev)
    with torch.random.fork_rng(**_FORK):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**{**VAE, "sample_size": int(images.shape[-1]), **(config or {})})
        vae.to(dev).train()
        budget = _Budget(steps, max_seconds)
        opt, sched = _optimizer(vae.parameters(), lr, steps, total=budget.total)
        gen = torch.Generator().manual_seed(seed)
        noise_gen = torch.Generator(dev).manual_seed(seed)
        for step, idx in _training_steps("vae", len(images), batch_size, budget, gen, progress):
            x = data[idx.to(dev)]
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=noise_gen, device=dev)
            rec = vae.decode(z).sample
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * posterior.kl().mean()
            _finite(loss, "vae", step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            if log is not None:
                log.append(loss.detach())
    _to_floats(log)
    vae.cpu().eval()
    latents = encode_latents(vae, images[:2048], scaled=False)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std().clamp_min(1e-6)))
    return vae


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, *, scaled: bool = True, batch_size: int = 256) -> torch.Tensor:
    """The posterior means of ``images`` (deterministic), times ``scaling_factor`` when ``scaled``."""
    dev = vae.device
    chunks = [images[i : i + batch_size].to(dev) for i in range(0, len(images), batch_size)]
    z = torch.cat([vae.encode(x).latent_dist.mean.cpu() for x in chunks])
    return z * vae.config.scaling_factor if scaled else z


# ---------------------------------------------------------------------------------------------
# 3. UNet


def make_noise_scheduler():
    """SD's training-noise schedule (1000 steps, scaled_linear 0.00085..0.012, epsilon): the one
    :func:`higanbana.models.pipeline.default_scheduler_config` assumes."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         steps_offset=1, prediction_type="epsilon")  # fmt: skip


def train_unet(
    latents: torch.Tensor,
    text_states: torch.Tensor,
    empty_state: torch.Tensor,
    *,
    steps: int = 4000,
    batch_size: int = 64,
    lr: float = 5e-4,
    caption_dropout: float = 0.1,
    ema_decay: float = 0.999,
    seed: int = 0,
    config: dict | None = None,
    progress: bool = True,
    log: list | None = None,
    device: str | torch.device = "cpu",
    max_seconds: float | None = None,
):
    """A ``UNet2DConditionModel`` trained to predict the noise of ``latents`` (scaled, (n, 4, s, s))
    given ``text_states`` ((n, L, d) frozen text-encoder outputs); with probability ``caption_dropout``
    a sample sees ``empty_state`` (the empty caption's states) instead, for classifier-free guidance.
    ``max_seconds`` shortens the run (and its cosine schedule) to what fits that wall-clock time;
    the steps run are ``len(log)``. Returns the EMA weights (``ema_decay`` 0 returns the raw ones)
    on the CPU, in eval mode."""
    from diffusers import UNet2DConditionModel

    _check_steps(steps, batch_size, len(latents))
    if len(latents) != len(text_states):
        raise ConfigError(f"train_unet: {len(latents)} latents but {len(text_states)} text states")
    cfg = {**UNET, "sample_size": int(latents.shape[-1]), "cross_attention_dim": int(text_states.shape[-1])}
    cfg.update(config or {})
    dev = torch.device(device)
    scheduler = make_noise_scheduler()
    alphas = scheduler.alphas_cumprod.to(dev)
    latents, text_states = latents.to(dev), text_states.to(dev)
    empty = empty_state.reshape(1, *text_states.shape[1:]).to(dev)
    budget = _Budget(steps, max_seconds)
    with torch.random.fork_rng(**_FORK):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg)
        unet.to(dev).train()
        ema = copy.deepcopy(unet).eval().requires_grad_(False) if ema_decay > 0 else None
        opt, sched = _optimizer(unet.parameters(), lr, steps, weight_decay=0.0, total=budget.total)
        params = list(unet.parameters())
        ema_params = list(ema.parameters()) if ema is not None else []
        gen = torch.Generator().manual_seed(seed)
        noise_gen = torch.Generator(dev).manual_seed(seed)
        for step, idx in _training_steps("unet", len(latents), batch_size, budget, gen, progress):
            drop = (torch.rand(len(idx), generator=gen) < caption_dropout).to(dev)
            idx = idx.to(dev)
            z0, ctx = latents[idx], text_states[idx]
            ctx = torch.where(drop[:, None, None], empty, ctx)
            noise = torch.randn(z0.shape, generator=noise_gen, device=dev)
            t = torch.randint(0, len(alphas), (len(idx),), generator=noise_gen, device=dev)
            a = alphas[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            loss = F.mse_loss(unet(zt, t, encoder_hidden_states=ctx).sample, noise)
            _finite(loss, "unet", step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            if ema is not None:
                d = min(ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    torch._foreach_lerp_(ema_params, params, 1 - d)
            if log is not None:
                log.append(loss.detach())
    _to_floats(log)
    return (ema if ema is not None else unet).cpu().eval()


# ---------------------------------------------------------------------------------------------
# saving and evaluation


def save_miniworld(folder, clip, vae, unet, tokenizer, *, dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    """Write ``folder/sd`` (a StableDiffusionPipeline folder: unet/, vae/, text_encoder/ = the CLIP
    text tower, tokenizer/, scheduler/, model_index.json) and ``folder/clip`` (the CLIPModel and its
    tokenizer). Weights are stored in ``dtype`` (fp16 keeps the shipped models small; ``load_sd`` and
    ``ClipEncoder`` load them as float32). The in-memory modules are left unchanged."""
    folder = Path(folder)
    te = text_encoder_of(clip)

    def cast(m):
        return copy.deepcopy(m).to(dtype)

    parts = SDParts("sd1", cast(unet), [cast(te)], cast(vae), [tokenizer])
    # each folder is written whole, then swapped in (a kill never leaves half a model under its name)
    with atomic_folder(folder / "sd", overwrite=True) as tmp:
        save_tiny_sd(parts, tmp)
    clip_dir = folder / "clip"
    with atomic_folder(clip_dir, overwrite=True) as tmp:
        cast(clip).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"sd": folder / "sd", "clip": clip_dir}


def folder_size_mb(folder) -> float:
    """Total size of the files under ``folder`` in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6


@torch.no_grad()
def prompt_following(pipeline, n: int = 100, seed: int = 0, steps: int = 20, cfg: float = 4.0,
                     batch_size: int = 50, size: int = 32) -> dict[str, Any]:  # fmt: skip
    """Generate one image per caption of ``n`` random single-object flat-style base scenes and score
    them with the world's attribute checker: the fraction correct per attribute (``colour``,
    ``shape``, ``count``, ``position``, ``size``) plus ``n``, ``steps`` and ``cfg``."""
    if n < 1:
        raise ConfigError(f"prompt_following: n must be >= 1, got {n}")
    rng = np.random.default_rng([int(seed), 4242])
    scenes = [sample_scene(rng, count=1, style="flat") for _ in range(n)]
    hits: dict[str, int] = {}
    for i in range(0, n, batch_size):
        chunk = scenes[i : i + batch_size]
        gen = torch.Generator().manual_seed(int(seed) + i)
        out = pipeline([s.caption() for s in chunk], height=size, width=size, num_inference_steps=steps,
                       guidance_scale=cfg, generator=gen, output_type="pil")  # fmt: skip
        for image, scene in zip(out.images, chunk, strict=True):
            for k, ok in check(image, scene).items():
                hits[k] = hits.get(k, 0) + int(ok)
    return {**{k: v / n for k, v in hits.items()}, "n": n, "steps": steps, "cfg": cfg}


@torch.no_grad()
def reconstruction_accuracy(vae, n: int = 100, seed: int = 0) -> dict[str, float]:
    """The checker's accuracy on VAE round trips of the renders of the scenes
    :func:`prompt_following` asks for (single-object, flat): how much of what the checker reads
    survives the autoencoder, an upper bound for the SD model's prompt following."""
    rng = np.random.default_rng([int(seed), 4242])
    scenes = [sample_scene(rng, count=1, style="flat") for _ in range(n)]
    x = images_to_tensor([render(s, int(vae.config.sample_size), i) for i, s in enumerate(scenes)])
    rec = vae.decode(encode_latents(vae, x, scaled=False)).sample.clamp(-1, 1)
    arr = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    hits: dict[str, int] = {}
    for a, scene in zip(arr, scenes, strict=True):
        for k, ok in check(Image.fromarray(a), scene).items():
            hits[k] = hits.get(k, 0) + int(ok)
    return {k: v / n for k, v in hits.items()}


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _stage(folder: Path, name: str, key: dict, train, load, save):
    """Stage ``name`` from its checkpoint ``folder/stages/name`` when that was made with the same
    ``key`` (plan, seed, data), else trained by ``train()`` and checkpointed (written atomically:
    a partial folder is never taken for a finished stage, and an old one is replaced rename-then-delete).
    Returns (model, trained_now)."""
    path = folder / "stages" / name
    marker = path / "stage.json"
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == key:
        return load(path), False
    model = train()
    with atomic_folder(path, overwrite=True) as tmp:
        save(model, tmp)
        (tmp / "stage.json").write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")
    return model, True


def pretrain(out, scale: str = "full", seed: int = 0, *, progress: bool = True, overrides: dict | None = None,
             cfg: float | list[float] = 4.0, device: str | torch.device = "cpu", workers: int = 1,
             stages_only: bool = False) -> dict[str, Any]:  # fmt: skip
    """Run all stages at ``SCALES[scale]`` (merged with ``overrides``) on ``device``, save to ``out``
    (see :func:`save_miniworld`), reload the SD folder, measure prompt following and write
    ``out/training.json`` (sizes, steps, seeds, times, losses, accuracies). Returns that record.

    The CLIP and VAE stages are checkpointed under ``out/stages/`` and reused by a later call with
    the same plan, seed and data (so a UNet can be retrained, or several UNet variants trained in
    copies of ``out``, without retraining them); ``stages_only`` stops after them. ``workers``
    renders the data in that many processes. With several ``cfg`` values prompt following is
    measured at each (``prompt_following_by_cfg``); ``prompt_following`` is the first.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    plan = copy.deepcopy(SCALES[scale])
    for key, value in (overrides or {}).items():
        if key not in plan:
            raise ConfigError(f"unknown pretraining plan entry {key!r}; expected one of {sorted(plan)}")
        plan[key] = {**plan[key], **value} if isinstance(value, dict) else value
    dev = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    record: dict[str, Any] = {"scale": scale, "seed": seed, "plan": plan, "device": str(dev),
                              "torch_threads": torch.get_num_threads()}  # fmt: skip

    t0 = time.perf_counter()
    data = dataset(plan["n_images"], seed=seed, workers=workers)
    images = images_to_tensor([im for im, _, _ in data])
    captions = [c for _, c, _ in data]
    tokenizer = world_tokenizer()
    times["data"] = time.perf_counter() - t0

    losses: dict[str, list] = {"clip": [], "vae": [], "unet": []}
    data_key = {"n_images": plan["n_images"], "seed": seed}
    t = time.perf_counter()
    clip, clip_trained = _stage(
        out, "clip", {**data_key, "plan": plan["clip"]},
        lambda: train_clip(images, captions, tokenizer, seed=seed, progress=progress, log=losses["clip"],
                           device=dev, **plan["clip"]),
        lambda path: CLIPModel.from_pretrained(path, dtype=torch.float32).eval(),
        lambda model, path: model.save_pretrained(path),
    )  # fmt: skip
    times["clip"] = time.perf_counter() - t
    t = time.perf_counter()
    vae, vae_trained = _stage(
        out, "vae", {**data_key, "plan": plan["vae"]},
        lambda: train_vae(images, seed=seed + 1, progress=progress, log=losses["vae"], device=dev, **plan["vae"]),
        lambda path: AutoencoderKL.from_pretrained(path, dtype=torch.float32).eval(),
        lambda model, path: model.save_pretrained(path),
    )  # fmt: skip
    times["vae"] = time.perf_counter() - t
    if stages_only:
        record.update(steps_run={k: len(v) for k, v in losses.items()},
                      final_loss={k: float(np.mean(v[-50:])) for k, v in losses.items() if v},
                      times_s={k: round(v, 1) for k, v in times.items()})  # fmt: skip
        write_text(out / "stages.json", json.dumps(record, indent=2, default=str) + "\n")
        return record

    t = time.perf_counter()
    te = text_encoder_of(clip).to(dev)
    latents = encode_latents(vae.to(dev), images)
    vae.cpu()
    states = encode_texts(te, tokenizer, captions).cpu()
    empty = encode_texts(te, tokenizer, [""])[0].cpu()
    te.cpu()
    times["cache"] = time.perf_counter() - t
    t = time.perf_counter()
    unet = train_unet(latents, states, empty, seed=seed + 2, progress=progress, log=losses["unet"], device=dev,
                      **plan["unet"])  # fmt: skip
    times["unet"] = time.perf_counter() - t

    paths = save_miniworld(out, clip, vae, unet, tokenizer)
    t = time.perf_counter()
    parts = load_sd(paths["sd"])
    pipeline = build_pipeline(parts, sampler="ddim", scheduler_config=read_scheduler_config(paths["sd"])).to(dev)
    cfgs = [float(c) for c in (cfg if isinstance(cfg, list | tuple) else [cfg])]
    by_cfg = {str(c): prompt_following(pipeline, seed=seed, cfg=c, **plan["eval"]) for c in cfgs}
    accuracy = by_cfg[str(cfgs[0])]
    recon = reconstruction_accuracy(vae, n=plan["eval"]["n"], seed=seed)
    times["eval"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0

    def tail(values: list) -> float | None:
        return float(np.mean(values[-50:])) if values else None

    record.update(
        params={"clip": _count(clip), "vae": _count(vae), "unet": _count(unet), "text_encoder": _count(te)},
        configs={"clip": clip.config.to_dict(), "vae": dict(vae.config), "unet": dict(unet.config)},
        vocab_size=len(tokenizer),
        vae_scaling_factor=float(vae.config.scaling_factor),
        steps_run={k: len(v) for k, v in losses.items()},
        stages_reused=[name for name, trained in (("clip", clip_trained), ("vae", vae_trained)) if not trained],
        final_loss={k: tail(v) for k, v in losses.items()},
        times_s={k: round(v, 1) for k, v in times.items()},
        prompt_following=accuracy,
        prompt_following_by_cfg=by_cfg,
        vae_reconstruction=recon,
        size_mb={"sd": round(folder_size_mb(paths["sd"]), 2), "clip": round(folder_size_mb(paths["clip"]), 2)},
    )
    write_text(out / "training.json", json.dumps(record, indent=2, default=str) + "\n")
    return record
