"""Where the shipped miniature-world models live (package data under ``miniworld/weights``).

``sd`` is a diffusers ``StableDiffusionPipeline`` folder (tiny UNet, VAE, CLIP text tower,
tokenizer, scheduler); ``clip`` is the world-trained ``CLIPModel`` with its tokenizer (the
evaluation's text-image and DINO-like image encoder). ``training.json`` records how they were made
(``scripts/pretrain_miniworld_gpu.sh``, variant D; docs/miniworld.md).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import HiganbanaError

WEIGHTS_DIR = Path(__file__).with_name("weights")
_MARKERS = {"sd": "model_index.json", "clip": "config.json"}


def shipped_model(part: str = "sd") -> Path:
    """The folder of a shipped model: ``"sd"`` (the tiny Stable Diffusion) or ``"clip"``."""
    if part not in _MARKERS:
        raise HiganbanaError(f"unknown shipped model {part!r}: expected one of {sorted(_MARKERS)}")
    path = WEIGHTS_DIR / part
    if not (path / _MARKERS[part]).is_file():
        raise HiganbanaError(
            f"the miniature world's {part!r} model is missing: expected {path / _MARKERS[part]} in the installed "
            "package (reinstall higanbana, or retrain with scripts/pretrain_miniworld.py --out DIR and pass DIR/"
            f"{part} explicitly)"
        )
    return path
