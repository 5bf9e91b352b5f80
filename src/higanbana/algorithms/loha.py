"""LoHa: ``ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b)``, a Hadamard product of two low-rank matrices.

Keys: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in·∏k), ``hada_w2_a``, ``hada_w2_b``, ``alpha``,
optional ``dora_scale``. Tucker (``use_tucker``, convs with k > 1): ``hada_t1``/``hada_t2``
(r, r, *k), ``hada_w?_a`` (r, out), ``hada_w?_b`` (r, in), and
``W_j[p,q,κ] = Σ_{a,c} t_j[a,c,κ]·w_j_a[a,p]·w_j_b[c,q]``, ``ΔW = W_1 ⊙ W_2``.

Bypass. The Hadamard product of two rank-r products is one rank-r² product (a row-wise
Khatri–Rao product of the factors):

    ΔW[o,j] = Σ_a w1_a[o,a]·w1_b[a,j] · Σ_b w2_a[o,b]·w2_b[b,j] = Σ_(a,b) U[o,(a,b)]·V[(a,b),j],
    U[o,(a,b)] = w1_a[o,a]·w2_a[o,b],   V[(a,b),j] = w1_b[a,j]·w2_b[b,j]

so the branch is a rank-r² LoRA ``U·(V·x)`` (for a conv, ``V`` carries the layer's kernel): no
full-size tensor in forward or backward. Tucker LoHa builds ΔW (the base default) for its branch.
Building ΔW keeps only the four small factors for backward (:class:`HadamardProduct`): the two
full-size products are rebuilt there instead of being held between forward and backward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import HiganbanaError
from .base import copy_checked, present, require
from .cost import Costs
from .dora import dora_options
from .factored import FactoredAdapter, linear_lowrank_bypass
from .files import FileStateError, LayoutRefused, alpha_of, dims, need, same, shape, slice_rows
from .layer import LayerSpec, layer_spec
from .options import FactoredOptions, option


class HadamardProduct(torch.autograd.Function):
    """``(a1·b1) ⊙ (a2·b2)`` saving only the factors; backward recomputes the two products."""

    @staticmethod
    def forward(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor) -> Tensor:
        return (a1 @ b1) * (a2 @ b2)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        a1, b1, a2, b2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        g1 = grad * (a2 @ b2) if need[0] or need[1] else None
        g2 = grad * (a1 @ b1) if need[2] or need[3] else None
        return (
            g1 @ b1.mT if need[0] else None,
            a1.mT @ g1 if need[1] else None,
            g2 @ b2.mT if need[2] else None,
            a2.mT @ g2 if need[3] else None,
        )


def tucker_rebuild(t: Tensor, w_a: Tensor, w_b: Tensor) -> Tensor:
    """``W[p,q,κ] = Σ_{a,c} t[a,c,κ]·w_a[a,p]·w_b[c,q]`` with ``t`` (r,r,K), ``w_a`` (r,P), ``w_b`` (r,Q)."""
    return torch.einsum("ack,ap,cq->pqk", t, w_a, w_b)


class LoHa(FactoredAdapter):
    """Low-rank Hadamard-product adaptation of Linear and ConvNd layers."""

    algo = "loha"
    title = "LoHa"
    up_factors = ("hada_w2_a",)
    supports_dora = True
    file_keys = frozenset(
        {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"}
    )
    marker_keys = ("hada_w1_a",)
    key_flags = (("weight_decompose", "dora_scale"), ("use_tucker", "hada_t1"))
    peft_type = "LOHA"
    stack_refusal = (
        "the Hadamard product of factors stacked over the fused rows is not zero off the members' blocks, "
        "so the members cannot become one LoHa"
    )
    loaded_by = frozenset({"ComfyUI", "A1111", "LyCORIS"})
    examples = (("loha", {"rank": 4}, 3e-3),)

    @dataclass(frozen=True)
    class Options(FactoredOptions):
        use_tucker: bool = option(False, "Tucker form for convs with a kernel > 1 (hada_t1, hada_t2)")

    def __init__(self, layer: nn.Module, **options: Any) -> None:
        super().__init__(layer, **options)
        spec, r = self.spec, self.rank
        self.use_tucker = bool(self.options.use_tucker) and spec.is_conv and spec.kernel_numel > 1
        self.hada_t1: nn.Parameter | None
        self.hada_t2: nn.Parameter | None
        if self.use_tucker:
            self.hada_t1 = self.new_param(r, r, *spec.kernel_size)
            self.hada_t2 = self.new_param(r, r, *spec.kernel_size)
            self.hada_w1_a = self.new_param(r, spec.out_features)
            self.hada_w1_b = self.new_param(r, spec.in_features)
            self.hada_w2_a = self.new_param(r, spec.out_features)
            self.hada_w2_b = self.new_param(r, spec.in_features)
        else:
            self.hada_t1 = self.hada_t2 = None
            self.hada_w1_a = self.new_param(spec.out_features, r)
            self.hada_w1_b = self.new_param(r, spec.fan_in)
            self.hada_w2_a = self.new_param(spec.out_features, r)
            self.hada_w2_b = self.new_param(r, spec.fan_in)
        self.reset_parameters()
        self._init_dora()

    @classmethod
    def full_rank(cls, spec: LayerSpec, options: dict[str, Any]) -> int | None:
        """``min(out, in·∏k)`` (Tucker: ``min(out, in)``): each Hadamard factor then spans every matrix."""
        tucker = options.get("use_tucker") and spec.is_conv and spec.kernel_numel > 1
        return min(spec.out_features, spec.in_features if tucker else spec.fan_in)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """w1_a, t ~ N(0, 0.1²); w1_b, w2_b ~ N(0, 1); w2_a = 0 (N(0, 0.1²) with ``use_scalar``)."""
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        if self.use_scalar:
            nn.init.normal_(self.hada_w2_a, std=0.1)
        else:
            nn.init.zeros_(self.hada_w2_a)
        if self.use_tucker:
            nn.init.normal_(present(self.hada_t1), std=0.1)
            nn.init.normal_(present(self.hada_t2), std=0.1)

    def _a_factors(self, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """``w1_a`` and ``w2_a`` (with the learned scalar) masked on their rank axis."""
        a1: Tensor = self.hada_w1_a
        a2 = self.scaled_up(self.hada_w2_a)
        if mask is not None:
            m = mask.to(a1.dtype)
            m = m[:, None] if self.use_tucker else m  # rank axis: 0 for Tucker (r,out), 1 for (out,r)
            a1, a2 = a1 * m, a2 * m
        return a1, a2

    def delta_weight(self, mask: Tensor | None = None) -> Tensor:
        shape = self.base_weight.shape
        a1, a2 = self._a_factors(mask)
        if not self.use_tucker:
            return HadamardProduct.apply(a1, self.hada_w1_b, a2, self.hada_w2_b).reshape(shape)
        w1 = tucker_rebuild(present(self.hada_t1).flatten(2), a1, self.hada_w1_b)
        w2 = tucker_rebuild(present(self.hada_t2).flatten(2), a2, self.hada_w2_b)
        return (w1 * w2).reshape(shape)

    def khatri_rao(self, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """``U`` (out, r²) and ``V`` (r², in·∏k) with ``ΔW = U·V`` (not for Tucker; see the module)."""
        a1, a2 = self._a_factors(mask)
        out, r = a1.shape[0], self.rank
        u = (a1[:, :, None] * a2[:, None, :]).reshape(out, r * r)
        v = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r * r, -1)
        return u, v

    def branch(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.use_tucker:
            return super().branch(x, mask)
        return self.scaled_branch(x, mask, 1.0)

    def scaled_branch(self, x: Tensor, mask: Tensor | None, factor: float) -> Tensor:
        """``factor·U(V(x))``, the rank-r² form; Tucker builds ΔW."""
        if self.use_tucker:
            return super().scaled_branch(x, mask, factor)
        spec, dt = self.spec, x.dtype
        u, v = self.khatri_rao(mask)
        h = spec.op(x, v.reshape(v.shape[0], spec.in_features, *spec.kernel_size).to(dt))
        return spec.pointwise(h, (u * factor if factor != 1.0 else u).to(dt))

    def bypass_forward(self, x: Tensor, multiplier: float, mask: Tensor | None = None) -> Tensor:
        """Linear: ``addmm(addmm(b0, x, W0ᵀ), x·Vᵀ, (m·s·U)ᵀ)`` — the add rides on the GEMM."""
        if self.use_tucker or not self.fused_linear_bypass(x):
            return super().bypass_forward(x, multiplier, mask)
        u, v = self.khatri_rao(mask)
        return linear_lowrank_bypass(self, x, v, u, multiplier * self.scale)

    def branch_costs(self, tokens: int) -> Costs:
        """The rank-r² branch (Tucker: none, the branch builds ΔW) against two rank-r products and
        their Hadamard product for ΔW."""
        s, r = self.spec, self.rank
        if self.use_tucker:
            per_side = r * r * s.kernel_numel * s.in_features + s.out_features * r * s.fan_in
            return Costs(None, 2 * per_side + s.out_features * s.fan_in)
        per_side = s.out_features * r * s.fan_in
        branch = tokens * r * r * (s.fan_in + s.out_features) + r * r * (s.fan_in + s.out_features)
        return Costs(branch, 2 * per_side + s.out_features * s.fan_in, passes=3 if not s.is_conv else 4)

    # ------------------------------------------------------------------ state
    def _factor_names(self) -> tuple[str, ...]:
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        return (*names, "hada_t1", "hada_t2") if self.use_tucker else names

    def state_tensors(self) -> dict[str, Tensor]:
        out = {name: getattr(self, name).detach().clone() for name in self._factor_names()}
        out["hada_w2_a"] = self.scaled_up(self.hada_w2_a).detach().clone()
        out.update(self.common_state())
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        for name in self._factor_names():
            copy_checked(getattr(self, name), require(tensors, name), name)
        self.load_common_state(tensors)

    @classmethod
    def split_outputs(
        cls, tensors: Mapping[str, Tensor], sizes: Sequence[int], ranks: Sequence[int | None] | None = None
    ) -> list[dict[str, Tensor] | None]:
        """Rows of a Hadamard product are the products of the rows: each member keeps its rows of
        ``w1_a`` and ``w2_a``, and the same ``w1_b``, ``w2_b``, rank and α — exact."""
        if "hada_t1" in tensors:
            raise LayoutRefused("LoHa Tucker (hada_t1/hada_t2) belongs to convolutions; fused layers are Linears")
        return list(slice_rows(tensors, sizes, ("hada_w1_a", "hada_w2_a")))

    @classmethod
    def options_from_state(cls, tensors: dict[str, Tensor], layer: nn.Module) -> dict[str, Any]:
        """Rank, Tucker and the DoRA axis from a module's tensors."""
        spec = layer_spec(layer, cls.algo)
        tucker = "hada_t1" in tensors
        # the rank is the leading axis of w1_b in both layouts: (r, in·∏k) and Tucker (r, in)
        rank = require(tensors, "hada_w1_b").shape[0]
        options: dict[str, Any] = {"rank": rank, "use_tucker": tucker}
        options.update(dora_options(tensors, spec.out_features))
        return options

    def extra_state_options(self) -> dict[str, Any]:
        return {**super().extra_state_options(), "use_tucker": self.use_tucker}

    # ------------------------------------------------------------------ files
    @classmethod
    def check_file_shapes(cls, tensors: Mapping[str, Tensor]) -> tuple[int | None, int | None]:
        """w?_a (out, r), w?_b (r, in·∏k); Tucker: t? (r, r, *k), w?_a (r, out), w?_b (r, in)."""
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        w1a, w1b, w2a, w2b = need(tensors, *names)
        if ("hada_t1" in tensors) != ("hada_t2" in tensors):
            raise FileStateError("a Tucker LoHa needs both 'hada_t1' and 'hada_t2'")
        for key, t in zip(names, (w1a, w1b, w2a, w2b), strict=True):
            dims(t, key, 2)
        rank = w1b.shape[0]
        if "hada_t1" in tensors:
            for j, (wa, wb) in ((1, (w1a, w1b)), (2, (w2a, w2b))):
                t = tensors[f"hada_t{j}"]
                dims(t, f"hada_t{j}", 3, 5)
                if shape(t)[:2] != (rank, rank) or wa.shape[0] != rank or wb.shape[0] != rank:
                    raise FileStateError(
                        f"Tucker LoHa branch {j}: hada_t{j} {shape(t)}, hada_w{j}_a {shape(wa)}, hada_w{j}_b "
                        f"{shape(wb)} do not share the rank {rank}"
                    )
            same(w1a.shape[1], w2a.shape[1], "hada_w1_a and hada_w2_a disagree on the output channels")
            same(w1b.shape[1], w2b.shape[1], "hada_w1_b and hada_w2_b disagree on the input channels")
            return w1a.shape[1], w1b.shape[1]
        same(w1a.shape[1], rank, f"hada_w1_a {shape(w1a)} and hada_w1_b {shape(w1b)} disagree on the rank")
        same(w2a.shape[1], w2b.shape[0], f"hada_w2_a {shape(w2a)} and hada_w2_b {shape(w2b)} disagree on the rank")
        same(w2b.shape[0], rank, "the two Hadamard branches have different ranks")
        same(w1a.shape[0], w2a.shape[0], "hada_w1_a and hada_w2_a disagree on the output channels")
        same(w1b.shape[1], w2b.shape[1], "hada_w1_b and hada_w2_b disagree on the input width")
        return w1a.shape[0], None

    @classmethod
    def describe_rank(cls, tensors: Mapping[str, Tensor]) -> str:
        return str(tensors["hada_w1_b"].shape[0])

    @classmethod
    def peft_export(cls, modules, paths, root, records, shapes):
        """The same keys under PEFT's names; Tucker (Conv2d only) as ``use_effective_conv2d``; no DoRA."""
        out, ranks, alphas = {}, {}, {}
        tucker = {n for n, mod in modules.items() if "hada_t1" in mod}
        for name, mod in modules.items():
            if "dora_scale" in mod:
                raise HiganbanaError(f"module {name!r}: PEFT's LoHa has no DoRA (dora_scale)")
            path = paths[name]
            rank = mod["hada_w1_b"].shape[0]
            ranks[path] = rank
            alphas[path] = alpha_of(mod, rank)
            for key in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"):
                if key in mod:
                    t = mod[key]
                    if key in ("hada_t1", "hada_t2") and t.dim() != 4:
                        raise HiganbanaError(f"module {name!r}: PEFT's LoHa Tucker form is for Conv2d only")
                    out[f"{root}{path}.{key}"] = t
        return out, ranks, alphas, {"use_effective_conv2d": bool(tucker)}
