"""``higanbana train CONFIG.toml [section.key=value ...] [--dry-run] [--resume STATE|latest]``."""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """examples:
  higanbana train my_lora.toml
  higanbana train my_lora.toml --dry-run
  higanbana train my_lora.toml training.max_train_steps=2000 optimizer.unet_lr=2e-4 network.options={rank=16}
  higanbana train my_lora.toml --resume latest
  accelerate launch --num_processes 2 -m higanbana train my_lora.toml

Overrides are section.key=value (a leading -- is allowed: --training.seed=1); values are TOML literals.
Every field, its default and meaning: docs/training.md. The resolved config is written to
<save.output_dir>/config.toml.
"""


def is_override(arg: str) -> bool:
    """``section.key=value`` or ``--section.key=value``."""
    key = arg.removeprefix("--").partition("=")[0]
    return "=" in arg and "." in key and " " not in key


def _train(args: argparse.Namespace) -> int:
    from ..schema import toml_value
    from ..train.config import TrainConfig
    from ..train.trainer import train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"training.resume={toml_value(args.resume)}")
    config = TrainConfig.load(args.config, overrides)
    result = train(config, dry_run=args.dry_run, progress=not args.no_progress)
    if not args.dry_run:
        print(f"\ntrained {result.steps} step(s), {result.epochs} epoch(s); adapter written to {result.output}")
    return 0


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Define ``higanbana train`` on an argparse sub-parsers object; ``func`` runs it."""
    p = subparsers.add_parser(
        "train",
        help="fine-tune an SD1.x/SD2/SDXL model with any algorithm from a TOML config",
        description=(
            "Train an adapter (LoRA, LoHa, LoKr, IA3, GLoRA, DoRA, OFT, BOFT, full) on a local SD1/SD2/SDXL, "
            "SD3 or Flux model."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="the training config (.toml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (anywhere after CONFIG)")
    p.add_argument("--dry-run", action="store_true", help="print the data, buckets, steps and wrapped modules; exit")
    p.add_argument("--resume", help="a state folder to resume from, or 'latest'")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)
    return p
