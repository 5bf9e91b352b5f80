"""Pretrain the miniature world's tiny models (CLIP, VAE, SD UNet) and save them.

    python scripts/pretrain_miniworld.py --out DIR [--scale tiny|full] [--seed 0] [--threads N]

Writes DIR/sd (a diffusers StableDiffusionPipeline folder), DIR/clip (a transformers CLIPModel with
its tokenizer) and DIR/training.json (sizes, steps, seeds, times, prompt-following accuracies).
See docs/miniworld.md.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from higanbana.miniworld.pretrain import SCALES, pretrain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--scale", default="full", choices=sorted(SCALES), help="run size (tiny: smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cfg", type=float, default=4.0, help="guidance scale of the prompt-following check")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    record = pretrain(args.out, args.scale, args.seed, progress=not args.no_progress, cfg=args.cfg)
    summary = {k: record[k] for k in ("times_s", "params", "size_mb", "prompt_following", "vae_reconstruction")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
