"""FactoredAdapter: the base of the algorithms whose ΔW is a product of trainable factors (LoRA,
LoHa, LoKr, GLoRA) — rank, α and scale, ``use_scalar``, rank dropout, and DoRA."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .base import Adapter, copy_checked
from .cost import Costs, with_dora
from .dora import dora_bypass, dora_weight, weight_norm
from .files import DEVIATE, REJECT, TOOLS, FileStateError, Kernel, Verdicts, dora_axis, merge_verdicts
from .options import FactoredOptions, check_fraction, finite_number, whole_number


def frozen_linear(adapter: Adapter, x2: Tensor) -> Tensor:
    """The wrapped Linear on 2-D activations ``(positions, in)``: ``addmm(b0, x, W0ᵀ)`` (or ``mm``),
    the GEMM a Linear bypass adds its branch into."""
    w0, b0 = adapter.base_weight, adapter.base_bias
    return x2.mm(w0.t()) if b0 is None else torch.addmm(b0, x2, w0.t())


def linear_lowrank_bypass(adapter: Adapter, x: Tensor, down: Tensor, up: Tensor, factor: float) -> Tensor:
    """A Linear's bypass with a low-rank branch: ``addmm(addmm(b0, x, W0ᵀ), x·downᵀ, (factor·up)ᵀ)``
    — the frozen GEMM, then the branch's add rides on the second GEMM (no activation-size add)."""
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    y = frozen_linear(adapter, x2)
    up = up if factor == 1.0 else up * factor
    y = torch.addmm(y, x2.mm(down.to(dt).t()), up.to(dt).t())
    return y.reshape(*x.shape[:-1], y.shape[-1])


class FactoredAdapter(Adapter):
    """Base of algorithms whose ΔW is a product of trainable factors (LoRA, LoHa, LoKr, GLoRA).

    It owns the rank, α and scale (``s = α/r``, rs-LoRA ``α/√r``), ``use_scalar``,
    ``rank_dropout`` and DoRA (``weight_decompose``) for the subclasses that allow it.
    """

    supports_dora: ClassVar[bool] = False

    @classmethod
    def tool_verdicts(
        cls, tensors: Mapping[str, Tensor], options: Mapping[str, Any] | None, kernel: Kernel = None
    ) -> Verdicts:
        """The tools that do not load the algorithm; then alpha 0 (ComfyUI, A1111 and diffusers read
        scale 0); then the algorithm's own rules (:meth:`own_tool_verdicts`); then DoRA (ComfyUI divides
        by ‖W0‖ instead of ‖W0+ΔW‖, A1111 supports only the input axis, diffusers drops ``dora_scale``,
        LyCORIS raises on the input axis).
        Per tool the most severe verdict wins (reject > skip > deviate), the first among equals."""
        out = super().tool_verdicts(tensors, options, kernel)
        if _alpha_is_zero(cls, tensors):
            merge_verdicts(
                out,
                {
                    tool: (DEVIATE, ALPHA_ZERO.format(tool="load_lora_weights" if tool == "diffusers" else tool))
                    for tool in TOOLS
                    if tool != "LyCORIS"  # it reads alpha 0 as the rank, as we do
                },
            )
        merge_verdicts(out, cls.own_tool_verdicts(tensors, options, kernel))
        axis = dora_axis(tensors, options)
        if axis == "output":
            merge_verdicts(
                out,
                {
                    "ComfyUI": (DEVIATE, "DoRA on the output axis: ComfyUI divides by ‖W0‖ instead of ‖W0+ΔW‖"),
                    "A1111": (DEVIATE, "DoRA on the output axis: A1111 supports only the input axis (wrong result)"),
                },
            )
        if axis == "input":
            merge_verdicts(
                out,
                {
                    "LyCORIS": (
                        REJECT,
                        "DoRA on the input axis: LyCORIS rebuilds dora_scale on the output axis and its copy of "
                        "this one raises",
                    )
                },
            )
        if axis is not None:
            merge_verdicts(
                out, {"diffusers": (DEVIATE, "DoRA: load_lora_weights drops dora_scale (plain LoRA result)")}
            )
        return out

    @classmethod
    def own_tool_verdicts(
        cls, tensors: Mapping[str, Tensor], options: Mapping[str, Any] | None, kernel: Kernel = None
    ) -> Verdicts:
        """The algorithm's own deviations, between the alpha-0 and the DoRA rules."""
        return {}

    @classmethod
    def alpha_scales(cls, tensors: Mapping[str, Tensor]) -> bool:
        """Whether ``α/r`` is this module's scale (true for every factored algorithm but LoKr with both
        blocks full, whose scale is 1)."""
        return True

    Options = FactoredOptions

    def __init__(self, layer: nn.Module, **options: Any) -> None:
        super().__init__(layer, **options)
        o = self.options
        rank = whole_number(self.algo, "rank", o.rank)
        if rank < 1:
            raise ConfigError(f"{self.algo}: option rank={rank} must be ≥ 1")
        self.rank = rank
        self.alpha = float(rank if o.alpha in (None, 0) else finite_number(self.algo, "alpha", o.alpha))
        self.rs_lora = bool(o.rs_lora)
        self.rank_dropout = check_fraction("rank_dropout", o.rank_dropout)
        self.rank_dropout_scale = bool(o.rank_dropout_scale)
        if o.weight_decompose and not self.supports_dora:
            raise ConfigError(f"{self.algo}: weight_decompose (DoRA) is only for lora, loha and lokr")
        self.weight_decompose = bool(o.weight_decompose)
        self.wd_on_output = bool(o.wd_on_output)
        zero = torch.zeros((), dtype=self.param_dtype, device=self.device)
        self.scalar = nn.Parameter(zero) if o.use_scalar else None

    @property
    def use_scalar(self) -> bool:
        return self.scalar is not None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rs_lora else self.rank)

    @property
    def file_alpha(self) -> float:
        """α as written to files: ``α·√r`` for rs-LoRA so that ``alpha/r`` is the scale."""
        return self.alpha * math.sqrt(self.rank) if self.rs_lora else self.alpha

    def set_file_alpha(self, value: float) -> None:
        """Set α from a file's value; 0 reads as the rank (scale 1), as kohya and LyCORIS read it."""
        value = float(value) or float(self.rank)
        self.alpha = value / math.sqrt(self.rank) if self.rs_lora else value

    def scaled_up(self, up: Tensor) -> Tensor:
        """Apply the learned scalar to the "up" factor (a tiny tensor, so it is cheap)."""
        return up if self.scalar is None else up * self.scalar

    def rank_mask(self) -> Tensor | None:
        if not (self.training and self.rank_dropout > 0):
            return None
        keep = 1.0 - self.rank_dropout
        mask = (torch.rand(self.rank, device=self.device) < keep).to(self.param_dtype)
        if self.rank_dropout_scale and keep > 0:
            mask = mask / keep
        return mask

    def alpha_tensor(self) -> Tensor:
        return torch.tensor(self.file_alpha, dtype=torch.float32)

    # ---------------------------------------------------------------- DoRA
    def _init_dora(self) -> None:
        if not self.weight_decompose:
            return
        with torch.no_grad():
            norm = weight_norm(self.base_weight.to(self.param_dtype), self.wd_on_output)
        self.dora_scale = nn.Parameter(norm.clone())

    def merged_weight(self, multiplier: float | None = None, mask: Tensor | None = None) -> Tensor:
        if not self.weight_decompose:
            return super().merged_weight(multiplier, mask)
        m = self.multiplier if multiplier is None else multiplier
        w0 = self.base_weight
        w0p = w0.to(self.param_dtype)
        wd = dora_weight(w0p, self.scale * self.delta_weight(mask), self.dora_scale, self.wd_on_output)
        return torch.add(w0p, wd - w0p, alpha=m).to(w0.dtype)

    def bypass_forward(self, x: Tensor, multiplier: float, mask: Tensor | None = None) -> Tensor:
        if not self.weight_decompose:
            return super().bypass_forward(x, multiplier, mask)
        return dora_bypass(self, x, multiplier, mask)

    def _needs_backup(self) -> bool:
        return self.weight_decompose or super()._needs_backup()

    def costs(self, tokens: int) -> Costs:
        """The factored branch's costs, and DoRA's on top when it is on."""
        plain = self.branch_costs(tokens)
        return with_dora(plain) if self.weight_decompose else plain

    def fused_linear_bypass(self, x: Tensor) -> bool:
        """Whether this call may run an algorithm's fused Linear bypass (adds riding on GEMMs):
        a Linear, without DoRA (its own bypass) and without dropout on the branch."""
        return (
            not self.spec.is_conv
            and not self.weight_decompose
            and not (self.training and self.dropout > 0)
            and x.dim() >= 1
        )

    def dora_factors(self, mask: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """``(U, V)`` with ``flat(ΔW) = U·V`` when ΔW is a product of rank-r factors (DoRA's norm is
        then computed without ΔW, see :mod:`.dora`); ``None``: DoRA builds ΔW."""
        return None

    def branch_costs(self, tokens: int) -> Costs:
        """The factored branch's costs without DoRA; ``bypass`` is ``None`` when ``branch`` must
        materialise ΔW (then bypass is never the cheaper mode)."""
        return Costs(None, self.base_weight.numel())

    def extra_state_options(self) -> dict[str, Any]:
        """Rank and DoRA (subclasses add their own): what rebuilds this adapter from a file."""
        options: dict[str, Any] = {"rank": self.rank}
        if self.weight_decompose:
            options.update(weight_decompose=True, wd_on_output=self.wd_on_output)
        return options

    def common_state(self) -> dict[str, Tensor]:
        """``alpha`` and (with DoRA) ``dora_scale``."""
        out = {"alpha": self.alpha_tensor()}
        if self.weight_decompose:
            out["dora_scale"] = self.dora_scale.detach().clone()
        return out

    def load_common_state(self, tensors: dict[str, Tensor]) -> None:
        if "alpha" in tensors:
            self.set_file_alpha(float(tensors["alpha"]))
        if self.weight_decompose:
            if "dora_scale" not in tensors:
                raise FileStateError("missing key 'dora_scale'")
            copy_checked(self.dora_scale, tensors["dora_scale"], "dora_scale")
        if self.scalar is not None:
            with torch.no_grad():
                self.scalar.fill_(1.0)


#: the note for a factored module whose file alpha is 0
ALPHA_ZERO = "alpha 0: {tool} reads scale 0 (no effect), where higanbana, kohya and LyCORIS read alpha = rank"


def _alpha_is_zero(cls: type[FactoredAdapter], tensors: Mapping[str, Tensor]) -> bool:
    alpha = tensors.get("alpha")
    return alpha is not None and float(alpha.reshape(-1)[0]) == 0 and cls.alpha_scales(tensors)
