"""``higanbana demo | selfcheck | experiment``: jobs that train and evaluate together."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _positive(text: str) -> int:
    """A whole number of at least 1 (argparse turns the error into one usage line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _quiet_loading(args: argparse.Namespace) -> None:
    """``--no-progress`` also silences transformers' "Loading weights" bars (this process only)."""
    if args.no_progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def _demo(args: argparse.Namespace) -> int:
    from ..miniworld.demo import run_demo

    _quiet_loading(args)
    run_demo(args.out, args.plan, progress=not args.no_progress, workers=args.workers)
    return 0


def _selfcheck(args: argparse.Namespace) -> int:
    from ..workflows.selfcheck import format_table, run_selfcheck

    rows = run_selfcheck(args.out, steps=args.steps, only=args.algos)
    print(format_table(rows))
    print(f"\nadapter files written to {args.out}/")
    worse = [r.label for r in rows if not r.loss_after < r.loss_before]
    if worse:
        print(f"loss did not decrease for: {', '.join(worse)}", file=sys.stderr)
        return 1
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from ..workflows.experiment import run_experiment

    _quiet_loading(args)
    result = run_experiment(args.grid, progress=not args.no_progress, workers=args.workers, threads=args.threads)
    if result.ranking is not None:
        print(result.ranking.to_string())
    if result.findings is not None:
        from ..evaluate.findings import format_findings

        print(f"\n{format_findings(result.findings)}\n")
    print(f"report: {result.report}")
    return 0


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    demo = subparsers.add_parser(
        "demo", help="the paper's experiment in the miniature world: fine-tune, evaluate, rank (CPU, minutes)"
    )
    demo.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    plans = "full: 3 concepts x 4 algorithms x 2 learning rates; quick: a one-minute smoke run"
    demo.add_argument("--plan", default="full", choices=("full", "quick"), help=plans)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.add_argument(
        "--workers", type=_positive, default=None, help="processes of one torch thread each (default: the usable cores)"
    )
    demo.set_defaults(func=_demo)
    return demo


def add_selfcheck_parser(subparsers: Any) -> argparse.ArgumentParser:
    check = subparsers.add_parser("selfcheck", help="train, save and reload every algorithm on a tiny SD UNet")
    check.add_argument("--out", default="selfcheck-output", help="folder for the adapter files")
    check.add_argument("--steps", type=int, default=40, help="Adam steps per algorithm (default: 40)")
    check.add_argument("--algos", nargs="*", help="only these setups (e.g. lora lokr)")
    check.set_defaults(func=_selfcheck)
    return check


def add_experiment_parser(subparsers: Any) -> argparse.ArgumentParser:
    experiment = subparsers.add_parser(
        "experiment",
        help="configurations × seeds × epochs: train, evaluate together, report (docs/evaluation.md)",
        description="Run an experiment grid: train every (configuration, seed), evaluate every epoch's "
        "checkpoint with the same prompts and seeds, aggregate and report. Finished work is skipped.",
    )
    experiment.add_argument("grid", help="the grid file (.toml)")
    experiment.add_argument("--no-progress", action="store_true", help="no progress bars")
    experiment.add_argument(
        "--workers", type=_positive, default=1, help="train the runs and generate the images in N processes (1)"
    )
    experiment.add_argument("--threads", type=_positive, default=1, help="torch threads per worker process (1)")
    experiment.set_defaults(func=_experiment)
    return experiment
