"""Change the rank of a LoRA/LoCon file (kohya, LyCORIS or ours) by SVD of each module's update.

Per module the *scaled* update ``ΔW = (α/r)·flat(up)·flat(down)`` (α missing or 0 means ``r``) is
decomposed exactly and cheaply: ``up = Q₁R₁``, ``downᵀ = Q₂R₂`` (QR), then the SVD of the small
``r×r`` core ``(α/r)·R₁R₂ᵀ`` gives ``ΔW``'s singular values ``σ₁ ≥ σ₂ ≥ …`` and vectors.

**New rank per mode** (LyCORIS' ``extract_locon`` definitions, on the singular values of the scaled
``ΔW``; the result is clamped to ``[1, r_max]`` with ``r_max = min(r, out, in·∏k)``, so asking for
more than the old rank keeps it, exactly):

* ``fixed``: ``param`` (an integer rank);
* ``threshold``: ``#{i : σ_i > param}`` (an absolute singular value of the scaled ΔW);
* ``ratio``: ``#{i : σ_i > param·σ₁}`` (0 < param ≤ 1);
* ``quantile``: ``#{k : C_k < param·C_n}`` with ``C_k = σ₁ + … + σ_k`` — the number of leading
  singular values whose running sum stays strictly below the fraction ``param`` of the total
  (LyCORIS' rule; e.g. σ = 4, 3, 2, 1 and param 0.7 keep 1). ``param ≥ 1`` keeps everything.

``conv_param`` (default ``param``) applies to conv modules with a kernel larger than 1×1.

**Alpha.** By default the new file has ``alpha = new rank`` (scale 1) and ``√σ`` folded into both
factors (``up = U·√Σ``, ``down = √Σ·Vᵀ``), so ``scale·up·down`` is exactly the truncated SVD of the
scaled ΔW, whatever the old α was (rs-LoRA files included: their stored α already makes α/r the
scale). With ``keep_alpha_ratio`` the old scale ``s = α/r`` is kept (``alpha = s·new rank``, as kohya's
``resize_lora.py`` does) and the factors hold the truncated SVD divided by ``s``. Alpha is a 0-d
float32 tensor and never 0.

**LoCon Tucker** (``lora_mid``): kept in Tucker form by a truncated HOSVD of the core: the output
and input factor ranks are chosen by the same rule from the singular values of ΔW's mode-1
(output) and mode-2 (input) unfoldings, and the larger of the two is used for both (``lora_mid`` is
square). HOSVD truncation is quasi-optimal, not optimal; the reported error is the true one. With
the old rank or more it is exact. ``alpha = new rank``; the magnitude sits in ``lora_mid``.

**DoRA.** ``dora_scale`` is copied unchanged. DoRA renormalises ``W0 + ΔW`` per row (or column), so
a truncated ΔW also turns the merged weight slightly; without the base weight that error cannot be
measured, so the report gives the error of ΔW only (as for plain LoRA).

**Other algorithms** (LoHa, LoKr, OFT, …) are refused, listing them, unless ``skip_other`` is set:
then they are copied unchanged (and reported with ``skipped=True``).

**Metadata** is kept; ``ss_network_dim``/``ss_network_alpha`` become the most common new (rank,
alpha) when present, ``higanbana.modules`` options get the new ``rank``/``alpha``,
``higanbana.resize`` records what was done, and ``sshs_model_hash``/``sshs_legacy_hash`` (and
``modelspec.hash_sha256`` when present) are recomputed. The output is written atomically; an
existing output is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..algorithms.files import alpha_of
from ..errors import ConfigError, HiganbanaError
from ..formats.detect import group_modules
from ..formats.metadata import model_hashes
from ..formats.reader import read_network_file
from ..formats.safetensors_io import save_tensors
from ..safeio import check_writable

MODES = ("fixed", "threshold", "ratio", "quantile")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ResizeReport:
    """What resizing did to one module. ``rel_error`` = ‖ΔW − ΔW'‖_F / ‖ΔW‖_F of the scaled update;
    ``retained`` = ‖ΔW'‖²_F / ‖ΔW‖²_F (energy kept; 1 and 0 for an all-zero module)."""

    name: str
    algo: str
    old_rank: int
    new_rank: int
    rel_error: float
    retained: float
    alpha: float | None
    tucker: bool = False
    skipped: bool = False


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``fp32``/``fp16``/``bf16`` (or ``float32``… or a torch dtype) -> torch dtype; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in DTYPES.values():
            raise ConfigError(f"dtype {value} is not one of float32, float16, bfloat16")
        return value
    aliases = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
    key = aliases.get(str(value).lower(), str(value).lower())
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {value!r} (choose fp32, fp16 or bf16)")
    return DTYPES[key]


def select_rank(sv: Tensor, mode: str, param: float, max_rank: int | None = None) -> int:
    """The rank kept from singular values ``sv`` (descending) by ``mode`` (see the module docstring)."""
    sv = sv.detach().double().flatten()
    n = int(sv.numel()) if max_rank is None else min(int(max_rank), int(sv.numel()))
    if mode == "fixed":
        if float(param) != int(param) or int(param) < 1:
            raise ConfigError(f"resize mode fixed needs a whole rank ≥ 1, got {param!r}")
        k = int(param)
    elif mode == "threshold":
        if param < 0:
            raise ConfigError(f"resize mode threshold needs a value ≥ 0, got {param!r}")
        k = int((sv > param).sum())
    elif mode == "ratio":
        if not 0 < param <= 1:
            raise ConfigError(f"resize mode ratio needs 0 < ratio ≤ 1, got {param!r}")
        k = int((sv > param * sv[0]).sum()) if n else 0
    elif mode == "quantile":
        if param <= 0:
            raise ConfigError(f"resize mode quantile needs a fraction > 0, got {param!r}")
        cum = torch.cumsum(sv, 0)
        k = n if param >= 1 else int((cum < param * cum[-1]).sum()) if n else 0
    else:
        raise ConfigError(f"unknown resize mode {mode!r} (choose from {', '.join(MODES)})")
    return max(1, min(k, n)) if n else 1


def _resize_flat(
    name: str, mod: dict[str, Tensor], mode: str, param: float, keep_ratio: bool
) -> tuple[dict[str, Tensor], ResizeReport]:
    down, up = mod["lora_down.weight"], mod["lora_up.weight"]
    r = down.shape[0]
    s = alpha_of(mod, r) / r
    q1, r1 = torch.linalg.qr(up.flatten(1).double())  # (out, m1), (m1, r)
    q2, r2 = torch.linalg.qr(down.flatten(1).double().T)  # (in·K, m2), (m2, r)
    u, sv, vh = torch.linalg.svd(s * (r1 @ r2.T), full_matrices=False)
    k = select_rank(sv, mode, param, max_rank=min(r, sv.numel()))
    total = float((sv**2).sum())
    kept = float((sv[:k] ** 2).sum())
    root = sv[:k].sqrt() if not keep_ratio else (sv[:k] / s).sqrt()
    new_up = (q1 @ u[:, :k]) * root  # (out, k)
    new_down = root[:, None] * (vh[:k] @ q2.T)  # (k, in·K)
    if total == 0:  # an all-zero module stays zero, at rank 1
        k = 1
        new_up = torch.zeros(up.shape[0], 1, dtype=torch.float64)
        new_down = torch.zeros(1, down.flatten(1).shape[1], dtype=torch.float64)
    alpha = float(k) if not keep_ratio else s * k
    out = {
        "lora_down.weight": new_down.reshape(k, *down.shape[1:]),
        "lora_up.weight": new_up.reshape(up.shape[0], k, *up.shape[2:]),
        "alpha": torch.tensor(alpha, dtype=torch.float32),
    }
    err = math.sqrt(max(total - kept, 0.0) / total) if total else 0.0
    return out, ResizeReport(name, "lora", r, k, err, kept / total if total else 1.0, alpha)


def _resize_tucker(
    name: str, mod: dict[str, Tensor], mode: str, param: float, keep_ratio: bool
) -> tuple[dict[str, Tensor], ResizeReport]:
    down, mid, up = mod["lora_down.weight"], mod["lora_mid.weight"], mod["lora_up.weight"]
    r = down.shape[0]
    s = alpha_of(mod, r) / r
    q1, r1 = torch.linalg.qr(up.flatten(1).double())  # (out, m1), (m1, r)
    q2, r2 = torch.linalg.qr(down.flatten(1).double().T)  # (in, m2), (m2, r)
    kernel = mid.shape[2:]
    core = s * torch.einsum("pa,ack,qc->pqk", r1, mid.double().flatten(2), r2)  # (m1, m2, K)
    m1, m2, kk = core.shape
    u1, s1, _ = torch.linalg.svd(core.reshape(m1, m2 * kk), full_matrices=False)
    u2, s2, _ = torch.linalg.svd(core.permute(1, 0, 2).reshape(m2, m1 * kk), full_matrices=False)
    kmax = min(r, m1, m2)
    k = max(select_rank(s1, mode, param, kmax), select_rank(s2, mode, param, kmax))
    a, b = u1[:, :k], u2[:, :k]
    new_core = torch.einsum("pa,pqk,qc->ack", a, core, b)  # (k, k, K)
    total = float((core**2).sum())
    kept = float((new_core**2).sum())
    if keep_ratio:
        new_core = new_core / s
    alpha = float(k) if not keep_ratio else s * k
    out = {
        "lora_down.weight": (q2 @ b).T.reshape(k, *down.shape[1:]),
        "lora_mid.weight": new_core.reshape(k, k, *kernel),
        "lora_up.weight": (q1 @ a).reshape(up.shape[0], k, *up.shape[2:]),
        "alpha": torch.tensor(alpha, dtype=torch.float32),
    }
    err = math.sqrt(max(total - kept, 0.0) / total) if total else 0.0
    return out, ResizeReport(name, "lora", r, k, err, kept / total if total else 1.0, alpha, tucker=True)


def resize_tensors(
    tensors: dict[str, Tensor],
    records: dict[str, dict[str, Any]],
    *,
    mode: str = "fixed",
    param: float,
    conv_param: float | None = None,
    keep_alpha_ratio: bool = False,
    skip_other: bool = False,
    dtype: torch.dtype | str | None = None,
) -> tuple[dict[str, Tensor], list[ResizeReport]]:
    """Resize ``<name>.<suffix>`` tensors in memory (see the module docstring); returns (tensors, reports).

    Factors are written in ``dtype`` (default: each module's ``lora_up`` dtype); ``alpha`` is float32.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown resize mode {mode!r} (choose from {', '.join(MODES)})")
    for label, value in (("param", param), ("conv_param", conv_param)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise ConfigError(f"resize {label} must be a finite number, got {value!r}")
    dtype = parse_dtype(dtype)
    groups = group_modules(tensors)
    algos = {n: (records.get(n) or {}).get("algo") or "?" for n in groups}
    other = sorted(
        n for n, a in algos.items() if a not in ("lora", "locon", "dora") or "lora_up.weight" not in groups[n]
    )
    if other and not skip_other:
        shown = ", ".join(f"{n} ({algos[n]})" for n in other[:8]) + (
            f" … and {len(other) - 8} more" if len(other) > 8 else ""
        )
        raise HiganbanaError(
            f"resize handles LoRA/LoCon modules only; {len(other)} module(s) are other algorithms: {shown}. "
            "Pass skip_other=True (--skip-other) to copy them unchanged"
        )
    out: dict[str, Tensor] = {}
    reports: list[ResizeReport] = []
    from tqdm.auto import tqdm

    for name, mod in tqdm(groups.items(), total=len(groups), desc="resize", unit="module", disable=len(groups) < 50):
        if name in other:
            for suffix, t in mod.items():
                cast = dtype is not None and t.is_floating_point() and suffix != "alpha"
                out[f"{name}.{suffix}"] = t.to(dtype) if cast else t
            reports.append(ResizeReport(name, algos[name], 0, 0, 0.0, 1.0, None, skipped=True))
            continue
        conv = (
            mod["lora_down.weight"].dim() > 2
            and math.prod((mod.get("lora_mid.weight", mod["lora_down.weight"])).shape[2:]) > 1
        )
        p = conv_param if (conv and conv_param is not None) else param
        fn = _resize_tucker if "lora_mid.weight" in mod else _resize_flat
        try:
            new, report = fn(name, mod, mode, p, keep_alpha_ratio)
        except ConfigError as exc:
            raise ConfigError(f"module {name}: {exc}") from exc
        target = dtype or mod["lora_up.weight"].dtype
        for suffix, t in new.items():
            out[f"{name}.{suffix}"] = t if suffix == "alpha" else t.to(target)
        for suffix, t in mod.items():  # dora_scale and anything else the module carries
            if suffix not in ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"):
                out[f"{name}.{suffix}"] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        reports.append(report)
    return out, reports


def _updated_metadata(
    metadata: dict[str, str], tensors: dict[str, Tensor], reports: list[ResizeReport], info: dict[str, Any]
) -> dict[str, str]:
    meta = dict(metadata)
    done = [r for r in reports if not r.skipped]
    if done:
        (dim, alpha), _ = Counter((r.new_rank, r.alpha) for r in done).most_common(1)[0]
        if "ss_network_dim" in meta:
            meta["ss_network_dim"] = str(int(dim))
        if "ss_network_alpha" in meta:
            meta["ss_network_alpha"] = str(float(alpha))
    if "higanbana.modules" in meta:
        records = json.loads(meta["higanbana.modules"])
        for r in done:
            opts = (records.get(r.name) or {}).get("options")
            if opts is None:
                continue
            opts["rank"] = r.new_rank
            opts["alpha"] = r.alpha / math.sqrt(r.new_rank) if opts.get("rs_lora") else r.alpha
        meta["higanbana.modules"] = json.dumps(records, sort_keys=True)
    meta["higanbana.resize"] = json.dumps(info, sort_keys=True)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hashes(tensors, meta)
    if "modelspec.hash_sha256" in meta:
        meta["modelspec.hash_sha256"] = "0x" + meta["sshs_model_hash"]
    return meta


def resize(
    path_in: str | os.PathLike,
    path_out: str | os.PathLike,
    *,
    mode: str = "fixed",
    param: float,
    conv_param: float | None = None,
    keep_alpha_ratio: bool = False,
    skip_other: bool = False,
    overwrite: bool = False,
    dtype: torch.dtype | str | None = None,
    unsafe_pickle: bool = False,
) -> list[ResizeReport]:
    """Resize every LoRA/LoCon module of ``path_in`` and write ``path_out`` atomically (module docstring)."""
    path_in, path_out = Path(path_in), Path(path_out)
    if path_out.exists() and not overwrite:
        raise HiganbanaError(f"{path_out}: exists; pass overwrite=True (--overwrite) to replace it")
    if path_out.suffix.lower() != ".safetensors":
        raise HiganbanaError(f"{path_out}: the output must be a .safetensors file")
    check_writable(path_out)
    tensors, records, metadata = read_network_file(path_in, unsafe_pickle=unsafe_pickle)
    try:
        out, reports = resize_tensors(
            tensors,
            records,
            mode=mode,
            param=param,
            conv_param=conv_param,
            keep_alpha_ratio=keep_alpha_ratio,
            skip_other=skip_other,
            dtype=dtype,
        )
    except HiganbanaError as exc:
        raise type(exc)(f"{path_in}: {exc}") from exc
    info = {"mode": mode, "param": param, "conv_param": conv_param, "keep_alpha_ratio": keep_alpha_ratio}
    info["source"] = path_in.name
    save_tensors(out, path_out, _updated_metadata(metadata, out, reports, info))
    return reports


def format_reports(reports: list[ResizeReport]) -> str:
    """A table of the reports, one module per line, plus a summary line."""
    lines = [f"{'module':<60} {'rank':>11} {'rel.err':>9} {'energy':>8}"]
    for r in reports:
        if r.skipped:
            lines.append(f"{r.name:<60} {'(' + r.algo + ', copied)':>11}")
            continue
        tag = " T" if r.tucker else ""
        lines.append(f"{r.name:<60} {f'{r.old_rank}->{r.new_rank}':>11} {r.rel_error:9.2e} {r.retained:8.4f}{tag}")
    done = [r for r in reports if not r.skipped]
    if done:
        worst = max(done, key=lambda r: r.rel_error)
        lines.append(
            f"{len(done)} module(s) resized, {len(reports) - len(done)} copied; largest relative ΔW error "
            f"{worst.rel_error:.3e} ({worst.name}); errors are of ΔW (DoRA's merged weight needs the base)"
        )
    return "\n".join(lines)
