"""The layers an adapter wraps: :class:`LayerSpec` (shape and op of a Linear or ConvNd) and
:func:`layer_spec`, which refuses anything else with an error naming the layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedLayerError

_CONV_OPS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class LayerSpec:
    """The shape and op of a wrapped Linear or ConvNd layer."""

    kind: str  # "linear" or "conv"
    out_features: int
    in_features: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: Any = ()
    dilation: tuple[int, ...] = ()

    @property
    def is_conv(self) -> bool:
        return self.kind == "conv"

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def fan_in(self) -> int:
        """``in·∏k``: the width of ``flat(W)``."""
        return self.in_features * self.kernel_numel

    @property
    def channel_dim(self) -> int:
        """The axis of channels in activations: last for Linear, 1 for ConvNd."""
        return 1 if self.is_conv else -1

    @property
    def ones_kernel(self) -> tuple[int, ...]:
        """Trailing singleton kernel dims: ``(1, 1)`` for Conv2d, ``()`` for Linear."""
        return (1,) * len(self.kernel_size)

    def op(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The layer's own operation with another weight (same stride/padding/dilation)."""
        if not self.is_conv:
            return F.linear(x, weight, bias)
        conv = _CONV_OPS[len(self.kernel_size)]
        return conv(x, weight, bias, self.stride, self.padding, self.dilation)

    def pointwise(self, x: Tensor, weight: Tensor) -> Tensor:
        """A 1×1 (pointwise) projection; ``weight`` is ``(c_out, c_in)``."""
        if not self.is_conv:
            return F.linear(x, weight)
        conv = _CONV_OPS[len(self.kernel_size)]
        return conv(x, weight.reshape(*weight.shape, *self.ones_kernel))

    def pointwise_full(self, x: Tensor, weight: Tensor) -> Tensor:
        """A 1×1 projection with a weight already in layer shape ``(c_out, c_in, 1..)``."""
        if not self.is_conv:
            return F.linear(x, weight)
        return _CONV_OPS[len(self.kernel_size)](x, weight)

    def channel_shape(self, channels: int) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel vector over activations."""
        return (channels, *self.ones_kernel) if self.is_conv else (channels,)


def layer_spec(layer: nn.Module, algo: str = "") -> LayerSpec:
    """Describe a Linear/ConvNd layer, or raise a clear error for anything else."""
    if isinstance(layer, nn.Linear):
        return LayerSpec("linear", layer.out_features, layer.in_features)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if layer.groups != 1:
            raise UnsupportedLayerError(
                f"{algo or 'adapter'}: grouped/depthwise convolutions are not supported "
                f"({type(layer).__name__} with groups={layer.groups})"
            )
        if layer.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"{algo or 'adapter'}: padding_mode={layer.padding_mode!r} is not supported (only 'zeros')"
            )
        if getattr(layer, "transposed", False):
            raise UnsupportedLayerError(f"{algo or 'adapter'}: transposed convolutions are not supported")
        return LayerSpec(
            "conv",
            layer.out_channels,
            layer.in_channels,
            tuple(layer.kernel_size),
            tuple(layer.stride),
            layer.padding,
            tuple(layer.dilation),
        )
    raise UnsupportedLayerError(
        f"{algo or 'adapter'}: cannot wrap {type(layer).__name__}; "
        "supported layers are Linear, Conv1d, Conv2d and Conv3d"
    )
