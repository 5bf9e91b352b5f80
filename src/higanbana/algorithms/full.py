"""Full (native) fine-tuning: a trainable difference ``diff = W − W0`` (and ``diff_b = b − b0``).

Keys: ``diff`` (shape of W0) and ``diff_b`` (shape of b0, only when the layer has a bias).
``W' = W0 + m·diff``, ``b' = b0 + m·diff_b``; both differences start at 0.

The adapter trains the difference instead of a copy of W0, so the wrapped layer's weight is never
copied and stays frozen (and may be low-precision while ``diff`` is float32). The merged form is
always cheaper (bypass would be two full-size ops), so ``auto`` runs merged; bypass
``op(x, W0, b0) + m·op(x, diff, diff_b)`` is used only where dropout on the branch needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import Adapter, copy_checked, require
from .cost import Costs
from .files import FileStateError, dims, need, shape
from .layer import layer_spec
from .options import AdapterOptions, option


class Full(Adapter):
    """Native fine-tuning of a Linear/ConvNd layer's weight and bias, as a difference to W0."""

    algo = "full"
    title = "Full"
    file_keys = frozenset({"diff", "diff_b"})
    marker_keys = ("diff",)
    peft_refusal = "PEFT has no full weight-difference adapter"
    loaded_by = frozenset({"ComfyUI", "A1111", "LyCORIS"})
    examples = (("full", {}, 3e-4),)

    @dataclass(frozen=True)
    class Options(AdapterOptions):
        train_bias: bool = option(True, "also train the bias difference diff_b (layers with a bias)")

    def __init__(self, layer: nn.Module, **options: Any) -> None:
        super().__init__(layer, **options)
        self.diff = self.new_param(*self.base_weight.shape)
        b0 = self.base_bias
        self.diff_b = self.new_param(*b0.shape) if (b0 is not None and self.options.train_bias) else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """diff = 0 and diff_b = 0: the layer is unchanged at init."""
        nn.init.zeros_(self.diff)
        if self.diff_b is not None:
            nn.init.zeros_(self.diff_b)

    @property
    def train_bias(self) -> bool:
        return self.diff_b is not None

    def delta_weight(self, mask: Tensor | None = None) -> Tensor:
        return self.diff

    def delta_bias(self) -> Tensor | None:
        return self.diff_b

    def costs(self, tokens: int) -> Costs:
        return Costs(None, self.diff.numel())  # a second full-size op: merged is always cheaper

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, Tensor]:
        out = {"diff": self.diff.detach().clone()}
        if self.diff_b is not None:
            out["diff_b"] = self.diff_b.detach().clone()
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        copy_checked(self.diff, require(tensors, "diff"), "diff")
        if self.diff_b is not None:
            copy_checked(self.diff_b, require(tensors, "diff_b"), "diff_b")
        elif "diff_b" in tensors:
            raise FileStateError(
                "tensor 'diff_b' given, but this adapter has no bias difference "
                f"(layer bias: {'none' if self.base_bias is None else 'not trained'})"
            )

    @classmethod
    def options_from_state(cls, tensors: dict[str, Tensor], layer: nn.Module) -> dict[str, Any]:
        """``train_bias`` from the presence of ``diff_b``; the ``diff`` shape is checked."""
        spec = layer_spec(layer, cls.algo)
        diff = require(tensors, "diff")
        expected = (spec.out_features, spec.in_features, *spec.kernel_size)
        if tuple(diff.shape) != expected:
            raise FileStateError(f"tensor 'diff' has shape {tuple(diff.shape)}, expected {expected}")
        has_bias = getattr(layer, "bias", None) is not None
        if "diff_b" in tensors and not has_bias:
            raise FileStateError(f"tensor 'diff_b' given, but the {type(layer).__name__} layer has no bias")
        return {"train_bias": "diff_b" in tensors} if has_bias else {}

    def extra_state_options(self) -> dict[str, Any]:
        return {"train_bias": self.train_bias}

    # ------------------------------------------------------------------ files
    @classmethod
    def check_file_shapes(cls, tensors: Mapping[str, Tensor]) -> tuple[int | None, int | None]:
        """diff (out, in, *k); diff_b (out,)."""
        (diff,) = need(tensors, "diff")
        dims(diff, "diff", 2, 5)
        if "diff_b" in tensors and shape(tensors["diff_b"]) != (diff.shape[0],):
            raise FileStateError(f"tensor 'diff_b' has shape {shape(tensors['diff_b'])}; expected ({diff.shape[0]},)")
        return diff.shape[0], diff.shape[1]
