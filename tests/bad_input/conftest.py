"""The bad-input corpus: every case runs a real command in-process and checks how it fails.

``cli(*args)`` runs ``higanbana.cli.main`` and captures its streams; ``assert_refused`` checks the
contract for bad input — exit code 2, one ``error: …`` line on stderr naming what is wrong, no
traceback — and ``snapshot``/``assert_unchanged`` that nothing was left behind.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(*args: object) -> Result:
    from higanbana.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse: --help, and usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


def error_line(result: Result) -> str:
    """The one ``error:`` line of a refused command (tqdm bars and warnings may precede it)."""
    lines = [line for line in result.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, f"expected one error line, got stderr:\n{result.err}"
    return lines[0]


def assert_refused(result: Result, *fragments: str) -> str:
    """Exit code 2, one ``error:`` line holding every fragment (case-insensitive), no traceback."""
    assert result.code == 2, f"exit code {result.code}; stdout:\n{result.out}\nstderr:\n{result.err}"
    assert "Traceback" not in result.err
    line = error_line(result)
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}"
    return line


def snapshot(*folders: Path) -> set[str]:
    """Every path (hidden temporaries included) under the folders."""
    out: set[str] = set()
    for folder in folders:
        for top, dirs, files in os.walk(folder):
            out.update(os.path.join(top, n) for n in [*dirs, *files])
    return out


@pytest.fixture
def unchanged(tmp_path: Path):
    """``with unchanged(folder): ...`` asserts the block leaves no new path under ``folder``."""

    @contextlib.contextmanager
    def check(*folders: Path):
        folders = folders or (tmp_path,)
        before = snapshot(*folders)
        yield
        after = snapshot(*folders)
        assert after == before, f"left behind: {sorted(after - before)}; removed: {sorted(before - after)}"

    return check
