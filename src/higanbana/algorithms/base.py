"""The Adapter base: wraps one existing layer (without copying its weight) with one algorithm.

Every algorithm is a subclass that owns its parameters and implements a small interface:

- ``delta_weight(mask)``: ΔW before the scale ``s`` (additive algorithms), in the parameter dtype;
- ``branch(x, mask)``: ``op(x, ΔW)`` computed without materialising ΔW, where the algorithm allows;
- ``merged_weight(m)`` / ``merged_bias(m)``: the weight and bias the layer has at multiplier ``m``;
- ``unmerged_weight(W, m)``: the inverse of ``merged_weight`` (exact un-merge without a backup);
- ``state_tensors()`` / ``load_state_tensors()``: the tensors under docs/design.md §4 key suffixes.

The forward has two modes that agree to rounding: *merged* (one ``op(x, W', b')``) and *bypass*
(``op(x, W0, b0)`` plus a cheap branch). ``auto`` picks the cheaper by the cost model of
:mod:`.cost`, from the numbers each algorithm states in ``costs(tokens)``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, HiganbanaError, UnsupportedLayerError, nearest
from .cost import Costs, bypass_is_cheaper, with_dora
from .files import DEVIATE, REJECT, SKIP, TOOLS, FileStateError, Verdicts, dora_axis, merge_verdicts

FORWARD_MODES = ("auto", "merged", "bypass")

_CONV_OPS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class LayerSpec:
    """The shape and op of a wrapped Linear or ConvNd layer."""

    kind: str  # "linear" or "conv"
    out_features: int
    in_features: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: Any = ()
    dilation: tuple[int, ...] = ()

    @property
    def is_conv(self) -> bool:
        return self.kind == "conv"

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def fan_in(self) -> int:
        """``in·∏k``: the width of ``flat(W)``."""
        return self.in_features * self.kernel_numel

    @property
    def channel_dim(self) -> int:
        """The axis of channels in activations: last for Linear, 1 for ConvNd."""
        return 1 if self.is_conv else -1

    @property
    def ones_kernel(self) -> tuple[int, ...]:
        """Trailing singleton kernel dims: ``(1, 1)`` for Conv2d, ``()`` for Linear."""
        return (1,) * len(self.kernel_size)

    def op(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The layer's own operation with another weight (same stride/padding/dilation)."""
        if not self.is_conv:
            return F.linear(x, weight, bias)
        conv = _CONV_OPS[len(self.kernel_size)]
        return conv(x, weight, bias, self.stride, self.padding, self.dilation)

    def pointwise(self, x: Tensor, weight: Tensor) -> Tensor:
        """A 1×1 (pointwise) projection; ``weight`` is ``(c_out, c_in)``."""
        if not self.is_conv:
            return F.linear(x, weight)
        conv = _CONV_OPS[len(self.kernel_size)]
        return conv(x, weight.reshape(*weight.shape, *self.ones_kernel))

    def pointwise_full(self, x: Tensor, weight: Tensor) -> Tensor:
        """A 1×1 projection with a weight already in layer shape ``(c_out, c_in, 1..)``."""
        if not self.is_conv:
            return F.linear(x, weight)
        return _CONV_OPS[len(self.kernel_size)](x, weight)

    def channel_shape(self, channels: int) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel vector over activations."""
        return (channels, *self.ones_kernel) if self.is_conv else (channels,)


def layer_spec(layer: nn.Module, algo: str = "") -> LayerSpec:
    """Describe a Linear/ConvNd layer, or raise a clear error for anything else."""
    if isinstance(layer, nn.Linear):
        return LayerSpec("linear", layer.out_features, layer.in_features)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if layer.groups != 1:
            raise UnsupportedLayerError(
                f"{algo or 'adapter'}: grouped/depthwise convolutions are not supported "
                f"({type(layer).__name__} with groups={layer.groups})"
            )
        if layer.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"{algo or 'adapter'}: padding_mode={layer.padding_mode!r} is not supported (only 'zeros')"
            )
        if getattr(layer, "transposed", False):
            raise UnsupportedLayerError(f"{algo or 'adapter'}: transposed convolutions are not supported")
        return LayerSpec(
            "conv",
            layer.out_channels,
            layer.in_channels,
            tuple(layer.kernel_size),
            tuple(layer.stride),
            layer.padding,
            tuple(layer.dilation),
        )
    raise UnsupportedLayerError(
        f"{algo or 'adapter'}: cannot wrap {type(layer).__name__}; "
        "supported layers are Linear, Conv1d, Conv2d and Conv3d"
    )


def whole_number(algo: str, name: str, value: Any) -> int:
    """``value`` as an int when it is a whole number (``8`` or ``8.0``), else a ConfigError naming the
    option: ``int(2.5)`` would silently train rank 2."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise ConfigError(f"{algo}: option {name}={value!r} must be a whole number")
    return int(value)  # type: ignore[call-overload]  # numbers.Real is not typed SupportsInt; int() is what runs


def finite_number(algo: str, name: str, value: Any) -> float:
    """``value`` as a float when it is a finite number, else a ConfigError naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{algo}: option {name}={value!r} must be a finite number")
    return float(value)


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"option {name}={value} must be between 0 and 1")
    return value


def option(default: Any, help: str) -> Any:
    """A declared option: its default and the one line ``higanbana algorithms`` shows."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class AdapterOptions:
    """The options every algorithm takes. Each algorithm declares its own ``Options`` subclass: the
    one schema that construction, validation of file records, kohya ``network_args`` parsing and
    ``higanbana algorithms`` read (names, types, defaults, help)."""

    multiplier: float = option(1.0, "strength m (0: the base layer)")
    dropout: float = option(0.0, "dropout on the adapter branch's output, in training")
    module_dropout: float = option(0.0, "probability of skipping the adapter for a whole step, in training")
    forward_mode: str = option("auto", "auto, merged (one op with W0 + m·s·ΔW) or bypass (op(x, W0) + branch)")
    dtype: torch.dtype | None = option(torch.float32, "dtype of the adapter's parameters")


@dataclass(frozen=True)
class FactoredOptions(AdapterOptions):
    """The options of the algorithms whose ΔW is a product of factors (LoRA, LoHa, LoKr, GLoRA)."""

    rank: int = option(4, "the factors' inner dimension r")
    alpha: float | None = option(None, "scale numerator: s = alpha/r (missing or 0: alpha = r)")
    rs_lora: bool = option(False, "rank-stabilised scale s = alpha/√r")
    use_scalar: bool = option(False, "a learned scalar (init 0) allows a non-zero init of the up factor")
    rank_dropout: float = option(0.0, "zero random rank channels, in training")
    rank_dropout_scale: bool = option(False, "rescale the kept rank channels by 1/(1 - rank_dropout)")
    weight_decompose: bool = option(False, "DoRA: learn the magnitude of W0 + s·ΔW separately")
    wd_on_output: bool = option(True, "DoRA magnitude per output row (false: per input column, legacy)")


def option_fields(options_cls: type) -> dict[str, dataclasses.Field]:
    """``{name: field}`` of an algorithm's ``Options`` dataclass."""
    return {f.name: f for f in dataclasses.fields(options_cls)}


class Adapter(nn.Module):
    """One algorithm wrapped around one layer. Subclasses set ``algo`` and the hooks below.

    The wrapped layer is referenced, not registered: the adapter's ``state_dict`` holds only
    adapter parameters and the model keeps its own keys. ``forward(x)`` computes the adapted
    layer; :meth:`attach` makes the layer itself call it.
    """

    algo: ClassVar[str] = ""
    #: the options the algorithm takes (a frozen dataclass; see :class:`AdapterOptions`)
    Options: ClassVar[type] = AdapterOptions
    #: the name tools and papers use (``LoRA``, ``IA3``): in messages
    title: ClassVar[str] = ""
    #: the factors initialised to zero (LoRA's "up"): LoRA+ gives them a larger learning rate
    up_factors: ClassVar[tuple[str, ...]] = ()

    # ----------------------------------------------------------------- what files hold (see files.py)
    #: every key a module of this algorithm may hold in a file
    file_keys: ClassVar[frozenset[str]] = frozenset()
    #: the keys whose presence identifies the algorithm (detection of foreign files)
    marker_keys: ClassVar[tuple[str, ...]] = ()
    #: ``(option, key)``: a recorded option that is true exactly when the module holds the key
    key_flags: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: PEFT's ``peft_type`` when the mapping is exact; otherwise why PEFT cannot hold the algorithm
    peft_type: ClassVar[str | None] = None
    peft_refusal: ClassVar[str] = "PEFT has no equivalent adapter"
    #: whether diffusers' ``pytorch_lora_weights`` layout can carry the PEFT export
    diffusers_export: ClassVar[bool] = False
    #: the tools that load this algorithm's modules at all (the rest skip them, or reject the file)
    loaded_by: ClassVar[frozenset[str]] = frozenset()
    #: a caveat every tool verdict of a file with this algorithm carries
    tool_note: ClassVar[str] = ""
    #: ``(label, options, learning rate)``: the setups ``higanbana selfcheck`` trains
    examples: ClassVar[tuple[tuple[str, dict[str, Any], float], ...]] = ()

    def __init__(self, layer: nn.Module, **options: Any) -> None:
        super().__init__()
        self.options = self.read_options(options)
        o = self.options
        self.spec = self._make_spec(layer)
        self._layer = [layer]  # a list, so nn.Module does not register (or save) the base layer
        self._original_forward: Callable[..., Any] | None = None
        self._stack: list[Adapter | None] = [None, None]  # [inner, outer] on the same layer (not registered)
        self.multiplier = finite_number(self.algo, "multiplier", o.multiplier)
        self.dropout = _check_fraction("dropout", o.dropout)
        self.module_dropout = _check_fraction("module_dropout", o.module_dropout)
        if o.forward_mode not in FORWARD_MODES:
            raise ConfigError(f"option forward_mode={o.forward_mode!r} must be one of {FORWARD_MODES}")
        self.forward_mode = o.forward_mode
        self.param_dtype = o.dtype or torch.float32
        self._merged_multiplier: float | None = None
        self._backup: tuple[Tensor, Tensor | None] | None = None

    @classmethod
    def read_options(cls, options: Mapping[str, Any]) -> Any:
        """``options`` as this algorithm's ``Options``; an unknown name is an error naming the nearest."""
        names = option_fields(cls.Options)
        for name in options:
            if name not in names:
                raise ConfigError(f"{cls.algo}: unknown option {name!r}{nearest(name, names)}")
        return cls.Options(**options)

    # ----------------------------------------------------------------- the wrapped layer
    def _make_spec(self, layer: nn.Module) -> LayerSpec:
        return layer_spec(layer, self.algo)

    @property
    def layer(self) -> nn.Module:
        return self._layer[0]

    @property
    def layer_weight(self) -> Tensor:
        """The wrapped layer's own weight parameter (typed: ``nn.Module`` attributes are not)."""
        return cast(Tensor, self.layer.weight)

    @property
    def layer_bias(self) -> Tensor | None:
        """The wrapped layer's own bias parameter, if it has one."""
        return cast("Tensor | None", self.layer.bias)

    @property
    def inner(self) -> Adapter | None:
        """The adapter attached before this one on the same layer (stacked networks), if any."""
        return self._stack[0]

    @property
    def base_weight(self) -> Tensor:
        """``W0`` as this adapter sees it: the layer's weight, or the inner adapter's merged weight
        when networks are stacked (so stacking composes like sequential patches in ComfyUI)."""
        inner = self.inner
        if inner is not None and not inner.merged and inner.multiplier != 0.0:
            return inner.merged_weight(inner.multiplier)
        return self.layer_weight

    @property
    def base_bias(self) -> Tensor | None:
        inner = self.inner
        if inner is not None and not inner.merged and inner.multiplier != 0.0:
            return inner.merged_bias(inner.multiplier)
        return self.layer_bias

    @property
    def device(self) -> torch.device:
        return self.layer_weight.device

    def base_forward(self, x: Tensor) -> Tensor:
        """The wrapped layer's output with its current weight."""
        return self.spec.op(x, self.base_weight, self.base_bias)

    def new_param(self, *shape: int) -> nn.Parameter:
        """An uninitialised trainable tensor in the adapter dtype on the layer's device."""
        return nn.Parameter(torch.empty(shape, dtype=self.param_dtype, device=self.device))

    # ----------------------------------------------------------------- algorithm hooks
    @property
    def scale(self) -> float:
        """``s``: the factor applied to ΔW (1 unless the algorithm has α/r)."""
        return 1.0

    def delta_weight(self, mask: Tensor | None = None) -> Tensor:
        """ΔW before the scale ``s``, shape of the base weight, in the parameter dtype."""
        raise NotImplementedError(f"{self.algo} has no additive ΔW")

    def delta_bias(self) -> Tensor | None:
        """Δb before the scale (Full, Norm); ``None`` when the bias is unchanged."""
        return None

    def branch(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``op(x, ΔW, Δb)``; the default materialises ΔW (Δb: Full and Norm, else none)."""
        db = self.delta_bias()
        return self.spec.op(x, self.delta_weight(mask).to(x.dtype), None if db is None else db.to(x.dtype))

    def merged_weight(self, multiplier: float | None = None, mask: Tensor | None = None) -> Tensor:
        """``W0 + m·s·ΔW`` in the base dtype (overridden by multiplicative algorithms)."""
        m = self.multiplier if multiplier is None else multiplier
        w0 = self.base_weight
        delta = self.delta_weight(mask)
        return torch.add(w0, delta.to(w0.dtype), alpha=m * self.scale)

    def merged_bias(self, multiplier: float | None = None) -> Tensor | None:
        """The bias at multiplier ``m``; unchanged unless the algorithm trains it."""
        m = self.multiplier if multiplier is None else multiplier
        b0, db = self.base_bias, self.delta_bias()
        if db is None or b0 is None:
            return b0
        return torch.add(b0, db.to(b0.dtype), alpha=m * self.scale)

    def unmerged_weight(self, merged: Tensor, multiplier: float) -> Tensor:
        """Recover ``W0`` from ``merged_weight(m)`` (the inverse used by :meth:`unmerge`)."""
        delta = self.delta_weight()
        return torch.add(merged, delta.to(merged.dtype), alpha=-multiplier * self.scale)

    def unmerged_bias(self, merged: Tensor | None, multiplier: float) -> Tensor | None:
        db = self.delta_bias()
        if merged is None or db is None:
            return merged
        return torch.add(merged, db.to(merged.dtype), alpha=-multiplier * self.scale)

    def scaled_branch(self, x: Tensor, mask: Tensor | None, factor: float) -> Tensor:
        """``factor·branch(x)``; algorithms fold ``factor`` into a small tensor where they can."""
        delta = self.branch(x, mask).to(x.dtype)
        return delta if factor == 1.0 else delta * factor

    def bypass_forward(self, x: Tensor, multiplier: float, mask: Tensor | None = None) -> Tensor:
        """``op(x, W0, b0) + m·s·branch(x)``; multiplicative algorithms override it."""
        return self.base_forward(x) + self._drop(self.scaled_branch(x, mask, multiplier * self.scale))

    def costs(self, tokens: int) -> Costs:
        """What this layer costs per forward mode for ``tokens`` positions (:mod:`.cost` decides
        with it); the default has no cheap branch, so ``auto`` runs merged."""
        return Costs(None, self.base_weight.numel())

    def rank_mask(self) -> Tensor | None:
        """A random rank mask in training (factored algorithms); ``None`` otherwise."""
        return None

    @classmethod
    def options_from_state(cls, tensors: dict[str, Tensor], layer: nn.Module) -> dict[str, Any]:
        """The options that rebuild this algorithm's module on ``layer`` from a file's tensors alone
        (foreign files carry no records); every algorithm says how."""
        raise NotImplementedError(f"{cls.algo} does not say how to read its options from tensors")

    @classmethod
    def full_rank(cls, spec: LayerSpec, options: dict[str, Any]) -> int | None:
        """The rank beyond which this algorithm's ΔW on a layer of ``spec`` gains nothing (``None``:
        ``rank`` does not size the factors); a network clamps larger requests to it."""
        return None

    # ----------------------------------------------------------------- file facts (the formats layer asks)
    @classmethod
    def detect(cls, tensors: Mapping[str, Tensor]) -> bool:
        """Whether a module's keys (``{suffix: tensor}``) are this algorithm's."""
        return any(k in tensors for k in cls.marker_keys)

    @classmethod
    def check_file_shapes(cls, tensors: Mapping[str, Tensor]) -> tuple[int | None, int | None]:
        """Check that a module's tensors fit together, without the layer (:class:`FileStateError` names
        the key); returns the layer's ``(out, in)`` where the tensors tell them."""
        return None, None

    @classmethod
    def describe_rank(cls, tensors: Mapping[str, Tensor]) -> str:
        """The rank (or block layout) of a module, read from its shapes, as ``info`` shows it."""
        return "-"

    @classmethod
    def tool_verdicts(cls, tensors: Mapping[str, Tensor], options: Mapping[str, Any] | None) -> Verdicts:
        """How ComfyUI, A1111 and diffusers treat one (valid) module: a tool not in the result loads it
        as we compute it. Tools outside ``loaded_by`` skip it (diffusers rejects the whole file)."""
        name = cls.title or cls.algo
        out: Verdicts = {}
        for tool in TOOLS:
            if tool in cls.loaded_by:
                continue
            if tool == "diffusers":
                out[tool] = (REJECT, f"load_lora_weights rejects non-LoRA keys ({cls.algo})")
            else:
                out[tool] = (SKIP, f"{tool} has no {name}")
        return out

    @classmethod
    def peft_export(
        cls,
        modules: Mapping[str, Mapping[str, Tensor]],
        paths: Mapping[str, str],
        root: str,
        records: Mapping[str, Mapping[str, Any]],
        shapes: Mapping[str, tuple[int, ...]],
    ) -> tuple[dict[str, Tensor], dict[str, int], dict[str, float], dict[str, Any]]:
        """PEFT-keyed tensors, rank and α per module path, and extra config of modules of this
        algorithm — only for exact mappings (``peft_type``); anything else is an error saying why."""
        raise HiganbanaError(f"{cls.algo} cannot be exported to PEFT: {cls.peft_refusal}")

    @classmethod
    def from_peft(cls, tensors: dict[str, Tensor], alpha: float, rank: int) -> tuple[dict[str, Tensor], float]:
        """A PEFT module's tensors and our file α from PEFT's α and ``r`` (the identity for most)."""
        return tensors, alpha

    def state_tensors(self) -> dict[str, Tensor]:
        """The adapter's tensors under their file-key suffixes (detached copies)."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Load tensors written by :meth:`state_tensors` (same options)."""
        raise NotImplementedError

    def extra_state_options(self) -> dict[str, Any]:
        """The options that reproduce this adapter (recorded in file metadata)."""
        return {}

    # ----------------------------------------------------------------- forward
    def _drop(self, t: Tensor) -> Tensor:
        if self.training and self.dropout > 0:
            return F.dropout(t, self.dropout, training=True)
        return t

    def _adapter_requires_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def use_bypass(self, x: Tensor) -> bool:
        """Whether this call runs in bypass mode (``auto``: the lower estimated cost, see below)."""
        if self.forward_mode == "bypass" or (self.training and self.dropout > 0):
            return True
        if self.forward_mode == "merged":
            return False
        tokens = x.numel() // max(x.shape[self.spec.channel_dim], 1)
        if self.spec.is_conv:  # positions of the output (strided convs have fewer)
            tokens = max(tokens // math.prod(self.spec.stride), 1)
        return bypass_is_cheaper(
            self.costs(tokens),
            tokens=tokens,
            weight_numel=self.base_weight.numel(),
            width=max(self.spec.in_features, self.spec.out_features),
            device_type=x.device.type,
            grad=self._adapter_requires_grad(),
        )

    def forward(self, x: Tensor) -> Tensor:
        m = self.multiplier
        if self._merged_multiplier is not None or m == 0.0:
            return self.base_forward(x)
        if self.training and self.module_dropout > 0 and torch.rand(()).item() < self.module_dropout:
            return self.base_forward(x)
        mask = self.rank_mask()
        if self.use_bypass(x):
            return self.bypass_forward(x, m, mask)
        return self.spec.op(x, self.merged_weight(m, mask), self.merged_bias(m))

    # ----------------------------------------------------------------- merge / attach
    @property
    def merged(self) -> bool:
        return self._merged_multiplier is not None

    def _needs_backup(self) -> bool:
        """Whether un-merge needs a copy of W0 (non-invertible merge, or low-precision base)."""
        return self.base_weight.dtype not in (torch.float32, torch.float64)

    @torch.no_grad()
    def merge_into(self) -> None:
        """Write the adapted weight (at the current multiplier) into the wrapped layer."""
        if self.merged:
            raise HiganbanaError(f"{self.algo} adapter is already merged")
        if self.inner is not None and not self.inner.merged:
            inner = self.inner.algo
            raise HiganbanaError(f"{self.algo} adapter is stacked on an unmerged {inner} adapter: merge that first")
        m = self.multiplier
        weight, bias = self.merged_weight(m), self.merged_bias(m)
        if self._needs_backup():
            b0 = self.base_bias
            self._backup = (
                self.base_weight.detach().to("cpu", copy=True),
                None if b0 is None else b0.detach().to("cpu", copy=True),
            )
        self.layer_weight.copy_(weight)
        layer_bias = self.layer_bias
        if bias is not None and layer_bias is not None:
            layer_bias.copy_(bias)
        self._merged_multiplier = m

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the layer's original weight and bias after :meth:`merge_into`."""
        if not self.merged:
            raise HiganbanaError(f"{self.algo} adapter is not merged")
        outer = self._stack[1]
        if outer is not None and outer.merged:
            raise HiganbanaError(f"a {outer.algo} adapter is merged on top of this {self.algo} one: unmerge it first")
        m = self._merged_multiplier
        assert m is not None  # merged
        layer_bias = self.layer_bias
        if self._backup is not None:
            weight, bias = self._backup
            self.layer_weight.copy_(weight)
            if bias is not None and layer_bias is not None:
                layer_bias.copy_(bias)
            self._backup = None
        else:
            bias = self.unmerged_bias(self.base_bias, m)
            weight = self.unmerged_weight(self.base_weight, m)
            self.layer_weight.copy_(weight)
            if bias is not None and layer_bias is not None:
                layer_bias.copy_(bias)
        self._merged_multiplier = None

    def attach(self) -> None:
        """Make the wrapped layer's own ``forward`` run this adapter.

        If another adapter is already attached to the layer, this one stacks on top of it: its
        ``W0`` becomes the inner adapter's adapted weight (see :attr:`base_weight`).
        """
        if self._original_forward is not None:
            return
        layer = self.layer
        current = layer.__dict__.get("forward")
        inner = getattr(current, "__self__", None)
        if isinstance(inner, Adapter):
            if inner._stack[1] is not None:
                raise HiganbanaError(f"layer {type(layer).__name__} already has an adapter stacked on its adapter")
            self._stack[0], inner._stack[1] = inner, self
        self._original_forward = layer.forward
        layer.forward = self.forward

    def detach(self) -> None:
        """Undo :meth:`attach`; the layer runs what it ran before (its own forward, or the inner adapter)."""
        if self._original_forward is None:
            return
        if self._stack[1] is not None:
            outer = self._stack[1].algo
            raise HiganbanaError(f"a {outer} adapter is stacked on this {self.algo} adapter: detach it first")
        if self.merged:
            raise HiganbanaError(f"{self.algo} adapter is merged: unmerge it before detaching")
        inner = self._stack[0]
        if inner is not None:
            self.layer.forward = inner.forward
            inner._stack[1] = None
            self._stack[0] = None
        else:
            del self.layer.forward
        self._original_forward = None

    def extra_repr(self) -> str:
        s = self.spec
        shape = f"{s.out_features}x{s.in_features}" + ("x" + "x".join(map(str, s.kernel_size)) if s.is_conv else "")
        return f"algo={self.algo}, layer={type(self.layer).__name__}({shape}), multiplier={self.multiplier}"


class FactoredAdapter(Adapter):
    """Base of algorithms whose ΔW is a product of trainable factors (LoRA, LoHa, LoKr, GLoRA).

    It owns the rank, α and scale (``s = α/r``, rs-LoRA ``α/√r``), ``use_scalar``,
    ``rank_dropout`` and DoRA (``weight_decompose``) for the subclasses that allow it.
    """

    supports_dora: ClassVar[bool] = False

    @classmethod
    def tool_verdicts(cls, tensors: Mapping[str, Tensor], options: Mapping[str, Any] | None) -> Verdicts:
        """The tools that do not load the algorithm; then alpha 0 (ComfyUI, A1111 and diffusers read
        scale 0); then the algorithm's own rules (:meth:`own_tool_verdicts`); then DoRA (ComfyUI divides
        by ‖W0‖ instead of ‖W0+ΔW‖, A1111 supports only the input axis, diffusers drops ``dora_scale``).
        Per tool the most severe verdict wins (reject > skip > deviate), the first among equals."""
        out = super().tool_verdicts(tensors, options)
        if _alpha_is_zero(cls, tensors):
            merge_verdicts(
                out,
                {
                    tool: (DEVIATE, ALPHA_ZERO.format(tool="load_lora_weights" if tool == "diffusers" else tool))
                    for tool in TOOLS
                },
            )
        merge_verdicts(out, cls.own_tool_verdicts(tensors, options))
        axis = dora_axis(tensors, options)
        if axis == "output":
            merge_verdicts(
                out,
                {
                    "ComfyUI": (DEVIATE, "DoRA on the output axis: ComfyUI divides by ‖W0‖ instead of ‖W0+ΔW‖"),
                    "A1111": (DEVIATE, "DoRA on the output axis: A1111 supports only the input axis (wrong result)"),
                },
            )
        if axis is not None:
            merge_verdicts(
                out, {"diffusers": (DEVIATE, "DoRA: load_lora_weights drops dora_scale (plain LoRA result)")}
            )
        return out

    @classmethod
    def own_tool_verdicts(cls, tensors: Mapping[str, Tensor], options: Mapping[str, Any] | None) -> Verdicts:
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
        self.rank_dropout = _check_fraction("rank_dropout", o.rank_dropout)
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
        from .dora import weight_norm

        with torch.no_grad():
            norm = weight_norm(self.base_weight.to(self.param_dtype), self.wd_on_output)
        self.dora_scale = nn.Parameter(norm.clone())

    def merged_weight(self, multiplier: float | None = None, mask: Tensor | None = None) -> Tensor:
        if not self.weight_decompose:
            return super().merged_weight(multiplier, mask)
        from .dora import dora_weight

        m = self.multiplier if multiplier is None else multiplier
        w0 = self.base_weight
        w0p = w0.to(self.param_dtype)
        wd = dora_weight(w0p, self.scale * self.delta_weight(mask), self.dora_scale, self.wd_on_output)
        return torch.add(w0p, wd - w0p, alpha=m).to(w0.dtype)

    def bypass_forward(self, x: Tensor, multiplier: float, mask: Tensor | None = None) -> Tensor:
        if not self.weight_decompose:
            return super().bypass_forward(x, multiplier, mask)
        from .dora import dora_bypass

        return dora_bypass(self, x, multiplier, mask)

    def _needs_backup(self) -> bool:
        return self.weight_decompose or super()._needs_backup()

    def costs(self, tokens: int) -> Costs:
        """The factored branch's costs, and DoRA's on top when it is on."""
        plain = self.branch_costs(tokens)
        return with_dora(plain) if self.weight_decompose else plain

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


def present(param: Tensor | None) -> Tensor:
    """An optional parameter that the adapter's layout says exists (e.g. LoKr's ``lokr_w1`` when w1
    is not factored): narrowed for the type checker, a bug if it is missing."""
    assert param is not None, "a parameter the layout says exists is missing"
    return param


@torch.no_grad()
def copy_checked(param: Tensor, value: Tensor, key: str) -> None:
    """Copy ``value`` into ``param``, with an error naming ``key`` on a shape mismatch."""
    if tuple(value.shape) != tuple(param.shape):
        raise FileStateError(f"tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
    param.copy_(value.to(param.dtype))


#: the note for a factored module whose file alpha is 0
ALPHA_ZERO = "alpha 0: {tool} reads scale 0 (no effect), where higanbana, kohya and LyCORIS read alpha = rank"


def _alpha_is_zero(cls: type[FactoredAdapter], tensors: Mapping[str, Tensor]) -> bool:
    alpha = tensors.get("alpha")
    return alpha is not None and float(alpha.reshape(-1)[0]) == 0 and cls.alpha_scales(tensors)


def require(tensors: dict[str, Tensor], key: str) -> Tensor:
    """``tensors[key]``, or a KeyError that names the missing key."""
    if key not in tensors:
        raise FileStateError(f"missing key {key!r}")
    return tensors[key]
