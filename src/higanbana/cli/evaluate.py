"""``higanbana evaluate CONFIG.toml [section.key=value ...]``."""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """examples:
  higanbana evaluate eval.toml
  higanbana evaluate eval.toml prompts.n_images=20 generation.steps=20
  accelerate launch --num_processes 4 -m higanbana evaluate eval.toml

A re-run skips the images and features that exist. docs/evaluation.md lists every field.
"""


def _evaluate(args: argparse.Namespace) -> int:
    from ..evaluate.config import EvalConfig
    from ..evaluate.run import evaluate

    config = EvalConfig.load(args.config, list(args.overrides))
    result = evaluate(config, progress=not args.no_progress)
    if result.ranking is not None:
        print(result.ranking.to_string())
    return 0


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Define ``higanbana evaluate`` on an argparse sub-parsers object; ``func`` runs it."""
    p = subparsers.add_parser(
        "evaluate",
        help="generate, measure and report: the paper's evaluation of fine-tuned checkpoints",
        description="Evaluate checkpoints against their base model: fidelity, controllability, diversity, "
        "base-model preservation; rank-normalised scores, correlations and an HTML report.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="the evaluation config (.toml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (anywhere after CONFIG)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_evaluate)
    return p
