"""BOFT: butterfly orthogonal fine-tuning, M stages of permuted block-diagonal rotations.

Keys (docs/design.md §3): ``oft_blocks`` (M, n, b, b) with ``n·b = out``, ``n`` a power of two, ``b``
even and ``M ≤ log2(n) + 1``; ``alpha`` = the constraint c; optional ``rescale`` (out, 1..).
Each stage's ``R_i`` is the Cayley transform of its skew blocks, with the OFT constraint rule
applied to ``Q`` over all blocks of all stages together (``‖Q‖_F`` vs ``c·out``). The multiplier
acts as in OFT: ``R_i(m) = Cayley(m·Q_i)``.

Stages i = 0..M−1 act on the rows of ``flat(W)``: with ``h = 2^i·b/2`` the rows are viewed as
``(out/(2h), 2, h)``, the last two axes swapped and flattened, grouped into n blocks of b rows;
each block is multiplied **on the left by** ``R_i[block]`` and the permutation undone. Finally
``⊙ rescale``. All by reshapes and transposes: no permutation matrix is built.

``rank`` is the block size request: ``b = factorize.boft_block_size(out, rank)``, the largest
valid block size ≤ ``rank`` (an error names the sizes that work). ``boft_stages`` is M (default
and maximum ``log2(n) + 1``).

Bypass on activations: ``y' = W'x + b0 = b0 + rescale ⊙ S·(y − b0)`` with ``S`` the product of
the stages; the channel vector of each position is a column, so the stages act on it exactly as on
the rows of W — **R on the left, not Rᵀ** (in row-vector notation ``z ← z·R_iᵀ``). The adapter
branch is ``rescale ⊙ S·z − z`` (exactly 0 at init).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .base import require
from .cost import Costs
from .factorize import boft_block_size, is_power_of_two
from .files import FileStateError
from .layer import layer_spec
from .oft import OrthogonalAdapter
from .options import option, whole_number

#: multiply-adds that one separate product (a stage, or a composed block matrix) costs per row and
#: position beyond its arithmetic: its permutation copies and the batched matmul's passes
GROUP_PASS_COST = 64


def max_stages(num_blocks: int) -> int:
    """``log2(n) + 1``: the most butterfly stages ``n`` blocks allow."""
    return num_blocks.bit_length()


class BOFT(OrthogonalAdapter):
    """Butterfly orthogonal fine-tuning of Linear and ConvNd layers."""

    algo = "boft"
    title = "BOFT"
    block_dims = 4
    loaded_by = frozenset({"ComfyUI", "A1111", "LyCORIS"})
    peft_refusal = "PEFT's BOFT acts on the input side with its own butterfly parametrisation; ours rotates output rows"
    examples = (("boft", {"rank": 4}, 3e-3),)

    @classmethod
    def layout_for(cls, tool: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """For LyCORIS (which always rebuilds log2(n)+1 stages): the missing stages as zero blocks.
        A zero skew block is the identity rotation and adds nothing to ``‖Q‖``, so the result is the
        same at every strength."""
        blocks = tensors["oft_blocks"]
        stages, n = blocks.shape[0], blocks.shape[1]
        if tool != "LyCORIS" or stages >= max_stages(n):
            return None
        pad = blocks.new_zeros(max_stages(n) - stages, *blocks.shape[1:])
        return {**tensors, "oft_blocks": torch.cat([blocks, pad])}

    @dataclass(frozen=True)
    class Options(OrthogonalAdapter.Options):
        boft_stages: int | None = option(None, "butterfly stages M (default and maximum log2(n) + 1)")

    def choose_block_size(self, out: int, rank: int) -> int:
        b = boft_block_size(out, rank)
        n, most = out // b, max_stages(out // b)
        stages = (
            most
            if self.options.boft_stages in (None, 0)
            else whole_number("boft", "boft_stages", self.options.boft_stages)
        )
        if not 1 <= stages <= most:
            raise ConfigError(
                f"boft: option boft_stages={stages} must be between 1 and log2(n)+1 = {most} "
                f"(out={out}, block size b={b}, n={n} blocks)"
            )
        self.num_stages = stages
        return b

    def blocks_shape(self) -> tuple[int, ...]:
        return (self.num_stages, self.num_blocks, self.block_size, self.block_size)

    def stages(self, rows: Tensor, rotations: Tensor, which: range, inverse: bool = False) -> Tensor:
        """Butterfly stages ``which`` on ``rows`` (P, out, Q), one at a time; the inverse runs them
        back with ``R_iᵀ``."""
        p, out, q = rows.shape
        n, b = self.num_blocks, self.block_size
        order = reversed(which) if inverse else which
        pattern = "pkdq,kdc->pkcq" if inverse else "pkdq,kcd->pkcq"
        per_stage = rotations.unbind(0)  # one backward for all stages (indexing would add M zero tensors)
        for i in order:
            h = (b // 2) << i
            groups = out // (2 * h)
            x = rows.reshape(p, groups, 2, h, q).transpose(2, 3).reshape(p, n, b, q)
            x = torch.einsum(pattern, x, per_stage[i])
            rows = x.reshape(p, groups, h, 2, q).transpose(2, 3).reshape(p, out, q)
        return rows

    def rotate(self, rows: Tensor, rotations: Tensor, inverse: bool = False) -> Tensor:
        """All stages on ``rows`` (P, out, Q), stage by stage or as two composed block-diagonal
        matrices (:meth:`plan`), whichever costs less for ``P·Q`` positions; the same product."""
        split = self.plan(rows.shape[0] * rows.shape[2])
        if split is None:
            return self.stages(rows, rotations, range(self.num_stages), inverse)
        low, high = self.composed(rotations, split)
        if inverse:
            if high is not None:
                rows = self._apply_high(rows, high.mT, split)
            return self._apply_low(rows, low.mT)
        rows = self._apply_low(rows, low)
        return rows if high is None else self._apply_high(rows, high, split)

    # A butterfly's stages compose into two block-diagonal matrices. With u = b/2 and a row index
    # r, stage i mixes rows that differ only in r mod u and in bit i of r // u. Stages 0..k
    # therefore keep r // (b·2^k): their product ("low") is block-diagonal over contiguous blocks
    # of b·2^k rows. Stages k+1..M−1 keep (r // u) mod 2^(k+1): their product ("high") is
    # block-diagonal over the 2^(k+1) classes of that residue, out/2^(k+1) rows each (the rows
    # r = hi·u·2^(k+1) + class·u + j, ordered by (hi, j) within a class). Applying the two costs
    # b·2^k + out/2^(k+1) multiply-adds per row and position, in two passes, against b·M in M
    # passes stage by stage; building them runs the stages once on identity columns.

    def plan(self, positions: int) -> int | None:
        """The last stage ``k`` of the low product, or ``None`` to run the stages one by one: the
        cheapest for ``positions`` columns (multiply-adds, plus :data:`GROUP_PASS_COST` per row and
        position for each separate product, plus building the products). Decided once per count."""
        plans: dict[int, int | None] = self.__dict__.setdefault("_plans", {})
        if positions in plans:
            return plans[positions]
        out, b, stages = self.spec.out_features, self.block_size, self.num_stages
        best, best_cost = None, positions * out * stages * (b + GROUP_PASS_COST)
        for k in range(stages):
            low, high = self._sizes(k)
            groups = 2 if high else 1
            build = 3 * out * b * (low * (k + 1) + high * (stages - 1 - k))  # forward and backward
            cost = positions * out * (low + high + groups * GROUP_PASS_COST) + build
            if cost < best_cost:
                best, best_cost = k, cost
        plans[positions] = best
        return best

    def _sizes(self, k: int) -> tuple[int, int]:
        """The block sizes of the low and the high product of split ``k`` (high 0: no high product)."""
        high = self.spec.out_features >> (k + 1) if k < self.num_stages - 1 else 0
        return self.block_size << k, high

    def composed(self, rotations: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
        """The blocks of the low product (out/(b·2^k), b·2^k, b·2^k) and of the high one
        (2^(k+1), out/2^(k+1), out/2^(k+1)), or ``None`` when stages 0..k are all of them."""
        out, stages = self.spec.out_features, self.num_stages
        dt, dev = rotations.dtype, rotations.device
        size, span = self._sizes(k)  # span: rows per class of the high product
        eye = torch.eye(size, dtype=dt, device=dev).repeat(out // size, 1)  # column c: e_c in every block
        low = self.stages(eye.unsqueeze(0), rotations, range(k + 1))[0].reshape(out // size, size, size)
        if not span:
            return low, None
        u, classes = self.block_size // 2, 2 << k
        eye = torch.eye(span, dtype=dt, device=dev).reshape(span // u, 1, u, span).expand(-1, classes, -1, -1)
        high = self.stages(eye.reshape(1, out, span), rotations, range(k + 1, stages))[0]
        high = high.reshape(span // u, classes, u, span).transpose(0, 1).reshape(classes, span, span)
        return low, high

    def _apply_low(self, rows: Tensor, low: Tensor) -> Tensor:
        p, out, q = rows.shape
        blocks, size = low.shape[0], low.shape[1]
        x = torch.einsum("kcd,pkdq->pkcq", low.to(rows.dtype), rows.reshape(p, blocks, size, q))
        return x.reshape(p, out, q)

    def _apply_high(self, rows: Tensor, high: Tensor, k: int) -> Tensor:
        p, out, q = rows.shape
        u, classes = self.block_size // 2, 2 << k
        span = out // classes
        x = rows.reshape(p, span // u, classes, u, q).transpose(1, 2).reshape(p, classes, span, q)
        x = torch.einsum("kcd,pkdq->pkcq", high.to(rows.dtype), x)
        return x.reshape(p, classes, span // u, u, q).transpose(1, 2).reshape(p, out, q)

    def transform_macs(self, positions: int = 1) -> int:
        """Multiply-adds per column of the cheaper plan for ``positions`` columns."""
        k = self.plan(positions)
        if k is None:
            return self.num_stages * self.spec.out_features * self.block_size
        return self.spec.out_features * sum(self._sizes(k))

    def costs(self, tokens: int) -> Costs:
        """OFT's with the plan's multiply-adds; passes: centering and the add, plus each separate
        product (stage or composed block) permuting, rotating and un-permuting the activations
        (forward and backward), about 8 passes for Linear, where each position's channels are a
        short vector; convs move long contiguous rows and measure like 2 (benchmarks/layers.py)."""
        k = self.plan(tokens)
        products = self.num_stages if k is None else (2 if self._sizes(k)[1] else 1)
        plain = super().costs(tokens)
        bypass = tokens * self.transform_macs(tokens) + self.cayley_macs()
        delta = self.spec.fan_in * self.transform_macs(self.spec.fan_in) + self.cayley_macs()
        return replace(plain, bypass=bypass, delta=delta, passes=(2 if self.spec.is_conv else 8) * products + 4)

    @classmethod
    def options_from_state(cls, tensors: dict[str, Tensor], layer: nn.Module) -> dict[str, Any]:
        """``rank`` (the block size b), ``boft_stages``, ``constraint`` and ``rescaled``."""
        spec = layer_spec(layer, cls.algo)
        blocks = require(tensors, "oft_blocks")
        shape = tuple(blocks.shape)
        if blocks.dim() != 4 or shape[2] != shape[3]:
            raise FileStateError(f"boft: tensor 'oft_blocks' has shape {shape}, expected (M, n, b, b)")
        stages, n, b = shape[0], shape[1], shape[2]
        if n * b != spec.out_features or b % 2 or not is_power_of_two(n) or not 1 <= stages <= max_stages(n):
            raise FileStateError(
                f"boft: tensor 'oft_blocks' has shape {shape}: needs n·b = out = {spec.out_features}, "
                f"b even, n a power of two and 1 ≤ M ≤ log2(n)+1"
            )
        return {"rank": b, "boft_stages": stages, **cls.common_options(tensors)}

    def extra_state_options(self) -> dict[str, Any]:
        return {**super().extra_state_options(), "boft_stages": self.num_stages}
