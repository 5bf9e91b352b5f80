"""Flux.1's latent layout: the transformer reads 2×2 patches of the 16-channel VAE latent as tokens
of 64 channels, rows first, each with a position id ``(0, row, column)`` for its rotary embedding
(as diffusers' ``FluxPipeline`` packs them)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["latent_ids", "pack_latents", "unpack_latents"]


def pack_latents(latents: Tensor) -> Tensor:
    """Flux's 2×2 patches: ``(B, C, H, W)`` → ``(B, H/2·W/2, 4C)``, rows first, channel-major patches."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ConfigError(f"Flux packs 2×2 latent patches: height and width must be even, got {h}×{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack_latents` for a ``height``×``width`` latent."""
    b, n, c4 = packed.shape
    if n != (height // 2) * (width // 2) or c4 % 4:
        raise ConfigError(f"packed latents {tuple(packed.shape)} do not match a {height}×{width} latent")
    x = packed.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def latent_ids(height: int, width: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Flux's position ids of the packed patches of a ``height``×``width`` latent: ``(0, row, column)``."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros(grid.shape[0], 1, device=device, dtype=dtype), grid], dim=1)
