"""The trainer: ``higanbana train CONFIG.toml`` and :func:`train` (see ``docs/training.md``).

``config`` (the validated TOML schema) → ``data``/``buckets``/``latents`` (images, captions,
aspect buckets, latent cache) → ``setup`` (data, model and network from the config; preflight) →
``trainer`` (the loop, saving, resume via ``state``; ``step``: text conditioning and the loss),
with ``optim`` for optimizers/schedules and ``sample`` for sample images.
"""

from .config import TrainConfig
from .trainer import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "train"]
