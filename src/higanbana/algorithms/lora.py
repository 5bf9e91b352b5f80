"""LoRA / LoCon: ``ΔW = flat(up)·flat(down)``; Tucker (``lora_mid``) for convs with k > 1.

Keys: ``lora_down.weight`` (r, in, *k) [Tucker: (r, in, 1..)], ``lora_mid.weight`` (r, r, *k),
``lora_up.weight`` (out, r, 1..), ``alpha``, optional ``dora_scale``.
Bypass: ``up(down(x))`` (conv: ``down`` carries the layer's kernel, stride and padding), never ΔW.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import FactoredAdapter, LayerSpec, copy_checked, layer_spec, require
from .dora import dora_options


class LoRA(FactoredAdapter):
    """Low-rank adaptation of Linear and ConvNd layers (LoCon for convs)."""

    algo = "lora"
    up_factors = ("lora_up",)
    supports_dora = True

    def __init__(self, layer: nn.Module, *, rank: int = 4, use_tucker: bool = False, **options: Any) -> None:
        super().__init__(layer, rank=rank, **options)
        spec = self.spec
        r = self.rank
        self.use_tucker = bool(use_tucker) and spec.is_conv and spec.kernel_numel > 1
        if self.use_tucker:
            self.lora_down = self.new_param(r, spec.in_features, *spec.ones_kernel)
            self.lora_mid = self.new_param(r, r, *spec.kernel_size)
        else:
            self.lora_down = self.new_param(r, spec.in_features, *spec.kernel_size)
            self.lora_mid = None
        self.lora_up = self.new_param(spec.out_features, r, *spec.ones_kernel)
        self.reset_parameters()
        self._init_dora()

    @classmethod
    def full_rank(cls, spec: LayerSpec, options: dict[str, Any]) -> int | None:
        """``min(out, in·∏k)`` (Tucker: ``min(out, in)``): ``up·down`` then spans every ΔW."""
        tucker = options.get("use_tucker") and spec.is_conv and spec.kernel_numel > 1
        return min(spec.out_features, spec.in_features if tucker else spec.fan_in)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """down (and mid): kaiming-uniform(a=√5); up: 0, or kaiming with ``use_scalar``."""
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))
        if self.lora_mid is not None:
            nn.init.kaiming_uniform_(self.lora_mid, a=math.sqrt(5))
        if self.use_scalar:
            nn.init.kaiming_uniform_(self.lora_up, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_up)

    def _up(self, mask: Tensor | None) -> Tensor:
        up = self.scaled_up(self.lora_up.flatten(1))
        return up if mask is None else up * mask

    def delta_weight(self, mask: Tensor | None = None) -> Tensor:
        spec = self.spec
        up = self._up(mask)
        if self.lora_mid is None:
            return (up @ self.lora_down.flatten(1)).reshape(self.base_weight.shape)
        mid = self.lora_mid.flatten(2)  # (r, r, K)
        delta = torch.einsum("oa,ack,ci->oik", up, mid, self.lora_down.flatten(1))
        return delta.reshape(spec.out_features, spec.in_features, *spec.kernel_size)

    def _up_in_shape(self, mask: Tensor | None, factor: float, dtype: torch.dtype) -> Tensor:
        """The "up" weight in its layer shape, with scalar, rank mask and ``factor`` folded in."""
        up = self.scaled_up(self.lora_up)
        if mask is not None:
            up = up * mask.reshape(1, -1, *self.spec.ones_kernel)
        if factor != 1.0:
            up = up * factor
        return up.to(dtype)

    def branch(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.scaled_branch(x, mask, 1.0)

    def scaled_branch(self, x: Tensor, mask: Tensor | None, factor: float) -> Tensor:
        """``factor·up(mid(down(x)))``: ``factor`` rides on the small "up" weight."""
        spec, dt = self.spec, x.dtype
        up = self._up_in_shape(mask, factor, dt)
        if self.lora_mid is None:
            h = spec.op(x, self.lora_down.to(dt))
        else:
            h = spec.op(spec.pointwise(x, self.lora_down.flatten(1).to(dt)), self.lora_mid.to(dt))
        return spec.pointwise_full(h, up)

    def bypass_forward(self, x: Tensor, multiplier: float, mask: Tensor | None = None) -> Tensor:
        """Linear: ``addmm(addmm(b0, x, W0ᵀ), x·downᵀ, (m·s·up)ᵀ)`` — the add rides on the GEMM."""
        if self.spec.is_conv or self.weight_decompose or (self.training and self.dropout > 0) or x.dim() < 1:
            return super().bypass_forward(x, multiplier, mask)
        dt = x.dtype
        w0, b0 = self.base_weight, self.base_bias
        x2 = x.reshape(-1, x.shape[-1])
        y = x2.mm(w0.t()) if b0 is None else torch.addmm(b0, x2, w0.t())
        h = x2.mm(self.lora_down.to(dt).t())
        y = torch.addmm(y, h, self._up_in_shape(mask, multiplier * self.scale, dt).t())
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def branch_passes(self) -> int:
        return 3 if not self.spec.is_conv else 4

    def branch_flops(self, tokens: int) -> int | None:
        s, r = self.spec, self.rank
        if self.lora_mid is None:
            return tokens * r * (s.fan_in + s.out_features)
        return tokens * r * (s.in_features + r * s.kernel_numel + s.out_features)

    def delta_flops(self) -> int:
        s, r = self.spec, self.rank
        extra = r * r * s.kernel_numel * s.in_features if self.lora_mid is not None else 0
        return s.out_features * r * s.fan_in + extra

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, Tensor]:
        out = {
            "lora_down.weight": self.lora_down.detach().clone(),
            "lora_up.weight": self.scaled_up(self.lora_up).detach().clone(),
        }
        if self.lora_mid is not None:
            out["lora_mid.weight"] = self.lora_mid.detach().clone()
        out.update(self.common_state())
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        copy_checked(self.lora_down, require(tensors, "lora_down.weight"), "lora_down.weight")
        copy_checked(self.lora_up, require(tensors, "lora_up.weight"), "lora_up.weight")
        if self.lora_mid is not None:
            copy_checked(self.lora_mid, require(tensors, "lora_mid.weight"), "lora_mid.weight")
        self.load_common_state(tensors)

    @classmethod
    def options_from_state(cls, tensors: dict[str, Tensor], layer: nn.Module) -> dict[str, Any]:
        """The constructor options that reproduce a module's tensors (rank, Tucker, DoRA axis)."""
        spec = layer_spec(layer, cls.algo)
        down = require(tensors, "lora_down.weight")
        options: dict[str, Any] = {"rank": down.shape[0], "use_tucker": "lora_mid.weight" in tensors}
        options.update(dora_options(tensors, spec.out_features))
        return options

    def extra_state_options(self) -> dict[str, Any]:
        return {**super().extra_state_options(), "use_tucker": self.use_tucker}
