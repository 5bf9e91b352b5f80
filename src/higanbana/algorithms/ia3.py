"""IA3: learned per-channel scaling of the weight, ``W' = W0 ⊙ (1 + m·w)``; the bias is unchanged.

Keys: ``weight`` — ``(C,)`` for Linear, ``(1, C, 1..)`` for ConvNd — and ``on_input`` (0-d int64).
``on_input = 0`` scales the output channels (rows of ``W0``), ``1`` the input channels (columns).

Bypass needs no weight rebuild:

- output side: ``y' = y + (y − b0)·(m·w)``, i.e. ``(y − b0)·(1 + m·w) + b0`` on the channel axis;
- input side: ``y' = op(x ⊙ (1 + m·w), W0, b0)`` — the same single op on scaled input.

With dropout in training the adapter branch ``y' − y`` is dropped: output side
``y + drop((y − b0)·m·w)``, input side ``y + drop(op(x ⊙ m·w, W0))``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import Adapter, copy_checked, require
from .cost import Costs
from .files import REJECT, SKIP, FileStateError, Kernel, LayoutRefused, Verdicts, need, shape, slice_rows
from .layer import layer_spec
from .options import AdapterOptions, option


class IA3(Adapter):
    """Per-channel scaling of the output (default) or input channels of a Linear/ConvNd layer."""

    algo = "ia3"
    title = "IA3"
    file_keys = frozenset({"weight", "on_input"})
    marker_keys = ("on_input",)
    peft_refusal = (
        "PEFT's IA3 stores l = 1 + w and, for output scaling, also multiplies the bias by l (ours leaves the "
        "bias unchanged), so the results differ for layers with a bias"
    )
    loaded_by = frozenset({"A1111"})
    examples = (("ia3", {}, 1e-2),)

    @classmethod
    def tool_verdicts(
        cls, tensors: Mapping[str, Tensor], options: Mapping[str, Any] | None, kernel: Kernel = None
    ) -> Verdicts:
        """A1111 (``network_ia3.py``, v1.10.1) multiplies the layer weight by the vector, reshaped to
        ``(-1, 1)`` for the output side: right on Linears, but on a convolution that broadcasts against the
        kernel axes and raises (caught per layer, logged, left unpatched); the input side's stored
        ``(1, C, 1, 1)`` is right. LyCORIS 4.1.3 reads ``weight`` and ``on_input`` for an IA3 module but its
        ``make_module_from_state_dict`` takes only ``weight``: every IA3 file (its own too) raises a
        TypeError in ``create_lycoris_from_weights`` (``lycoris/modules/ia3.py``)."""
        out = super().tool_verdicts(tensors, options, kernel)
        if tensors["weight"].dim() > 1 and not _on_input(tensors):
            out["A1111"] = (
                SKIP,
                "IA3 on a convolution (output side): A1111 multiplies the 4-D weight by the vector as (-1, 1), "
                "which raises (logged) and leaves the layer unpatched",
            )
        out["LyCORIS"] = (
            REJECT,
            "LyCORIS 4.1.3 cannot load IA3 (its make_module_from_state_dict raises, own files too)",
        )
        return out

    @dataclass(frozen=True)
    class Options(AdapterOptions):
        on_input: bool = option(False, "scale the input channels (columns of W0) instead of the output channels")

    def __init__(self, layer: nn.Module, **options: Any) -> None:
        super().__init__(layer, **options)
        spec = self.spec
        self.on_input = bool(self.options.on_input)
        channels = spec.in_features if self.on_input else spec.out_features
        self.channels = channels
        # (C,) for Linear, (1, C, 1..) for ConvNd: the stored shape also broadcasts over activations
        self.weight = self.new_param(*((1, channels, *spec.ones_kernel) if spec.is_conv else (channels,)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """w = 0: the layer is unchanged at init."""
        nn.init.zeros_(self.weight)

    # ------------------------------------------------------------------ weight form
    def _weight_factor_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts ``w`` over ``W0`` (rows or columns)."""
        nd = self.base_weight.dim()
        if self.on_input:
            return (1, self.channels, *([1] * (nd - 2)))
        return (self.channels, *([1] * (nd - 1)))

    def _factor(self, multiplier: float, dtype: torch.dtype) -> Tensor:
        """``1 + m·w`` shaped to broadcast over ``W0``."""
        w = self.weight.reshape(self._weight_factor_shape()).to(dtype)
        return 1.0 + multiplier * w

    def merged_weight(self, multiplier: float | None = None, mask: Tensor | None = None) -> Tensor:
        m = self.multiplier if multiplier is None else multiplier
        w0 = self.base_weight
        dt = torch.promote_types(w0.dtype, self.param_dtype)
        return (w0.to(dt) * self._factor(m, dt)).to(w0.dtype)

    @torch.no_grad()
    def unmerged_weight(self, merged: Tensor, multiplier: float) -> Tensor:
        dt = torch.float64 if merged.device.type != "mps" else torch.float32
        return (merged.to(dt) / self._factor(multiplier, dt)).to(merged.dtype)

    def _needs_backup(self) -> bool:
        # dividing by (1 + m·w) restores W0 to rounding (the relative error is not amplified), but a
        # channel scaled to (nearly) 0 has lost W0: keep a copy of W0 then
        with torch.no_grad():
            smallest = float((1.0 + self.multiplier * self.weight.double()).abs().min())
        return not smallest >= 1e-6 or super()._needs_backup()

    # ------------------------------------------------------------------ bypass
    def bypass_forward(self, x: Tensor, multiplier: float, mask: Tensor | None = None) -> Tensor:
        spec = self.spec
        w0, b0 = self.base_weight, self.base_bias
        dropping = self.training and self.dropout > 0
        w = self.weight.to(x.dtype)
        if self.on_input:
            if not dropping:
                return spec.op(x * (1.0 + multiplier * w), w0, b0)
            y = spec.op(x, w0, b0)
            return y + self._drop(spec.op(x * (multiplier * w), w0))
        if not dropping:  # (x·W0ᵀ)·(1 + m·w) + b0 in one fused addcmul
            y0 = spec.op(x, w0)
            scale = 1.0 + multiplier * w if multiplier != 1.0 else 1.0 + w
            if b0 is None:
                return y0 * scale
            return torch.addcmul(b0.reshape(spec.channel_shape(spec.out_features)).to(y0.dtype), y0, scale)
        y = spec.op(x, w0, b0)
        h = y if b0 is None else y - b0.reshape(spec.channel_shape(spec.out_features)).to(y.dtype)
        return y + self._drop(h * (multiplier * w.to(y.dtype)))

    def costs(self, tokens: int) -> Costs:
        """One product per position and channel; passes: one fused addcmul forward, two products
        backward (op traces)."""
        return Costs(tokens * self.channels, self.base_weight.numel(), passes=2)

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, Tensor]:
        return {
            "weight": self.weight.detach().clone(),
            "on_input": torch.tensor(int(self.on_input), dtype=torch.int64),
        }

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "on_input" in tensors and bool(int(tensors["on_input"])) != self.on_input:
            raise FileStateError(
                f"tensor 'on_input' is {int(tensors['on_input'])}, but this adapter has on_input={self.on_input}"
            )
        weight = require(tensors, "weight")
        if weight.numel() == self.weight.numel() and weight.dim() != self.weight.dim():
            weight = weight.reshape(self.weight.shape)  # (C,) vs (1, C, 1..) written by other tools
        copy_checked(self.weight, weight, "weight")

    @classmethod
    def stack_outputs(cls, members: Sequence[Mapping[str, Tensor] | None], sizes: Sequence[int]) -> dict[str, Tensor]:
        """Output-channel scales one after the other (zero — no scaling — for a member without adapter);
        input-side scales act on the shared input, so they stack only where every member has the same."""
        present_ = [m for m in members if m is not None]
        if any(_on_input(m) for m in present_):
            weights = [m["weight"].reshape(-1) for m in present_]
            if len(present_) < len(members) or any(not torch.equal(w, weights[0]) for w in weights):
                raise LayoutRefused(
                    "input-channel IA3 scales the fused layer's shared input: its members need one and the same scale"
                )
            return {"weight": weights[0].clone(), "on_input": torch.tensor(1)}
        like = present_[0]["weight"]
        parts = [
            m["weight"].reshape(-1) if m is not None else like.new_zeros(n) for m, n in zip(members, sizes, strict=True)
        ]
        return {"weight": torch.cat(parts), "on_input": torch.tensor(0)}

    @classmethod
    def split_outputs(
        cls, tensors: Mapping[str, Tensor], sizes: Sequence[int], ranks: Sequence[int | None] | None = None
    ) -> list[dict[str, Tensor] | None]:
        """Each member's output-channel scales; an input-side scale applies to every member as it is."""
        if tensors["weight"].dim() != 1:
            raise LayoutRefused("IA3 on a convolution; fused layers are Linears")
        if _on_input(tensors):
            return [{k: v.clone() for k, v in tensors.items()} for _ in sizes]
        return list(slice_rows(tensors, sizes, ("weight",)))

    @classmethod
    def options_from_state(cls, tensors: dict[str, Tensor], layer: nn.Module) -> dict[str, Any]:
        """``on_input`` from its tensor, or (foreign files without it) from the size of ``weight``."""
        spec = layer_spec(layer, cls.algo)
        if "on_input" in tensors:
            return {"on_input": bool(int(tensors["on_input"]))}
        size = require(tensors, "weight").numel()
        if size not in (spec.in_features, spec.out_features):
            raise FileStateError(
                f"tensor 'weight' has {size} values; expected {spec.out_features} (output channels) "
                f"or {spec.in_features} (input channels)"
            )
        return {"on_input": size == spec.in_features and size != spec.out_features}

    def extra_state_options(self) -> dict[str, Any]:
        return {"on_input": self.on_input}

    # ------------------------------------------------------------------ files
    @classmethod
    def check_file_shapes(cls, tensors: Mapping[str, Tensor]) -> tuple[int | None, int | None]:
        """weight (C,) or (1, C, 1..); on_input one value 0 or 1."""
        (weight,) = need(tensors, "weight")
        if weight.dim() == 0 or sum(d != 1 for d in weight.shape) > 1:
            raise FileStateError(f"tensor 'weight' has shape {shape(weight)}; expected (C,) or (1, C, 1..)")
        if "on_input" in tensors:
            flag = tensors["on_input"]
            if flag.numel() != 1 or float(flag.reshape(-1)[0]) not in (0.0, 1.0):
                raise FileStateError(f"tensor 'on_input' must be one value 0 or 1, got {flag.tolist()!r}")
        return None, None


def _on_input(tensors: Mapping[str, Tensor]) -> bool:
    flag = tensors.get("on_input")
    return flag is not None and bool(flag.reshape(-1)[0])
