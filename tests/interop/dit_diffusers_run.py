"""Run in the peers' venv by ``test_dit_files.py``: what the real diffusers does with our SD3/Flux files.

Usage: ``python dit_diffusers_run.py OUT_DIR CASES_JSON``; ``CASES_JSON`` is a list of
``[label, family, algo, options, layout]`` (``options["attention_only"]``: adapt only the blocks' attention
Linears): ``layout`` ``split``/``original`` (one safetensors file,
``save_dit_network``) or ``diffusers`` (``export_peft(target="diffusers-transformer")``, a folder). A
``FluxPipeline``/``StableDiffusion3Pipeline`` around a fresh copy of the same tiny transformer (no
other components) loads it with ``load_lora_weights`` and fuses it at scale 1. Prints ``{label: row}``:
``failed`` (the exception), or ``applied``/``matching``/``differing``/``not_applied`` (our module paths),
plus ``warnings``.

``kohya_flux`` (last argument ``kohya-flux``): diffusers' kohya→diffusers conversion of Flux files
(``_convert_kohya_flux_lora_to_diffusers``) hard-codes Flux.1's widths (3072, MLP 12288), so it runs
on our original-layout tensors of a network on the first double and single block at the real widths
(tensors only, no model); the row says whether each diffusers module's ``B·A`` equals ours.
"""

from __future__ import annotations

import json
import logging
import sys

import torch

# the same folder as this script is on sys.path when it runs: the SD runner's log collector and helpers
from diffusers_reads_ours_run import ATOL, RTOL, _Collect, _layer_weights, _randomize
from torch import nn


def run_case(out: str, label: str, family: str, algo: str, options: dict, layout: str) -> dict:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from higanbana.formats.dit_network import dit_network, save_dit_network
    from higanbana.formats.peft import export_peft
    from higanbana.models.tiny import tiny_flux_transformer, tiny_sd3_transformer

    make = tiny_flux_transformer if family == "flux" else tiny_sd3_transformer
    model = make().requires_grad_(False)
    options = dict(options)
    if options.pop("attention_only", False):
        options["select"] = lambda path, m: isinstance(m, nn.Linear) and ".attn." in path
    net = dit_network(model, algo=algo, **options).attach()
    _randomize(net)
    if layout == "diffusers":
        path = str(export_peft(net, f"{out}/{label}", target="diffusers-transformer"))
    else:
        path = str(save_dit_network(net, f"{out}/{label}.safetensors", layout=layout))
    paths = {r.path for r in net.records.values()}
    net.merge()
    ours, _ = _layer_weights(model)
    row: dict = {"path": path, "modules": sorted(paths)}
    fresh = make()
    components = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None)
    components.update(tokenizer_2=None, transformer=fresh)
    if family == "sd3":
        components.update(text_encoder_3=None, tokenizer_3=None)
    pipe = (FluxPipeline if family == "flux" else StableDiffusion3Pipeline)(**components)
    collect = _Collect()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for lg in loggers:
        lg.addHandler(collect)
    try:
        pipe.load_lora_weights(path)
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    except Exception as exc:  # what diffusers raises is the verdict: record it
        row["failed"] = f"{type(exc).__name__}: {exc}"[:600]
        return row
    finally:
        for lg in loggers:
            lg.removeHandler(collect)
        row["warnings"] = collect.lines
    fused, wrapped = _layer_weights(pipe.transformer)
    applied, matching, differing, not_applied = [], [], [], []
    for p in sorted(paths):
        if p not in wrapped:
            not_applied.append(p)
            continue
        applied.append(p)
        ok = fused[p].shape == ours[p].shape and torch.allclose(fused[p], ours[p], rtol=RTOL, atol=ATOL)
        (matching if ok else differing).append(p)
    row.update(applied=applied, matching=matching, differing=differing, not_applied=not_applied)
    return row


def kohya_flux() -> dict:
    """Our original-layout Flux LoRA at the real widths through diffusers' own conversion."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from higanbana.formats.dit_layout import DitLayout, to_original

    layout = DitLayout(
        "flux",
        {
            "num_layers": 1,
            "num_single_layers": 1,
            "num_attention_heads": 24,
            "attention_head_dim": 128,
            "guidance_embeds": True,
        },
    )
    gen = torch.Generator().manual_seed(0)
    split: dict[str, torch.Tensor] = {}
    records = {}
    ins = {"proj_out": 15360, "attn.to_out.0": 3072, "ff.net.2": 12288, "ff_context.net.2": 12288}
    outs = {"proj_mlp": 12288, "ff.net.0.proj": 12288, "ff_context.net.0.proj": 12288}
    deltas = {}
    for path in layout.slots:
        if not path.startswith(("transformer_blocks.0.", "single_transformer_blocks.0.")) or "norm" in path:
            continue
        tail = path.split(".", 2)[2]
        n_in, n_out = ins.get(tail, 3072), outs.get(tail, 3072)
        rank, alpha = 2, 1.0
        name = "lora_transformer_" + path.replace(".", "_")
        down = torch.randn(rank, n_in, generator=gen) * 0.05
        up = torch.randn(n_out, rank, generator=gen) * 0.05
        split[f"{name}.lora_down.weight"], split[f"{name}.lora_up.weight"] = down, up
        split[f"{name}.alpha"] = torch.tensor(alpha)
        records[name] = {"algo": "lora", "options": {"rank": rank}}
        deltas[path] = (up.double() @ down.double()) * alpha / rank
    fused, _ = to_original(split, records, layout)
    converted = _convert_kohya_flux_lora_to_diffusers(dict(fused))
    matching, differing = [], []
    for path, delta in deltas.items():
        a, b = converted.get(f"transformer.{path}.lora_A.weight"), converted.get(f"transformer.{path}.lora_B.weight")
        ok = a is not None and b is not None and torch.allclose((b.double() @ a.double()), delta, rtol=1e-5, atol=1e-8)
        (matching if ok else differing).append(path)
    left = sorted(k for k in converted if not k.startswith("transformer."))
    return {"matching": matching, "differing": differing, "left": left}


def main(out: str, cases: list) -> dict:
    rows = {label: run_case(out, label, *case) for label, *case in cases}
    rows["kohya-flux"] = kohya_flux()
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))))
