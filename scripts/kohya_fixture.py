"""Offline inputs for running kohya sd-scripts' ``train_network.py``: model, tokenizer, dataset.

Used by ``scripts/kohya_sd_scripts_check.py`` (and its CI test); also runnable on its own::

    python scripts/kohya_fixture.py WORK_DIR [--size full|tiny] [--seed 0]

writes ``WORK_DIR/model`` (a diffusers ``StableDiffusionPipeline`` folder), ``WORK_DIR/tokenizers``
(a ``--tokenizer_cache_dir``) and ``WORK_DIR/data`` (a kohya ``N_concept`` image folder).

* **Model.** ``size="full"`` is SD1.5's architecture at full width with random weights: sd-scripts
  rebuilds the UNet as its own ``library.original_unet.UNet2DConditionModel``, whose channel widths
  (320/640/1280/1280) are module constants, so a narrower UNet cannot be loaded by it. The text
  encoder (CLIP ViT-L/14 shape) and VAE are SD1.5's too. ``size="tiny"`` is the same layout, narrow,
  for tests of this builder only (sd-scripts cannot load it).
* **Tokenizer.** sd-scripts loads ``openai/clip-vit-large-patch14`` unless ``--tokenizer_cache_dir``
  holds ``openai_clip-vit-large-patch14/`` (``library/strategy_base.py`` ``_load_tokenizer``). We
  write a slow ``CLIPTokenizer``'s files there directly (``vocab.json``, ``merges.txt``, configs) —
  the byte-level alphabet and no merges, the same vocabulary as ``higanbana.models.tiny.tiny_clip_tokenizer``
  — so any transformers version reads them; the text encoder's bos/eos/pad ids match it.
* **Dataset.** a few deterministic 64×64 PNGs with ``.txt`` captions in ``data/<repeats>_<concept>``.

Only the standard library at import time; torch/diffusers/transformers are imported when building
the model, so the check script can import this module from any interpreter.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

from higanbana.models.architectures import SD15_UNET as SD15_UNET_CONFIG

#: the model id sd-scripts' SD1 tokenizer strategy asks for, and its cache-folder name
TOKENIZER_ID = "openai/clip-vit-large-patch14"
TOKENIZER_CACHE_NAME = TOKENIZER_ID.replace("/", "_")
BOS_ID, EOS_ID = 0, 1  # the tokenizer's specials (as tiny_clip_tokenizer); pad = eos
MAX_LENGTH = 77

#: SD1.5's UNet (diffusers config of runwayml/stable-diffusion-v1-5 / unet)
SD15_UNET: dict[str, Any] = dict(SD15_UNET_CONFIG)
#: SD1.5's text encoder: CLIP ViT-L/14's text tower (specials moved to the offline tokenizer's ids)
SD15_TEXT_ENCODER: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=EOS_ID,
)
#: SD1.5's VAE (4 levels: latents are 1/8 of the image, 4 channels)
SD15_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
#: the same layouts, narrow (tests of the builder only: sd-scripts' own UNet is fixed at SD1.5's widths)
TINY_UNET = {**SD15_UNET, "block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 32, "layers_per_block": 1}
TINY_TEXT_ENCODER = {
    **SD15_TEXT_ENCODER,
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
TINY_VAE = {**SD15_VAE, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1}
SIZES = {"full": (SD15_UNET, SD15_TEXT_ENCODER, SD15_VAE), "tiny": (TINY_UNET, TINY_TEXT_ENCODER, TINY_VAE)}

DATASET_CONCEPT = "sks"
DATASET_REPEATS = 1
DATASET_CAPTIONS = (
    "a photo of sks, red square",
    "a photo of sks, green circle",
    "a photo of sks, blue stripes",
    "a photo of sks, yellow gradient",
)


# --------------------------------------------------------------------------- tokenizer
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte → printable-character table (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_vocab() -> dict[str, int]:
    """The offline tokenizer's vocabulary: specials 0/1, then each byte symbol bare and with ``</w>``."""
    alphabet = sorted(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab[ch + suffix] = len(vocab)
    return vocab


def write_tokenizer(folder: str | Path) -> Path:
    """A slow ``CLIPTokenizer``'s files in ``folder`` (read by ``CLIPTokenizer.from_pretrained``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def write_tokenizer_cache(cache_dir: str | Path) -> Path:
    """A ``--tokenizer_cache_dir`` that sd-scripts' SD1 strategy reads instead of downloading."""
    return write_tokenizer(Path(cache_dir) / TOKENIZER_CACHE_NAME)


# --------------------------------------------------------------------------- dataset
def _png(path: Path, pixels: list[list[tuple[int, int, int]]]) -> None:
    """Write an RGB PNG with the standard library only."""
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _image(index: int, size: int) -> list[list[tuple[int, int, int]]]:
    c = size // 2
    rows = []
    for y in range(size):
        row = []
        for x in range(size):
            if index == 0:
                inside = abs(x - c) < size // 4 and abs(y - c) < size // 4
                px = (220, 30, 30) if inside else (240, 240, 240)
            elif index == 1:
                inside = (x - c) ** 2 + (y - c) ** 2 < (size // 3) ** 2
                px = (30, 200, 60) if inside else (20, 20, 20)
            elif index == 2:
                px = (30, 60, 220) if (x // 8) % 2 else (250, 250, 250)
            else:
                px = (255 * x // size, 255 * y // size, 40)
            row.append(px)
        rows.append(row)
    return rows


def write_dataset(data_dir: str | Path, count: int = 4, size: int = 64, repeats: int = DATASET_REPEATS) -> Path:
    """``data_dir/<repeats>_sks/NN.png`` + ``NN.txt`` captions; returns the image folder."""
    folder = Path(data_dir) / f"{repeats}_{DATASET_CONCEPT}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        _png(folder / f"{i:02d}.png", _image(i % 4, size))
        (folder / f"{i:02d}.txt").write_text(DATASET_CAPTIONS[i % len(DATASET_CAPTIONS)] + "\n", encoding="utf-8")
    return folder


# --------------------------------------------------------------------------- model
_LIBS: list[Any] = []  # keeps the torch.library fragments of torchvision_shim alive


def torchvision_shim() -> str:
    """Make ``import torchvision`` work when its compiled ops cannot load; says what was done."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return "torchvision not installed"
    folder = Path(next(iter(spec.submodule_search_locations)))
    libs = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
    if libs:
        try:
            torch.ops.load_library(str(libs[0]))
            return "torchvision ops loaded"
        except Exception:
            pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBS.append(lib)
    return "torchvision ops unavailable (CUDA-only wheel): declared nms/qnms schemas"


def write_model(model_dir: str | Path, size: str = "full", seed: int = 0) -> Path:
    """A diffusers SD1.x folder with random weights (``size``: ``full`` = SD1.5's shapes, ``tiny``)."""
    import torch

    torchvision_shim()  # transformers/diffusers import torchvision when it is installed
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from higanbana.models.sd import SDParts
    from higanbana.models.tiny import save_tiny_sd

    unet_cfg, te_cfg, vae_cfg = SIZES[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(**vae_cfg)
    parts = SDParts("sd1", unet.eval(), [text_encoder.eval()], vae.eval(), None)
    root = save_tiny_sd(parts, model_dir)
    write_tokenizer(root / "tokenizer")  # for tools that want the pipeline's tokenizer too
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return root


def build_all(work_dir: str | Path, size: str = "full", seed: int = 0, image_size: int = 64) -> dict[str, Path]:
    """Model, tokenizer cache and dataset under ``work_dir``; returns their paths."""
    work = Path(work_dir)
    return {
        "model": write_model(work / "model", size=size, seed=seed),
        "tokenizers": write_tokenizer_cache(work / "tokenizers").parent,
        "data": write_dataset(work / "data", size=image_size).parent,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("work_dir")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64, help="the dataset's image side (default 64)")
    args = parser.parse_args(argv)
    paths = build_all(args.work_dir, args.size, args.seed, args.image_size)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
