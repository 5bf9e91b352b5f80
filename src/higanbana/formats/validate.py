"""One validation of adapter files, shared by every reader: ``info``, ``merge``, loading, ``resize``,
``convert`` and the trainer's warm start all call :func:`check_file`, so they agree on what a file is.

Checked without the model (the model's own checks follow when a module is built on its layer):

- **Metadata.** ``higanbana.modules`` is a JSON object ``{module: {"algo": str, "options": {...} | null}}``
  with known algorithms, options the algorithm takes (of the right type), one record per module
  of the file and no record without tensors; the recorded algorithm is the one the keys show.
- **Keys.** Each module holds the keys its algorithm needs, and no key it does not read (a key a
  reader would silently ignore is an error, not a warning).
- **dtypes.** Factors are floating point; only ``alpha`` and IA3's ``on_input`` may be integers.
- **Shapes.** The factors of a module fit together (inner ranks agree, ranks ≥ 1, Tucker cores
  square, OFT blocks square, BOFT blocks even with a power-of-two count, DoRA magnitudes on one
  axis, ``alpha`` a scalar) — the shape checks against the layer come when it is built.
- **Values.** Every floating tensor is finite. NaN/Inf is reported separately (``non_finite``):
  every reader refuses such a file, ``info`` describes it and says so.

``alpha`` semantics: a missing alpha, or 0, reads as the rank (scale 1), as kohya and
LyCORIS read it (ComfyUI and A1111 read it as scale 0; ``info`` says so).
"""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, HiganbanaError
from .detect import detect_algo, glora_layout, group_modules

#: keys that may be integers (or bool); every other tensor must be floating point
NON_FLOAT_KEYS = ("alpha", "on_input")
#: algorithms that may carry ``dora_scale``
DORA_ALGOS = ("lora", "loha", "lokr")


class InvalidFileError(HiganbanaError):
    """An adapter file that no reader accepts; ``problems`` lists every reason, each naming a module and key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = list(problems)
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        super().__init__(f"{source}: invalid adapter file: {problems[0]}{more}")


class _Bad(Exception):
    """One problem of one module (internal: collected into :class:`FileCheck`)."""


@dataclass
class FileCheck:
    """What :func:`check_file` found: structural problems, and modules with NaN/Inf values."""

    problems: list[str] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)

    def raise_if_invalid(self, source: str, *, allow_non_finite: bool = False) -> None:
        problems = list(self.problems)
        if self.non_finite and not allow_non_finite:
            shown = ", ".join(self.non_finite[:3]) + (
                f" … and {len(self.non_finite) - 3} more" if len(self.non_finite) > 3 else ""
            )
            problems.append(
                f"NaN/Inf values in {len(self.non_finite)} module(s) ({shown}): the file is damaged "
                "(merging or loading it would put NaN into the model)"
            )
        if problems:
            raise InvalidFileError(source, problems)


# --------------------------------------------------------------------------- metadata records
def parse_records(raw: str) -> dict[str, dict[str, Any]]:
    """``higanbana.modules`` as ``{name: {"algo": str, "options": dict | None}}``, or an error saying why not."""
    from ..algorithms import accepted_options, algorithm_class

    try:
        records = json.loads(raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise HiganbanaError(f"metadata higanbana.modules is not valid JSON ({exc})") from None
    if not isinstance(records, dict):
        raise HiganbanaError(f"metadata higanbana.modules must be a JSON object, got {type(records).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for name, record in records.items():
        where = f"metadata higanbana.modules[{name!r}]"
        if not isinstance(record, dict) or not isinstance(record.get("algo"), str):
            raise HiganbanaError(f"{where} must be an object with a string 'algo', got {record!r}")
        unknown = set(record) - {"algo", "options"}
        if unknown:
            raise HiganbanaError(f"{where} has unknown field(s) {sorted(unknown)}")
        try:
            cls = algorithm_class(record["algo"])
        except ConfigError as exc:
            raise HiganbanaError(f"{where}: {exc}") from None
        options = record.get("options")
        if options is not None:
            if not isinstance(options, dict):
                raise HiganbanaError(f"{where}.options must be an object or null, got {options!r}")
            valid = accepted_options(cls)
            for key, value in options.items():
                if key not in valid:
                    raise HiganbanaError(f"{where}.options: {cls.algo} takes no option {key!r}")
                _check_option_type(cls, key, value, f"{where}.options.{key}")
        out[name] = {"algo": record["algo"], "options": options}
    return out


def _option_types(cls: type) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass.__module__.startswith("torch"):
            continue
        try:
            hints.update(typing.get_type_hints(init))
        except Exception:  # an annotation that cannot be resolved is not checked
            continue
    return hints


def _check_option_type(cls: type, key: str, value: Any, where: str) -> None:
    hint = _option_types(cls).get(key)
    if hint is None:
        return
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return
    if isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int):
        ok = int in allowed or float in allowed
    elif isinstance(value, float):
        ok = float in allowed and math.isfinite(value)
    elif isinstance(value, str):
        ok = str in allowed or torch.dtype in allowed
    else:
        ok = False
    if not ok:
        names = " or ".join(getattr(a, "__name__", str(a)) for a in allowed)
        raise HiganbanaError(f"{where} is {value!r}; expected {names}")


# --------------------------------------------------------------------------- per-algorithm keys and shapes
def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _need(mod: Mapping[str, Tensor], *keys: str) -> list[Tensor]:
    missing = [k for k in keys if k not in mod]
    if missing:
        raise _Bad(f"missing key(s) {', '.join(repr(k) for k in missing)} (has {sorted(mod)})")
    return [mod[k] for k in keys]


def _dims(t: Tensor, key: str, low: int, high: int | None = None) -> None:
    high = low if high is None else high
    if not low <= t.dim() <= high:
        want = f"{low}" if low == high else f"{low} to {high}"
        raise _Bad(f"tensor {key!r} has shape {_shape(t)}; expected {want} dims")


def _ones(t: Tensor, key: str, start: int) -> None:
    if any(d != 1 for d in t.shape[start:]):
        raise _Bad(f"tensor {key!r} has shape {_shape(t)}; its dims after {start} must be 1")


def _same(a: int, b: int, what: str) -> None:
    if a != b:
        raise _Bad(f"{what}: {a} ≠ {b}")


def _lora(mod: Mapping[str, Tensor]) -> tuple[int, int]:
    down, up = _need(mod, "lora_down.weight", "lora_up.weight")
    _dims(down, "lora_down.weight", 2, 5)
    _dims(up, "lora_up.weight", down.dim())
    rank = down.shape[0]
    _same(up.shape[1], rank, f"lora_up.weight {_shape(up)} and lora_down.weight {_shape(down)} disagree on the rank")
    _ones(up, "lora_up.weight", 2)
    if "lora_mid.weight" in mod:
        mid = mod["lora_mid.weight"]
        _dims(mid, "lora_mid.weight", down.dim())
        if _shape(mid)[:2] != (rank, rank):
            raise _Bad(f"tensor 'lora_mid.weight' has shape {_shape(mid)}; expected ({rank}, {rank}, *kernel)")
        _ones(down, "lora_down.weight", 2)
    return up.shape[0], down.shape[1]


def _loha(mod: Mapping[str, Tensor]) -> tuple[int, int | None]:
    w1a, w1b, w2a, w2b = _need(mod, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if ("hada_t1" in mod) != ("hada_t2" in mod):
        raise _Bad("a Tucker LoHa needs both 'hada_t1' and 'hada_t2'")
    for key, t in zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), (w1a, w1b, w2a, w2b), strict=True):
        _dims(t, key, 2)
    rank = w1b.shape[0]
    if "hada_t1" in mod:  # t (r, r, *k), w_a (r, out), w_b (r, in)
        for j, (wa, wb) in ((1, (w1a, w1b)), (2, (w2a, w2b))):
            t = mod[f"hada_t{j}"]
            _dims(t, f"hada_t{j}", 3, 5)
            if _shape(t)[:2] != (rank, rank) or wa.shape[0] != rank or wb.shape[0] != rank:
                raise _Bad(
                    f"Tucker LoHa branch {j}: hada_t{j} {_shape(t)}, hada_w{j}_a {_shape(wa)}, hada_w{j}_b "
                    f"{_shape(wb)} do not share the rank {rank}"
                )
        _same(w1a.shape[1], w2a.shape[1], "hada_w1_a and hada_w2_a disagree on the output channels")
        _same(w1b.shape[1], w2b.shape[1], "hada_w1_b and hada_w2_b disagree on the input channels")
        return w1a.shape[1], w1b.shape[1]
    _same(w1a.shape[1], rank, f"hada_w1_a {_shape(w1a)} and hada_w1_b {_shape(w1b)} disagree on the rank")
    _same(w2a.shape[1], w2b.shape[0], f"hada_w2_a {_shape(w2a)} and hada_w2_b {_shape(w2b)} disagree on the rank")
    _same(w2b.shape[0], rank, "the two Hadamard branches have different ranks")
    _same(w1a.shape[0], w2a.shape[0], "hada_w1_a and hada_w2_a disagree on the output channels")
    _same(w1b.shape[1], w2b.shape[1], "hada_w1_b and hada_w2_b disagree on the input width")
    return w1a.shape[0], None


def _lokr(mod: Mapping[str, Tensor]) -> tuple[int, int | None]:
    if ("lokr_w1" in mod) == ("lokr_w1_a" in mod or "lokr_w1_b" in mod):
        raise _Bad("LoKr needs either 'lokr_w1' or both 'lokr_w1_a' and 'lokr_w1_b'")
    if ("lokr_w2" in mod) == ("lokr_w2_a" in mod or "lokr_w2_b" in mod):
        raise _Bad("LoKr needs either 'lokr_w2' or both 'lokr_w2_a' and 'lokr_w2_b'")
    ranks = set()
    if "lokr_w1" in mod:
        w1 = mod["lokr_w1"]
        _dims(w1, "lokr_w1", 2)
        u1, v1 = w1.shape
    else:
        a, b = _need(mod, "lokr_w1_a", "lokr_w1_b")
        _dims(a, "lokr_w1_a", 2)
        _dims(b, "lokr_w1_b", 2)
        _same(a.shape[1], b.shape[0], f"lokr_w1_a {_shape(a)} and lokr_w1_b {_shape(b)} disagree on the rank")
        (u1, _), v1 = a.shape, b.shape[1]
        ranks.add(b.shape[0])
    if "lokr_t2" in mod and "lokr_w2" in mod:
        raise _Bad("'lokr_t2' (Tucker) goes with 'lokr_w2_a'/'lokr_w2_b', not 'lokr_w2'")
    if "lokr_w2" in mod:
        w2 = mod["lokr_w2"]
        _dims(w2, "lokr_w2", 2, 5)
        u2 = w2.shape[0]
    else:
        a, b = _need(mod, "lokr_w2_a", "lokr_w2_b")
        _dims(a, "lokr_w2_a", 2)
        _dims(b, "lokr_w2_b", 2)
        if "lokr_t2" in mod:  # t2 (r, r, *k), w2_a (r, u2), w2_b (r, v2)
            t2 = mod["lokr_t2"]
            _dims(t2, "lokr_t2", 3, 5)
            r = t2.shape[0]
            if t2.shape[1] != r or a.shape[0] != r or b.shape[0] != r:
                raise _Bad(f"lokr_t2 {_shape(t2)}, lokr_w2_a {_shape(a)}, lokr_w2_b {_shape(b)} do not share a rank")
            u2 = a.shape[1]
        else:
            _same(a.shape[1], b.shape[0], f"lokr_w2_a {_shape(a)} and lokr_w2_b {_shape(b)} disagree on the rank")
            u2, r = a.shape
        ranks.add(r)
    if len(ranks) > 1:
        raise _Bad(f"w1 and w2 are factored with different ranks {sorted(ranks)}")
    if min(u1, v1, u2) < 1 or (ranks and min(ranks) < 1):
        raise _Bad("a LoKr factor has an empty dimension")
    return u1 * u2, None


def _ia3(mod: Mapping[str, Tensor]) -> tuple[int | None, int | None]:
    (weight,) = _need(mod, "weight")
    if weight.dim() == 0 or sum(d != 1 for d in weight.shape) > 1:
        raise _Bad(f"tensor 'weight' has shape {_shape(weight)}; expected (C,) or (1, C, 1..)")
    if "on_input" in mod:
        flag = mod["on_input"]
        if flag.numel() != 1 or float(flag.reshape(-1)[0]) not in (0.0, 1.0):
            raise _Bad(f"tensor 'on_input' must be one value 0 or 1, got {flag.tolist()!r}")
    return None, None


def _glora(mod: Mapping[str, Tensor]) -> tuple[int | None, int | None]:
    a1, a2, b1, b2 = _need(mod, "a1.weight", "a2.weight", "b1.weight", "b2.weight")
    for key, t in zip(("a1.weight", "a2.weight", "b1.weight", "b2.weight"), (a1, a2, b1, b2), strict=True):
        _dims(t, key, 2, 5)
    try:
        layout = glora_layout(mod)
    except HiganbanaError as exc:
        raise _Bad(str(exc)) from None
    rank = a1.shape[1] if layout == "new" else a1.shape[0]
    if rank < 1:
        raise _Bad("GLoRA rank 0")
    return (b1.shape[0] if layout == "new" else b2.shape[0]), None


def _oft(mod: Mapping[str, Tensor], stages: bool) -> tuple[int, None]:
    from ..algorithms.factorize import is_power_of_two

    (blocks,) = _need(mod, "oft_blocks")
    _dims(blocks, "oft_blocks", 4 if stages else 3)
    shape = _shape(blocks)
    m, n, b = (shape[0], shape[1], shape[2]) if stages else (1, shape[0], shape[1])
    if shape[-1] != shape[-2] or min(m, n, b) < 1:
        raise _Bad(f"tensor 'oft_blocks' has shape {shape}; expected {'(M, n, b, b)' if stages else '(n, b, b)'}")
    if stages and (b % 2 or not is_power_of_two(n) or m > n.bit_length()):
        raise _Bad(f"tensor 'oft_blocks' has shape {shape}: BOFT needs b even, n a power of two and M ≤ log2(n)+1")
    if "rescale" in mod:
        rescale = mod["rescale"]
        if rescale.dim() < 1 or rescale.shape[0] != n * b or rescale.numel() != n * b:
            raise _Bad(f"tensor 'rescale' has shape {_shape(rescale)}; expected ({n * b}, 1..)")
    return n * b, None


def _full(mod: Mapping[str, Tensor]) -> tuple[int, int]:
    (diff,) = _need(mod, "diff")
    _dims(diff, "diff", 2, 5)
    if "diff_b" in mod and _shape(mod["diff_b"]) != (diff.shape[0],):
        raise _Bad(f"tensor 'diff_b' has shape {_shape(mod['diff_b'])}; expected ({diff.shape[0]},)")
    return diff.shape[0], diff.shape[1]


def _norm(mod: Mapping[str, Tensor]) -> tuple[None, None]:
    (w,) = _need(mod, "w_norm")
    _dims(w, "w_norm", 1)
    if "b_norm" in mod and _shape(mod["b_norm"]) != _shape(w):
        raise _Bad(f"tensor 'b_norm' has shape {_shape(mod['b_norm'])}; expected {_shape(w)} like 'w_norm'")
    return None, None


#: per algorithm: the keys a module may hold, and the check of their shapes → (out, in) where known
ALGO_KEYS: dict[str, tuple[frozenset[str], Any]] = {
    "lora": (frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale"}), _lora),
    "loha": (
        frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"}),
        _loha,
    ),
    "lokr": (
        frozenset(
            {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"}
        ),
        _lokr,
    ),
    "ia3": (frozenset({"weight", "on_input"}), _ia3),
    "glora": (frozenset({"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}), _glora),
    "oft": (frozenset({"oft_blocks", "alpha", "rescale"}), lambda m: _oft(m, stages=False)),
    "boft": (frozenset({"oft_blocks", "alpha", "rescale"}), lambda m: _oft(m, stages=True)),
    "full": (frozenset({"diff", "diff_b"}), _full),
    "norm": (frozenset({"w_norm", "b_norm"}), _norm),
}


def _check_dora(scale: Tensor, out: int | None, inp: int | None) -> None:
    shape = _shape(scale)
    if len(shape) < 2:
        raise _Bad(f"tensor 'dora_scale' has shape {shape}; expected (out, 1, ..) or (1, in, 1..)")
    output = shape[1] == 1 and all(d == 1 for d in shape[2:]) and (out is None or shape[0] == out)
    inputs = shape[0] == 1 and all(d == 1 for d in shape[2:]) and (inp is None or shape[1] == inp)
    if not (output or inputs):
        expected = f"({out if out is not None else 'out'}, 1, ..) or (1, {inp if inp is not None else 'in'}, 1..)"
        raise _Bad(f"tensor 'dora_scale' has shape {shape}; expected {expected}")


def _check_flags(algo: str, mod: Mapping[str, Tensor], options: Mapping[str, Any] | None) -> None:
    """Options of our records that decide which keys a module holds agree with its keys (an option
    left out has its default, false): a key the options do not build would be silently ignored."""
    if options is None:  # a foreign file: the options are derived from the keys
        return
    pairs = [("weight_decompose", "dora_scale")] if algo in DORA_ALGOS else []
    if algo == "lora":
        pairs.append(("use_tucker", "lora_mid.weight"))
    elif algo == "loha":
        pairs.append(("use_tucker", "hada_t1"))
    elif algo in ("oft", "boft"):
        pairs.append(("rescaled", "rescale"))
    for option, key in pairs:
        value = bool(options.get(option, False))
        if value != (key in mod):
            raise _Bad(f"options say {option}={value} but the module {'has' if key in mod else 'has no'} {key!r}")


def _canonical(algo: str) -> str:
    from ..algorithms import algorithm_class

    return algorithm_class(algo).algo


def check_module(name: str, algo: str, mod: Mapping[str, Tensor], options: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`HiganbanaError` naming the module and key when its tensors cannot be the algorithm's."""
    try:
        _check_module(algo, mod, options)
    except _Bad as exc:
        raise HiganbanaError(f"module {name}: {exc}") from None


def _check_module(algo: str, mod: Mapping[str, Tensor], options: Mapping[str, Any] | None) -> None:
    algo = _canonical(algo)
    allowed, check = ALGO_KEYS[algo]
    unknown = sorted(set(mod) - allowed)
    if unknown:
        raise _Bad(f"unexpected key(s) {', '.join(repr(k) for k in unknown)} for {algo} (no reader would use them)")
    if "dora_scale" in mod and algo not in DORA_ALGOS:
        raise _Bad(f"'dora_scale' on {algo}")
    for key, t in mod.items():
        if key in NON_FLOAT_KEYS:
            if t.is_complex():
                raise _Bad(f"tensor {key!r} has dtype {t.dtype}; expected a real number")
            if key == "alpha" and t.numel() != 1:
                raise _Bad(f"tensor 'alpha' has shape {_shape(t)}; expected one value (a scalar)")
            continue
        if not t.is_floating_point():
            raise _Bad(
                f"tensor {key!r} has dtype {str(t.dtype).replace('torch.', '')}; adapter factors are floating point"
            )
        if t.numel() == 0:
            raise _Bad(f"tensor {key!r} is empty (shape {_shape(t)})")
    out, inp = check(mod)
    if "dora_scale" in mod:
        _check_dora(mod["dora_scale"], out, inp)
    _check_flags(algo, mod, options)


def non_finite_modules(tensors: Mapping[str, Tensor]) -> list[str]:
    """Modules (``<name>`` of ``<name>.<suffix>``) holding a NaN or Inf value, sorted."""
    bad = set()
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.add(key.partition(".")[0])
    return sorted(bad)


def check_file(tensors: Mapping[str, Tensor], records: Mapping[str, Mapping[str, Any]]) -> FileCheck:
    """Every problem of a file's ``<module>.<suffix>`` tensors and their records (see the module docstring)."""
    result = FileCheck()
    try:
        groups = group_modules(tensors)
    except HiganbanaError as exc:
        result.problems.append(str(exc))
        return result
    for name in sorted(set(records) - set(groups)):
        result.problems.append(f"module {name}: recorded in higanbana.modules but the file has no tensors for it")
    for name, mod in groups.items():
        record = records.get(name)
        if record is None:
            result.problems.append(f"module {name}: has tensors but no record in higanbana.modules")
            continue
        try:
            detected = detect_algo(name, mod)
            if _canonical(record["algo"]) != detected:
                raise _Bad(f"recorded as {record['algo']!r} but its keys are {detected}'s ({sorted(mod)})")
            _check_module(record["algo"], mod, record.get("options"))
        except _Bad as exc:
            result.problems.append(f"module {name}: {exc}")
        except HiganbanaError as exc:
            text = str(exc)
            result.problems.append(text if text.startswith("module ") else f"module {name}: {text}")
    result.non_finite = non_finite_modules(tensors)
    return result
