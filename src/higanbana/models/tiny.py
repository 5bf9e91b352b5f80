"""Tiny, randomly initialised models of the real Stable Diffusion architectures (no downloads).

They have the same module classes and naming as SD1.x (diffusers ``UNet2DConditionModel``), so
adapters, file names and tools are exercised exactly as on the real model, in milliseconds.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_SD_UNET: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

#: SDXL's shape in miniature: 3 blocks, 2 resnets each, attention only in the deeper two, linear
#: projections, per-block transformer depth and the text_time added embedding (SGM naming tests).
TINY_SDXL_UNET: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 2),
    cross_attention_dim=32,
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32,
    norm_num_groups=32,
)


def tiny_sd_unet(seed: int = 0, **overrides: Any):
    """A tiny SD1.x-shaped ``UNet2DConditionModel`` with deterministic random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_SD_UNET, **overrides})


def tiny_unet_inputs(batch: int = 2, seed: int = 0, unet=None) -> dict[str, torch.Tensor]:
    """Noisy latents, timesteps and text context for :func:`tiny_sd_unet`."""
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config if unet is not None else TINY_SD_UNET
    size = cfg["sample_size"] if isinstance(cfg, dict) else cfg.sample_size
    channels = cfg["in_channels"] if isinstance(cfg, dict) else cfg.in_channels
    ctx = cfg["cross_attention_dim"] if isinstance(cfg, dict) else cfg.cross_attention_dim
    return {
        "sample": torch.randn(batch, channels, size, size, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
        "encoder_hidden_states": torch.randn(batch, 8, ctx, generator=gen),
    }
