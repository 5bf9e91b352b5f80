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

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, HiganbanaError, nearest
from .cost import Costs, bypass_is_cheaper
from .files import REJECT, SKIP, TOOLS, FileStateError, Kernel, LayoutRefused, Verdicts
from .layer import LayerSpec, layer_spec
from .options import AdapterOptions, check_fraction, finite_number, option_fields

FORWARD_MODES = ("auto", "merged", "bypass")


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
    #: why per-member modules cannot become one module of a fused layer, or split back (layouts)
    stack_refusal: ClassVar[str] = "its weight change is not block-wise in the output rows"
    split_refusal: ClassVar[str] = "its weight change does not separate by output rows"
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
        self.dropout = check_fraction("dropout", o.dropout)
        self.module_dropout = check_fraction("module_dropout", o.module_dropout)
        if o.forward_mode not in FORWARD_MODES:
            raise ConfigError(f"option forward_mode={o.forward_mode!r} must be one of {FORWARD_MODES}")
        self.forward_mode = o.forward_mode
        self.param_dtype = o.dtype or torch.float32
        self._merged_multiplier: float | None = None
        self._backup: tuple[Tensor, Tensor | None] | None = None
        #: auto's decision per (positions, device type, grads): the shapes are fixed, so each is costed once
        self._auto_decisions: dict[tuple[int, str, bool], bool] = {}

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
        when networks are stacked (so stacking composes like sequential patches in ComfyUI). A
        quantized base weight is dequantized here (for the maths that needs ``W0`` itself, e.g. DoRA's
        norm); the layer's own op keeps running on the quantized weight (:meth:`base_forward`)."""
        inner = self.inner
        if inner is not None and not inner.merged and inner.multiplier != 0.0:
            return inner.merged_weight(inner.multiplier)
        w = self.layer_weight
        return w.dequantize() if is_quantized(w) else w

    @property
    def quantized_base(self) -> bool:
        """Whether the wrapped layer's weight is quantized (a tensor subclass such as torchao's): the
        adapter then always runs in bypass and cannot be merged into the layer."""
        return is_quantized(self.layer_weight)

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
        """The wrapped layer's output with its current weight (a quantized one as it is)."""
        inner = self.inner
        if self.quantized_base and (inner is None or inner.merged or inner.multiplier == 0.0):
            return self.spec.op(x, self.layer_weight, self.base_bias)
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
    def tool_verdicts(
        cls, tensors: Mapping[str, Tensor], options: Mapping[str, Any] | None, kernel: Kernel = None
    ) -> Verdicts:
        """How ComfyUI, A1111, diffusers and LyCORIS treat one (valid) module: a tool not in the result
        loads it as we compute it. Tools outside ``loaded_by`` skip it (diffusers rejects the whole file).
        ``kernel`` is the layer's kernel where the caller knows it (from the module's name), for the rules
        that depend on it and cannot read it from the file."""
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
    def layout_for(cls, tool: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """An exactly equivalent layout of this module (same weights at every strength) that ``tool``
        reads where this one fails, or None when there is none or none is needed (``convert --for``).
        The records of a rewritten module are detected again from its new keys."""
        return None

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
    def stack_outputs(cls, members: Sequence[Mapping[str, Tensor] | None], sizes: Sequence[int]) -> dict[str, Tensor]:
        """One module for a layer whose output rows are the members' layers stacked in order (a fused
        ``qkv`` from ``to_q/to_k/to_v``): file tensors with exactly the members' weights, where the
        algebra allows. ``None`` is a member layer without adapter; ``sizes`` are the members' rows."""
        name = cls.title or cls.algo
        raise LayoutRefused(f"{name} modules cannot be stacked into one fused layer: {cls.stack_refusal}")

    @classmethod
    def split_outputs(
        cls, tensors: Mapping[str, Tensor], sizes: Sequence[int], ranks: Sequence[int | None] | None = None
    ) -> list[dict[str, Tensor] | None]:
        """The inverse: one module per block of output rows (``sizes``), with exactly the fused module's
        weights in those rows. ``ranks`` (from our own records, ``None`` for a member without adapter)
        restores what :meth:`stack_outputs` stacked; foreign files are split by their structure."""
        name = cls.title or cls.algo
        raise LayoutRefused(f"a fused {name} module cannot be split by output rows: {cls.split_refusal}")

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
        if self.forward_mode == "bypass" or (self.training and self.dropout > 0) or self.quantized_base:
            return True
        if self.forward_mode == "merged":
            return False
        tokens = x.numel() // max(x.shape[self.spec.channel_dim], 1)
        if self.spec.is_conv:  # positions of the output (strided convs have fewer)
            tokens = max(tokens // math.prod(self.spec.stride), 1)
        key = (tokens, x.device.type, self._adapter_requires_grad())
        decision = self._auto_decisions.get(key)
        if decision is None:
            decision = bypass_is_cheaper(
                self.costs(tokens),
                tokens=tokens,
                weight_numel=self.base_weight.numel(),
                width=max(self.spec.in_features, self.spec.out_features),
                device_type=key[1],
                grad=key[2],
            )
            self._auto_decisions[key] = decision
        return decision

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
        if self.quantized_base:
            raise HiganbanaError(
                f"{self.algo} adapter: its layer's weight is quantized ({type(self.layer_weight).__name__}); adapters "
                "run in bypass over it and cannot be merged into it (merge the file into the checkpoint instead)"
            )
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


def is_quantized(weight: Tensor) -> bool:
    """A quantized weight: a tensor subclass with ``dequantize()`` in place of a plain tensor or
    parameter (torchao's int8/float8 weights, ...)."""
    return type(weight) not in (Tensor, nn.Parameter) and callable(getattr(weight, "dequantize", None))


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


def require(tensors: dict[str, Tensor], key: str) -> Tensor:
    """``tensors[key]``, or a KeyError that names the missing key."""
    if key not in tensors:
        raise FileStateError(f"missing key {key!r}")
    return tensors[key]
