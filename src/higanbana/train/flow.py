"""Flow matching for the diffusion transformers (SD3/SD3.5, Flux.1): timesteps, interpolation, target.

Rectified flow (Esser et al. 2024, "Scaling Rectified Flow Transformers", §2–3): a noise level
``σ ∈ [0, 1]`` interpolates ``x_σ = (1 − σ)·x_0 + σ·ε`` between the latents and the noise, and the
model predicts the velocity ``v = ε − x_0`` (d x_σ / dσ). SD3's transformer takes ``1000·σ`` as its
timestep, Flux's (in diffusers) ``σ`` itself.

The noise level of a training sample is drawn per sample from its own generator (reproducible and
resumable, as the UNet objective draws its timesteps):

- ``uniform``: ``σ ~ U(0, 1)``;
- ``logit_normal`` (SD3's default, m = 0, s = 1): ``σ = sigmoid(u)``, ``u ~ N(m, s²)``;
- ``mode`` (SD3 §3.1, "mode sampling with heavy tails"): ``σ = 1 − u − s·(cos²(πu/2) − 1 + u)``,
  ``u ~ U(0, 1)``, ``s`` in [−1, 2/(π − 2)] so that it stays monotone;

then shifted towards noise for larger images: SD3's constant shift ``σ' = αs / (1 + (α − 1)s)``
(α = 3 for SD3), or Flux's resolution-dependent one ``σ' = e^μ / (e^μ + 1/σ − 1)`` with ``μ``
linear in the number of packed latent tokens (0.5 at 256 tokens, 1.15 at 4096).

SD3 §3.1 also weights the loss per sample (``weighting``): ``none``, ``sigma_sqrt`` (``σ⁻²``) or
``cosmap`` (``2 / (π(1 − 2σ + 2σ²))``). Flux's latents enter the transformer as 2×2 patches
(:func:`~higanbana.models.flux.pack_latents`, 64 channels from 16, re-exported here), with a
position id ``(0, row, column)`` per patch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.flux import latent_ids, pack_latents, unpack_latents

__all__ = [
    "FLUX_SHIFT",
    "SCHEMES",
    "WEIGHTINGS",
    "flux_mu",
    "flux_shift",
    "interpolate",
    "latent_ids",
    "loss_weight",
    "pack_latents",
    "sample_sigmas",
    "shift_sigmas",
    "unpack_latents",
    "velocity",
]

SCHEMES = ("uniform", "logit_normal", "mode")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
#: Flux.1's scheduler: μ = base_shift at base_seq_len packed tokens, max_shift at max_seq_len
FLUX_SHIFT = {"base_seq_len": 256, "max_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
#: the mode-sampling scales for which σ(u) stays monotone (SD3 §3.1)
MODE_SCALE_LIMITS = (-1.0, 2.0 / (math.pi - 2.0))


def sample_sigmas(
    generators: list[torch.Generator],
    *,
    scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> Tensor:
    """One noise level in [0, 1] per generator (float64 on the CPU), drawn by ``scheme``."""
    if scheme not in SCHEMES:
        raise ConfigError(f"timestep sampling {scheme!r}: expected one of {list(SCHEMES)}")
    if scheme == "logit_normal":
        if not logit_std > 0:
            raise ConfigError(f"logit_std must be > 0, got {logit_std}")
        u = torch.stack([torch.randn((), generator=g, dtype=torch.float64) for g in generators])
        return torch.sigmoid(logit_mean + logit_std * u)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    if scheme == "uniform":
        return u
    low, high = MODE_SCALE_LIMITS
    if not low <= mode_scale <= high:
        raise ConfigError(f"mode_scale must be in [{low}, {high:.4f}] (else σ(u) is not monotone), got {mode_scale}")
    return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """SD3's constant shift towards noise: ``σ' = α·σ / (1 + (α − 1)·σ)`` (α = 1: unchanged)."""
    if not shift > 0:
        raise ConfigError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_mu(tokens: int, params: dict[str, float] | None = None) -> float:
    """Flux's μ for an image of ``tokens`` packed latent tokens (linear through its two anchors)."""
    p = FLUX_SHIFT if params is None else params
    slope = (p["max_shift"] - p["base_shift"]) / (p["max_seq_len"] - p["base_seq_len"])
    return p["base_shift"] + slope * (tokens - p["base_seq_len"])


def flux_shift(sigmas: Tensor, mu: float) -> Tensor:
    """Flux's resolution-dependent shift: ``σ' = e^μ / (e^μ + 1/σ − 1)`` (σ = 0 stays 0)."""
    e = math.exp(mu)
    return torch.where(sigmas > 0, e / (e + (1 / sigmas.clamp_min(1e-30) - 1)), torch.zeros_like(sigmas))


def _per_sample(sigmas: Tensor, like: Tensor) -> Tensor:
    return sigmas.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def interpolate(latents: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """``x_σ = (1 − σ)·x_0 + σ·ε``, one σ per sample."""
    s = _per_sample(sigmas, latents)
    return (1 - s) * latents + s * noise


def velocity(latents: Tensor, noise: Tensor) -> Tensor:
    """The flow-matching target ``v = ε − x_0``."""
    return noise - latents


def loss_weight(sigmas: Tensor, weighting: str = "none") -> Tensor:
    """SD3's per-sample loss weight: ``none`` 1, ``sigma_sqrt`` ``σ⁻²``, ``cosmap`` ``2/(π(1 − 2σ + 2σ²))``."""
    if weighting == "none":
        return torch.ones_like(sigmas)
    if weighting == "sigma_sqrt":
        return sigmas.clamp_min(1e-12) ** -2
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    raise ConfigError(f"loss weighting {weighting!r}: expected one of {list(WEIGHTINGS)}")
