"""``higanbana <command>``: a thin argument parser over library functions."""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    from .miniworld.demo import run_demo

    run_demo(args.out, args.plan, progress=not args.no_progress)
    return 0


def _selfcheck(args: argparse.Namespace) -> int:
    from .selfcheck import format_table, run_selfcheck

    rows = run_selfcheck(args.out, steps=args.steps, only=args.algos)
    print(format_table(rows))
    print(f"\nadapter files written to {args.out}/")
    worse = [r.label for r in rows if not r.loss_after < r.loss_before]
    if worse:
        print(f"loss did not decrease for: {', '.join(worse)}", file=sys.stderr)
        return 1
    return 0


def _algorithms(args: argparse.Namespace) -> int:
    from .algorithms import ALIASES, accepted_options, algorithm_class, list_algorithms

    for name in list_algorithms():
        options = ", ".join(sorted(accepted_options(algorithm_class(name))))
        print(f"{name:<6} {options}")
    print("aliases: " + ", ".join(f"{a} → {t}" for a, (t, _) in sorted(ALIASES.items())))
    return 0


def _info(args: argparse.Namespace) -> int:
    import json

    from .formats.inspect import file_info, format_info

    info = file_info(args.file, unsafe_pickle=args.unsafe_pickle)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 1 if info["non_finite_modules"] else 0  # a damaged file: described, but no reader takes it


def _presets(args: argparse.Namespace) -> int:
    from .presets import list_presets, load_preset

    for name in list_presets():
        print(f"{name:<22} {load_preset(name).get('description', '')}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from .experiment import run_experiment

    result = run_experiment(args.grid, progress=not args.no_progress)
    if result.ranking is not None:
        print(result.ranking.to_string())
    print(f"report: {result.report}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one ``error:`` line like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="higanbana", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="the paper's experiment in the miniature world: fine-tune, evaluate, rank (CPU, minutes)"
    )
    demo.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    plans = "full: 3 concepts x 4 algorithms x 2 learning rates; quick: a one-minute smoke run"
    demo.add_argument("--plan", default="full", choices=("full", "quick"), help=plans)
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.set_defaults(func=_demo)
    check = sub.add_parser("selfcheck", help="train, save and reload every algorithm on a tiny SD UNet")
    check.add_argument("--out", default="selfcheck-output", help="folder for the adapter files")
    check.add_argument("--steps", type=int, default=40, help="Adam steps per algorithm (default: 40)")
    check.add_argument("--algos", nargs="*", help="only these setups (e.g. lora lokr)")
    check.set_defaults(func=_selfcheck)
    algos = sub.add_parser("algorithms", help="list the algorithms and the options each takes")
    algos.set_defaults(func=_algorithms)
    presets = sub.add_parser("presets", help="list the built-in presets (which layers a network adapts)")
    presets.set_defaults(func=_presets)
    info = sub.add_parser("info", help="what an adapter file holds, and which tools load it")
    info.add_argument("file", help="a .safetensors adapter file (ours, kohya, LyCORIS, PEFT/diffusers)")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.add_argument(
        "--unsafe-pickle", action="store_true", help="allow a .pt/.ckpt/.bin pickle (read with weights_only=True)"
    )
    info.set_defaults(func=_info)
    from .tools.convert import add_convert_parser
    from .tools.extract import add_extract_parser
    from .tools.merge import add_merge_parser
    from .tools.resize import add_resize_parser

    add_merge_parser(sub)
    add_extract_parser(sub)
    add_resize_parser(sub)
    add_convert_parser(sub)
    from .evaluate.command import add_evaluate_parser
    from .train.command import add_train_parser

    add_train_parser(sub)
    add_evaluate_parser(sub)
    experiment = sub.add_parser(
        "experiment",
        help="configurations × seeds × epochs: train, evaluate together, report (docs/evaluation.md)",
        description="Run an experiment grid: train every (configuration, seed), evaluate every epoch's "
        "checkpoint with the same prompts and seeds, aggregate and report. Finished work is skipped.",
    )
    experiment.add_argument("grid", help="the grid file (.toml)")
    experiment.add_argument("--no-progress", action="store_true", help="no progress bars")
    experiment.set_defaults(func=_experiment)
    return parser


#: what Ctrl-C leaves behind, per command (the default: writes are atomic, so nothing)
INTERRUPTED = {
    "train": "interrupted; `higanbana train CONFIG --resume latest` continues from the last saved state",
    "evaluate": "interrupted; a re-run skips the images and features already done",
    "experiment": "interrupted; a re-run skips the runs and evaluations already done",
    "demo": "interrupted; a re-run of the demo skips the work already done",
}


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _parse(argv: list[str]) -> argparse.Namespace:
    overrides: list[str] = []
    if argv[:1] in (["train"], ["evaluate"]):
        from .train.command import is_override

        # `[--]section.key=value` overrides may stand anywhere after the config file
        overrides = [a.removeprefix("--") for a in argv[2:] if is_override(a)]
        argv = argv[:2] + [a for a in argv[2:] if not is_override(a)]
    args = build_parser().parse_args(argv)
    if overrides:
        args.overrides = overrides
    return args


def _quiet_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Parse and run one command; every failure becomes one line on stderr and an exit code.

    ``HiganbanaError`` and ``OSError`` → ``error: …`` (2), Ctrl-C → one line saying what a re-run
    does (130), a closed output pipe (``higanbana info F | head``) → a quiet exit (141).
    """
    from .errors import HiganbanaError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    try:
        args = _parse(argv)
        return args.func(args)
    except HiganbanaError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED.get(command, 'interrupted; nothing was written')}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or _one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
