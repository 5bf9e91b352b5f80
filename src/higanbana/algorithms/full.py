"""Full (native) fine-tuning: ``W' = W0 + m·diff`` (and ``b' = b0 + m·diff_b``).

Keys: ``diff`` (shape of W0) and ``diff_b`` (shape of b0, only when the layer has a bias).
Both differences start at 0.

By default the adapter trains a float32 copy ``W`` of the weight (and bias) itself, as kohya,
LyCORIS and diffusers' full fine-tuning do: the forward at multiplier 1 uses ``W`` as it is, so a
step costs what the frozen layer with a trainable weight costs; ``diff = W − W0`` is formed only for
files and merges, and weight decay pulls ``W`` towards 0. With ``train_weight = false`` it trains the
difference ``diff`` instead: the wrapped weight is never copied (and may be low-precision while
``diff`` is float32) and weight decay pulls the layer towards W0, at the price of one weight-sized
add ``W0 + diff`` per layer and step (docs/benchmarks.md). Over a quantized base the difference is
the default (the layer then runs in bypass, where a trained copy would cost ``W − W0`` every step).
Both hold the same memory (W0 plus one trained tensor of its shape). The merged form is always
cheaper (bypass would be two full-size ops), so ``auto`` runs merged; bypass
``op(x, W0, b0) + m·op(x, diff, diff_b)`` is used only where dropout on the branch or a quantized
base needs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import Adapter, copy_checked, present, require
from .cost import Costs
from .files import FileStateError, LayoutRefused, dims, need, shape, slice_rows
from .layer import layer_spec
from .options import AdapterOptions, option


class Full(Adapter):
    """Native fine-tuning of a Linear/ConvNd layer's weight and bias, as a difference to W0."""

    algo = "full"
    title = "Full"
    file_keys = frozenset({"diff", "diff_b"})
    marker_keys = ("diff",)
    peft_refusal = "PEFT has no full weight-difference adapter"
    loaded_by = frozenset({"ComfyUI", "A1111", "LyCORIS"})
    examples = (("full", {}, 3e-4),)

    @dataclass(frozen=True)
    class Options(AdapterOptions):
        train_bias: bool = option(True, "also train the bias difference diff_b (layers with a bias)")
        train_weight: bool | None = option(
            None,
            "train a float32 copy of the weight (and bias) itself, as kohya and LyCORIS do (weight decay pulls it "
            "towards 0); false: train diff = W − W0 (weight decay towards W0, one weight-sized add per step); "
            "default: true, false over a quantized base",
        )

    def __init__(self, layer: nn.Module, **options: Any) -> None:
        super().__init__(layer, **options)
        w0, b0 = self.base_weight, self.base_bias
        with_bias = b0 is not None and self.options.train_bias
        #: the trained differences (default), or the trained weight and bias themselves (train_weight)
        self.diff: nn.Parameter | None = None
        self.diff_b: nn.Parameter | None = None
        self.trained_weight: nn.Parameter | None = None
        self.trained_bias: nn.Parameter | None = None
        train_weight = self.options.train_weight
        if train_weight is None:
            train_weight = not self.quantized_base
        if train_weight:
            self.trained_weight = self.new_param(*w0.shape)
            self.trained_bias = self.new_param(*b0.shape) if with_bias and b0 is not None else None
        else:
            self.diff = self.new_param(*w0.shape)
            self.diff_b = self.new_param(*b0.shape) if with_bias and b0 is not None else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """diff = 0 and diff_b = 0 (W = W0, b = b0): the layer is unchanged at init."""
        if self.trained_weight is not None:
            self.trained_weight.copy_(self._anchor_weight())
            if self.trained_bias is not None:
                self.trained_bias.copy_(present(self._anchor_bias()))
            return
        nn.init.zeros_(present(self.diff))
        if self.diff_b is not None:
            nn.init.zeros_(self.diff_b)

    @property
    def train_bias(self) -> bool:
        return self.diff_b is not None or self.trained_bias is not None

    def _anchor_weight(self) -> Tensor:
        """W0, also while merged (then it is the backup that :meth:`merge_into` took)."""
        if self._backup is not None:
            return self._backup[0].to(self.device)
        return self.base_weight

    def _anchor_bias(self) -> Tensor | None:
        if self._backup is not None:
            b0 = self._backup[1]
            return None if b0 is None else b0.to(self.device)
        return self.base_bias

    def _needs_backup(self) -> bool:
        """A trained weight needs W0 kept while merged: ``diff = W − W0`` is read from it."""
        return self.trained_weight is not None or super()._needs_backup()

    def delta_weight(self, mask: Tensor | None = None) -> Tensor:
        if self.trained_weight is None:
            return present(self.diff)
        return self.trained_weight - self._anchor_weight().to(self.trained_weight.dtype)

    def delta_bias(self) -> Tensor | None:
        if self.trained_bias is None:
            return self.diff_b
        return self.trained_bias - present(self._anchor_bias()).to(self.trained_bias.dtype)

    def merged_weight(self, multiplier: float | None = None, mask: Tensor | None = None) -> Tensor:
        """``W0 + m·diff``; with a trained weight, ``W`` itself at m = 1 and ``lerp(W0, W, m)`` otherwise."""
        w = self.trained_weight
        if w is None:
            return super().merged_weight(multiplier, mask)
        m = self.multiplier if multiplier is None else multiplier
        w0 = self._anchor_weight()
        if m == 1.0:
            return w.to(w0.dtype)
        return torch.lerp(w0.to(w.dtype), w, m).to(w0.dtype)

    def merged_bias(self, multiplier: float | None = None) -> Tensor | None:
        b, b0 = self.trained_bias, self._anchor_bias()
        if b is None or b0 is None:
            return super().merged_bias(multiplier)
        m = self.multiplier if multiplier is None else multiplier
        return b.to(b0.dtype) if m == 1.0 else torch.lerp(b0.to(b.dtype), b, m).to(b0.dtype)

    def costs(self, tokens: int) -> Costs:
        return Costs(None, self.base_weight.numel())  # a second full-size op: merged is always cheaper

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, Tensor]:
        out = {"diff": self.delta_weight().detach().clone()}
        db = self.delta_bias()
        if db is not None:
            out["diff_b"] = db.detach().clone()
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        diff = require(tensors, "diff")
        if self.trained_weight is not None:
            w = self.trained_weight
            if tuple(diff.shape) != tuple(w.shape):
                raise FileStateError(f"tensor 'diff' has shape {tuple(diff.shape)}, expected {tuple(w.shape)}")
            w.copy_(self._anchor_weight().to(w.dtype) + diff.to(w.dtype))
        else:
            copy_checked(present(self.diff), diff, "diff")
        b = self.trained_bias
        if b is not None:
            diff_b = require(tensors, "diff_b")
            if tuple(diff_b.shape) != tuple(b.shape):
                raise FileStateError(f"tensor 'diff_b' has shape {tuple(diff_b.shape)}, expected {tuple(b.shape)}")
            b.copy_(present(self._anchor_bias()).to(b.dtype) + diff_b.to(b.dtype))
        elif self.diff_b is not None:
            copy_checked(self.diff_b, require(tensors, "diff_b"), "diff_b")
        elif "diff_b" in tensors:
            raise FileStateError(
                "tensor 'diff_b' given, but this adapter has no bias difference "
                f"(layer bias: {'none' if self.base_bias is None else 'not trained'})"
            )

    @classmethod
    def stack_outputs(cls, members: Sequence[Mapping[str, Tensor] | None], sizes: Sequence[int]) -> dict[str, Tensor]:
        """The members' differences one above the other; a member without adapter adds zero rows."""
        present_ = [m for m in members if m is not None]
        like = present_[0]["diff"]
        with_bias = any("diff_b" in m for m in present_)
        diffs, biases = [], []
        for member, size in zip(members, sizes, strict=True):
            if member is not None and member["diff"].shape[1:] != like.shape[1:]:
                raise LayoutRefused("the members' diff tensors differ in their input shape")
            diffs.append(member["diff"] if member is not None else like.new_zeros(size, *like.shape[1:]))
            if with_bias:
                b = None if member is None else member.get("diff_b")
                biases.append(b if b is not None else like.new_zeros(size))
        out = {"diff": torch.cat(diffs)}
        if with_bias:
            out["diff_b"] = torch.cat(biases)
        return out

    @classmethod
    def split_outputs(
        cls, tensors: Mapping[str, Tensor], sizes: Sequence[int], ranks: Sequence[int | None] | None = None
    ) -> list[dict[str, Tensor] | None]:
        """Each member's rows of ``diff`` and ``diff_b``."""
        return [
            None if ranks is not None and ranks[i] is None else m
            for i, m in enumerate(slice_rows(tensors, sizes, ("diff", "diff_b")))
        ]

    @classmethod
    def options_from_state(cls, tensors: dict[str, Tensor], layer: nn.Module) -> dict[str, Any]:
        """``train_bias`` from the presence of ``diff_b``; the ``diff`` shape is checked."""
        spec = layer_spec(layer, cls.algo)
        diff = require(tensors, "diff")
        expected = (spec.out_features, spec.in_features, *spec.kernel_size)
        if tuple(diff.shape) != expected:
            raise FileStateError(f"tensor 'diff' has shape {tuple(diff.shape)}, expected {expected}")
        has_bias = getattr(layer, "bias", None) is not None
        if "diff_b" in tensors and not has_bias:
            raise FileStateError(f"tensor 'diff_b' given, but the {type(layer).__name__} layer has no bias")
        return {"train_bias": "diff_b" in tensors} if has_bias else {}

    def extra_state_options(self) -> dict[str, Any]:
        return {"train_bias": self.train_bias}

    # ------------------------------------------------------------------ files
    @classmethod
    def check_file_shapes(cls, tensors: Mapping[str, Tensor]) -> tuple[int | None, int | None]:
        """diff (out, in, *k); diff_b (out,)."""
        (diff,) = need(tensors, "diff")
        dims(diff, "diff", 2, 5)
        if "diff_b" in tensors and shape(tensors["diff_b"]) != (diff.shape[0],):
            raise FileStateError(f"tensor 'diff_b' has shape {shape(tensors['diff_b'])}; expected ({diff.shape[0]},)")
        return diff.shape[0], diff.shape[1]
