"""Run in the peers' venv by ``test_lycoris_reads_ours.py``: save our file of each case with the
standalone ``lycoris_`` prefix, load it with the real ``lycoris.create_lycoris_from_weights`` on a fresh
copy of the same UNet, and compare the two UNets' outputs.

Usage: ``python lycoris_reads_ours_run.py OUT_DIR CASES_JSON``; ``CASES_JSON`` is a list of
``[label, kind, algo, options, prefix, for_lycoris]`` (``kind`` ``sd1`` or ``sdxl``; ``prefix`` the
module-name prefix, ``lycoris`` for LyCORIS's standalone names; ``for_lycoris``: the saved file is passed
through ``higanbana convert --for lycoris`` and the converted file is the one LyCORIS loads). Prints
one JSON object: ``{label: {"path", "modules", "effect", "loaded" | "failed", "error"}}``; files land in
``OUT_DIR/<label>.safetensors``.
"""

from __future__ import annotations

import copy
import json
import logging
import sys

import torch

logging.disable(logging.WARNING)


def _inputs(unet, seed: int = 3) -> dict:
    from higanbana.models.tiny import tiny_unet_inputs

    batch = tiny_unet_inputs(seed=seed, unet=unet)
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and size conditioning
        gen = torch.Generator().manual_seed(seed + 1)
        n = batch["sample"].shape[0]
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        batch["added_cond_kwargs"] = {
            "text_embeds": torch.randn(n, pooled, generator=gen),
            "time_ids": torch.randn(n, 6, generator=gen),
        }
    return batch


def main(out: str, cases: list) -> dict:
    from lycoris import create_lycoris_from_weights

    from higanbana.formats import save_network
    from higanbana.models.tiny import tiny_sd_parts
    from higanbana.network import AdapterNetwork
    from higanbana.workflows.selfcheck import select_layers

    bases = {kind: tiny_sd_parts(kind, seed=0).unet.requires_grad_(False).eval() for kind in {c[1] for c in cases}}
    results = {}
    from higanbana.tools.convert import convert

    for label, kind, algo, options, prefix, for_lycoris in cases:
        base = bases[kind]
        batch = _inputs(base)
        with torch.no_grad():
            frozen = base(**batch).sample
        unet = copy.deepcopy(base)
        net = AdapterNetwork(unet, algo, select_layers(algo), prefix=prefix, **options)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        net.attach()
        with torch.no_grad():
            ours = unet(**batch).sample
        path = f"{out}/{label}.safetensors"
        save_network(net, path)
        if for_lycoris:
            convert(path, f"{out}/{label}.converted.safetensors", for_tool="lycoris", progress=False)
            path = f"{out}/{label}.converted.safetensors"
        other = copy.deepcopy(base)
        row = {
            "path": path,
            "modules": len(net.adapters),
            "effect": float((ours - frozen).abs().max() / frozen.abs().max()),
        }
        try:
            lyco, _ = create_lycoris_from_weights(1.0, path, other)
            lyco.apply_to()
            with torch.no_grad():
                theirs = other(**batch).sample
            row.update(loaded=len(lyco.loras), error=float((theirs - ours).abs().max() / ours.abs().max()))
        except Exception as exc:  # what LyCORIS raises is the verdict: record it
            row.update(failed=f"{type(exc).__name__}: {exc}"[:300])
        results[label] = row
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))))
