"""Tiny random evaluation encoders of the real architectures, for the tests (``save_tiny_encoders``).

A test builder, so it lives with the tests: library code never imports tiny models. The
miniature world has its own, pretrained encoders (``higanbana.miniworld``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from higanbana.evaluate.encoders import Vgg19StyleEncoder
from higanbana.models.tiny import tiny_clip_tokenizer

TINY_DINOV2: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=14, image_size=56
)
TINY_CLIP_TEXT: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
    max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
)  # fmt: skip
TINY_CLIP_VISION: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
TINY_VGG19_WIDTHS = (4, 8, 16, 32, 32)


def save_tiny_encoders(folder: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Save tiny random models of the real architectures (moved here from ``higanbana.evaluate.encoders``).

    A ``Dinov2Model`` folder, a ``CLIPModel`` folder with an offline-built ``CLIPTokenizer``, and a
    ``vgg19.safetensors`` with torchvision key names (narrow widths, recorded in its metadata).
    Deterministic for a given ``seed``; the global RNG is left untouched.
    """
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    folder = Path(folder)
    paths = {"dinov2": folder / "dinov2", "clip": folder / "clip", "vgg19": folder / "vgg19.safetensors"}
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Dinov2Model(Dinov2Config(**TINY_DINOV2)).eval().save_pretrained(paths["dinov2"])
        torch.manual_seed(seed + 1)
        cfg = CLIPConfig(text_config=TINY_CLIP_TEXT, vision_config=TINY_CLIP_VISION, projection_dim=16)
        CLIPModel(cfg).eval().save_pretrained(paths["clip"])
    tiny_clip_tokenizer().save_pretrained(paths["clip"])
    vgg = Vgg19StyleEncoder(None, random_init=True, widths=TINY_VGG19_WIDTHS, seed=seed + 2)
    sd = {f"features.{k}": v.contiguous() for k, v in vgg.features.state_dict().items()}
    save_file(sd, str(paths["vgg19"]), metadata={"widths": ",".join(map(str, TINY_VGG19_WIDTHS))})
    return paths
