#!/usr/bin/env python
"""Evaluation cost benchmark: feature extraction and metrics next to generation (issue 6).

The issue's requirement: "images/s for feature extraction and metric computation; the metrics for
15,000 images must not be the bottleneck next to generation". One paper checkpoint is 14,900 images:
149 sets of 100 (39 leaves × ``<train>``/``<trigger>``/``<alter>`` + 32 non-style leaves × ``<style>``;
docs/reference evaluation §1.1). Everything runs on random weights of the real sizes (no download):

1. **metrics** (:mod:`higanbana.evaluate.metrics`) from synthetic random features, per set as
   :func:`higanbana.evaluate.run.measure` computes them: ``fidelity`` of 100 DINOv2-L features
   (width 1024) against 200 reference features (the largest training set), ``vendi`` of the 100,
   ``vendi_per_group`` (10 groups of 10) for a third of the sets in addition, ``text_alignment`` of 100
   CLIP-L image/text feature pairs (width 768); and for 32 ``<style>`` sets the ``style_loss`` of 100
   pairs of Gram matrices shaped like VGG-19's (64², 128², 256², 512², 512²; in chunks of 8 pairs,
   as ``measure`` does). Only the metric calls are timed, not drawing the random inputs.
2. **feature extraction** through our encoders, preprocessing (PIL resize/letterbox) included, on
   ``--images`` random 512×512 images, batch ``--batch``, after one warm-up batch:
   ``Dinov2Encoder`` on a ``Dinov2Model`` of DINOv2-L's config (24 × 1024, 16 heads, patch 14) at
   224 px; ``ClipEncoder`` on a ``CLIPModel`` with ViT-L/14's vision tower (24 × 1024, patch 14, 224
   px, projection 768) and CLIP-L's text tower (12 × 768) — images, and texts of 77 tokens (the
   context length: an upper bound, real prompts are shorter); ``Vgg19StyleEncoder`` (full widths,
   random init) Gram matrices at short side 224.
3. **generation** for comparison: one forward of SD1.5's UNet (diffusers' default
   ``UNet2DConditionModel`` config, 860M parameters, random init) at batch 2 (the CFG pair of one
   image) on a 64×64 latent (512 px) with a 77×768 context, no grad; seconds per image = 25 DDIM steps
   × that forward. The text encoding and the VAE decode are left out, so generation is
   underestimated and the ratio below is an upper bound.

Per checkpoint image the evaluation runs DINOv2, CLIP image and CLIP text once; VGG-19 runs on the
3,200 ``<style>`` images of the checkpoint and again on the base model's paired images (``measure``
recomputes the base's Gram matrices for each model), i.e. on 6,400 / 14,900 images per checkpoint
image. The training images' features are computed once per concept and cached (not counted).

Run: ``python benchmarks/evaluate.py --threads 2`` (about 10 minutes on 2 CPU cores);
``--quick`` for a smoke test with small models; ``--device cuda [--dtype fp16]`` on a GPU machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _machine.py beside this script, however it is loaded
from _machine import cpu_name, device_label

SETS = 149  # sets of 100 images per paper checkpoint
SET_SIZE = 100
STYLE_SETS = 32
REFERENCE_IMAGES = 200  # the largest training set of one (sub-)class
DINO_WIDTH = 1024
CLIP_WIDTH = 768
VGG_GRAM_WIDTHS = (64, 128, 256, 512, 512)
CHECKPOINT_IMAGES = 14_900
VGG_IMAGES_PER_CHECKPOINT = 2 * STYLE_SETS * SET_SIZE  # fine-tuned + base model's paired images
STEPS = 25
PROMPT = (
    "whoo anime girl, toid outfit, in a chef's outfit, cooking in a kitchen, looking at viewer, smile, "
    "simple background, full body"
)  # ≥ 77 byte-level tokens: truncated to the full context length

DINOV2_L: dict[str, Any] = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=14,
    image_size=518,
)  # fmt: skip
CLIP_L_VISION: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
    image_size=224,
)  # fmt: skip
CLIP_L_TEXT: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408,
    max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
)  # fmt: skip
#: --quick: the same code paths on small models (a smoke test; its numbers mean nothing)
QUICK_DINOV2 = {**DINOV2_L, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 128}  # fmt: skip
QUICK_VISION = {**CLIP_L_VISION, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4}  # fmt: skip
QUICK_TEXT = {**CLIP_L_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 1000}  # fmt: skip
QUICK_UNET: dict[str, Any] = dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=4, cross_attention_dim=768)


# --------------------------------------------------------------------------- helpers
def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# --------------------------------------------------------------------------- 1. metrics
def bench_metrics(args: argparse.Namespace) -> dict[str, float]:
    """Seconds of each metric over one checkpoint's sets, from random features (inputs drawn untimed)."""
    import torch

    from higanbana.evaluate import metrics as M

    sets, style_sets = (12, 3) if args.quick else (SETS, STYLE_SETS)
    gen = torch.Generator().manual_seed(0)
    groups = [i // 10 for i in range(SET_SIZE)]
    seconds = {"fidelity": 0.0, "vendi": 0.0, "vendi_per_group": 0.0, "text_alignment": 0.0, "style_loss": 0.0}
    for s in range(sets):
        z = torch.randn(SET_SIZE, DINO_WIDTH, generator=gen)
        ref = torch.randn(REFERENCE_IMAGES, DINO_WIDTH, generator=gen)
        zi = torch.randn(SET_SIZE, CLIP_WIDTH, generator=gen)
        zt = torch.randn(SET_SIZE, CLIP_WIDTH, generator=gen)
        t0 = time.perf_counter()
        M.fidelity(z, ref)
        t1 = time.perf_counter()
        M.vendi(z)
        t2 = time.perf_counter()
        if s % 3 == 0:
            M.vendi_per_group(z, groups)
        t3 = time.perf_counter()
        M.text_alignment(zi, zt)
        t4 = time.perf_counter()
        seconds["fidelity"] += t1 - t0
        seconds["vendi"] += t2 - t1
        seconds["vendi_per_group"] += t3 - t2
        seconds["text_alignment"] += t4 - t3
    # one pool of 100 Gram pairs (~490 MB float32 per side, far beyond any cache), reused by every set
    grams_a = [torch.rand(SET_SIZE, c, c, generator=gen) for c in VGG_GRAM_WIDTHS]
    grams_b = [torch.rand(SET_SIZE, c, c, generator=gen) for c in VGG_GRAM_WIDTHS]
    for _ in range(style_sets):
        t0 = time.perf_counter()
        losses = [
            M.style_loss([g[i : i + 8] for g in grams_a], [g[i : i + 8] for g in grams_b], per_pair=True)
            for i in range(0, SET_SIZE, 8)
        ]
        float(torch.cat(losses).mean())
        seconds["style_loss"] += time.perf_counter() - t0
    del grams_a, grams_b
    gc.collect()
    seconds["sets"] = sets
    seconds["style_sets"] = style_sets
    return seconds


# --------------------------------------------------------------------------- 2. features
def random_images(n: int, size: int = 512) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def time_encoder(fn: Any, items: list[Any], args: argparse.Namespace) -> float:
    """Seconds for ``fn(items, batch_size=args.batch)`` after one warm-up batch."""
    fn(items[: args.batch], batch_size=args.batch)
    sync(args.device)
    t0 = time.perf_counter()
    fn(items, batch_size=args.batch)
    sync(args.device)
    return time.perf_counter() - t0


def bench_features(args: argparse.Namespace) -> dict[str, float]:
    """Seconds per image of each encoder (images/s = 1 / that)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    from higanbana.evaluate.encoders import ClipEncoder, Dinov2Encoder, Vgg19StyleEncoder
    from higanbana.models.tiny import tiny_clip_tokenizer

    images = random_images(args.images)
    dtype = torch_dtype(args.dtype)
    out: dict[str, float] = {}

    torch.manual_seed(0)
    dino = Dinov2Encoder(
        Dinov2Model(Dinov2Config(**(QUICK_DINOV2 if args.quick else DINOV2_L))), device=args.device, dtype=dtype
    )
    out["params_dinov2"] = sum(p.numel() for p in dino.model.parameters())
    out["dinov2"] = time_encoder(dino.encode_images, images, args) / len(images)
    log(f"DINOv2: {out['dinov2']:.3f} s/image")
    del dino
    free(args.device)

    torch.manual_seed(1)
    cfg = CLIPConfig(
        text_config=QUICK_TEXT if args.quick else CLIP_L_TEXT,
        vision_config=QUICK_VISION if args.quick else CLIP_L_VISION,
        projection_dim=CLIP_WIDTH,
    )
    clip = ClipEncoder(CLIPModel(cfg), processor_or_path=tiny_clip_tokenizer(), device=args.device, dtype=dtype)
    out["params_clip_vision"] = sum(p.numel() for p in clip.model.vision_model.parameters())
    out["params_clip_text"] = sum(p.numel() for p in clip.model.text_model.parameters())
    out["clip_image"] = time_encoder(clip.encode_images, images, args) / len(images)
    log(f"CLIP image: {out['clip_image']:.3f} s/image")
    texts = [PROMPT] * len(images)
    assert len(clip.tokenizer(PROMPT, truncation=True, max_length=clip.max_length)["input_ids"]) == 77
    out["clip_text"] = time_encoder(clip.encode_texts, texts, args) / len(texts)
    log(f"CLIP text: {out['clip_text']:.4f} s/text")
    del clip
    free(args.device)

    widths = (8, 16, 32, 64, 64) if args.quick else None
    vgg = Vgg19StyleEncoder(None, random_init=True, device=args.device, widths=widths)
    out["params_vgg19"] = sum(p.numel() for p in vgg.features.parameters())
    out["vgg19"] = time_encoder(vgg.gram_matrices, images, args) / len(images)
    log(f"VGG-19 Grams: {out['vgg19']:.3f} s/image")
    del vgg
    free(args.device)
    return out


# --------------------------------------------------------------------------- 3. generation
def bench_generation(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of one SD1.5 UNet forward at batch 2 (64×64 latent, 77×768 context), no grad."""
    import torch
    from diffusers import UNet2DConditionModel

    dtype = torch_dtype(args.dtype)
    torch.manual_seed(2)
    # diffusers' default config is SD1.5's (sample_size left None in 0.42: SD1.5's is 64)
    unet = UNet2DConditionModel(**(QUICK_UNET if args.quick else {}), sample_size=64).eval()
    unet = unet.to(args.device) if dtype == torch.float32 else unet.to(args.device, dtype)
    params = sum(p.numel() for p in unet.parameters())
    size = unet.config.sample_size
    latents = torch.randn(2, 4, size, size, device=args.device, dtype=dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device=args.device, dtype=dtype)
    timestep = torch.tensor(500, device=args.device)
    times = []
    with torch.no_grad():
        for r in range(1 + args.gen_repeats):  # the first one is a warm-up
            sync(args.device)
            t0 = time.perf_counter()
            unet(latents, timestep, context, return_dict=False)
            sync(args.device)
            times.append(time.perf_counter() - t0)
            log(f"UNet forward {'(warm-up) ' if r == 0 else ''}{times[-1]:.2f} s")
            if r == 0 and times[0] > 60 and args.gen_repeats > 1:
                args.gen_repeats = 1
                log("slow forward (> 60 s): 1 timed repeat")
            if r >= args.gen_repeats:
                break
    del unet, latents, context
    free(args.device)
    timed = times[1:]
    return {"forward": statistics.median(timed), "forwards": timed, "params": params, "sample": size}


# --------------------------------------------------------------------------- report
def machine_line(args: argparse.Namespace) -> str:
    import torch

    cpu = cpu_name()
    device = device_label(args.device)
    return (
        f"- machine: {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}, {args.dtype}, Python {platform.python_version()}"
    )


def fmt_s(seconds: float) -> str:
    if seconds >= 100:
        return f"{seconds:,.0f}"
    if seconds >= 1:
        return f"{seconds:.2f}"
    if seconds >= 0.01:
        return f"{seconds:.3f}"
    return f"{seconds:.2g}"


def report(args: argparse.Namespace, m: dict[str, float], f: dict[str, float], g: dict[str, Any]) -> list[str]:
    import diffusers
    import transformers

    sets, style_sets = int(m["sets"]), int(m["style_sets"])
    # metric seconds scaled to one paper checkpoint (identity unless --quick)
    per_set = {k: m[k] * SETS / sets for k in ("fidelity", "vendi", "vendi_per_group", "text_alignment")}
    per_set["style_loss"] = m["style_loss"] * STYLE_SETS / style_sets
    metrics_total = sum(per_set.values())
    n = CHECKPOINT_IMAGES
    vgg_share = VGG_IMAGES_PER_CHECKPOINT / n
    feat_rows = [
        ("DINOv2-L/14 image features (224 px)", f["dinov2"], n, f["params_dinov2"]),
        ("CLIP ViT-L/14 image features (224 px)", f["clip_image"], n, f["params_clip_vision"]),
        ("CLIP-L text features (77 tokens)", f["clip_text"], n, f["params_clip_text"]),
        ("VGG-19 Gram matrices (short side 224)", f["vgg19"], VGG_IMAGES_PER_CHECKPOINT, f["params_vgg19"]),
    ]
    features_total = sum(s * count for _, s, count, _ in feat_rows)
    gen_per_image = STEPS * g["forward"]
    gen_total = gen_per_image * n
    eval_per_image = (features_total + metrics_total) / n
    ratio = eval_per_image / gen_per_image
    forwards = ", ".join(f"{t:.2f}" for t in g["forwards"])
    lines = [
        f"- date: {args.date or dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        machine_line(args),
        f"- transformers {transformers.__version__}, diffusers {diffusers.__version__}",
        f"- command: `{' '.join(['python', *map(shlex.quote, sys.argv)])}`",
        f"- features: {args.images} random 512×512 images, batch {args.batch}, after 1 warm-up batch "
        f"(preprocessing included); metrics: {sets} sets of {SET_SIZE} ({style_sets} with a style loss)"
        + (" scaled to 149/32 sets" if (sets, style_sets) != (SETS, STYLE_SETS) else "")
        + f"; generation: median of {len(g['forwards'])} UNet forward(s) ({forwards} s) after 1 warm-up",
        f"- peak RSS of the process: {peak_rss_mib():,.0f} MiB" + (" (--quick: small models)" if args.quick else ""),
        "",
        "| stage | per checkpoint | images/s | s/image | s per checkpoint (14,900 images) | params |",
        "|---|---|---|---|---|---|",
    ]
    for name, s, count, params in feat_rows:
        lines.append(f"| {name} | {count:,} | {1 / s:.2f} | {fmt_s(s)} | {fmt_s(s * count)} | {params / 1e6:.0f}M |")
    lines.append(
        f"| **features, total** | | {n / features_total:.2f} | {fmt_s(features_total / n)} "
        f"| {fmt_s(features_total)} | |"
    )
    metric_rows = [
        ("fidelity (S_C + SCD vs 200 refs, d=1024)", "fidelity", SETS),
        ("vendi (100 images, d=1024)", "vendi", SETS),
        ("vendi_per_group (10 × 10)", "vendi_per_group", (SETS + 2) // 3),
        ("text_alignment (d=768)", "text_alignment", SETS),
        ("style_loss (100 pairs of VGG-19 Grams)", "style_loss", STYLE_SETS),
    ]
    for name, key, count in metric_rows:
        s = per_set[key]
        lines.append(f"| metric: {name} | {count} sets | {count * SET_SIZE / s:,.0f} | {s / (count * SET_SIZE):.2g} "
                     f"| {fmt_s(s)} | |")  # fmt: skip
    lines += [
        f"| **metrics, total** | 149 sets | {n / metrics_total:,.0f} | {metrics_total / n:.2g} "
        f"| {fmt_s(metrics_total)} | |",
        f"| **evaluation (features + metrics)** | | {1 / eval_per_image:.2f} | {fmt_s(eval_per_image)} "
        f"| {fmt_s(eval_per_image * n)} | |",
        f"| generation: SD1.5 UNet, {STEPS} steps × forward at batch 2 (CFG), {g['sample'] * 8} px "
        f"| {n:,} | {1 / gen_per_image:.3g} | {fmt_s(gen_per_image)} | {fmt_s(gen_total)} | {g['params'] / 1e6:.0f}M |",
        "",
        f"**Ratio (features + metrics) / generation per image: {ratio:.3f}** "
        f"(metrics alone: {metrics_total / gen_total:.2g}; VGG-19 counts {vgg_share:.2f} images per checkpoint image; "
        "generation excludes the text encoder and the VAE decode, so it is underestimated and the ratio is an "
        "upper bound)",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="DINOv2/CLIP encoders and the UNet (VGG-19 and the metrics stay fp32/fp64)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--images", type=int, default=16, help="images per encoder (timed, after 1 warm-up batch)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--gen-repeats", type=int, default=2, help="timed UNet forwards (after 1 warm-up)")
    parser.add_argument("--date", default="", help="the date line to print (default: now, UTC)")
    parser.add_argument("--quick", action="store_true", help="small models and few sets: a smoke test")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.batch, args.gen_repeats = 4, 2, 1
    t0 = time.perf_counter()
    log("metrics …")
    m = bench_metrics(args)
    log(f"metrics: {sum(v for k, v in m.items() if k not in ('sets', 'style_sets')):.2f} s; features …")
    f = bench_features(args)
    log(f"peak RSS so far {peak_rss_mib():,.0f} MiB; generation …")
    g = bench_generation(args)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    print("\n".join(report(args, m, f, g)))


if __name__ == "__main__":
    main()
