#!/usr/bin/env python
"""Per-layer training-step benchmark of every registered algorithm at SD1.5 shapes.

For each shape and algorithm it measures one training step (forward + backward, grads to the
adapter parameters and to the input) of

- the *frozen* layer (weights ``requires_grad=False``, input requiring grad, as inside a UNet),
- our adapter in ``merged``, ``bypass`` and ``auto`` forward modes,
- lycoris-lora (plain and ``bypass_mode=True``) and PEFT, when they are installed (optional),

and reports the median time as a ratio to the frozen layer timed in the same rounds, the number of
ATen ops dispatched per step (deterministic), and the peak of extra memory allocated during the
step relative to the frozen layer. ``--write docs/benchmarks.md`` replaces the section between
``<!-- layers:start -->`` and ``<!-- layers:end -->`` with the tables.

Run: ``python benchmarks/layers.py --quick`` (well under a minute), or see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import importlib
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from higanbana.algorithms import accepted_options, algorithm_class, list_algorithms, make_adapter

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _machine.py beside this script, however it is loaded
from _machine import cpu_name, device_label

RANK = 8
MARK_START = "<!-- layers:start -->"
MARK_END = "<!-- layers:end -->"
OUR_MODES = ("merged", "bypass", "auto")
PEER_KEYS = ("lycoris", "lycoris_bypass", "peft")
COLUMN_TITLES = {
    "frozen": "frozen",
    "merged": "merged",
    "bypass": "bypass",
    "auto": "auto",
    "lycoris": "lycoris",
    "lycoris_bypass": "lycoris bypass",
    "peft": "peft",
}


class Skip(Exception):
    """A cell that cannot be measured (the peer lacks the algorithm, or it refuses the layer)."""


# --------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    key: str
    title: str
    kind: str  # "linear", "conv" or "norm"
    make: Callable[[], nn.Module]
    cpu_tokens: int  # default tokens on CPU (4096 on GPU)

    def input_shape(self, tokens: int) -> tuple[int, ...]:
        layer = self.make()
        if self.kind == "linear":
            return (1, tokens, layer.in_features)
        side = math.isqrt(tokens)
        channels = layer.in_channels if self.kind == "conv" else layer.num_channels
        return (1, channels, side, side)

    def describe_tokens(self, tokens: int) -> str:
        if self.kind == "linear":
            return f"{tokens} tokens"
        side = math.isqrt(tokens)
        return f"1×{self.input_shape(tokens)[1]}×{side}×{side}"


SHAPES: dict[str, Shape] = {
    s.key: s
    for s in (
        Shape("linear320", "Linear 320→320", "linear", lambda: nn.Linear(320, 320), 4096),
        Shape("linear1280", "Linear 1280→5120", "linear", lambda: nn.Linear(1280, 5120), 1024),
        Shape("conv320", "Conv2d 320→320 3×3", "conv", lambda: nn.Conv2d(320, 320, 3, padding=1), 4096),
        Shape("groupnorm320", "GroupNorm(32, 320)", "norm", lambda: nn.GroupNorm(32, 320), 4096),
    )
}
GPU_TOKENS = 4096
QUICK_SHAPES = ("linear320", "conv320", "groupnorm320")
QUICK_TOKENS = 1024


# --------------------------------------------------------------------------- algorithms
@dataclass(frozen=True)
class Row:
    """One table row: a registered algorithm, possibly with options (``lora+dora``)."""

    name: str
    algo: str
    options: dict[str, Any] = field(default_factory=dict)


#: options beyond ``rank`` for some rows (filtered by what the class accepts)
ROW_OPTIONS: dict[str, dict[str, Any]] = {
    "lokr": {"factor": -1},
}
#: extra rows: name -> (registered algorithm, options)
EXTRA_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora+dora": ("lora", {"weight_decompose": True}),
}
NORM_ALGOS = {"norm"}


#: the table order; algorithms registered later come after these
ROW_ORDER = ("lora", "loha", "lokr", "ia3", "glora", "oft", "boft", "full", "norm")


def default_rows(kind: str) -> list[Row]:
    rows: list[Row] = []
    known = [a for a in ROW_ORDER if a in list_algorithms()]
    for algo in [*known, *(a for a in list_algorithms() if a not in ROW_ORDER)]:
        if (algo in NORM_ALGOS) != (kind == "norm"):
            continue
        rows.append(Row(algo, algo, dict(ROW_OPTIONS.get(algo, {}))))
        for name, (base, options) in EXTRA_ROWS.items():
            if base == algo and kind != "norm":
                rows.append(Row(name, base, dict(options)))
    return rows


def parse_rows(names: list[str], kind: str) -> list[Row]:
    rows = []
    for name in names:
        if name in EXTRA_ROWS:
            base, options = EXTRA_ROWS[name]
            rows.append(Row(name, base, dict(options)))
        else:
            rows.append(Row(name, name, dict(ROW_OPTIONS.get(name, {}))))
    return [r for r in rows if (r.algo in NORM_ALGOS) == (kind == "norm")]


def boft_block_candidates(out: int, dim: int) -> list[int]:
    """Valid BOFT block sizes (even ``b``, ``out/b`` a power of two), nearest to ``dim`` first."""
    valid = [b for b in range(2, out + 1, 2) if out % b == 0 and (out // b) & (out // b - 1) == 0]
    return sorted(valid, key=lambda b: (abs(b - dim), b))


def make_ours(row: Row, layer: nn.Module, mode: str) -> nn.Module:
    """Our adapter for ``row`` on ``layer`` in forward mode ``mode`` (rank 8 or the nearest valid)."""
    from higanbana.errors import ConfigError

    cls = algorithm_class(row.algo)
    valid = accepted_options(cls)
    options = {k: v for k, v in {"rank": RANK, **row.options}.items() if k in valid}
    if "forward_mode" in valid:
        options["forward_mode"] = mode
    try:
        return make_adapter(row.algo, layer, **options)
    except ConfigError:
        if row.algo != "boft" or "rank" not in options:
            raise
    out = layer.weight.shape[0]
    for b in boft_block_candidates(out, RANK):
        with contextlib.suppress(ConfigError):
            return make_adapter(row.algo, layer, **{**options, "rank": b})
    raise Skip(f"no BOFT block size fits {out} channels")


def describe_params(module: nn.Module, params: list[Tensor]) -> str:
    """The trainable tensors of a variant, e.g. ``oft_blocks 40×8×8`` (names relative to ``module``)."""
    ids = {id(p) for p in params}
    parts = []
    for name, p in module.named_parameters():
        if id(p) in ids:
            short = name.removeprefix("layer.").replace(".default", "").replace("base_layer.", "")
            parts.append(f"{short} {'×'.join(map(str, p.shape)) or 'scalar'}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- peers
LYCORIS_CLASSES = {
    "lora": "LoConModule",
    "loha": "LohaModule",
    "lokr": "LokrModule",
    "ia3": "IA3Module",
    "glora": "GLoRAModule",
    "oft": "DiagOFTModule",
    "boft": "ButterflyOFTModule",
    "full": "FullModule",
    "norm": "NormModule",
}


def peer_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for key, module, dist in (("lycoris", "lycoris", "lycoris-lora"), ("peft", "peft", "peft")):
        try:
            importlib.import_module(module)
        except Exception:
            versions[key] = None
            continue
        try:
            from importlib.metadata import version

            versions[key] = version(dist)
        except Exception:
            versions[key] = "?"
    return versions


def our_block_size(ours: nn.Module | None) -> int:
    """OFT/BOFT block size our adapter chose (to give the peers the same one)."""
    blocks = getattr(ours, "oft_blocks", None)
    return int(blocks.shape[-1]) if blocks is not None else RANK


def our_boft_stages(ours: nn.Module | None) -> int:
    blocks = getattr(ours, "oft_blocks", None)
    return int(blocks.shape[0]) if blocks is not None and blocks.dim() == 4 else 1


def make_lycoris(
    row: Row, layer: nn.Module, bypass: bool, ours: nn.Module | None
) -> tuple[Callable, list[Tensor], str, nn.Module]:
    import logging

    import lycoris.modules as lm

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)

    if row.algo not in LYCORIS_CLASSES:
        raise Skip("lycoris has no such algorithm")
    if bypass and row.algo in ("full", "norm"):
        raise Skip("lycoris has no bypass mode for it")
    cls = getattr(lm, LYCORIS_CLASSES[row.algo])
    kwargs: dict[str, Any] = {"lora_dim": RANK, "alpha": RANK}
    if row.algo in ("oft", "boft"):
        kwargs["lora_dim"] = our_block_size(ours)
    if row.algo == "lokr":
        kwargs["factor"] = row.options.get("factor", -1)
    if row.options.get("weight_decompose"):
        kwargs["weight_decompose"] = True
    if row.algo != "norm":
        kwargs["bypass_mode"] = True if bypass else None
    base_ids = {id(p) for p in layer.parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = cls("bench", layer, 1.0, **kwargs)
    if getattr(module, "not_supported", False):
        raise Skip("lycoris does not support this layer")
    module.to(layer.weight.device)
    module.apply_to()
    module.train()
    params = [p for p in module.parameters() if id(p) not in base_ids]
    for p in params:
        p.requires_grad_(True)
    return layer, params, "", module


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def peft_config(row: Row, ours: nn.Module | None, layer: nn.Module) -> Any:
    import peft

    target = {"target_modules": ["layer"]}
    if row.algo == "lora":
        return peft.LoraConfig(r=RANK, lora_alpha=RANK, use_dora=bool(row.options.get("weight_decompose")), **target)
    if row.options.get("weight_decompose"):
        raise Skip("peft has DoRA only for LoRA")
    if row.algo == "loha":
        return peft.LoHaConfig(r=RANK, alpha=RANK, **target)
    if row.algo == "lokr":
        return peft.LoKrConfig(r=RANK, alpha=RANK, decompose_factor=row.options.get("factor", -1), **target)
    if row.algo == "ia3":
        return peft.IA3Config(feedforward_modules=[], **target)
    if row.algo == "oft":
        return peft.OFTConfig(r=0, oft_block_size=our_block_size(ours), **target)
    if row.algo == "boft":
        return peft.BOFTConfig(
            boft_block_size=our_block_size(ours), boft_n_butterfly_factor=our_boft_stages(ours), **target
        )
    raise Skip("peft has no such algorithm")


def make_peft(row: Row, layer: nn.Module, ours: nn.Module | None) -> tuple[Callable, list[Tensor], str, nn.Module]:
    import peft

    base_ids = {id(p) for p in layer.parameters()}
    config = peft_config(row, ours, layer)
    holder = _Holder(layer)
    errors = []
    stages = getattr(config, "boft_n_butterfly_factor", None)
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = peft.inject_adapter_in_model(config, holder)
            break
        except ValueError as exc:  # BOFT: fewer butterfly stages until the layer accepts them
            errors.append(str(exc))
            if stages is None or stages <= 1:
                raise Skip(f"peft refuses: {errors[0][:80]}") from exc
            stages -= 1
            config.boft_n_butterfly_factor = stages
            holder = _Holder(layer)
    model.train()
    params = []
    for p in model.parameters():
        trainable = id(p) not in base_ids
        p.requires_grad_(trainable)
        if trainable:
            params.append(p)
    mismatch = ""
    if row.options.get("weight_decompose"):
        mismatch = (
            "PEFT detaches the norm ‖W0 + s·ΔW‖ from the gradient (DoRA paper §4.3), docs/design.md §3 does not: "
            "a cheaper, different gradient"
        )
    if row.algo == "boft":
        peft_stages = next((p.shape[0] for n, p in model.named_parameters() if "boft_R" in n), None)
        if peft_stages != our_boft_stages(ours):
            mismatch = (
                f"PEFT runs {peft_stages} butterfly stage(s), ours {our_boft_stages(ours)} "
                "(PEFT drops to 1 stage when its CUDA extension is unavailable)"
            )
    return model, params, mismatch, model


# --------------------------------------------------------------------------- measuring
class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while active (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops.append(name)
        if func.is_view or name in METADATA_OPS:
            VIEW_OPS.add(name)
        return func(*args, **(kwargs or {}))


#: ops that only make a new view of the same memory (no kernel); filled in while counting
VIEW_OPS: set[str] = set()
METADATA_OPS = {"aten._unsafe_view.default", "aten._reshape_alias.default"}


def kernel_ops(ops: list[str]) -> int:
    """The ops that run a kernel: all but views and other metadata-only ops."""
    return sum(1 for op in ops if op not in VIEW_OPS)


@dataclass
class Variant:
    key: str
    fn: Callable[[Tensor], Tensor]
    params: list[Tensor]
    config: str = ""
    mismatch: str = ""  # why this peer variant does not compute the same algorithm as ours
    times: list[float] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    peak: int | None = None
    no_grad: int = 0  # trainable elements that got no gradient (the variant skips part of the algorithm)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)


def run_step(v: Variant, x: Tensor, grad: Tensor) -> None:
    x.grad = None
    for p in v.params:
        p.grad = None
    y = v.fn(x)
    torch.autograd.backward(y, grad)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_ops(v: Variant, x: Tensor, grad: Tensor) -> list[str]:
    counter = OpCounter()
    with counter:
        run_step(v, x, grad)
    return counter.ops


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's start/stop lines (written by C++ to file descriptor 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(v: Variant, x: Tensor, grad: Tensor) -> int:
    """Peak of the bytes allocated during one step beyond what was allocated before it."""
    x.grad = None
    for p in v.params:
        p.grad = None
    if x.device.type == "cuda":
        sync(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        run_step(v, x, grad)
        sync(x.device)
        return torch.cuda.max_memory_allocated(x.device) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step(v, x, grad)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def time_variants(variants: list[Variant], x: Tensor, grad: Tensor, warmup: int, repeats: int) -> None:
    """Interleaved rounds (each round runs every variant once) so that drift hits all alike."""
    for _ in range(warmup):
        for v in variants:
            run_step(v, x, grad)
    sync(x.device)
    for r in range(repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            sync(x.device)
            t0 = time.perf_counter()
            run_step(v, x, grad)
            sync(x.device)
            v.times.append(time.perf_counter() - t0)


@dataclass
class Result:
    shape: Shape
    tokens: int
    row: Row
    variants: dict[str, Variant]
    skipped: dict[str, str]
    auto_mode: str = ""
    config: str = ""


def build_variants(
    row: Row, shape: Shape, device: torch.device, dtype: torch.dtype, peers: dict[str, str | None]
) -> tuple[dict[str, Variant], dict[str, str], nn.Module | None]:
    torch.manual_seed(0)
    base = shape.make().to(device=device, dtype=dtype).requires_grad_(False)
    variants: dict[str, Variant] = {"frozen": Variant("frozen", base, [])}
    skipped: dict[str, str] = {}
    ours_auto = None
    for mode in OUR_MODES:
        layer = copy.deepcopy(base)
        adapter = make_ours(row, layer, mode).to(device)
        adapter.train()
        params = [p for p in adapter.parameters() if p.requires_grad]
        variants[mode] = Variant(mode, adapter, params, describe_params(adapter, params))
        if mode == "auto":
            ours_auto = adapter
    builders: dict[str, Callable[[nn.Module], tuple[Callable, list[Tensor], str, nn.Module]]] = {}
    if peers.get("lycoris"):
        builders["lycoris"] = lambda layer: make_lycoris(row, layer, False, ours_auto)
        builders["lycoris_bypass"] = lambda layer: make_lycoris(row, layer, True, ours_auto)
    if peers.get("peft"):
        builders["peft"] = lambda layer: make_peft(row, layer, ours_auto)
    for key, build in builders.items():
        try:
            fn, params, mismatch, module = build(copy.deepcopy(base))
            variants[key] = Variant(key, fn, params, describe_params(module, params), mismatch)
        except Skip as exc:
            skipped[key] = str(exc)
        except Exception as exc:  # a peer failing must not stop the benchmark
            skipped[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
    return variants, skipped, ours_auto


def check_variant(v: Variant, x: Tensor, grad: Tensor) -> str | None:
    """Run one step; return an error line if the variant cannot train this layer."""
    try:
        run_step(v, x, grad)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
    v.no_grad = sum(p.numel() for p in v.params if p.grad is None)
    if v.key != "frozen" and v.params and v.no_grad == v.n_params:
        return "no parameter received a gradient"
    return None


def measure(row: Row, shape: Shape, tokens: int, args: argparse.Namespace, peers: dict[str, str | None]) -> Result:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    variants, skipped, ours = build_variants(row, shape, device, dtype, peers)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(shape.input_shape(tokens), generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    with torch.no_grad():
        y_shape = variants["frozen"].fn(x).shape
    grad = torch.randn(y_shape, generator=gen).to(device=device, dtype=dtype)
    for key in list(variants):
        error = check_variant(variants[key], x, grad)
        if error:
            if key in OUR_MODES:
                raise RuntimeError(f"{row.name} ({key}) failed on {shape.title}: {error}")
            skipped[key] = error
            del variants[key]
    if not args.ops_only:
        time_variants(list(variants.values()), x, grad, args.warmup, args.repeats)
    for v in variants.values():
        v.ops = count_ops(v, x, grad)
        v.peak = peak_extra_bytes(v, x, grad)
    auto = variants["auto"].ops
    if auto == variants["merged"].ops:
        mode = "merged"
    elif auto == variants["bypass"].ops:
        mode = "bypass"
    else:
        try:
            with torch.enable_grad():
                mode = ("bypass" if ours.use_bypass(x) else "merged") + "?"
        except Exception:
            mode = "?"
    return Result(shape, tokens, row, variants, skipped, mode, variants["auto"].config)


# --------------------------------------------------------------------------- reporting
def fmt_ratio(v: Variant | None, frozen: Variant, with_ms: bool, bold: bool) -> str:
    if v is None or not v.times:
        return ""
    text = f"{v.median_ms / frozen.median_ms:.2f}×"
    if bold:
        text = f"**{text}**"
    text = f"{text} ({v.median_ms:.3g})" if with_ms else text
    return text + dagger(v)


def dagger(v: Variant) -> str:
    return ("†" if v.no_grad else "") + ("‡" if v.mismatch else "")


def comparable(r: Result, keys: tuple[str, ...] | list[str]) -> list[str]:
    """The columns that compute the whole algorithm (a † column leaves some tensors without grad)."""
    return [k for k in keys if k in r.variants and not r.variants[k].no_grad and not r.variants[k].mismatch]


def fmt_mem(v: Variant | None, frozen: Variant) -> str:
    if v is None or v.peak is None or not frozen.peak:
        return ""
    return f"{v.peak / frozen.peak:.2f}×"


def table_for_shape(results: list[Result], timed: bool) -> list[str]:
    lines: list[str] = []
    present = [k for k in PEER_KEYS if any(k in r.variants for r in results)]
    if timed:
        head = ["algorithm", "frozen ms", "merged", "bypass", "auto", "auto mode", *[COLUMN_TITLES[k] for k in present]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in results:
            frozen = r.variants["frozen"]
            candidates = comparable(r, (*OUR_MODES, *present))
            fastest = min(candidates, key=lambda k: r.variants[k].median_ms)
            cells = [r.row.name, f"{frozen.median_ms:.3g}"]
            cells += [fmt_ratio(r.variants.get(k), frozen, True, k == fastest) for k in OUR_MODES]
            cells.append(r.auto_mode)
            cells += [fmt_ratio(r.variants.get(k), frozen, False, k == fastest) for k in present]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    head = [
        "algorithm",
        "ops frozen",
        "ops merged",
        "ops bypass",
        "ops auto",
        *[f"ops {COLUMN_TITLES[k]}" for k in present],
        "mem auto",
        *[f"mem {COLUMN_TITLES[k]}" for k in present],
        "params ours",
        *[f"params {COLUMN_TITLES[k]}" for k in present],
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        frozen = r.variants["frozen"]
        fewest = min(len(r.variants[k].ops) for k in comparable(r, (*OUR_MODES, *present)))

        def ops(k: str, r: Result = r, fewest: int = fewest) -> str:
            v = r.variants.get(k)
            if v is None:
                return ""
            n = len(v.ops)
            text = f"**{n}**" if n == fewest and k in comparable(r, (*OUR_MODES, *present)) else str(n)
            return f"{text} ({kernel_ops(v.ops)}){dagger(v)}"

        cells = [r.row.name, *[ops(k) for k in ("frozen", *OUR_MODES, *present)]]
        cells += [fmt_mem(r.variants.get(k), frozen) for k in ("auto", *present)]
        cells += [f"{r.variants[k].n_params:,}" if k in r.variants else "" for k in ("auto", *present)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def machine_lines(args: argparse.Namespace, peers: dict[str, str | None]) -> list[str]:
    cpu = cpu_name()
    device = device_label(args.device)
    peer_text = ", ".join(f"{k} {v}" if v else f"{k} not installed" for k, v in peers.items())
    timing = "op counts and memory only"
    if not args.ops_only:
        timing = f"median of {args.repeats} interleaved steps after {args.warmup} warm-up rounds"
    return [
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}, {args.dtype}, Python {platform.python_version()}",
        f"- peers: {peer_text}",
        f"- command: `{' '.join(['python', *map(shlex.quote, sys.argv)])}`",
        f"- rank {RANK} (OFT/BOFT: block size {RANK} or the nearest valid; LoKr factor -1), {timing}",
    ]


LEGEND = [
    "Time cells: median step time ÷ the frozen layer's, measured in the same rounds (our modes also give ms);",
    "**bold** is the fastest column. `auto mode`: the mode our `auto` ran (its op trace equals that mode's).",
    "Ops cells: ATen ops per training step, total (in brackets: those that run a kernel, i.e. not views);",
    "**bold** is the fewest. mem: peak extra memory of the step ÷ the frozen layer's. params: trainable elements.",
]


def report(
    all_results: dict[str, list[Result]], notes: list[str], args: argparse.Namespace, peers: dict[str, str | None]
) -> list[str]:
    lines = ["## Layer benchmark", "", *machine_lines(args, peers), "", *LEGEND, ""]
    for results in all_results.values():
        if not results:
            continue
        shape, tokens = results[0].shape, results[0].tokens
        reduced = ""
        if tokens < GPU_TOKENS and args.tokens is None:
            reduced = f" (reduced from {GPU_TOKENS}: {'--quick' if args.quick else 'CPU default'})"
        lines += [f"### {shape.title}, input {shape.describe_tokens(tokens)}{reduced}", ""]
        lines += table_for_shape(results, not args.ops_only)
        configs = []
        for r in results:
            configs.append(f"{r.row.name}: ours {r.config}")
            configs += [
                f"{r.row.name}: {COLUMN_TITLES[k]} {r.variants[k].config}" for k in PEER_KEYS if k in r.variants
            ]
        lines += [
            "<details><summary>trainable tensors of each column</summary>",
            "",
            *[f"- {c}" for c in configs],
            "",
            "</details>",
            "",
        ]
        cell_notes = []
        missing = [
            f"{r.row.name}/{COLUMN_TITLES[k]}" for r in results for k, why in r.skipped.items() if "no such" in why
        ]
        if missing:
            cell_notes.append(f"empty peer cells, the peer lacks the algorithm: {', '.join(missing)}")
        for r in results:
            cell_notes += [
                f"{r.row.name} / {COLUMN_TITLES[k]}: not measured ({why})"
                for k, why in r.skipped.items()
                if "no such" not in why
            ]
            cell_notes += [
                f"{r.row.name} / {COLUMN_TITLES[k]} †: {v.no_grad:,} of {v.n_params:,} trainable elements get no "
                "gradient (this variant computes less than the algorithm; left out of the comparisons)"
                for k, v in r.variants.items()
                if v.no_grad
            ]
            cell_notes += [
                f"{r.row.name} / {COLUMN_TITLES[k]} ‡: {v.mismatch}; left out of the comparisons"
                for k, v in r.variants.items()
                if v.mismatch
            ]
        if cell_notes:
            lines += [*[f"- {n}" for n in cell_notes], ""]
    lines += goal_check(all_results, args)
    if notes:
        lines += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    return lines


def goal_check(all_results: dict[str, list[Result]], args: argparse.Namespace) -> list[str]:
    lines = ["### Where `auto` misses the goal", ""]
    misses = []
    for results in all_results.values():
        for r in results:
            where = f"{r.shape.title} / {r.row.name}"
            auto = r.variants["auto"]
            others = {k: r.variants[k] for k in comparable(r, ("merged", "bypass", *PEER_KEYS))}
            if others:
                fewest_key = min(others, key=lambda k: len(others[k].ops))
                if len(others[fewest_key].ops) < len(auto.ops):
                    misses.append(
                        f"{where}: {len(auto.ops)} ops, {COLUMN_TITLES[fewest_key]} has {len(others[fewest_key].ops)}"
                    )
                if not args.ops_only:
                    fastest_key = min(others, key=lambda k: others[k].median_ms)
                    best = others[fastest_key].median_ms
                    if best < auto.median_ms:
                        slower = auto.median_ms / best - 1
                        noise = " (within CPU noise)" if slower < 0.15 and args.device == "cpu" else ""
                        misses.append(f"{where}: {COLUMN_TITLES[fastest_key]} is {slower:.0%} faster{noise}")
    lines += [f"- {m}" for m in misses] if misses else ["- nowhere: auto is the fastest and has the fewest ops"]
    return [*lines, ""]


def write_section(path: Path, section: list[str]) -> None:
    body = "\n".join([MARK_START, *section, MARK_END])
    text = path.read_text() if path.exists() else ""
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        tail = rest.split(MARK_END, 1)[1]
        text = head + body + tail
    else:
        text = (text.rstrip() + "\n\n" if text else "") + body + "\n"
    path.write_text(text)


def print_trace(result: Result, which: list[str]) -> None:
    for key in which:
        v = result.variants.get(key)
        if v is None:
            continue
        counts = Counter(v.ops)
        print(f"\n--- {result.shape.title} / {result.row.name} / {key}: {len(v.ops)} ops")
        print("  " + ", ".join(f"{name.removeprefix('aten.')}×{n}" for name, n in counts.most_common()))
        print("  sequence: " + " ".join(op.removeprefix("aten.").removesuffix(".default") for op in v.ops))


# --------------------------------------------------------------------------- main
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default=None, help=f"comma-separated, from {', '.join(SHAPES)} (default: all)")
    p.add_argument(
        "--algos", default=None, help="comma-separated rows, e.g. lora,lora+dora,oft (default: all registered)"
    )
    p.add_argument("--tokens", type=int, default=None, help="tokens per input for every shape (conv/norm: side²)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="layer and input dtype (adapters stay fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10 on CPU, 50 on GPU; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3; quick 2)")
    p.add_argument("--quick", action="store_true", help=f"{'/'.join(QUICK_SHAPES)} at {QUICK_TOKENS} tokens, 3 rounds")
    p.add_argument("--ops-only", action="store_true", help="only op counts and memory (deterministic, no timing)")
    p.add_argument("--no-peers", action="store_true", help="skip lycoris and peft even when installed")
    p.add_argument("--trace", default=None, help="print the op trace of these columns, e.g. auto,lycoris_bypass")
    p.add_argument("--write", type=Path, default=None, help="replace the layers section of this markdown file")
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    if args.repeats is None:
        args.repeats = 3 if args.quick else (50 if on_gpu else 10)
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.shapes:
        shape_keys = [s.strip() for s in args.shapes.split(",") if s.strip()]
    else:
        shape_keys = list(QUICK_SHAPES if args.quick else SHAPES)
    unknown = [s for s in shape_keys if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    peers = {"lycoris": None, "peft": None} if args.no_peers else peer_versions()
    for name, version in peers.items():
        if not version:
            print(f"note: {name} is {'skipped' if args.no_peers else 'not installed'}; its columns stay empty")
    notes: list[str] = []
    unavailable: dict[str, str] = {}
    all_results: dict[str, list[Result]] = {}
    for key in shape_keys:
        shape = SHAPES[key]
        if args.tokens is not None:
            tokens = args.tokens
        elif args.quick:
            tokens = QUICK_TOKENS
        else:
            tokens = GPU_TOKENS if args.device.startswith("cuda") else shape.cpu_tokens
        rows = parse_rows(args.algos.split(","), shape.kind) if args.algos else default_rows(shape.kind)
        all_results[key] = []
        for row in rows:
            if row.algo in unavailable:
                continue
            try:
                algorithm_class(row.algo)
            except Exception as exc:
                unavailable[row.algo] = f"{type(exc).__name__}: {exc}"
                print(f"note: skipping {row.algo}: it does not import ({unavailable[row.algo]})")
                continue
            t0 = time.perf_counter()
            try:
                result = measure(row, shape, tokens, args, peers)
            except Skip as exc:
                notes.append(f"{shape.title} / {row.name}: skipped ({exc})")
                print(f"note: {notes[-1]}")
                continue
            except Exception as exc:  # an algorithm that fails here must not hide the others
                first = str(exc).splitlines()[0][:160] if str(exc) else ""
                notes.append(f"{shape.title} / {row.name}: failed ({type(exc).__name__}: {first})")
                print(f"note: {notes[-1]}")
                continue
            all_results[key].append(result)
            print(f"[{time.perf_counter() - t0:5.1f}s] {shape.title} / {row.name}: done", file=sys.stderr)
            if args.trace:
                print_trace(result, [k.strip() for k in args.trace.split(",")])
    notes += [f"{algo} was not measured: it does not import ({why})" for algo, why in unavailable.items()]
    section = report(all_results, notes, args, peers)
    print("\n".join(section))
    if args.write:
        write_section(args.write, section)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
