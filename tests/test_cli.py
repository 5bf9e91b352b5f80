"""The ``cli`` package: parsing imports no torch, and its choices agree with the library's constants."""

from __future__ import annotations

import subprocess
import sys

import pytest

from higanbana.cli import build_parser, main, tools


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
    assert tuple(convert.FOR_TOOLS) == tools.FOR_TOOLS
    assert tools.KIND_CHOICES == KINDS


def test_every_command_has_a_handler():
    sub = build_parser()._subparsers._group_actions[0]
    for name, parser in sub.choices.items():
        assert callable(parser.get_default("func")), name


def test_version_and_a_mistyped_command_get_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("higanbana ")
    with pytest.raises(SystemExit) as exit_:
        main(["selfchek"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "did you mean 'selfcheck'?" in err
    with pytest.raises(SystemExit):
        main(["convert", "a", "b", "--for", "comfy"])
    assert "did you mean 'comfyui'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["zzz"])
    assert "choose from demo, selfcheck" in capsys.readouterr().err  # nothing close: the list
