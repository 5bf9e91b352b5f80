"""One training step of the diffusion transformers (SD3/SD3.5, Flux.1): the captions' conditioning
(:class:`DitConditioner`, the family pipeline's own ``encode_prompt``) and the flow-matching loss
(:func:`flow_matching_loss`, formulas in :mod:`higanbana.train.flow`).

The UNet families' step is :mod:`higanbana.train.step`; the loop that calls either is
:mod:`higanbana.train.trainer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..models.dit import dit_pipeline
from . import flow
from .step import TextEncoder

#: T5 tokens per caption by default, as the pipelines: Flux.1 [dev] 512, SD3 256
DEFAULT_MAX_SEQUENCE_LENGTH = {"flux": 512, "sd3": 256}


class DitConditioner(TextEncoder):
    """Captions → ``(prompt_embeds, pooled_prompt_embeds)`` exactly as the family's pipeline computes
    them for generation (Flux: CLIP-L pooled + T5 states; SD3: both CLIPs' penultimate states padded and
    joined with T5's, pooled projections concatenated). Frozen encoders run without gradients;
    ``cache`` keeps the outputs per caption (T5-XXL is the largest part of these models), as
    :class:`~higanbana.train.step.TextEncoder` does for the UNet families."""

    def __init__(self, parts: Any, *, max_sequence_length: int = 0, trainable: bool, cache: bool) -> None:
        super().__init__(parts, 1, trainable=trainable, cache=cache)
        self.pipeline = dit_pipeline(parts)
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[parts.kind]

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.parts.transformer.device
        n = self.max_sequence_length
        if self.parts.kind == "flux":
            embeds, pooled, _ids = self.pipeline.encode_prompt(captions, captions, device=device, max_sequence_length=n)
            return embeds, pooled
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            captions, captions, captions, device=device, do_classifier_free_guidance=False, max_sequence_length=n
        )
        return embeds, pooled


@dataclass(frozen=True)
class FlowSettings:
    """How the noise level of a sample is drawn and weighted (``[training]`` of a DiT run)."""

    scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"
    shift: float = 0.0  # 0: the scheduler config's (SD3: 3.0); Flux shifts by resolution when it says so
    guidance: float = 1.0  # Flux [dev]'s guidance input while training (kohya's default 1.0)


def noise_levels(
    generators: list[torch.Generator], settings: FlowSettings, kind: str, scheduler_config: dict, tokens: int
) -> torch.Tensor:
    """Each sample's σ: drawn by ``settings.scheme``, then shifted as the family's scheduler shifts at
    inference — Flux by its image size (``use_dynamic_shifting``), SD3 by the constant shift."""
    sigmas = flow.sample_sigmas(
        generators,
        scheme=settings.scheme,
        logit_mean=settings.logit_mean,
        logit_std=settings.logit_std,
        mode_scale=settings.mode_scale,
    )
    if settings.shift:
        return flow.shift_sigmas(sigmas, settings.shift)
    if kind == "flux" and scheduler_config.get("use_dynamic_shifting"):
        params = {
            "base_seq_len": scheduler_config.get("base_image_seq_len", flow.FLUX_SHIFT["base_seq_len"]),
            "max_seq_len": scheduler_config.get("max_image_seq_len", flow.FLUX_SHIFT["max_seq_len"]),
            "base_shift": scheduler_config.get("base_shift", flow.FLUX_SHIFT["base_shift"]),
            "max_shift": scheduler_config.get("max_shift", flow.FLUX_SHIFT["max_shift"]),
        }
        return flow.flux_shift(sigmas, flow.flux_mu(tokens, params))
    return flow.shift_sigmas(sigmas, float(scheduler_config.get("shift", 1.0)))


def flow_matching_loss(
    parts: Any,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    generators: list[torch.Generator],
    settings: FlowSettings,
    *,
    loss_type: str = "l2",
    huber_c: float = 0.1,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The flow-matching loss of one batch, averaged over its samples.

    Per sample (its own generator): noise ``ε ~ N(0, I)``, a noise level σ (:func:`noise_levels`),
    ``x_σ = (1 − σ)·x_0 + σ·ε``; the transformer predicts the velocity ``v = ε − x_0`` (SD3 reads the
    timestep ``1000·σ``, Flux ``σ`` with packed latents, position ids and the guidance input); the
    per-sample loss is weighted by ``settings.weighting``.
    """
    b, _, h, w = latents.shape
    device = latents.device
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(device)
    kind = parts.kind
    tokens = (h // 2) * (w // 2)
    sigmas = noise_levels(generators, settings, kind, parts.scheduler_config, tokens)
    noisy = flow.interpolate(latents, noise, sigmas)
    target = flow.velocity(latents, noise)
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    model = parts.transformer
    if kind == "flux":
        guidance = None
        if model.config.get("guidance_embeds"):
            guidance = torch.full((b,), settings.guidance, device=device, dtype=torch.float32)
        pred = model(
            hidden_states=cast(flow.pack_latents(noisy)),
            encoder_hidden_states=cast(embeds),
            pooled_projections=cast(pooled),
            timestep=sigmas.to(device, torch.float32),
            img_ids=flow.latent_ids(h, w, device=device),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device),
            guidance=guidance,
            return_dict=False,
        )[0]
        pred = flow.unpack_latents(pred.float(), h, w)
    else:
        pred = model(
            hidden_states=cast(noisy),
            encoder_hidden_states=cast(embeds),
            pooled_projections=cast(pooled),
            timestep=(1000 * sigmas).to(device, torch.float32),
            return_dict=False,
        )[0].float()
    if loss_type == "l2":
        per = F.mse_loss(pred, target.float(), reduction="none")
    elif loss_type == "l1":
        per = F.l1_loss(pred, target.float(), reduction="none")
    else:
        per = F.huber_loss(pred, target.float(), reduction="none", delta=huber_c)
    per = per.reshape(b, -1).mean(dim=1)
    return (per * flow.loss_weight(sigmas, settings.weighting).to(device, per.dtype)).mean()
