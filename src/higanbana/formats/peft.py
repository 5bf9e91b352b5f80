"""Export to Hugging Face PEFT (``adapter_config.json`` + ``adapter_model.safetensors``) and diffusers naming.

Only exact mappings are written (interop.md E, F.7): LoRA/LoCon without ``lora_mid``, output-axis
DoRA, LoHa (Tucker as ``use_effective_conv2d``) and LoKr. PEFT's scale is always ``α/r`` with its
own ``r`` per module, so each module's ``r``/``alpha`` are chosen to give our scale and PEFT's
shapes; anything PEFT would build with other shapes, or compute differently, is an error.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import HiganbanaError
from ..safeio import atomic_folder
from .detect import detect_algo, dora_axis, group_modules
from .safetensors_io import save_tensors

TARGETS = {"peft": "base_model.model.", "diffusers-unet": "unet."}
PEFT_TYPES = {"lora": "LORA", "loha": "LOHA", "lokr": "LOKR"}

PEFT_REFUSALS = {
    "oft": "PEFT's OFT rotates the layer's input features (W·Rᵀ) with its own parametrisation; ours rotates "
    "output rows, so the tensors cannot be carried over",
    "boft": "PEFT's BOFT acts on the input side with its own butterfly parametrisation; ours rotates output rows",
    "glora": "PEFT's GLoRA is element-wise (W0 + W0⊙A + B); ours is the matrix product W0·a1·a2 + b1·b2",
    "ia3": "PEFT's IA3 stores l = 1 + w and, for output scaling, also multiplies the bias by l (ours leaves the "
    "bias unchanged), so the results differ for layers with a bias",
    "full": "PEFT has no full weight-difference adapter",
    "norm": "PEFT has no LayerNorm/GroupNorm difference adapter",
}


def _alpha(mod: Mapping[str, Tensor], rank: int) -> float:
    """Our file α (``α/r`` is the scale, rs-LoRA folded in); missing or 0 means ``r``."""
    a = float(mod["alpha"]) if "alpha" in mod else 0.0
    return float(rank) if a == 0 else a


def peft_factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's LoKr ``factorization``: like ours, but a positive dividing factor is returned unsorted."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    bound = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:
        new_m = m + 1
        while dim % new_m:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > m + n or new_m > bound:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _peft_factor(splits: set[tuple[int, int, tuple[int, int], tuple[int, int]]]) -> int:
    """A ``decompose_factor`` with which PEFT splits every (out, in) pair like our tensors do."""
    dims = {d for out, inp, _, _ in splits for d in (out, inp)}
    marks = {x for d in dims for x in range(1, d + 1) if d % x == 0}
    for f in [-1, *sorted(marks | {x + 1 for x in marks})]:
        if all(peft_factorization(out, f) == u and peft_factorization(inp, f) == v for out, inp, u, v in splits):
            return f
    shown = "; ".join(f"out {o} = {u[0]}·{u[1]}, in {i} = {v[0]}·{v[1]}" for o, i, u, v in sorted(splits))
    raise HiganbanaError(
        f"lokr: no PEFT decompose_factor reproduces the Kronecker splits ({shown}); "
        "a conv LoKr with a factored, non-Tucker w2 needs the layer shapes (to_peft(..., shapes=...))"
    )


def _lokr_plan(name: str, mod: Mapping[str, Tensor], rank_hint: int | None) -> dict[str, Any]:
    """Block shapes, factored sides, rank and our scale of one LoKr module (``v2`` is None while unknown)."""
    w1_full, w2_full, tucker = "lokr_w1" in mod, "lokr_w2" in mod, "lokr_t2" in mod
    u1, v1 = mod["lokr_w1"].shape[:2] if w1_full else (mod["lokr_w1_a"].shape[0], mod["lokr_w1_b"].shape[1])
    ranks = set() if w1_full else {mod["lokr_w1_a"].shape[1]}
    v2 = None  # a factored, non-Tucker w2_b is (r, v2·∏k): the kernel comes from the layer shape
    if w2_full:
        u2, v2 = mod["lokr_w2"].shape[:2]
    elif tucker:  # w2_a (r, u2), w2_b (r, v2)
        u2, v2 = mod["lokr_w2_a"].shape[1], mod["lokr_w2_b"].shape[1]
        ranks.add(mod["lokr_w2_a"].shape[0])
    else:
        u2 = mod["lokr_w2_a"].shape[0]
        ranks.add(mod["lokr_w2_a"].shape[1])
    if len(ranks) > 1:
        raise HiganbanaError(f"module {name!r}: lokr factors of different ranks {sorted(ranks)}")
    rank = ranks.pop() if ranks else None
    factored = not (w1_full and w2_full)
    return {
        "u": (int(u1), int(u2)),
        "v1": int(v1),
        "v2": None if v2 is None else int(v2),
        "w1_full": w1_full,
        "w2_full": w2_full,
        "tucker": tucker,
        "rank": rank if rank is not None else rank_hint,
        "scale": _alpha(mod, rank) / rank if factored else 1.0,
    }


def _check_one_algo(algos: Mapping[str, str]) -> str:
    kinds = sorted(set(algos.values()))
    if len(kinds) > 1:
        examples = ", ".join(f"{a}: {next(n for n, x in algos.items() if x == a)!r}" for a in kinds)
        raise HiganbanaError(f"PEFT holds one adapter type per config, but this file mixes {examples}")
    algo = kinds[0]
    if algo not in PEFT_TYPES:
        raise HiganbanaError(f"{algo} cannot be exported to PEFT: {PEFT_REFUSALS.get(algo, 'no PEFT equivalent')}")
    return algo


def _patterns(values: Mapping[str, float], default: float) -> dict[str, float]:
    """PEFT ``*_pattern`` entries for modules that differ from ``default``.

    Keys are the escaped paths, longest first: PEFT matches ``(.*\\.)?(key)$`` with the key as a regex
    and takes the first hit, so ``1.0`` must come before ``0``.
    """
    diff = {p: v for p, v in values.items() if v != default}
    return {re.escape(p): diff[p] for p in sorted(diff, key=lambda p: (-len(p), p))}


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def to_peft(
    tensors: Mapping[str, Tensor],
    records: Mapping[str, dict],
    paths: Mapping[str, str],
    *,
    target: str = "peft",
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[dict, dict[str, Tensor]]:
    """Our ``<name>.<suffix>`` tensors -> (PEFT ``adapter_config`` dict, PEFT-keyed tensors).

    ``records[name]`` is ``{"algo", "options"}`` (as ``module_records()``), ``paths[name]`` the module's
    path in the model. ``target="peft"`` writes ``base_model.model.<path>.…`` keys (PeftModel), and
    ``"diffusers-unet"`` ``unet.<path>.…`` (diffusers' ``pytorch_lora_weights`` layout; LoRA, and LoKr
    which diffusers ≥ 0.42 reads into a LoKrConfig; not LoHa). Per-module ranks and α go to ``rank_pattern`` /
    ``alpha_pattern``. Decisions: our α already includes rs-LoRA (``α/r`` is the scale), so
    ``use_rslora`` is always false; DoRA's magnitude is written as PEFT saves it, ``(out,)`` for
    Linear and ``(1, out, 1, ..)`` for convs; LoKr modules with both blocks full (our scale 1) get
    ``alpha = r``. ``shapes[name]`` (the base weight's shape) matters only for conv LoKr whose
    ``w2`` is factored without Tucker (``lokr_w2_b`` flattens the kernel, so the split of the input
    channels is not in the tensors); without it a Linear layer is assumed, and a wrong guess shows up
    as an error here or as PEFT's size-mismatch error on load, never as a silently different weight.
    """
    if target not in TARGETS:
        raise HiganbanaError(f"unknown PEFT export target {target!r} (choose from {sorted(TARGETS)})")
    groups = group_modules(tensors)
    if not groups:
        raise HiganbanaError("nothing to export: no tensors")
    missing = sorted(n for n in groups if n not in paths)
    if missing:
        raise HiganbanaError(f"no module path for {missing[:3]} (every module needs its path in the model)")
    algos = {n: (records.get(n) or {}).get("algo") or detect_algo(n, mod) for n, mod in groups.items()}
    algos = {n: {"locon": "lora", "dora": "lora"}.get(a, a) for n, a in algos.items()}
    algo = _check_one_algo(algos)
    if target == "diffusers-unet" and algo == "loha":
        raise HiganbanaError("diffusers' load_lora_weights reads LoRA and LoKr only; export loha with target='peft'")
    root = TARGETS[target]
    out: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    extra: dict[str, Any] = {}

    if algo == "lora":
        dora = {n for n, mod in groups.items() if "dora_scale" in mod}
        if dora and dora != set(groups):
            raise HiganbanaError(
                f"PEFT's use_dora is one switch per config, but only some modules have DoRA (e.g. {sorted(dora)[0]!r})"
            )
        for name, mod in groups.items():
            if "lora_mid.weight" in mod:
                raise HiganbanaError(f"module {name!r}: LoCon Tucker (lora_mid) has no PEFT equivalent")
            down, up = mod["lora_down.weight"], mod["lora_up.weight"]
            path = paths[name]
            ranks[path] = down.shape[0]
            alphas[path] = _alpha(mod, down.shape[0])
            out[f"{root}{path}.lora_A.weight"] = down
            out[f"{root}{path}.lora_B.weight"] = up
            if "dora_scale" in mod:
                if dora_axis(mod, up.shape[0]) != "output":
                    raise HiganbanaError(
                        f"module {name!r}: DoRA on the input axis (dora_scale {tuple(mod['dora_scale'].shape)}) "
                        "has no PEFT equivalent; PEFT normalises per output row"
                    )
                mag = mod["dora_scale"].reshape(-1)
                out[f"{root}{path}.lora_magnitude_vector"] = mag if up.dim() == 2 else mag.reshape(1, -1, *up.shape[2:])
        extra["use_dora"] = bool(dora)

    elif algo == "loha":
        tucker = {n for n, mod in groups.items() if "hada_t1" in mod}
        for name, mod in groups.items():
            if "dora_scale" in mod:
                raise HiganbanaError(f"module {name!r}: PEFT's LoHa has no DoRA (dora_scale)")
            path = paths[name]
            rank = mod["hada_w1_b"].shape[0]
            ranks[path] = rank
            alphas[path] = _alpha(mod, rank)
            for key in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"):
                if key in mod:
                    t = mod[key]
                    if key in ("hada_t1", "hada_t2") and t.dim() != 4:
                        raise HiganbanaError(f"module {name!r}: PEFT's LoHa Tucker form is for Conv2d only")
                    out[f"{root}{path}.{key}"] = t
        extra["use_effective_conv2d"] = bool(tucker)

    else:  # lokr
        hints = {n: (records.get(n) or {}).get("options", {}).get("rank") for n in groups}
        plans = {n: _lokr_plan(n, mod, hints[n]) for n, mod in groups.items()}
        if any("dora_scale" in mod for mod in groups.values()):
            raise HiganbanaError("PEFT's LoKr has no DoRA (dora_scale)")
        decompose_both = any(not p["w1_full"] for p in plans.values())
        tucker = any(p["tucker"] for p in plans.values())
        splits = set()
        for name, p in plans.items():
            if p["v2"] is None:
                flat = groups[name]["lokr_w2_b"].shape[1]
                kernel = math.prod((shapes or {}).get(name, (0, 0))[2:])
                if flat % kernel:
                    raise HiganbanaError(f"module {name!r}: lokr_w2_b width {flat} does not fit kernel size {kernel}")
                p["v2"] = flat // kernel
            splits.add((p["u"][0] * p["u"][1], p["v1"] * p["v2"], p["u"], (p["v1"], p["v2"])))
        for name, p in plans.items():
            u1, u2 = p["u"]
            r = p["rank"]
            need_w2 = math.ceil(max(u2, p["v2"]) / 2)
            need_w1 = math.ceil(max(u1, p["v1"]) / 2) if decompose_both else 1
            if p["w1_full"] and p["w2_full"]:
                r = max(int(r or 1), need_w2, need_w1)
            else:
                if p["w2_full"] and r < need_w2:
                    raise HiganbanaError(
                        f"module {name!r}: lokr w2 is full with rank {r} (full_matrix); PEFT factors it below "
                        f"rank {need_w2} and cannot hold it"
                    )
                if p["w1_full"] and r < need_w1:
                    raise HiganbanaError(
                        f"module {name!r}: lokr w1 is full while other modules factor it (decompose_both); "
                        f"PEFT would factor it at rank {r}"
                    )
            path = paths[name]
            ranks[path] = int(r)
            alphas[path] = p["scale"] * r
            for key in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"):
                if key in groups[name]:
                    t = groups[name][key]
                    if key == "lokr_t2" and t.dim() != 4:
                        raise HiganbanaError(f"module {name!r}: PEFT's LoKr Tucker form is for Conv2d only")
                    out[f"{root}{path}.{key}"] = t
        extra.update(
            decompose_both=decompose_both,
            decompose_factor=_peft_factor(splits),
            use_effective_conv2d=tucker,
            rank_dropout_scale=False,
        )

    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    alpha_key = "lora_alpha" if algo == "lora" else "alpha"
    config: dict[str, Any] = {
        "peft_type": PEFT_TYPES[algo],
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": int(r0),
        alpha_key: _number(a0),
        "target_modules": sorted(paths[n] for n in groups),
        "rank_pattern": {k: int(v) for k, v in _patterns(ranks, r0).items()},
        "alpha_pattern": {k: _number(v) for k, v in _patterns(alphas, a0).items()},
        "rank_dropout" if algo != "lora" else "lora_dropout": 0.0,
        **extra,
    }
    if algo == "lora":
        config.update(use_rslora=False, bias="none", fan_in_fan_out=False, init_lora_weights=True)
    else:
        config.update(module_dropout=0.0, init_weights=True)
    return config, out


def save_peft_folder(folder: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``folder``, as one unit.

    diffusers-keyed tensors (``unet.``) go to ``pytorch_lora_weights.safetensors`` instead, with the
    config in the ``lora_adapter_metadata`` header entry (keys prefixed ``unet.``) as diffusers writes it.
    The folder is written whole and swapped into place (other files of an existing folder are kept),
    so a kill never leaves weights beside the config of another run.
    """
    folder = Path(folder)
    diffusers = bool(tensors) and all(k.startswith("unet.") for k in tensors)
    weights = "pytorch_lora_weights.safetensors" if diffusers else "adapter_model.safetensors"
    with atomic_folder(folder, overwrite=True) as tmp:
        if folder.is_dir():  # keep what else the folder holds (hard links: no copy of large files)
            for entry in folder.iterdir():
                if entry.name not in (weights, "adapter_config.json"):
                    _link_or_copy(entry, tmp / entry.name)
        if diffusers:
            meta = json.dumps({f"unet.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)
            save_tensors(dict(tensors), tmp / weights, {"lora_adapter_metadata": meta})
        else:
            save_tensors(dict(tensors), tmp / weights)
        (tmp / "adapter_config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True), encoding="utf-8")
    return folder


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
