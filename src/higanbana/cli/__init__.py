"""``higanbana <command>``: the command line, a thin argument parser over library functions.

This package owns all argument parsing: one module per group of subcommands (``workflows``:
demo/selfcheck/experiment, ``catalog``: algorithms/presets/info, ``tools``: merge/extract/resize/
convert, ``train``, ``evaluate``), each defining its parsers and thin handlers that turn the
parsed arguments into plain Python arguments of a library function. Library modules take no
argparse objects.

Each handler imports its command's library code *inside the function*, on purpose: building the
parser (``higanbana --help``, a usage error) then imports neither torch nor diffusers, and a
command pays only for what it runs. The parsers' ``choices`` therefore repeat a few library
constants (``tests/test_cli.py`` checks that they agree).

:func:`main` is the one error handler: ``HiganbanaError``/``OSError`` → one ``error:`` line (exit
2), Ctrl-C → one line saying what a re-run does (130), a closed output pipe → a quiet exit (141).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys

from ..errors import HiganbanaError
from . import catalog, evaluate, tools, train, workflows

#: what ``higanbana --help`` says above the commands
DESCRIPTION = (
    "Customise Stable Diffusion 1.x/2.x/SDXL with LyCORIS-family adapters (LoRA/LoCon, LoHa, LoKr, IA3, "
    "GLoRA, DoRA, OFT, BOFT, full fine-tuning), check where their files load, and evaluate the results. "
    "New here? `higanbana demo --plan quick` trains and evaluates on the built-in miniature world."
)
_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


def _did_you_mean(message: str) -> str:
    """argparse's "invalid choice" message, shortened, with the closest choice suggested."""
    match = _INVALID_CHOICE.search(message)
    if match is None:
        return message
    choices = re.findall(r"'([^']*)'", match[2])
    close = difflib.get_close_matches(match[1], choices, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f" (choose from {', '.join(choices)})"
    return f"{message[: match.start()]}invalid choice {match[1]!r}{hint}"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one ``error:`` line like every other error (and a "did you
    mean" for a mistyped choice)."""

    def error(self, message: str):
        self.exit(2, f"error: {_did_you_mean(message)} (see `{self.prog} --help`)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("higanbana")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, in the order ``higanbana --help`` lists them; ``args.func(args)`` runs one."""
    parser = _Parser(prog="higanbana", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"higanbana {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    workflows.add_demo_parser(sub)
    workflows.add_selfcheck_parser(sub)
    catalog.add_algorithms_parser(sub)
    catalog.add_presets_parser(sub)
    catalog.add_info_parser(sub)
    tools.add_parsers(sub)
    train.add_train_parser(sub)
    evaluate.add_evaluate_parser(sub)
    workflows.add_experiment_parser(sub)
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
        # `[--]section.key=value` overrides may stand anywhere after the config file
        overrides = [a.removeprefix("--") for a in argv[2:] if train.is_override(a)]
        argv = argv[:2] + [a for a in argv[2:] if not train.is_override(a)]
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
