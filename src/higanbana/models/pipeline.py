"""Inference pipelines and samplers built around in-memory :class:`~higanbana.models.sd.SDParts`.

Sampling during training and the evaluation framework both need a diffusers pipeline that runs the
very modules being trained (adapters attached in place), so :func:`build_pipeline` wraps them without
copying, moving or casting anything. Samplers are named as kohya's ``--sample_sampler`` names them and
map to diffusers schedulers configured with SD's training-noise schedule.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, HiganbanaError, nearest
from .sd import SD_KINDS

if TYPE_CHECKING:
    from .sd import SDParts

#: Sampler names accepted everywhere (kohya's ``--sample_sampler`` spelling).
SAMPLERS = ("ddim", "euler", "euler_a", "dpm++_2m", "dpm++_2m_karras", "pndm", "lms", "ddpm")

#: Other spellings kohya and A1111 users write, mapped onto :data:`SAMPLERS`.
SAMPLER_ALIASES = {
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "euler_ancestral": "euler_a",
    "k_lms": "lms",
    "dpmsolver++": "dpm++_2m",
    "k_dpm_2m": "dpm++_2m",
    "dpm++_2m_k": "dpm++_2m_karras",
    "plms": "pndm",
}

# sampler -> (diffusers class name, extra constructor options)
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


def canonical_sampler(sampler: str) -> str:
    """The :data:`SAMPLERS` name for ``sampler`` (case-insensitive, aliases allowed), or a ConfigError."""
    name = str(sampler).strip().lower()
    name = SAMPLER_ALIASES.get(name, name)
    if name not in SAMPLERS:
        raise ConfigError(
            f"unknown sampler {sampler!r}{nearest(name, SAMPLERS)}; expected one of {', '.join(SAMPLERS)}"
        )
    return name


def sampler_name(scheduler) -> str:
    """The :data:`SAMPLERS` name of a scheduler instance (its class name when it is none of them)."""
    cls = type(scheduler).__name__
    if cls == "DPMSolverMultistepScheduler":
        return "dpm++_2m_karras" if getattr(scheduler.config, "use_karras_sigmas", False) else "dpm++_2m"
    names = [name for name, (class_name, _) in _SCHEDULERS.items() if class_name == cls]
    return names[0] if names else cls


def default_scheduler_config(kind: str, v_parameterization: bool = False) -> dict:
    """SD's training-noise schedule (same for SD1, SD2 and SDXL), used when a model has no scheduler config.

    1000 steps, ``scaled_linear`` betas 0.00085..0.012, ``leading`` timestep spacing with offset 1 —
    what the released SD1/SD2/SDXL folders ship — and ``v_prediction`` for v-parameterised models.
    """
    if kind not in SD_KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; expected one of {SD_KINDS}")
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": "v_prediction" if v_parameterization else "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }


def read_scheduler_config(model_path: str | os.PathLike) -> dict | None:
    """``<folder>/scheduler/scheduler_config.json`` of a diffusers folder as a dict.

    ``None`` for a single-file checkpoint or a folder without one (callers then use
    :func:`default_scheduler_config`); unreadable JSON is an error naming the file.
    """
    path = Path(model_path) / "scheduler" / "scheduler_config.json"
    if not Path(model_path).is_dir() or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the scheduler config: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the scheduler config must be a JSON object, got {type(config).__name__}")
    return config


def make_scheduler(sampler: str, config: dict | Any):
    """A fresh diffusers scheduler for ``sampler`` with the noise schedule in ``config``.

    ``config`` is a plain dict or another scheduler's ``.config``; keys the target class does not take
    (e.g. DDPM's ``variance_type`` for Euler) are dropped instead of being warned about.
    """
    import diffusers

    name = canonical_sampler(sampler)
    class_name, extra = _SCHEDULERS[name]
    if name == "lms":
        from diffusers.utils import is_scipy_available

        if not is_scipy_available():
            raise HiganbanaError("the 'lms' sampler needs scipy (pip install scipy); choose another sampler")
    cls = getattr(diffusers, class_name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    options = {k: v for k, v in dict(config or {}).items() if k in accepted}
    options.update(extra)
    return cls(**options)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings off for a moment: importing diffusers' pipelines makes transformers
    >= 5 warn that torchvision is missing for image processors these pipelines never use."""
    from transformers.utils import logging as transformers_logging

    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous)


def build_pipeline(parts: SDParts, *, sampler: str = "ddim", scheduler_config: dict | None = None):
    """A diffusers text-to-image pipeline over ``parts``' own modules (no copies, no moves, no casts).

    SD1/SD2 get ``StableDiffusionPipeline`` (no safety checker), SDXL ``StableDiffusionXLPipeline`` with
    both encoders and tokenizers, ``force_zeros_for_empty_prompt`` on (as SDXL ships) and no
    watermark. ``scheduler_config`` defaults to :func:`default_scheduler_config`. The progress bar is off.
    """
    missing = []
    if parts.vae is None:
        missing.append("a VAE")
    if parts.tokenizers is None or any(t is None for t in parts.tokenizers):
        missing.append("tokenizer(s)")
    if missing:
        raise HiganbanaError(
            f"cannot build a {parts.kind} pipeline: the model parts have no {' and no '.join(missing)}; "
            "load a diffusers folder or single file that includes them (or pass with_vae=True to tiny_sd_parts)"
        )
    if scheduler_config is None:
        scheduler_config = default_scheduler_config(parts.kind, parts.v_parameterization)
    scheduler = make_scheduler(sampler, scheduler_config)
    if parts.kind == "sdxl":
        with _quiet_transformers():
            from diffusers import StableDiffusionXLPipeline

        te1, te2 = parts.text_encoders
        tok1, tok2 = parts.tokenizers
        pipeline = StableDiffusionXLPipeline(
            vae=parts.vae,
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tok1,
            tokenizer_2=tok2,
            unet=parts.unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        with _quiet_transformers():
            from diffusers import StableDiffusionPipeline

        pipeline = StableDiffusionPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoders[0],
            tokenizer=parts.tokenizers[0],
            unet=parts.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
