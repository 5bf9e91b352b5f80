"""Norm: fine-tuning of the affine weight and bias of LayerNorm and GroupNorm layers.

Keys: ``w_norm`` (shape of the norm's weight) and ``b_norm`` (shape of its bias).
``W' = W0 + m·w_norm``, ``b' = b0 + m·b_norm``; both start at 0.

Both keys are always written (docs/design.md §4; A1111 loads a norm module only when both are
present). A norm created with ``bias=False`` has no bias to adapt: its ``b_norm`` is written as
zeros, is not a trainable parameter, and on load must be zero (a non-zero ``b_norm`` for a
bias-free layer is an error rather than silently dropped).

Norms without affine weights (``elementwise_affine=False``, ``affine=False``) have nothing to
adapt and are refused, as is every other layer type.

The merged form ``norm(x, W', b')`` is one call of the same cost as the frozen layer, so ``auto``
always runs merged; bypass ``norm(x, W0, b0) + m·norm(x, w_norm, b_norm)`` is used only where
dropout on the adapter branch needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedLayerError
from .base import Adapter, copy_checked, require
from .cost import Costs
from .files import SKIP, FileStateError, Kernel, Verdicts, dims, merge_verdicts, need, shape


@dataclass(frozen=True)
class NormSpec:
    """The op and shape of a wrapped LayerNorm or GroupNorm (the norm counterpart of LayerSpec)."""

    kind: str  # "layer_norm" or "group_norm"
    param_shape: tuple[int, ...]
    eps: float
    normalized_shape: tuple[int, ...] = ()
    num_groups: int = 0

    is_conv = False
    kernel_size: tuple[int, ...] = ()

    @property
    def channel_dim(self) -> int:
        """The axis of channels in activations: last for LayerNorm, 1 for GroupNorm."""
        return 1 if self.kind == "group_norm" else -1

    @property
    def out_features(self) -> int:
        n = 1
        for d in self.param_shape:
            n *= d
        return n

    in_features = out_features

    def op(self, x: Tensor, weight: Tensor | None, bias: Tensor | None = None) -> Tensor:
        """The norm with another affine weight and bias."""
        if self.kind == "group_norm":
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def norm_spec(layer: nn.Module, algo: str = "norm") -> NormSpec:
    """Describe a LayerNorm/GroupNorm with affine weights, or raise a clear error."""
    if isinstance(layer, nn.LayerNorm):
        if layer.weight is None:
            raise UnsupportedLayerError(
                f"{algo}: LayerNorm{tuple(layer.normalized_shape)} has no affine weight "
                "(elementwise_affine=False): nothing to adapt"
            )
        shape = tuple(layer.normalized_shape)
        return NormSpec("layer_norm", shape, float(layer.eps), normalized_shape=shape)
    if isinstance(layer, nn.GroupNorm):
        if layer.weight is None:
            raise UnsupportedLayerError(
                f"{algo}: GroupNorm({layer.num_groups}, {layer.num_channels}) has no affine weight "
                "(affine=False): nothing to adapt"
            )
        return NormSpec("group_norm", (layer.num_channels,), float(layer.eps), num_groups=layer.num_groups)
    raise UnsupportedLayerError(
        f"{algo}: cannot wrap {type(layer).__name__}; supported layers are LayerNorm and GroupNorm "
        "with affine weights (use another algorithm for Linear/Conv layers)"
    )


class Norm(Adapter):
    """Trains additive differences of a norm layer's affine weight and bias."""

    algo = "norm"
    title = "Norm"
    file_keys = frozenset({"w_norm", "b_norm"})
    marker_keys = ("w_norm",)
    peft_refusal = "PEFT has no LayerNorm/GroupNorm difference adapter"
    loaded_by = frozenset({"ComfyUI", "A1111", "LyCORIS"})
    examples = (("norm", {}, 3e-3),)
    spec: NormSpec  # type: ignore[assignment]  # a norm layer has its own spec, not a LayerSpec

    def __init__(self, layer: nn.Module, **options: Any) -> None:
        super().__init__(layer, **options)
        shape = self.spec.param_shape
        self.w_norm = self.new_param(*shape)
        self.b_norm = self.new_param(*shape) if self.base_bias is not None else None
        self.reset_parameters()

    def _make_spec(self, layer: nn.Module) -> NormSpec:  # type: ignore[override]
        return norm_spec(layer, self.algo)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """w_norm = 0 and b_norm = 0: the layer is unchanged at init."""
        nn.init.zeros_(self.w_norm)
        if self.b_norm is not None:
            nn.init.zeros_(self.b_norm)

    def delta_weight(self, mask: Tensor | None = None) -> Tensor:
        return self.w_norm

    def delta_bias(self) -> Tensor | None:
        return self.b_norm

    def costs(self, tokens: int) -> Costs:
        return Costs(None, self.w_norm.numel())  # a second normalisation: merged is always cheaper

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, Tensor]:
        b_norm = torch.zeros_like(self.w_norm) if self.b_norm is None else self.b_norm
        return {"w_norm": self.w_norm.detach().clone(), "b_norm": b_norm.detach().clone()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        copy_checked(self.w_norm, require(tensors, "w_norm"), "w_norm")
        if self.b_norm is not None:
            copy_checked(self.b_norm, require(tensors, "b_norm"), "b_norm")
        elif "b_norm" in tensors and bool(tensors["b_norm"].ne(0).any()):
            raise FileStateError(f"tensor 'b_norm' is non-zero, but the {type(self.layer).__name__} layer has no bias")

    @classmethod
    def options_from_state(cls, tensors: dict[str, Tensor], layer: nn.Module) -> dict[str, Any]:
        """No options; the layer type is checked and ``w_norm``'s shape against the layer's weight."""
        spec = norm_spec(layer, cls.algo)
        w = require(tensors, "w_norm")
        if tuple(w.shape) != spec.param_shape:
            raise FileStateError(f"tensor 'w_norm' has shape {tuple(w.shape)}, expected {spec.param_shape}")
        return {}

    # ------------------------------------------------------------------ files
    @classmethod
    def check_file_shapes(cls, tensors: Mapping[str, Tensor]) -> tuple[int | None, int | None]:
        """w_norm (C,); b_norm the same shape."""
        (w,) = need(tensors, "w_norm")
        dims(w, "w_norm", 1)
        if "b_norm" in tensors and shape(tensors["b_norm"]) != shape(w):
            raise FileStateError(
                f"tensor 'b_norm' has shape {shape(tensors['b_norm'])}; expected {shape(w)} like 'w_norm'"
            )
        return None, None

    @classmethod
    def tool_verdicts(
        cls, tensors: Mapping[str, Tensor], options: Mapping[str, Any] | None, kernel: Kernel = None
    ) -> Verdicts:
        out = super().tool_verdicts(tensors, options, kernel)
        if "b_norm" not in tensors:
            merge_verdicts(out, {"A1111": (SKIP, "A1111 needs both w_norm and b_norm")})
        return out

    def extra_repr(self) -> str:
        layer = self.layer
        return f"algo={self.algo}, layer={type(layer).__name__}({self.spec.param_shape}), multiplier={self.multiplier}"
