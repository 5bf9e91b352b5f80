"""Run in the peers' venv by ``test_diffusers_reads_ours.py``: save our kohya-named file of each case,
load it with the real diffusers ``load_lora_weights`` into a pipeline built from a fresh copy of the
same tiny SD model, fuse it at scale 1 and compare every fused layer with our merged one.

Usage: ``python diffusers_reads_ours_run.py OUT_DIR CASES_JSON``; ``CASES_JSON`` is a list of
``[label, kind, preset, algo, options, for_diffusers]`` (``kind`` ``sd1`` or ``sdxl``;
``for_diffusers``: the saved file is passed through ``convert(..., for_tool="diffusers")`` and the
converted file is the one diffusers loads). Prints one JSON object ``{label: row}``, a row having
``path``, ``modules`` (our module names), and either ``failed`` (the exception diffusers raised) or
``applied`` / ``matching`` / ``differing`` / ``not_applied`` (our module names) and ``stray`` (layers
diffusers changed that no module of ours targets), plus ``warnings`` (diffusers/peft log lines).
"""

from __future__ import annotations

import copy
import json
import logging
import sys

import torch
from torch import nn

RTOL, ATOL = 1e-5, 1e-6
LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage()[:400])


def _layer_weights(module: nn.Module) -> tuple[dict[str, torch.Tensor], set[str]]:
    """``{layer path: weight}`` of the plain layers, and the paths PEFT wrapped with a LoRA layer: a
    wrapped layer is read at its own path from its ``base_layer`` (where ``fuse_lora`` writes)."""
    weights, wrapped = {}, set()
    for path, m in module.named_modules():
        if hasattr(m, "base_layer") and hasattr(m, "lora_A"):
            wrapped.add(path)
        if not isinstance(m, LAYERS) or not isinstance(getattr(m, "weight", None), torch.Tensor):
            continue
        if ".lora_" in path:  # PEFT's own lora_A/lora_B layers
            continue
        weights[path.replace(".base_layer", "")] = m.weight.detach().clone()
    return weights, wrapped


def _randomize(net: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(net.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=RTOL, atol=ATOL)


def run_case(base, out: str, label: str, preset: str, algo: str, options: dict, for_diffusers: bool) -> dict:
    from higanbana.formats.sd_network import save_sd_network, sd_network
    from higanbana.models.pipeline import build_pipeline
    from higanbana.tools.convert import convert

    model = copy.deepcopy(base)
    parts = [model.unet, *model.text_encoders]
    names = ["unet", *(["text_encoder"] if len(parts) == 2 else ["text_encoder", "text_encoder_2"])]
    before = [_layer_weights(p)[0] for p in parts]
    net = sd_network(model, preset, algo, **options).attach()
    _randomize(net)
    path = f"{out}/{label}.safetensors"
    save_sd_network(net, path, model.kind)
    prefixes = [p.prefix for p in net.parts.values()]
    where = {}
    for name, record in net.records.items():
        index = 0 if record.prefix == "lora_unet" else prefixes.index(record.prefix)
        where[name] = (index, record.path)
    net.merge()
    ours = [_layer_weights(p)[0] for p in parts]
    net.restore()
    if for_diffusers:
        convert(path, f"{out}/{label}.converted.safetensors", for_tool="diffusers", progress=False)
        path = f"{out}/{label}.converted.safetensors"
    row: dict = {"path": path, "modules": sorted(where)}

    fresh = copy.deepcopy(base)
    pipe = build_pipeline(fresh)  # diffusers' SD/SDXL pipeline over the parts' own modules
    collect = _Collect()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for lg in loggers:
        lg.addHandler(collect)
    try:
        pipe.load_lora_weights(path)
        pipe.fuse_lora(components=names, lora_scale=1.0)
    except Exception as exc:  # what diffusers raises is the verdict: record it
        row["failed"] = f"{type(exc).__name__}: {exc}"[:600]
        return row
    finally:
        for lg in loggers:
            lg.removeHandler(collect)
        row["warnings"] = collect.lines
    read = [_layer_weights(getattr(pipe, n)) for n in names]
    fused = [weights for weights, _ in read]
    wrapped = {(i, p) for i, (_, paths) in enumerate(read) for p in paths}
    changed = {(i, p) for i, weights in enumerate(fused) for p, w in weights.items() if not _close(w, before[i][p])}
    applied, matching, differing, not_applied = [], [], [], []
    for name, (i, p) in sorted(where.items()):
        if (i, p) not in wrapped:  # diffusers put no LoRA layer on it
            not_applied.append(name)
            continue
        applied.append(name)
        (matching if _close(fused[i][p], ours[i][p]) else differing).append(name)
    row.update(
        applied=applied,
        matching=matching,
        differing=differing,
        not_applied=not_applied,
        stray=sorted(f"{names[i]}.{p}" for i, p in (changed | wrapped) - set(where.values())),
    )
    return row


def main(out: str, cases: list) -> dict:
    from higanbana.models.tiny import tiny_sd_parts

    bases = {kind: tiny_sd_parts(kind, seed=0, with_vae=True) for kind in {c[1] for c in cases}}
    return {
        label: run_case(bases[kind], out, label, preset, algo, options, for_diffusers)
        for label, kind, preset, algo, options, for_diffusers in cases
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))))
