"""The whole-UNet step benchmark keeps running (a small-width model, two algorithms; no timing asserted)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "unet_step.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_unet_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_unet_step_quick_run(tmp_path):
    out_json = tmp_path / "out.json"
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\n## Earlier section\n\ntext\n", encoding="utf-8")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--algos", "lora,ia3", "--variants", "ours", "--modes", "auto"]
    cmd += ["--rounds", "1", "--warmup", "1", "--json", str(out_json), "--write", str(doc), "--workdir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout
    assert "| lora | ≤ 1.05× |" in table and "| ia3 | ≤ 1.05× |" in table
    assert "| lora | ours auto |" in table and "| ia3 | frozen |" in table
    assert "failed" not in table
    data = json.loads(out_json.read_text(encoding="utf-8"))
    for algo in ("lora", "ia3"):
        rows = {r["variant"]: r for r in data["results"][algo]}
        assert set(rows) == {"frozen", "ours:auto"}
        auto = rows["ours:auto"]
        assert auto["info"]["modules"] == auto["info"]["targets"] == 160  # every attention/feed-forward Linear
        assert auto["no_grad"] == 0 and len(auto["cpu"]) == 1 and auto["ratio_median"] > 0
        assert sum(n for counts in auto["auto"].values() for n in counts.values()) == 160
    text = doc.read_text(encoding="utf-8")
    assert text.index("## Earlier section") < text.index("## Whole UNet step (issue 17)")
    assert "| lora | ours auto |" in text


def test_write_section_replaces_its_own_block(tmp_path):
    module = load_script()
    doc = tmp_path / "bench.md"
    doc.write_text("# B\n\n## Whole UNet step (issue 17)\n\nintro\n\n## Later\n\nkept\n", encoding="utf-8")
    sd15 = argparse.Namespace(arch="sd15", quick=False, targets="attn-ff", device="cpu")
    sdxl = argparse.Namespace(arch="sdxl", quick=False, targets="attn-ff", device="cpu")
    module.write_section(doc, sd15, ["BLOCK-ONE"])
    module.write_section(doc, sdxl, ["BLOCK-XL"])
    module.write_section(doc, sd15, ["BLOCK-TWO"])
    text = doc.read_text(encoding="utf-8")
    assert "BLOCK-ONE" not in text and text.count("BLOCK-TWO") == 1 and text.count("BLOCK-XL") == 1
    assert text.index("intro") < text.index("BLOCK-TWO") < text.index("## Later") and text.endswith("kept\n")
