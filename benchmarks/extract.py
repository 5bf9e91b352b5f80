#!/usr/bin/env python
"""LoRA extraction benchmark on a randomly initialised SD1.5-shaped UNet (issue 4).

The UNet is ``diffusers.UNet2DConditionModel`` with the real SD1.5 config, built on the meta
device (no download, no 860M-parameter init); only the selected Linear / Conv2d layers are
materialised with PyTorch's default init. For each one, ``tuned = base + L + N`` with ``L`` a
random rank-8 update (‖L‖ = 5 % of ‖W‖) and ``N`` i.i.d. noise (‖N‖ = 10 % of ‖L‖).

It times the factorisation of ``ΔW = tuned − base`` per module (the subtraction, the error check
and file IO are not timed) for

- ``exact``: our :func:`~higanbana.tools.extract.extract_module`, full thin SVD, fixed rank;
- ``randomized``: the same with ``torch.svd_lowrank`` (oversample 8, niter 2);
- ``lycoris``: lycoris-lora's ``lycoris.utils.extract_linear`` / ``extract_conv`` (what its
  ``extract_diff`` / ``extract_locon.py --disable_cp`` calls per layer), run with
  ``/work/main/.venv-bench/bin/python`` (or ``--lycoris-python``) in a subprocess on the same saved
  weights; skipped with a note when it cannot run.

Layer selection: ``--layers shapes`` (default) takes one module per distinct weight shape (40 of
the 282 Linear/Conv2d modules) and weighs each by how many modules of the UNet share its shape, so
the totals are the full UNet's, extrapolated; ``--layers all`` runs all 282 (about 4× longer);
``--quick`` takes 4 small shapes as a smoke test.

Run: ``python benchmarks/extract.py --quick``; ``python benchmarks/extract.py --write docs/benchmarks.md``
(replaces the part between ``<!-- extract:start -->`` and ``<!-- extract:end -->``, appending the
section ``## Extraction (issue 4)`` when it is missing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from higanbana.tools.extract import extract_module, reconstruct

MARK_START = "<!-- extract:start -->"
MARK_END = "<!-- extract:end -->"
SECTION = "## Extraction (issue 4)"
LYCORIS_PYTHON = "/work/main/.venv-bench/bin/python"
TRUE_RANK = 8

SD15 = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}

LYCORIS_SCRIPT = r"""
import json, sys, time, torch
from safetensors.torch import load_file
from lycoris.utils import extract_conv, extract_linear
torch.set_num_threads(int(sys.argv[3]))
torch.linalg.svd(torch.randn(64, 256))  # warm-up: the first LAPACK call pays a one-time setup
sd = load_file(sys.argv[1]); rank = int(sys.argv[2]); out = []
names = sorted({k.rsplit(".", 1)[0] for k in sd})
for name in names:
    base, tuned = sd[name + ".base"], sd[name + ".tuned"]
    diff = tuned - base
    t0 = time.perf_counter()
    if diff.dim() == 2:
        res, kind = extract_linear(diff, "fixed", rank)
    else:
        res, kind = extract_conv(diff, "fixed", rank)
    sec = time.perf_counter() - t0
    if kind == "low rank":
        a, b, _ = res
        approx = (b.flatten(1) @ a.flatten(1)).reshape(diff.shape)
        err = float((approx - diff).norm() / diff.norm())
    else:
        err = 0.0
    out.append({"name": name, "seconds": sec, "rel_error": err, "kind": kind})
print(json.dumps(out))
"""


@dataclass
class Layer:
    name: str  # kohya name
    base: torch.Tensor
    tuned: torch.Tensor
    weight: int  # modules of the full UNet this one stands for


@dataclass
class Result:
    method: str
    rank: int
    seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)


def kohya_name(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def build_layers(selection: str, seed: int) -> tuple[list[Layer], int]:
    """The selected layers of a meta-built SD1.5 UNet, materialised, with their tuned weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15)
    modules = [(n, m) for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    counts = Counter(tuple(m.weight.shape) for _, m in modules)
    if selection == "all":
        chosen = [(n, m, 1) for n, m in modules]
    else:
        seen: set[tuple[int, ...]] = set()
        chosen = []
        for n, m in modules:
            shape = tuple(m.weight.shape)
            if shape not in seen:
                seen.add(shape)
                chosen.append((n, m, counts[shape]))
        if selection == "quick":
            small = [(320, 320), (320, 768), (320, 320, 3, 3), (1280, 1280)]
            chosen = [c for c in chosen if tuple(c[1].weight.shape) in small]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers = []
    for n, m, weight in chosen:
        m.to_empty(device="cpu")
        m.reset_parameters()  # PyTorch's default init, as diffusers leaves it
        w = m.weight.detach()
        out_f, rest = w.shape[0], w[0].numel()
        low = torch.randn(out_f, TRUE_RANK, generator=g) @ torch.randn(TRUE_RANK, rest, generator=g)
        low = low * (0.05 * w.norm() / low.norm())
        noise = torch.randn(out_f, rest, generator=g)
        noise = noise * (0.1 * low.norm() / noise.norm())
        tuned = w + (low + noise).reshape(w.shape)
        layers.append(Layer(kohya_name(n), w.clone(), tuned, weight))
        m.to("meta")
    return layers, len(modules)


def run_ours(layers: list[Layer], ranks: list[int], oversample: int, niter: int, repeats: int) -> list[Result]:
    """exact and randomized at each rank; per layer the methods run back to back (so a busy
    machine slows them alike) and the fastest of ``repeats`` timings is kept."""
    results = {(m, r): Result(m, r) for r in ranks for m in ("exact", "randomized")}
    for layer in layers:
        diff = layer.tuned - layer.base
        for (method, rank), res in results.items():
            best = math.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                tensors, rep = extract_module(
                    diff,
                    mode="fixed",
                    linear_param=rank,
                    conv_param=rank,
                    randomized=method == "randomized",
                    oversample=oversample,
                    niter=niter,
                    measure_error=False,
                )
                best = min(best, time.perf_counter() - t0)
            res.seconds[layer.name] = best
            approx = reconstruct(tensors, tuple(diff.shape))
            res.errors[layer.name] = float((approx - diff).norm() / diff.norm())
            res.kinds[layer.name] = rep.kind
    return list(results.values())


def run_lycoris(layers: list[Layer], rank: int, python: str, threads: int, timeout: float) -> Result | str:
    """LyCORIS' per-layer extraction in a subprocess; a note (str) when it cannot run."""
    if not Path(python).exists():
        return f"lycoris skipped: {python} not found"
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pairs.safetensors")
        sd = {}
        for layer in layers:
            sd[layer.name + ".base"] = layer.base.contiguous()
            sd[layer.name + ".tuned"] = layer.tuned.contiguous()
        save_file(sd, path)
        try:
            proc = subprocess.run(
                [python, "-c", LYCORIS_SCRIPT, path, str(rank), str(threads)],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return f"lycoris skipped: no result within {timeout:.0f} s"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return f"lycoris skipped: it failed ({tail[0][:200]})"
    res = Result("lycoris", rank)
    for row in json.loads(proc.stdout.strip().splitlines()[-1]):
        res.seconds[row["name"]] = row["seconds"]
        res.errors[row["name"]] = row["rel_error"]
        res.kinds[row["name"]] = "lora" if row["kind"] == "low rank" else "full"
    return res


def lycoris_version(python: str) -> str:
    try:
        out = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('lycoris-lora'))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip() or "?"
    except Exception:
        return "?"


def summarize(res: Result, layers: list[Layer]) -> dict[str, float]:
    """Totals weighted to the full UNet: seconds, mean/max relative error over low-rank modules."""
    total = sum(res.seconds[ly.name] * ly.weight for ly in layers)
    low = [ly for ly in layers if res.kinds[ly.name] == "lora"]
    n = sum(ly.weight for ly in low)
    mean = sum(res.errors[ly.name] * ly.weight for ly in low) / max(n, 1)
    worst = max((res.errors[ly.name] for ly in low), default=0.0)
    full = sum(ly.weight for ly in layers if res.kinds[ly.name] == "full")
    return {"seconds": total, "mean": mean, "max": worst, "full": full, "lora": n}


def render(layers, n_modules, results, notes, args, elapsed) -> str:
    weight = sum(ly.weight for ly in layers)
    sel = {
        "shapes": f"one module per distinct shape ({len(layers)} of {n_modules}), weighted to all {weight}",
        "all": f"all {len(layers)} Linear/Conv2d modules",
        "quick": f"{len(layers)} small shapes only (smoke test), weighted by their counts ({weight} modules)",
    }[args.layers]
    lines = [
        f"Run {dt.date.today().isoformat()} on {platform.machine()} / {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.platform()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, float32.",
        f"Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}` ({elapsed:.0f} s).",
        "",
        f"SD1.5 UNet (`UNet2DConditionModel`, SD1.5 config, random init). Layers: {sel}. "
        f"ΔW = rank-{TRUE_RANK} update (5 % of ‖W‖) + i.i.d. noise (10 % of the update). "
        f"Time = factorising ΔW (fastest of {1 if args.quick else args.repeats} for ours, one for lycoris), summed "
        "over the UNet (per-shape time × modules of that shape); "
        "error = ‖ΔŴ − ΔW‖_F / ‖ΔW‖_F over the low-rank modules (mean weighted the same way, max over "
        "the measured ones). Modules that fall back to `diff` (rank ≥ half the full rank) have no "
        "error and are counted apart.",
        "",
        "| method | rank | time (s) | speed-up vs exact | mean error | max error | mean error / exact | full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    exact = {r.rank: summarize(r, layers) for r in results if r.method == "exact"}
    verdicts = []
    for r in results:
        s = summarize(r, layers)
        ref = exact.get(r.rank)
        speed = ref["seconds"] / s["seconds"] if ref and s["seconds"] > 0 else math.nan
        ratio = s["mean"] / ref["mean"] if ref and ref["mean"] > 0 else math.nan
        label = r.method
        if r.method == "randomized":
            label += f" (q = r+{args.oversample}, niter {args.niter})"
        lines.append(
            f"| {label} | {r.rank} | {s['seconds']:.2f} | {speed:.1f}× | {s['mean']:.4f} | {s['max']:.4f} "
            f"| {ratio:.4f} | {s['full']} |"
        )
        if r.method == "randomized" and ref:
            ex = next(x for x in results if x.method == "exact" and x.rank == r.rank)
            worst = max(
                (r.errors[ly.name] / ex.errors[ly.name] for ly in layers if r.kinds[ly.name] == "lora"), default=1.0
            )
            met = speed >= 5 and ratio <= 1.01
            strict = "" if worst <= 1.01 else f"; per module it is not: worst {(worst - 1) * 100:+.2f} %"
            verdicts.append(
                f"- rank {r.rank}: randomized is {speed:.1f}× faster than exact with mean error "
                f"{(ratio - 1) * 100:+.2f} % (worst module {(worst - 1) * 100:+.2f} %): goal "
                f"(≥ 5× at ≤ 1 % mean error) **{'met' if met else 'not met'}**{strict}."
            )
        if r.method == "lycoris" and ref:
            ex = next(x for x in results if x.method == "exact" and x.rank == r.rank)
            odd = [
                f"`{ly.name}` {tuple(ly.base.shape)}: {r.errors[ly.name]:.3f} vs {ex.errors[ly.name]:.3f}"
                for ly in layers
                if r.kinds[ly.name] == "lora" and r.errors[ly.name] > 1.5 * ex.errors[ly.name]
            ]
            if odd:
                verdicts.append(
                    "- lycoris clips the rank to min(out, in) (not in·∏k), so these convs get a smaller rank "
                    "and a larger error: " + "; ".join(odd) + "."
                )
    lines.append("")
    lines.extend(verdicts)
    lines.extend(f"- {n}" for n in notes)
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else ""
    block = f"{MARK_START}\n{body}\n{MARK_END}"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        _, tail = rest.split(MARK_END, 1)
        text = head + block + tail
    else:
        intro = (
            f"\n{SECTION}\n\n"
            "`benchmarks/extract.py`: `higanbana.tools.extract` on the weight differences of an SD1.5-shaped "
            "UNet — exact thin SVD against `torch.svd_lowrank` at a fixed rank, and lycoris-lora's per-layer "
            "extraction (`extract_linear`/`extract_conv`, i.e. `extract_locon.py --disable_cp`) on the same "
            "weights. Regenerate with `python benchmarks/extract.py --write docs/benchmarks.md`.\n\n"
        )
        text = text.rstrip("\n") + "\n" + intro + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="4 small layers only (smoke test)")
    p.add_argument("--layers", choices=("shapes", "all"), default="shapes")
    p.add_argument("--ranks", default="16,32", help="fixed ranks, comma-separated (default 16,32)")
    p.add_argument("--oversample", type=int, default=8)
    p.add_argument("--niter", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timings per layer and method, the fastest kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lycoris-python", default=LYCORIS_PYTHON)
    p.add_argument("--lycoris-rank", type=int, default=16, help="rank for the lycoris run (0: skip it)")
    p.add_argument("--lycoris-timeout", type=float, default=400.0)
    p.add_argument("--write", type=Path, help="update this markdown file (docs/benchmarks.md)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers = "quick"
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    warm = torch.randn(64, 256)  # warm-up: the first LAPACK / svd_lowrank calls pay a one-time setup
    torch.linalg.svd(warm, full_matrices=False)
    torch.svd_lowrank(warm, q=8, niter=2)
    layers, n_modules = build_layers(args.layers, args.seed)
    print(f"{len(layers)} layers (standing for {sum(ly.weight for ly in layers)} of {n_modules})", flush=True)
    results: list[Result] = []
    notes: list[str] = []
    ranks = [int(r) for r in args.ranks.split(",")]
    for res in run_ours(layers, ranks, args.oversample, args.niter, 1 if args.quick else args.repeats):
        print(f"{res.method} r{res.rank}: {summarize(res, layers)}", flush=True)
        results.append(res)
    if args.lycoris_rank > 0:
        res = run_lycoris(layers, args.lycoris_rank, args.lycoris_python, args.threads, args.lycoris_timeout)
        if isinstance(res, str):
            notes.append(res)
            print(res, flush=True)
        else:
            version = lycoris_version(args.lycoris_python)
            notes.append(
                f"lycoris = lycoris-lora {version} `extract_linear`/`extract_conv` in "
                f"`{args.lycoris_python}` (float32 factors, before its fp16 cast; full `linalg.svd` "
                "with `full_matrices=True` on the wide orientation)."
            )
            print(f"lycoris r{res.rank}: {summarize(res, layers)}", flush=True)
            results.append(res)
    body = render(layers, n_modules, results, notes, args, time.perf_counter() - t_start)
    print()
    print(body)
    if args.write:
        write_section(args.write, body)
        print(f"\nwrote {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
