"""The ``cli`` package: parsing imports no torch, and its choices agree with the library's constants."""

from __future__ import annotations

import subprocess
import sys

from higanbana.cli import build_parser, tools


def test_help_imports_no_torch():
    """``higanbana --help`` and building every parser stay light: the handlers import the library."""
    code = (
        "import sys\n"
        "from higanbana.cli import build_parser\n"
        "build_parser()\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_choices_match_the_library():
    from higanbana.formats.checkpoint import KINDS
    from higanbana.tools import convert, extract, merge, resize

    assert tools.DTYPE_CHOICES == tuple(sorted(merge.DTYPES)) == tuple(sorted(resize.DTYPES))
    assert tools.RANK_MODES == resize.MODES == extract.MODES
    assert tools.CONVERT_TARGETS == convert.TARGETS
    assert tools.KIND_CHOICES == KINDS


def test_every_command_has_a_handler():
    sub = build_parser()._subparsers._group_actions[0]
    for name, parser in sub.choices.items():
        assert callable(parser.get_default("func")), name
