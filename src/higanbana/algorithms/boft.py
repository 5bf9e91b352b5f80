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

    def rotate(self, rows: Tensor, rotations: Tensor, inverse: bool = False) -> Tensor:
        """The butterfly stages on ``rows`` (P, out, Q); the inverse runs them back with ``R_iᵀ``."""
        p, out, q = rows.shape
        n, b = self.num_blocks, self.block_size
        order = range(self.num_stages - 1, -1, -1) if inverse else range(self.num_stages)
        pattern = "pkdq,kdc->pkcq" if inverse else "pkdq,kcd->pkcq"
        for i in order:
            h = (b // 2) << i
            groups = out // (2 * h)
            x = rows.reshape(p, groups, 2, h, q).transpose(2, 3).reshape(p, n, b, q)
            x = torch.einsum(pattern, x, rotations[i])
            rows = x.reshape(p, groups, h, 2, q).transpose(2, 3).reshape(p, out, q)
        return rows

    def transform_macs(self) -> int:
        return self.num_stages * self.spec.out_features * self.block_size

    def costs(self, tokens: int) -> Costs:
        """OFT's, with the passes of the stages: each permutes, rotates and un-permutes the
        activations (forward and backward), about 8 passes per stage for Linear, where each
        position's channels are a short vector; convs move long contiguous rows and measure like 2
        (benchmarks/layers.py)."""
        return replace(super().costs(tokens), passes=(2 if self.spec.is_conv else 8) * self.num_stages + 4)

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
