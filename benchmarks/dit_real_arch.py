#!/usr/bin/env python
"""SD3.5-medium / Flux.1 at their real transformer architectures, random weights: ``higanbana train``
(the command users run) for a step or two with each algorithm, and the memory it needed.

It writes a diffusers folder (no downloads) with:

- the transformer at the real config (``models.architectures.SD35_MEDIUM_TRANSFORMER`` /
  ``FLUX1_DEV_TRANSFORMER``), random weights, stored in ``--dtype`` (bf16 by default: 2.5B / 12B
  parameters);
- the real 16-channel VAE architecture (SD3's/Flux's ``AutoencoderKL`` config);
- text encoders at the real widths (CLIP-L 768, CLIP-G 1280 with their projections, T5-XXL's
  d_model 4096 / d_ff 10240 / 64 heads) but one layer each, and the offline byte-level tokenizers of
  the tiny models: the conditioning has the real shapes without 5B parameters of T5 that a frozen,
  cached text encoder does not train;

then runs ``python -m higanbana train`` on two 256×256 images for ``--steps`` steps per algorithm under
``/usr/bin/time`` and reports wall time, peak RSS and the losses. ``--steps`` 1 and 3 give the time of
two steps without the set-up (``--per-step``).

The transformer is written shard by shard from a meta-device model, so building needs no memory for it.
Run: ``.venv/bin/python benchmarks/dit_real_arch.py --family sd3 --algos lora,lokr``. Flux.1 [dev] in
bf16 needs ~24 GB for its weights alone; ``--quantize int8`` loads it quantized (12 GB).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name

ALGOS = {"lora": {"rank": 16, "alpha": 16}, "lokr": {"rank": 16, "factor": 16}, "loha": {"rank": 8}}
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
)


def random_transformer_folder(family: str, folder: Path, dtype: torch.dtype, shard_bytes: int = 2 << 30) -> None:
    """The transformer at its real config written as sharded safetensors without ever holding it: the
    model is built on the meta device for its names and shapes, and each tensor is drawn (N(0, 0.02²);
    norm scales 1, biases 0) and written shard by shard, with diffusers' index."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from safetensors.torch import save_file

    from higanbana.models.architectures import FLUX1_DEV_TRANSFORMER, SD35_MEDIUM_TRANSFORMER

    cls, config = (
        (FluxTransformer2DModel, FLUX1_DEV_TRANSFORMER)
        if family == "flux"
        else (SD3Transformer2DModel, SD35_MEDIUM_TRANSFORMER)
    )
    with torch.device("meta"):
        model = cls(**config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        if shard:
            index += 1
            name = f"diffusion_pytorch_model-{index:05d}.safetensors"
            save_file(shard, str(folder / name), {"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for key, meta in model.state_dict().items():
        if key.endswith("bias"):
            t = torch.zeros(meta.shape, dtype=dtype)
        elif meta.dim() == 1:
            t = torch.ones(meta.shape, dtype=dtype)
        else:
            t = (torch.randn(meta.shape, generator=gen) * 0.02).to(dtype)
        shard[key] = t
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    index_file = folder / "diffusion_pytorch_model.safetensors.index.json"
    index_file.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2), encoding="utf-8")


def build(family: str, folder: Path, dtype: torch.dtype) -> None:
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from higanbana.models.architectures import FLUX1_DEV_TRANSFORMER, SD35_MEDIUM_TRANSFORMER
    from higanbana.models.dit import DitParts
    from higanbana.models.tiny import (
        DIT_SCHEDULERS,
        DIT_VAE_SCALING,
        TINY_T5,
        save_tiny_dit,
        tiny_clip_tokenizer,
        tiny_t5_tokenizer,
    )

    torch.manual_seed(0)
    with torch.device("meta"):  # a stand-in for save_tiny_dit: the real one is written shard by shard below
        transformer = (SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel)(
            **(SD35_MEDIUM_TRANSFORMER if family == "sd3" else FLUX1_DEV_TRANSFORMER)
        )
    if family == "sd3":
        clip = dict(num_hidden_layers=1, vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1)
        encoders = [
            CLIPTextModelWithProjection(
                CLIPTextConfig(
                    **clip, hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768
                )
            ),
            CLIPTextModelWithProjection(
                CLIPTextConfig(
                    **clip, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280
                )
            ),
        ]
    else:
        encoders = [
            CLIPTextModel(
                CLIPTextConfig(
                    num_hidden_layers=1,
                    vocab_size=49408,
                    max_position_embeddings=77,
                    hidden_size=768,
                    intermediate_size=3072,
                    num_attention_heads=12,
                    bos_token_id=0,
                    eos_token_id=1,
                )
            )
        ]
    # T5-XXL's widths, one layer (the tiny T5's settings otherwise)
    t5 = T5Config(
        **{**TINY_T5, "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 1, "num_heads": 64}
    )
    encoders = [e.to(dtype) for e in encoders] + [T5EncoderModel(t5).to(dtype)]
    scaling, shift = DIT_VAE_SCALING[family]
    vae = AutoencoderKL(**VAE, scaling_factor=scaling, shift_factor=shift)
    tokenizers = [tiny_clip_tokenizer() for _ in encoders[:-1]] + [tiny_t5_tokenizer()]
    parts = DitParts(family, transformer, encoders, vae, tokenizers, dict(DIT_SCHEDULERS[family]))
    transformer.save_pretrained = lambda where, **_: random_transformer_folder(family, Path(where), dtype)
    save_tiny_dit(parts, folder)


def images(folder: Path) -> None:
    import numpy as np
    from PIL import Image

    sub = folder / "10_bench"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((256, 256, 3)) * 255).astype("uint8")).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"a photo of bench object {i}", encoding="utf-8")


def run(
    work: Path, model: Path, algo: str, steps: int, device: str, checkpointing: bool, quantize: str, seq: int
) -> dict:
    out = work / f"out-{algo}-{steps}"
    config = f"""
[model]
pretrained = "{model}"
quantize = "{quantize}"
[network]
algo = "{algo}"
options = {{ {", ".join(f"{k} = {v}" for k, v in ALGOS[algo].items())} }}
[data]
train_data_dir = "{work / "data"}"
resolution = 256
enable_bucket = false
batch_size = 1
cache_text_encoder_outputs = true
[optimizer]
unet_lr = 1e-4
[training]
max_train_steps = {steps}
mixed_precision = "bf16"
gradient_checkpointing = {str(checkpointing).lower()}
max_sequence_length = {seq}
{'device = "cpu"' if device == "cpu" else ""}
[save]
output_dir = "{out}"
output_name = "bench"
every_n_epochs = 0
save_state = false
dtype = "bf16"
[logging]
log_with = "none"
"""
    path = work / f"{algo}-{steps}.toml"
    path.write_text(config, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    start = time.time()
    proc = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "higanbana", "train", str(path), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.time() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {
        "algo": algo,
        "steps": steps,
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(int(rss.group(1)) / 2**20, 2) if rss else None,
        "tail": (proc.stdout + proc.stderr)[-1500:] if proc.returncode else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=("sd3", "flux"), default="sd3")
    ap.add_argument("--work", type=Path, default=Path("/tmp/higanbana-dit-real"))
    ap.add_argument("--algos", default="lora,lokr")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--per-step", action="store_true", help="also run 1 step: (t(steps) − t(1)) / (steps − 1)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--quantize", choices=("none", "int8"), default="none", help="model.quantize of the runs")
    ap.add_argument("--seq", type=int, default=256, help="T5 tokens per caption (training.max_sequence_length)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model = args.work / f"model-{args.family}"
    if not (model / "model_index.json").is_file():
        t0 = time.time()
        build(args.family, model, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        print(f"built {model} in {time.time() - t0:.0f} s", flush=True)
    images(args.work / "data")
    rows = []
    for algo in args.algos.split(","):
        for steps in [1, args.steps] if args.per_step else [args.steps]:
            row = run(args.work, model, algo, steps, args.device, args.gradient_checkpointing, args.quantize, args.seq)
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "family": args.family,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "t5_tokens": args.seq,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
