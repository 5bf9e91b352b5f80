"""DoRA weight decomposition (``weight_decompose``), shared by LoRA, LoHa and LoKr.

``W_d = (W0 + s·ΔW) · dora_scale / ‖W0 + s·ΔW‖``, the norm taken per output row (default,
``dora_scale`` shape ``(out, 1, ..)``) or per input column (legacy, ``(1, in, 1, ..)``); the norm is
not detached. The multiplier blends full-strength DoRA with the base: ``W0 + m·(W_d − W0)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import ConfigError

if TYPE_CHECKING:  # factored.py imports this module
    from .factored import FactoredAdapter


def _norm_dims(weight: Tensor, on_output: bool) -> tuple[int, ...]:
    keep = 0 if on_output else 1
    return tuple(d for d in range(weight.dim()) if d != keep)


def weight_norm(weight: Tensor, on_output: bool = True) -> Tensor:
    """‖W‖ per output row (``(out, 1, ..)``) or per input column (``(1, in, 1, ..)``)."""
    return torch.linalg.vector_norm(weight, dim=_norm_dims(weight, on_output), keepdim=True)


def dora_weight(w0: Tensor, scaled_delta: Tensor, magnitude: Tensor, on_output: bool) -> Tensor:
    """The full-strength DoRA weight ``(W0 + sΔW)·magnitude/‖W0 + sΔW‖``."""
    combined = w0 + scaled_delta
    return combined * (magnitude / weight_norm(combined, on_output))


def _branch(adapter: FactoredAdapter, x: Tensor, delta: Tensor, mask: Tensor | None) -> Tensor:
    """``op(x, ΔW)``: the factored branch where it is cheap, else the ΔW already built."""
    if adapter.branch_costs(1).bypass is not None:
        return adapter.branch(x, mask)
    return adapter.spec.op(x, delta.to(x.dtype))


def dora_bypass(adapter: FactoredAdapter, x: Tensor, m: float, mask: Tensor | None) -> Tensor:
    """DoRA in bypass form: the base op runs once on ``x``, ΔW only feeds the norm.

    Output axis: ``y' = y0·(1 + m(g−1)) + m·g·s·branch(x) + b`` with ``g = magnitude/‖W0+sΔW‖``.
    Input axis: ``W_d = (W0 + sΔW)·diag(g)``, i.e. the input channels are scaled by ``g``.
    """
    spec = adapter.spec
    w0, b0 = adapter.base_weight, adapter.base_bias
    s = adapter.scale
    delta = adapter.delta_weight(mask)
    g = adapter.dora_scale / weight_norm(w0.to(delta.dtype) + s * delta, adapter.wd_on_output)
    if adapter.wd_on_output:
        g = g.reshape(spec.channel_shape(spec.out_features)).to(x.dtype)
        y0 = spec.op(x, w0)
        delta_out = y0 * (g - 1) + (s * g) * _branch(adapter, x, delta, mask)
        y = y0 + adapter._drop(delta_out * m)
    else:
        g = g.reshape(spec.channel_shape(spec.in_features)).to(x.dtype)
        xg = x * g
        y_d = spec.op(xg, w0) + s * _branch(adapter, xg, delta, mask)
        if m == 1.0 and not (adapter.training and adapter.dropout > 0):
            y = y_d
        else:
            y0 = spec.op(x, w0)
            y = y0 + adapter._drop((y_d - y0) * m)
    return y if b0 is None else y + (b0.reshape(spec.channel_shape(spec.out_features)) if spec.is_conv else b0)


def dora_options(tensors: dict[str, Tensor], out_features: int) -> dict[str, Any]:
    """``weight_decompose``/``wd_on_output`` inferred from a ``dora_scale`` tensor's shape."""
    scale = tensors.get("dora_scale")
    if scale is None:
        return {}
    if scale.dim() < 2:
        raise ConfigError(f"dora_scale has shape {tuple(scale.shape)}; expected (out, 1, ..) or (1, in, ..)")
    on_output = scale.shape[0] == out_features and scale.shape[1] == 1
    return {"weight_decompose": True, "wd_on_output": on_output}
