"""GLoRA: ``ΔW = flat(W0)·(a1·a2) + b1·b2`` — a low-rank map of the input channels plus a LoRA term.

Keys: ``a1.weight`` (in, r), ``a2.weight`` (r, in), ``b1.weight`` (out, r), ``b2.weight``
(r, in) for Linear; for ConvNd ``a1``, ``a2``, ``b1`` as 1×1 conv weights (in, r, 1..), (r, in, 1..),
(out, r, 1..) — LyCORIS's layout — and ``b2`` (r, in, *k); ``alpha``; ``s = α/r``. For a conv the ``a`` term
acts on the input-channel axis of ``W0``: ``ΔW[o,j,κ] = Σ_i W0[o,i,κ]·A[i,j]`` with ``A = a1·a2``.

Bypass. Because ``op(x, W0·A) = op(P_A(x), W0)`` where ``P_A`` is the pointwise projection of the
input channels by ``A`` (``P_A(x)[i] = Σ_j A[i,j]·x[j]``, i.e. ``a1(a2(x))``), the adapted layer is

    y' = op(x + c·a1(a2(x)), W0, b0) + c·b1(b2(x)),   c = m·s

— one full-size op on a slightly changed input plus a LoRA-like branch, never ΔW. (With dropout
in training the branch ``y' − y`` must be dropped on its own, which costs a second op with W0.)

Merged: ``W' = W0·(I + c·A) + c·B``. Un-merge inverts ``I + c·A`` with the Woodbury identity
``(I + c·a1·a2)⁻¹ = I − c·a1·(I_r + c·a2·a1)⁻¹·a2`` (r×r, in float64), so no backup is needed
unless ``I + c·A`` is ill-conditioned (see :meth:`GLoRA._needs_backup`).

``use_scalar``: ``a2`` and ``b2`` start non-zero and a learned scalar (init 0) multiplies both;
ΔW is linear in ``a2`` and in ``b2``, so saving ``scalar·a2`` and ``scalar·b2`` is exact.
``rank_dropout`` masks the rank axis of both terms (rows of ``a2`` and ``b2``).

Files in the old GLoRA layout (``a1`` (r, in), ``a2`` (in, r), ``b1`` (r, in·∏k), ``b2`` (out, r),
``ΔW = W0·a2·a1 + b2·b1``) are the same factors under swapped names; they are recognised by shape
and loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import copy_checked, require
from .cost import Costs
from .factored import FactoredAdapter, frozen_linear
from .files import DEVIATE, REJECT, SKIP, FileStateError, Kernel, Verdicts, dims, need
from .layer import LayerSpec, layer_spec
from .options import FactoredOptions, option

KEYS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


def _new_layout(tensors: dict[str, Tensor], spec: LayerSpec) -> dict[str, Tensor]:
    """The four factors in the new layout (old-layout files are renamed), or a clear error."""
    a1, a2, b1, b2 = (require(tensors, k) for k in KEYS)
    # LyCORIS writes a1/a2 of conv layers as 1×1 conv weights, (in, r, 1, 1) and (r, in, 1, 1)
    a1, a2 = (t.flatten(1) if t.dim() > 2 and math.prod(t.shape[2:]) == 1 else t for t in (a1, a2))
    inp, out = spec.in_features, spec.out_features

    def fits(a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor) -> bool:
        if a1.dim() != 2 or a2.dim() != 2 or b1.dim() < 2 or b2.dim() < 2:
            return False
        r = a1.shape[1]
        return (
            a1.shape[0] == inp
            and tuple(a2.shape) == (r, inp)
            and b1.shape[0] == out
            and b1.shape[1] == r
            and math.prod(b1.shape[2:]) == 1
            and b2.shape[0] == r
            and b2[0].numel() == spec.fan_in
        )

    if fits(a1, a2, b1, b2):
        return dict(zip(KEYS, (a1, a2, b1, b2), strict=True))
    if fits(a2, a1, b2, b1):  # old layout: the same factors under swapped names
        return dict(zip(KEYS, (a2, a1, b2, b1), strict=True))
    shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in zip(KEYS, (a1, a2, b1, b2), strict=True))
    raise FileStateError(
        f"glora tensors ({shapes}) fit neither layout for a layer with in={inp}, out={out}, "
        f"in·∏k={spec.fan_in}: expected a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in·∏k)"
    )


#: multiply-adds that changing a Linear's input costs per position and input channel, against the
#: ``W0·a1`` GEMM (SD1.5 shapes on the 2-core CPU, 2026-12-07: the input form wins from 1280×1280
#: at 64 positions on; ``W0·a1`` at 320×320 with 1024 positions)
INPUT_PASS_COST = 32


class GLoRA(FactoredAdapter):
    """Generalised LoRA of Linear and ConvNd layers (no DoRA)."""

    algo = "glora"
    title = "GLoRA"
    up_factors = ("a2", "b2")
    file_keys = frozenset({"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"})
    marker_keys = ("a1.weight",)
    peft_refusal = "PEFT's GLoRA is element-wise (W0 + W0⊙A + B); ours is the matrix product W0·a1·a2 + b1·b2"
    loaded_by = frozenset({"ComfyUI", "A1111", "LyCORIS"})
    examples = (("glora", {"rank": 4}, 3e-3),)

    @dataclass(frozen=True)
    class Options(FactoredOptions):
        use_tucker: bool = option(False, "accepted like every factored algorithm's; GLoRA has no Tucker form (ignored)")

    def __init__(self, layer: nn.Module, **options: Any) -> None:
        super().__init__(layer, **options)
        spec, r = self.spec, self.rank
        self.use_tucker = False
        self.a1 = self.new_param(spec.in_features, r)
        self.a2 = self.new_param(r, spec.in_features)
        self.b1 = self.new_param(spec.out_features, r)
        self.b2 = self.new_param(r, spec.in_features, *spec.kernel_size)
        self.reset_parameters()

    @classmethod
    def full_rank(cls, spec: LayerSpec, options: dict[str, Any]) -> int | None:
        """``max(in, min(out, in·∏k))``: both the ``a`` (in × in) and ``b`` (out × in·∏k) paths are full."""
        return max(spec.in_features, min(spec.out_features, spec.fan_in))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """a1, b1: kaiming-uniform(a=√5); a2 = b2 = 0 (kaiming as well with ``use_scalar``)."""
        nn.init.kaiming_uniform_(self.a1, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.b1, a=math.sqrt(5))
        if self.use_scalar:
            nn.init.kaiming_uniform_(self.a2, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.b2, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.a2)
            nn.init.zeros_(self.b2)

    # ------------------------------------------------------------------ factors
    def _ups(self, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """``a2`` (r, in) and ``flat(b2)`` (r, in·∏k) with the learned scalar and the rank mask."""
        a2, b2 = self.scaled_up(self.a2), self.scaled_up(self.b2.flatten(1))
        if mask is not None:
            m = mask.to(a2.dtype)[:, None]
            a2, b2 = a2 * m, b2 * m
        return a2, b2

    def delta_weight(self, mask: Tensor | None = None) -> Tensor:
        spec, w0 = self.spec, self.base_weight
        a2, b2 = self._ups(mask)
        if not spec.is_conv:  # (W0·a1)·a2 + b1·b2 as two plain GEMMs
            return torch.addmm(self.b1 @ b2, w0.to(a2.dtype) @ self.a1, a2)
        w = w0.to(a2.dtype).reshape(spec.out_features, spec.in_features, spec.kernel_numel)
        # (W0·a1)·a2 through the rank: 2·out·in·∏k·r instead of forming the in×in matrix A
        wa = torch.einsum("oik,ir->ork", w, self.a1)
        delta = torch.einsum("ork,rj->ojk", wa, a2).reshape(w0.shape)
        return delta + (self.b1 @ b2).reshape(w0.shape)

    def _b_path(self, x: Tensor, a2b2: tuple[Tensor, Tensor]) -> Tensor:
        spec, dt = self.spec, x.dtype
        b2 = a2b2[1].reshape(self.b2.shape).to(dt)
        return spec.pointwise(spec.op(x, b2), self.b1.to(dt))

    def _a_path(self, x: Tensor, a2b2: tuple[Tensor, Tensor]) -> Tensor:
        """``P_A(x)``: the input channels mapped by ``A = a1·a2`` (a rank-r pointwise projection)."""
        spec, dt = self.spec, x.dtype
        return spec.pointwise(spec.pointwise(x, a2b2[0].to(dt)), self.a1.to(dt))

    def branch(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``op(x, ΔW) = op(P_A(x), W0) + b1(b2(x))`` (costs one op with ``W0``)."""
        ups = self._ups(mask)
        return self.spec.op(self._a_path(x, ups), self.base_weight) + self._b_path(x, ups)

    def bypass_forward(self, x: Tensor, multiplier: float, mask: Tensor | None = None) -> Tensor:
        if self.training and self.dropout > 0:
            return super().bypass_forward(x, multiplier, mask)  # y + drop(c·op(x, ΔW))
        c = multiplier * self.scale
        ups = self._ups(mask)
        if not self.spec.is_conv:
            return self._linear_bypass(x, c, ups)
        y = self.spec.op(x + c * self._a_path(x, ups), self.base_weight, self.base_bias)
        return y + c * self._b_path(x, ups)

    def _linear_bypass(self, x: Tensor, c: float, ups: tuple[Tensor, Tensor]) -> Tensor:
        """For Linear, two exact forms, the cheaper for the call's number of positions:

        - ``W0·a1`` small against the activations: a rank-2r LoRA with ``down = [a2; b2]`` and
          ``up = c·[W0·a1 | b1]``, ``addmm(addmm(b0, x, W0ᵀ), x·downᵀ, upᵀ)`` (one weight-sized
          rank-r GEMM);
        - otherwise ``addmm(addmm(b0, x + c·a1(a2(x)), W0ᵀ), b2(x), c·b1ᵀ)``: the frozen GEMM on a
          changed input (one activation-size tensor), no weight-sized work.
        """
        dt, w0 = x.dtype, self.base_weight
        x2 = x.reshape(-1, x.shape[-1])
        h = x2.mm(torch.cat(ups).to(dt).t())  # (tokens, 2r): a2(x) and b2(x) in one GEMM
        r = self.rank
        if self._weight_form_is_cheaper(x2.shape[0]):
            up = torch.cat([w0.to(self.a1.dtype) @ self.a1, self.b1], dim=1)
            up = (up if c == 1.0 else up * c).to(dt)
            y = torch.addmm(frozen_linear(self, x2), h, up.t())
        else:
            a1, b1 = (self.a1 * c).to(dt), (self.b1 * c).to(dt)
            changed = torch.addmm(x2, h[:, :r], a1.t())
            y = torch.addmm(frozen_linear(self, changed), h[:, r:], b1.t())
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _weight_form_is_cheaper(self, tokens: int) -> bool:
        """Whether ``W0·a1`` (out·r per input channel, a skinny GEMM, forward and backward) costs less
        than changing the input (about :data:`INPUT_PASS_COST` multiply-adds per position and input
        channel: an activation-size tensor written, read and its gradient added)."""
        return self.spec.out_features * self.rank < INPUT_PASS_COST * tokens

    def branch_costs(self, tokens: int) -> Costs:
        """Linear: the rank-2r LoRA form plus ``W0·a1``; conv: the two factored paths."""
        s, r = self.spec, self.rank
        if not s.is_conv:
            branch = tokens * 2 * r * (s.in_features + s.out_features)
            branch += s.in_features * min(s.out_features * r, INPUT_PASS_COST * tokens)
        else:
            branch = tokens * r * (2 * s.in_features + s.fan_in + s.out_features)
        delta = 2 * s.out_features * r * s.fan_in + s.out_features * r * s.fan_in
        return Costs(branch, delta, passes=12 if s.is_conv else 3)

    # ------------------------------------------------------------------ un-merge
    def _woodbury(self, multiplier: float) -> tuple[Tensor, Tensor, Tensor]:
        """``a1``, ``a2`` and ``K = I_r + c·a2·a1`` in float64 (c = m·s)."""
        a2 = self._ups(None)[0].detach().double()
        a1 = self.a1.detach().double()
        k = torch.eye(self.rank, dtype=torch.float64, device=a1.device) + multiplier * self.scale * (a2 @ a1)
        return a1, a2, k

    def _needs_backup(self) -> bool:
        """Keep a copy of W0 when inverting ``M = I + c·A`` would lose more than ~1e-5 (relative).

        The un-merge error is about ``κ(M)·eps``; with Woodbury ``‖M‖ ≤ 1 + |c|‖a1‖‖a2‖`` and
        ``‖M⁻¹‖ ≤ 1 + |c|‖a1‖‖a2‖/σ_min(K)``, a bound from r-sized quantities only.
        """
        if super()._needs_backup():
            return True
        with torch.no_grad():
            a1, a2, k = self._woodbury(self.multiplier)
            if not bool(torch.isfinite(k).all()):
                return True
            sigma = float(torch.linalg.svdvals(k).min())
            if sigma <= 0.0:
                return True
            t = abs(self.multiplier * self.scale) * float(
                torch.linalg.matrix_norm(a1, 2) * torch.linalg.matrix_norm(a2, 2)
            )
            kappa = (1.0 + t) * (1.0 + t / sigma)
        return kappa * torch.finfo(self.base_weight.dtype).eps > 1e-5

    @torch.no_grad()
    def unmerged_weight(self, merged: Tensor, multiplier: float) -> Tensor:
        """``W0 = (W' − c·B)·(I + c·A)⁻¹`` on the input-channel axis (Woodbury, float64)."""
        spec, c = self.spec, multiplier * self.scale
        a1, a2, k = self._woodbury(multiplier)
        b = (self.b1.double() @ self._ups(None)[1].double()).reshape(merged.shape)
        v = (merged.double() - c * b).reshape(spec.out_features, spec.in_features, spec.kernel_numel)
        # v·(I − c·a1·K⁻¹·a2) on the input axis
        low = torch.einsum("oik,ir->ork", v, a1)
        low = torch.einsum("ork,rs,sj->ojk", low, torch.linalg.inv(k), a2)
        return (v - c * low).reshape(merged.shape).to(merged.dtype)

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, Tensor]:
        """For convolutions ``a1``, ``a2`` and ``b1`` are written as 1×1 conv weights, (in, r, 1, 1),
        (r, in, 1, 1) and (out, r, 1, 1): the layout LyCORIS writes and requires (it copies them
        into conv modules); ComfyUI and A1111 flatten them, so the values read are the same."""
        a2, _ = self._ups(None)
        ones = self.spec.ones_kernel
        out = {
            "a1.weight": self.a1.detach().clone().reshape(*self.a1.shape, *ones),
            "a2.weight": a2.detach().clone().reshape(*a2.shape, *ones),
            "b1.weight": self.b1.detach().clone().reshape(*self.b1.shape, *ones),
            "b2.weight": self.scaled_up(self.b2).detach().clone(),
        }
        out.update(self.common_state())
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        factors = _new_layout(tensors, self.spec)
        for key, param in zip(KEYS, (self.a1, self.a2, self.b1, self.b2), strict=True):
            value = factors[key]
            if value.shape != param.shape and value.numel() == param.numel():
                value = value.reshape(param.shape)  # b2 as (r, in·∏k), b1 as (out, r, 1..)
            copy_checked(param, value, key)
        self.load_common_state(tensors)

    @classmethod
    def options_from_state(cls, tensors: dict[str, Tensor], layer: nn.Module) -> dict[str, Any]:
        """The rank, from the (new or old layout) factors."""
        spec = layer_spec(layer, cls.algo)
        return {"rank": _new_layout(tensors, spec)["a1.weight"].shape[1]}

    # ------------------------------------------------------------------ files
    @classmethod
    def check_file_shapes(cls, tensors: Mapping[str, Tensor]) -> tuple[int | None, int | None]:
        """The four factors fit the new layout (a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in·∏k)) or
        the old one (the same factors under swapped names)."""
        factors = need(tensors, *KEYS)
        for key, t in zip(KEYS, factors, strict=True):
            dims(t, key, 2, 5)
        layout = glora_layout(tensors)
        a1, _a2, b1, b2 = factors
        if (a1.shape[1] if layout == "new" else a1.shape[0]) < 1:
            raise FileStateError("GLoRA rank 0")
        return (b1.shape[0] if layout == "new" else b2.shape[0]), None

    @classmethod
    def describe_rank(cls, tensors: Mapping[str, Tensor]) -> str:
        a1 = tensors["a1.weight"]
        return str(a1.shape[1] if glora_layout(tensors) == "new" else a1.shape[0])

    @classmethod
    def layout_for(cls, tool: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """For A1111, a Linear's new-layout factors under the old names (``a1``↔``a2``, ``b1``↔``b2``: the
        same factors, which A1111 multiplies as stored); convolutions have no layout A1111 computes."""
        if tool != "A1111" or glora_layout(tensors) == "old" or any(t.dim() > 2 for t in tensors.values()):
            return None
        swapped = {
            "a1.weight": "a2.weight",
            "a2.weight": "a1.weight",
            "b1.weight": "b2.weight",
            "b2.weight": "b1.weight",
        }
        out = {swapped.get(k, k): v for k, v in tensors.items()}
        return out if glora_layout(out) == "old" else None  # square shapes read as new: no distinct layout

    @classmethod
    def own_tool_verdicts(
        cls, tensors: Mapping[str, Tensor], options: Mapping[str, Any] | None, kernel: Kernel = None
    ) -> Verdicts:
        """ComfyUI (``comfy/weight_adapter/glora.py``) reads both layouts, telling them apart by shapes: a
        new-layout module with rank = in = out reads as old (another result), and the old layout's matrix
        product raises on k×k convolutions (caught, unpatched). A1111 (``network_glora.py``, v1.10.1)
        computes ``b2·b1 + W·a2·a1`` on the tensors as stored: right for the old layout on Linears; where
        those products raise it logs and skips the layer, where they happen to broadcast (square shapes)
        it applies another weight. LyCORIS (``lycoris/modules/glora.py``, 4.1.3) reads only the new
        layout, with ``a1``/``a2``/``b1`` as 1×1 conv weights on convolutions (its copy of a 2-D factor
        into them raises)."""
        a1, b1, b2 = tensors["a1.weight"], tensors["b1.weight"], tensors["b2.weight"]
        old = glora_layout(tensors) == "old"
        out: Verdicts = {}
        spatial = any(math.prod(t.shape[2:]) > 1 for t in tensors.values() if t.dim() > 2)
        if old:
            out["LyCORIS"] = (REJECT, "old GLoRA layout: LyCORIS reads only the new one (its copy raises)")
            if spatial:
                out["ComfyUI"] = (SKIP, "old GLoRA layout on a k×k convolution: ComfyUI's product raises (caught)")
            else:
                out["ComfyUI"] = (DEVIATE, "old GLoRA layout: ComfyUI reads it (by shapes)")
        elif a1.shape[0] == a1.shape[1] == b1.shape[0]:
            why = "GLoRA with rank = in = out: ComfyUI reads it as the old layout"
            out["ComfyUI"] = (SKIP, why + " and its product raises (caught)") if spatial else (DEVIATE, why)
        if not old or any(t.dim() > 2 for t in tensors.values()):
            if _a1111_products_run(tensors, old):
                out["A1111"] = (DEVIATE, "GLoRA: A1111's products on these shapes broadcast into another weight")
            else:
                out["A1111"] = (SKIP, "A1111 computes GLoRA on the stored old layout of Linears only (raises, logged)")
        if not old and b2.dim() > 2 and a1.dim() == 2:
            out["LyCORIS"] = (
                REJECT,
                "GLoRA on a convolution with 2-D a1/a2/b1: LyCORIS expects 1×1 conv weights (its copy raises)",
            )
        return out


def _a1111_products_run(tensors: Mapping[str, Tensor], old: bool) -> bool:
    """Whether A1111's ``b2 @ b1 + (W @ a2) @ a1`` (tensors as stored, batched matmul on 4-D ones), then
    its reshape to the weight when the sizes agree and ``W + ΔW`` copied into ``W``, runs without an
    error for this module's layer — on meta tensors, so shapes only."""
    a1, a2, b1, b2 = (tensors[k] for k in KEYS)
    new = (a2, a1, b2, b1) if old else (a1, a2, b1, b2)  # the factors in the new layout
    inp, out = new[0].shape[0], new[2].shape[0]
    kernel = tuple(new[3].shape[2:])
    weight = torch.empty(out, inp, *kernel, device="meta")

    def meta(t: Tensor) -> Tensor:
        return torch.empty(t.shape, device="meta")

    try:
        updown = meta(b2) @ meta(b1) + (weight @ meta(a2)) @ meta(a1)
        if updown.numel() == weight.numel():
            updown = updown.reshape(weight.shape)
        return torch.broadcast_shapes(torch.broadcast_shapes(weight.shape, updown.shape), weight.shape) == weight.shape
    except RuntimeError:
        return False


def glora_layout(tensors: Mapping[str, Tensor]) -> str:
    """``"new"`` (a1 (in,r), a2 (r,in), b1 (out,r), b2 (r,in·∏k)) or ``"old"`` (names swapped within each
    pair), decided by the shared rank axis without the layer; a square, ambiguous set reads as new."""
    try:
        a1, a2, b1, b2 = (tensors[k].shape for k in KEYS)
    except KeyError as exc:
        raise FileStateError(f"GLoRA module lacks {exc.args[0]!r} (has {sorted(tensors)})") from None
    if min(len(a1), len(a2), len(b1), len(b2)) < 2:
        raise FileStateError(f"GLoRA factors must be at least 2-D (a1 {tuple(a1)}, a2 {tuple(a2)})")
    if a2[0] == a1[1] and a2[1] == a1[0] and b1[1] == a1[1] and b2[0] == a1[1]:
        return "new"
    if a2[0] == a1[1] and a2[1] == a1[0] and b1[0] == a1[0] and b2[1] == a1[0]:
        return "old"
    raise FileStateError(
        f"GLoRA shapes fit neither layout: a1 {tuple(a1)}, a2 {tuple(a2)}, b1 {tuple(b1)}, b2 {tuple(b2)}"
    )
