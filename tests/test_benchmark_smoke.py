"""The layer benchmark keeps running (op counts only: deterministic, no timing asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

LAYERS = Path(__file__).resolve().parent.parent / "benchmarks" / "layers.py"


@pytest.mark.slow
def test_layers_benchmark_counts_ops(capsys):
    spec = importlib.util.spec_from_file_location("bench_layers", LAYERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    rc = module.main(
        ["--ops-only", "--algos", "lora,ia3,oft", "--shapes", "linear320,conv320", "--tokens", "64", "--no-peers"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "| lora |" in out and "| oft |" in out
