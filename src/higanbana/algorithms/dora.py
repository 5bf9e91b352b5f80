"""DoRA weight decomposition (``weight_decompose``), shared by LoRA, LoHa and LoKr.

``W_d = (W0 + s·ΔW) · dora_scale / ‖W0 + s·ΔW‖``, the norm taken per output row (default,
``dora_scale`` shape ``(out, 1, ..)``) or per input column (legacy, ``(1, in, 1, ..)``); the norm is
not detached. The multiplier blends full-strength DoRA with the base: ``W0 + m·(W_d − W0)``.

When ``flat(ΔW) = U·V`` is a low-rank product (LoRA: ``U = up``, ``V = down``), the bypass never
builds a full-size tensor: the squared norm of each output row expands into

    ‖W0_o‖² + 2s·Σ_k U[o,k]·(W0·Vᵀ)[o,k] + s²·Σ_kl U[o,k]·(V·Vᵀ)[k,l]·U[o,l]

(per input column: the same with the roles of ``U`` and ``V`` swapped), i.e. one rank-r GEMM with
``W0`` (forward and backward) and r-sized products; ``‖W0‖²`` is computed once per version of
``W0``. The cross term can only lose precision when ``‖W0 + sΔW‖ ≪ ‖W0‖`` (float32: relative
error about ``eps·‖W0‖²/‖W0 + sΔW‖²``).
"""

from __future__ import annotations

import weakref
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


def _branch(adapter: FactoredAdapter, x: Tensor, delta: Tensor | None, mask: Tensor | None) -> Tensor:
    """``op(x, ΔW)``: the factored branch where it is cheap, else the ΔW already built."""
    if delta is None or adapter.branch_costs(1).bypass is not None:
        return adapter.branch(x, mask)
    return adapter.spec.op(x, delta.to(x.dtype))


def squared_norm_of_base(adapter: FactoredAdapter, w0: Tensor) -> Tensor:
    """``‖W0‖²`` per output row (``(out,)``) or per column of ``flat(W0)`` (``(in·∏k,)``) of ``w0``
    (the base weight flattened, in the parameter dtype), cached on the adapter while the base weight
    is the same tensor object, storage and version: an in-place change, a swapped ``.data`` or a new
    weight recomputes it."""
    axis = 1 if adapter.wd_on_output else 0
    base = adapter.base_weight
    if base.requires_grad or torch.compiler.is_compiling():
        return (w0 * w0).sum(axis)
    key = (base.data_ptr(), base._version, w0.dtype, axis)
    cached = adapter.__dict__.get("_base_norm_cache")
    if cached is None or cached[0]() is not base or cached[1] != key:
        cached = (weakref.ref(base), key, (w0 * w0).sum(axis))
        adapter.__dict__["_base_norm_cache"] = cached
    return cached[2]


def factored_norm(adapter: FactoredAdapter, w0: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``‖W0 + s·U·V‖`` in :func:`weight_norm`'s shape without building ``U·V`` (module docstring);
    ``w0`` is ``flat(W0)`` (out, in·∏k) in the parameter dtype."""
    spec, s = adapter.spec, adapter.scale
    base = squared_norm_of_base(adapter, w0)
    if adapter.wd_on_output:
        cross = (u * (w0 @ v.mT)).sum(1)
        quad = ((u @ (v @ v.mT)) * u).sum(1)
    else:
        cross = (v * (u.mT @ w0)).sum(0)
        quad = (((u.mT @ u) @ v) * v).sum(0)
    squared = (base + (2 * s) * cross + (s * s) * quad).clamp_min(0)
    if adapter.wd_on_output:
        return squared.sqrt().reshape(spec.out_features, 1, *spec.ones_kernel)
    per_input = squared.reshape(spec.in_features, spec.kernel_numel).sum(1)
    return per_input.sqrt().reshape(1, spec.in_features, *spec.ones_kernel)


def _linear_output_axis(adapter: FactoredAdapter, x: Tensor, m: float, g: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """Linear, output axis, no dropout: ``y0·(1 + m(g−1)) + h·(m·s·g·U)ᵀ + b0`` with ``h = x·Vᵀ`` — the
    scale rides on the small ``U``, the adds on a GEMM and one fused multiply-add."""
    dt, w0, b0 = x.dtype, adapter.base_weight, adapter.base_bias
    x2 = x.reshape(-1, x.shape[-1])
    y0 = x2.mm(w0.t())
    up = (up * (g * (m * adapter.scale))[:, None]).to(dt)
    h = x2.mm(down.to(dt).t())
    z = h.mm(up.t()) if b0 is None else torch.addmm(b0, h, up.t())
    y = torch.addcmul(z, y0, (1 + m * (g - 1)).to(dt))
    return y.reshape(*x.shape[:-1], y.shape[-1])


def dora_bypass(adapter: FactoredAdapter, x: Tensor, m: float, mask: Tensor | None) -> Tensor:
    """DoRA in bypass form: the base op runs once on ``x``, ΔW only feeds the norm (and is never
    built when the adapter's ΔW is a low-rank product, see the module docstring).

    Output axis: ``y' = y0·(1 + m(g−1)) + m·g·s·branch(x) + b`` with ``g = magnitude/‖W0+sΔW‖``.
    Input axis: ``W_d = (W0 + sΔW)·diag(g)``, i.e. the input channels are scaled by ``g``.
    """
    spec = adapter.spec
    w0, b0 = adapter.base_weight, adapter.base_bias
    s = adapter.scale
    factors = adapter.dora_factors(mask)
    if factors is not None:
        u, v = factors
        delta = None
        norm = factored_norm(adapter, w0.to(u.dtype).reshape(w0.shape[0], -1), u, v)
        g = adapter.dora_scale / norm
        dropping = adapter.training and adapter.dropout > 0
        if adapter.wd_on_output and not spec.is_conv and not dropping and x.dim() >= 1:
            return _linear_output_axis(adapter, x, m, g.reshape(-1), v, u)
    else:
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
