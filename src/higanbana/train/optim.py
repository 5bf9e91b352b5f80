"""Optimizers and learning-rate schedules for the trainer.

AdamW and SGD come from torch; AdamW8bit / Lion8bit from bitsandbytes, Lion from ``lion-pytorch``,
Prodigy from ``prodigyopt`` and Adafactor from transformers — each optional library is imported only
when chosen, and a missing one is an error that says which extra to install. Schedules are
diffusers' (``get_scheduler``); a warm-up below 1 is a fraction of the total steps, as in kohya.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from ..errors import ConfigError
from .config import OptimizerSection, SchedulerSection

_OPTIONAL = {
    "adamw8bit": ("bitsandbytes", "AdamW8bit", "bitsandbytes"),
    "lion8bit": ("bitsandbytes", "Lion8bit", "bitsandbytes"),
    "lion": ("lion_pytorch", "Lion", "lion"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigy"),
}


def _optional_class(kind: str) -> type:
    module_name, cls_name, extra = _OPTIONAL[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(
            f"optimizer.type = {kind!r} needs the {module_name} package: pip install 'higanbana[{extra}]'"
        ) from None
    return getattr(module, cls_name)


def make_optimizer(groups: list[dict[str, Any]], section: OptimizerSection) -> torch.optim.Optimizer:
    """An optimizer over the network's parameter groups (each carries its own ``lr``)."""
    kind = section.type
    if not groups:
        raise ConfigError("no trainable parameters: every learning rate is 0 or nothing was adapted")
    clean = [{k: v for k, v in g.items() if k in ("params", "lr")} for g in groups]
    args = dict(section.args)
    betas = tuple(float(b) for b in section.betas)
    if kind == "adamw":
        cls: type = torch.optim.AdamW
        kwargs = {"betas": betas, "eps": section.eps, "weight_decay": section.weight_decay}
    elif kind == "sgd":
        cls = torch.optim.SGD
        kwargs = {"momentum": 0.9, "nesterov": True, "weight_decay": section.weight_decay}
    elif kind == "adafactor":
        from transformers.optimization import Adafactor

        cls = Adafactor
        kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    elif kind in ("adamw8bit", "lion8bit", "lion"):
        cls = _optional_class(kind)
        kwargs = {"betas": betas, "weight_decay": section.weight_decay}
        if kind == "adamw8bit":
            kwargs["eps"] = section.eps
    elif kind == "prodigy":
        cls = _optional_class(kind)
        kwargs = {"betas": betas, "weight_decay": section.weight_decay, "eps": section.eps}
        if any(g["lr"] < 0.1 for g in clean):
            import warnings

            warnings.warn("Prodigy adapts the step size itself: learning rates around 1.0 are expected", stacklevel=2)
    else:  # pragma: no cover - the schema refuses other values
        raise ConfigError(f"optimizer.type: unknown optimizer {kind!r}")
    kwargs.update(args)
    try:
        return cls(clean, **kwargs)
    except (TypeError, ValueError) as exc:  # an unknown keyword, or a value the optimizer class refuses
        raise ConfigError(f"optimizer.args: {kind} refuses the arguments: {exc}") from None


def warmup_steps(section: SchedulerSection, total_steps: int) -> int:
    """``warmup_steps`` as a step count (a value below 1 is a fraction of ``total_steps``)."""
    w = section.warmup_steps
    return round(w * total_steps) if 0 < w < 1 else int(w)


def make_scheduler(optimizer: torch.optim.Optimizer, section: SchedulerSection, total_steps: int):
    """diffusers' schedule of ``section.type`` over ``total_steps`` optimizer steps."""
    from diffusers.optimization import get_scheduler

    warmup = warmup_steps(section, total_steps)
    if section.type == "constant" and warmup:
        raise ConfigError("scheduler.type = 'constant' has no warm-up; use 'constant_with_warmup'")
    return get_scheduler(
        section.type,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
        num_cycles=section.num_cycles,
        power=section.power,
    )
