"""Pretrain the miniature world's tiny models (CLIP, VAE, SD UNet) and save them.

    python scripts/pretrain_miniworld.py --out DIR [--scale tiny|full|gpu] [--seed 0] [--threads N]
        [--device cuda] [--workers N] [--override JSON] [--stages-only] [--cfg 4 --cfg 7]

Writes DIR/sd (a diffusers StableDiffusionPipeline folder), DIR/clip (a transformers CLIPModel with
its tokenizer), DIR/stages (the CLIP and VAE checkpoints, reused by a rerun with the same plan) and
DIR/training.json (sizes, steps, seeds, times, prompt-following accuracies). ``--override`` merges a
JSON object into the plan, e.g. ``'{"unet": {"lr": 1e-3, "config": {"layers_per_block": 2}}}'``.
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
    parser.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering the training images")
    parser.add_argument("--override", default=None, help="JSON object merged into the plan")
    parser.add_argument("--stages-only", action="store_true", help="train (or reuse) CLIP and VAE, then stop")
    parser.add_argument("--cfg", type=float, action="append", default=None,
                        help="guidance scale(s) of the prompt-following check (default 4)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        overrides = json.loads(args.override) if args.override else None
    except json.JSONDecodeError as exc:
        parser.error(f"--override is not JSON: {exc}")
    if overrides is not None and not isinstance(overrides, dict):
        parser.error("--override must be a JSON object")
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    record = pretrain(args.out, args.scale, args.seed, progress=not args.no_progress, cfg=args.cfg or [4.0],
                      device=args.device, workers=args.workers, overrides=overrides,
                      stages_only=args.stages_only)  # fmt: skip
    keys = ("times_s", "steps_run", "params", "size_mb", "prompt_following_by_cfg", "vae_reconstruction")
    print(json.dumps({k: record[k] for k in keys if k in record}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
