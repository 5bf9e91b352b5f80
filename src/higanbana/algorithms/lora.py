"""LoRA / LoCon: ``ΔW = flat(up)·flat(down)``; Tucker (``lora_mid``) for convs with k > 1.

Keys: ``lora_down.weight`` (r, in, *k) [Tucker: (r, in, 1..)], ``lora_mid.weight`` (r, r, *k),
``lora_up.weight`` (out, r, 1..), ``alpha``, optional ``dora_scale``.
Bypass: ``up(down(x))`` (conv: ``down`` carries the layer's kernel, stride and padding), never ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import HiganbanaError
from .base import copy_checked, require
from .cost import Costs
from .dora import dora_options
from .factored import FactoredAdapter, linear_lowrank_bypass
from .files import (
    REJECT,
    FileStateError,
    Kernel,
    LayoutRefused,
    Verdicts,
    alpha_of,
    dims,
    dora_axis,
    need,
    ones_from,
    row_blocks,
    same,
    shape,
)
from .layer import LayerSpec, layer_spec
from .options import FactoredOptions, option


class LoRA(FactoredAdapter):
    """Low-rank adaptation of Linear and ConvNd layers (LoCon for convs)."""

    algo = "lora"
    title = "LoRA"
    up_factors = ("lora_up",)
    supports_dora = True
    file_keys = frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale"})
    marker_keys = ("lora_up.weight",)
    key_flags = (("weight_decompose", "dora_scale"), ("use_tucker", "lora_mid.weight"))
    peft_type = "LORA"
    diffusers_export = True
    loaded_by = frozenset({"ComfyUI", "A1111", "diffusers", "LyCORIS"})
    examples = (
        ("lora", {"rank": 4}, 3e-3),
        ("lora-tucker", {"rank": 4, "use_tucker": True}, 3e-3),
        ("dora", {"rank": 4, "weight_decompose": True}, 3e-3),
    )

    @dataclass(frozen=True)
    class Options(FactoredOptions):
        use_tucker: bool = option(False, "Tucker form for convs with a kernel > 1 (lora_mid)")

    def __init__(self, layer: nn.Module, **options: Any) -> None:
        super().__init__(layer, **options)
        spec = self.spec
        r = self.rank
        self.use_tucker = bool(self.options.use_tucker) and spec.is_conv and spec.kernel_numel > 1
        self.lora_mid: nn.Parameter | None
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

    def dora_factors(self, mask: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """``(up, down)`` flattened (not with a Tucker core, whose ΔW is built)."""
        if self.lora_mid is not None:
            return None
        return self._up(mask), self.lora_down.flatten(1)

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
        if not self.fused_linear_bypass(x):
            return super().bypass_forward(x, multiplier, mask)
        up = self._up_in_shape(mask, multiplier * self.scale, x.dtype)
        return linear_lowrank_bypass(self, x, self.lora_down, up, 1.0)

    def branch_costs(self, tokens: int) -> Costs:
        """Down, (Tucker core,) up per position, against ``up·down`` (and the core) for ΔW."""
        s, r = self.spec, self.rank
        if self.lora_mid is None:
            branch = tokens * r * (s.fan_in + s.out_features)
            extra = 0
        else:
            branch = tokens * r * (s.in_features + r * s.kernel_numel + s.out_features)
            extra = r * r * s.kernel_numel * s.in_features
        return Costs(branch, s.out_features * r * s.fan_in + extra, passes=3 if not s.is_conv else 4)

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

    # ------------------------------------------------------------------ files
    @classmethod
    def check_file_shapes(cls, tensors: Mapping[str, Tensor]) -> tuple[int | None, int | None]:
        """down (r, in, *k), up (out, r, 1..); Tucker: down (r, in, 1..), mid (r, r, *k)."""
        down, up = need(tensors, "lora_down.weight", "lora_up.weight")
        dims(down, "lora_down.weight", 2, 5)
        dims(up, "lora_up.weight", down.dim())
        rank = down.shape[0]
        same(up.shape[1], rank, f"lora_up.weight {shape(up)} and lora_down.weight {shape(down)} disagree on the rank")
        ones_from(up, "lora_up.weight", 2)
        if "lora_mid.weight" in tensors:
            mid = tensors["lora_mid.weight"]
            dims(mid, "lora_mid.weight", down.dim())
            if shape(mid)[:2] != (rank, rank):
                raise FileStateError(
                    f"tensor 'lora_mid.weight' has shape {shape(mid)}; expected ({rank}, {rank}, *kernel)"
                )
            ones_from(down, "lora_down.weight", 2)
        return up.shape[0], down.shape[1]

    @classmethod
    def describe_rank(cls, tensors: Mapping[str, Tensor]) -> str:
        return str(tensors["lora_down.weight"].shape[0])

    @classmethod
    def own_tool_verdicts(
        cls, tensors: Mapping[str, Tensor], options: Mapping[str, Any] | None, kernel: Kernel = None
    ) -> Verdicts:
        if "lora_mid.weight" in tensors:
            return {
                "diffusers": (
                    REJECT,
                    "load_lora_weights rejects non-LoRA keys "
                    "(LoCon with a Tucker mid; convert --for diffusers folds it)",
                )
            }
        return {}

    @classmethod
    def layout_for(cls, tool: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """For diffusers (which rejects ``lora_mid``): LoCon Tucker ``up·mid·down`` as a plain conv LoRA,
        the k×k core folded into ``lora_down`` (r, in, k, k); same rank and α, the same weights."""
        if tool != "diffusers" or "lora_mid.weight" not in tensors:
            return None
        mid, down = tensors["lora_mid.weight"], tensors["lora_down.weight"]
        folded = torch.einsum("abkl,bi->aikl", mid.double(), down.double().flatten(1)).to(down.dtype)
        out = {k: v for k, v in tensors.items() if k != "lora_mid.weight"}
        out["lora_down.weight"] = folded
        return out

    @classmethod
    def stack_outputs(cls, members: Sequence[Mapping[str, Tensor] | None], sizes: Sequence[int]) -> dict[str, Tensor]:
        """Concatenated ranks: ``down = [A_1; A_2; …]``, ``up`` block-diagonal with ``B_i`` in the rows of
        member ``i`` (zero rows for a member without adapter). Equal scales ``α_i/r_i`` keep the tensors
        as they are (``α = s·Σr``); unequal ones are folded into the ``up`` blocks (``α = Σr``)."""
        present = [m for m in members if m is not None]
        if any("lora_mid.weight" in m for m in present):
            raise LayoutRefused("LoCon Tucker (lora_mid) belongs to convolutions; fused layers are Linears")
        if any("dora_scale" in m for m in present):
            raise LayoutRefused(
                "DoRA normalises by the adapted weight's norm, which for a member without adapter needs the "
                "base weight; save DoRA with split names"
            )
        if any(m["lora_down.weight"].dim() != 2 for m in present):
            raise LayoutRefused("only Linear LoRA modules stack into a fused Linear")
        ranks = [m["lora_down.weight"].shape[0] for m in present]
        scales = [alpha_of(m, r) / r for m, r in zip(present, ranks, strict=True)]
        total = sum(ranks)
        same_scale = all(sc == scales[0] for sc in scales)
        dtype = present[0]["lora_up.weight"].dtype
        up = torch.zeros(sum(sizes), total, dtype=dtype)
        col, k = 0, 0
        for member, (start, size) in zip(members, row_blocks(sizes), strict=True):
            if member is None:
                continue
            block = member["lora_up.weight"]
            if block.shape[0] != size:
                raise LayoutRefused(f"a member's lora_up.weight has {block.shape[0]} rows; its layer has {size}")
            if not same_scale:
                block = (block.double() * scales[k]).to(dtype)
            up[start : start + size, col : col + ranks[k]] = block
            col += ranks[k]
            k += 1
        alpha = scales[0] * total if same_scale else float(total)
        return {
            "lora_down.weight": torch.cat([m["lora_down.weight"] for m in present]),
            "lora_up.weight": up,
            "alpha": torch.tensor(alpha, dtype=torch.float32),
        }

    @classmethod
    def split_outputs(
        cls, tensors: Mapping[str, Tensor], sizes: Sequence[int], ranks: Sequence[int | None] | None = None
    ) -> list[dict[str, Tensor] | None]:
        """Each member keeps its rows of ``up`` and the rank columns they use: the recorded ``ranks`` in
        order (our stacked files), else the columns each member's rows use when no two members share one
        (a block-diagonal ``up``; a member whose rows are all zero gets no adapter), else all of them (a
        LoRA trained on the fused layer: every member gets the whole ``down``, rank ``r``). ``α`` follows
        the rank so that ``α/r`` stays the same."""
        if "lora_mid.weight" in tensors:
            raise LayoutRefused("LoCon Tucker (lora_mid) belongs to convolutions; fused layers are Linears")
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        if up.dim() != 2 or up.shape[0] != sum(sizes):
            raise LayoutRefused(f"lora_up.weight {shape(up)} does not have the fused layer's {sum(sizes)} rows")
        dora = tensors.get("dora_scale")
        if dora is not None and not (dora.dim() == 2 and dora.shape == (up.shape[0], 1)):
            raise LayoutRefused(f"DoRA on the input axis (dora_scale {shape(dora)}) does not separate by output rows")
        total = down.shape[0]
        scale = alpha_of(tensors, total) / total
        blocks = row_blocks(sizes)
        columns = _member_columns(up, blocks, total, ranks)
        out: list[dict[str, Tensor] | None] = []
        for (start, size), cols in zip(blocks, columns, strict=True):
            if cols is None:
                out.append(None)
                continue
            member = {
                "lora_down.weight": down[cols].clone(),
                "lora_up.weight": up[start : start + size, cols].clone(),
                "alpha": torch.tensor(scale * len(cols), dtype=torch.float32),
            }
            if dora is not None:
                member["dora_scale"] = dora[start : start + size].clone()
            out.append(member)
        return out

    @classmethod
    def peft_export(cls, modules, paths, root, records, shapes):
        """``lora_A``/``lora_B`` (+ ``lora_magnitude_vector`` for output-axis DoRA: ``(out,)`` for Linear,
        ``(1, out, 1..)`` for convs, as PEFT saves it); ``use_dora`` is one switch for the whole config."""
        dora = {n for n, mod in modules.items() if "dora_scale" in mod}
        if dora and dora != set(modules):
            raise HiganbanaError(
                f"PEFT's use_dora is one switch per config, but only some modules have DoRA (e.g. {sorted(dora)[0]!r})"
            )
        out, ranks, alphas = {}, {}, {}
        for name, mod in modules.items():
            if "lora_mid.weight" in mod:
                raise HiganbanaError(f"module {name!r}: LoCon Tucker (lora_mid) has no PEFT equivalent")
            down, up = mod["lora_down.weight"], mod["lora_up.weight"]
            path = paths[name]
            ranks[path] = down.shape[0]
            alphas[path] = alpha_of(mod, down.shape[0])
            out[f"{root}{path}.lora_A.weight"] = down
            out[f"{root}{path}.lora_B.weight"] = up
            if "dora_scale" in mod:
                if dora_axis(mod, None) != "output":
                    raise HiganbanaError(
                        f"module {name!r}: DoRA on the input axis (dora_scale {tuple(mod['dora_scale'].shape)}) "
                        "has no PEFT equivalent; PEFT normalises per output row"
                    )
                mag = mod["dora_scale"].reshape(-1)
                out[f"{root}{path}.lora_magnitude_vector"] = mag if up.dim() == 2 else mag.reshape(1, -1, *up.shape[2:])
        return out, ranks, alphas, {"use_dora": bool(dora)}


def _member_columns(
    up: Tensor, blocks: list[tuple[int, int]], total: int, ranks: Sequence[int | None] | None
) -> list[list[int] | None]:
    """The rank columns of ``up`` each block of rows uses (see :meth:`LoRA.split_outputs`)."""
    if ranks is not None:
        if len(ranks) != len(blocks) or sum(r or 0 for r in ranks) != total:
            raise LayoutRefused(f"the recorded ranks {list(ranks)} do not add up to the fused rank {total}")
        columns: list[list[int] | None] = []
        col = 0
        for (start, size), r in zip(blocks, ranks, strict=True):
            if r is None:
                if up[start : start + size].any():
                    raise LayoutRefused("rows of a member recorded without adapter are not zero")
                columns.append(None)
                continue
            cols = list(range(col, col + r))
            outside = torch.ones(total, dtype=torch.bool)
            outside[cols] = False
            if up[start : start + size, outside].any():
                raise LayoutRefused("lora_up.weight is not block-diagonal in the recorded ranks")
            columns.append(cols)
            col += r
        return columns
    used = [up[start : start + size].ne(0).any(dim=0) for start, size in blocks]
    if any(u.any() for u in used) and not torch.stack(used).sum(dim=0).gt(1).any():
        return [u.nonzero().flatten().tolist() if u.any() else None for u in used]
    return [list(range(total)) for _ in blocks]
