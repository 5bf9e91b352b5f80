"""Test cases for every algorithm × layer type, and the shared helpers of the contract tests.

Each ``ref_<algo>.py`` beside this file defines ``CASES``: a list of :class:`Case`, each with an
independent reference of the merged weight written from docs/design.md §3 (einsum, float64) that reads
only the adapter's *file tensors* — so it also checks the key names and shapes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

#: every registered algorithm must have a reference module here
REFERENCE_MODULES = {
    "lora": "ref_lora",
    "loha": "ref_loha",
    "lokr": "ref_lokr",
    "ia3": "ref_ia3",
    "glora": "ref_glora",
    "oft": "ref_oft",
    "boft": "ref_boft",
    "full": "ref_full",
    "norm": "ref_norm",
}

#: reference(state, w0, b0, m) -> (W', b'): all float64; state holds the adapter's file tensors
Reference = Callable[[dict[str, Tensor], Tensor, "Tensor | None", float], "tuple[Tensor, Tensor | None]"]


def linear(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Linear(12, 8, dtype=dtype)


def conv1d(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Conv1d(6, 8, 3, padding=1, dtype=dtype)


def conv2d(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Conv2d(6, 8, 3, stride=2, padding=1, dtype=dtype)


def conv2d_1x1(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Conv2d(6, 8, 1, dtype=dtype)


def conv3d(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Conv3d(4, 8, (3, 1, 3), padding=(1, 0, 1), dtype=dtype)


def make_input(layer: nn.Module, dtype: torch.dtype, generator: torch.Generator | None = None) -> Tensor:
    """A small random input of the right shape for ``layer``."""
    if isinstance(layer, nn.Linear):
        shape: tuple[int, ...] = (2, 5, layer.in_features)
    elif isinstance(layer, nn.Conv1d):
        shape = (2, layer.in_channels, 7)
    elif isinstance(layer, nn.Conv2d):
        shape = (2, layer.in_channels, 6, 6)
    elif isinstance(layer, nn.Conv3d):
        shape = (2, layer.in_channels, 3, 4, 4)
    elif isinstance(layer, nn.LayerNorm):
        shape = (2, 5, *layer.normalized_shape)
    elif isinstance(layer, nn.GroupNorm):
        shape = (2, layer.num_channels, 4, 4)
    else:
        raise TypeError(type(layer))
    return torch.randn(shape, generator=generator).to(dtype)


STANDARD_LAYERS = {"linear": linear, "conv1d": conv1d, "conv2d": conv2d, "conv2d_1x1": conv2d_1x1, "conv3d": conv3d}


@dataclass
class Case:
    """One algorithm with one option set on one layer type."""

    algo: str
    layer_name: str
    make_layer: Callable[..., nn.Module]
    reference: Reference
    options: dict[str, Any] = field(default_factory=dict)
    #: file-key suffixes the adapter must write (exactly)
    keys: set[str] | None = None
    #: adapter parameters that legitimately get no gradient from a random start (none, normally)
    frozen_ok: set[str] = field(default_factory=set)
    label: str = ""

    @property
    def id(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.algo}-{self.layer_name}" + (f"[{self.label or opts}]" if (self.label or opts) else "")


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for module in REFERENCE_MODULES.values():
        try:
            mod = importlib.import_module(f"tests.algorithms.{module}")
        except ModuleNotFoundError:
            continue  # test_every_algorithm_has_cases reports it
        cases.extend(mod.CASES)
    return cases


@torch.no_grad()
def randomize(adapter: nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Give every adapter tensor a random non-zero value (so ΔW ≠ 0 and every grad flows)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(adapter.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * std
        if p.dim() == 0 or "scale" in _name_of(adapter, p):
            noise = 1.0 + noise  # scalars and DoRA magnitudes around 1
        elif name in ("trained_weight", "trained_bias"):  # Full(train_weight): W = W0 + noise, like diff
            noise = noise + getattr(adapter.layer, name.removeprefix("trained_")).detach().double()
        p.copy_(noise.to(p.dtype))


def _name_of(module: nn.Module, param: Tensor) -> str:
    for name, p in module.named_parameters():
        if p is param:
            return name
    return ""


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flat(w: Tensor) -> Tensor:
    """``flat(W)``: ``W`` viewed as ``(out, in·∏k)``."""
    return w.reshape(w.shape[0], -1)
