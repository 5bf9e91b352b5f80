"""The selfcheck runs end to end (reduced) and its table reports what it promises."""

from __future__ import annotations

import pytest

from higanbana.cli import main
from higanbana.workflows.selfcheck import format_table, run_selfcheck


@pytest.mark.slow
def test_reduced_selfcheck_trains_saves_and_reloads(tmp_path):
    rows = run_selfcheck(tmp_path, steps=8, only=["lora", "oft"])
    assert [r.label for r in rows] == ["lora", "oft"]
    for row in rows:
        assert row.loss_after < row.loss_before
        assert row.mode_error < 1e-4
        assert row.reload_error == 0.0
        assert (tmp_path / f"{row.label}.safetensors").stat().st_size > 0
    table = format_table(rows)
    assert "merged-vs-bypass" in table and "lora" in table


def test_cli_lists_algorithms(capsys):
    assert main(["algorithms"]) == 0
    out = capsys.readouterr().out
    for name in ("lora", "loha", "lokr", "ia3", "glora", "oft", "boft", "full", "norm"):
        assert name in out
