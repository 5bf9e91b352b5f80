"""``higanbana <command>``: a thin argument parser over library functions."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    rows = run_demo(args.out, steps=args.steps, only=args.algos)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="higanbana", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train, save and reload every algorithm on a tiny SD UNet")
    demo.add_argument("--out", default="demo-output", help="folder for the adapter files (default: demo-output)")
    demo.add_argument("--steps", type=int, default=40, help="Adam steps per algorithm (default: 40)")
    demo.add_argument("--algos", nargs="*", help="only these setups (e.g. lora lokr)")
    demo.set_defaults(func=_demo)
    algos = sub.add_parser("algorithms", help="list the algorithms and the options each takes")
    algos.set_defaults(func=_algorithms)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
