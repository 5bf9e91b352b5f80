"""``higanbana demo``: the paper's experiment in the miniature world. The quick plan (one concept,
two algorithms, a few dozen steps) runs end to end here, and fine-tuning must raise fidelity on
the ``<trigger>`` prompt above the base model's (the adapters learned the concept)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from higanbana.cli import build_parser
from higanbana.errors import ConfigError
from higanbana.evaluate.aggregate import load_table
from higanbana.evaluate.config import EvalConfig
from higanbana.miniworld.demo import (
    PLANS,
    WORLD_ALTER_TEMPLATES,
    DemoPlan,
    demo_workers,
    estimate_minutes,
    run_demo,
    write_demo,
)
from higanbana.miniworld.tokenizer import world_tokenizer
from higanbana.train import TrainConfig
from higanbana.workflows.experiment import Grid

REPORT_SECTIONS = ("findings", "ranking", "correlations", "scatter", "importance", "scores", "raw", "images")


def check_report_in_browser(html: Path) -> None:
    """The demo's report opened in headless Chromium: every section, figure and table of the file is
    in the rendered page, the console logs no error, and a screenshot is kept (under CI: in
    ``ci-artifacts/`` of the checkout, the run's folder)."""
    text = html.read_text(encoding="utf-8")
    for anchor in REPORT_SECTIONS:
        assert f'<section id="{anchor}">' in text, anchor
    images, tables = text.count("<img "), text.count("<table")
    assert images >= 5 and tables >= 5
    browser = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    assert browser, "no headless Chromium: .ci/run installs Debian's chromium; locally: apt-get install chromium"
    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
             "--enable-logging=stderr", "--v=0", "--dump-dom", html.resolve().as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    dom = run.stdout
    assert run.returncode == 0 and "</html>" in dom, run.stderr[-2000:]
    assert dom.count("<img ") == images and dom.count("<table") == tables
    assert all(f'id="{anchor}"' in dom for anchor in REPORT_SECTIONS)
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    artifacts = Path(os.environ.get("HIGANBANA_ARTIFACTS", Path(__file__).resolve().parents[2] / "ci-artifacts"))
    shot = (artifacts if os.environ.get("CI") else html.parent) / "demo-report.png"
    script = Path(__file__).resolve().parents[2] / "scripts" / "screenshot_report.sh"
    res = subprocess.run(["bash", str(script), str(html), str(shot), "1280,2400"], capture_output=True, text=True)
    assert res.returncode == 0 and shot.stat().st_size > 10_000, res.stderr


def test_full_plan_is_the_papers_table_1_grid(tmp_path):
    grid = Grid.load(write_demo(tmp_path, PLANS["full"]))
    assert len(grid.configs) == 9  # 4 algorithms x 2 learning rates, and LoRA at twice the rank
    assert len(grid.seeds) == 3  # several seeds: an interval for every finding
    assert {o["network.algo"] for o in grid.configs.values()} == {"lora", "loha", "lokr", "full"}
    assert len(grid.epochs) == 2
    train = TrainConfig.load(grid.train)
    assert train.data.resolution in (32, [32, 32])
    evaluation = EvalConfig.load(grid.evaluate)
    assert evaluation.prompts.types == ["train", "trigger", "alter", "style"]
    assert evaluation.prompts.alter_templates == WORLD_ALTER_TEMPLATES
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["1_qarn scene", "1_vlek style", "1_zorb toy"]


def test_world_templates_speak_the_world_language():
    """Every template word but the descriptor is one token of the world tokenizer (a word the base
    model was trained on)."""
    tok = world_tokenizer()
    for templates in WORLD_ALTER_TEMPLATES.values():
        for t in templates:
            for word in t.replace("{}", "").replace(",", " ").split():
                assert len(tok(word, add_special_tokens=False).input_ids) == 1, (t, word)


def test_plan_errors():
    with pytest.raises(ConfigError, match="demo concepts must be among"):
        DemoPlan(concepts=("dragon",))
    with pytest.raises(ConfigError, match="demo algorithms must be among"):
        DemoPlan(algorithms=("dreambooth",))
    with pytest.raises(ConfigError, match="unknown demo plan 'huge'"):
        run_demo("unused", "huge")


def test_workers_one_per_core_when_idle_more_when_busy():
    assert demo_workers(cores=2, load=0.0, runs=24) == 2
    assert demo_workers(cores=2, load=1.4, runs=24) == 2  # our own past load, or a light one
    # load 4x the cores: 8 processes keep about half of the 2 cores (8 of 16 runnable)
    assert demo_workers(cores=2, load=8.0, runs=24) == 8
    assert demo_workers(cores=2, load=30.0, runs=24) == 8  # at most 4 per core
    assert demo_workers(cores=16, load=0.0, runs=8) == 8  # never more than the runs
    assert demo_workers(cores=1, load=0.0, runs=1) == 1


def test_time_estimate_scales_with_the_work_and_the_cores():
    full, quick = PLANS["full"], PLANS["quick"]
    one = estimate_minutes(full, 1, probe=0.25)
    assert estimate_minutes(full, 2, probe=0.25) == pytest.approx(one / 2)
    assert estimate_minutes(full, 2, probe=0.5) == pytest.approx(one)  # a machine half as fast
    assert estimate_minutes(quick, 1, probe=0.25) < one / 20


def test_cli_parses_demo():
    args = build_parser().parse_args(["demo", "--plan", "quick", "--out", "x"])
    assert (args.plan, args.out) == ("quick", "x")


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_learns_the_concept(tmp_path):
    logs: list[str] = []
    result = run_demo(tmp_path, "quick", progress=False, log=logs.append)
    assert result.report is not None and result.report.is_file()
    assert (tmp_path / "summary.txt").read_text(encoding="utf-8").startswith("Tentative ranking")
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert set(summary) >= {"ranking", "criteria", "fidelity_correlations", "trigger_fidelity", "findings"}
    assert logs[0].startswith("demo: 2 training runs") and "about" in logs[0] and "re-run resumes" in logs[0]
    assert list(result.ranking.columns) == ["lora", "lokr"]  # native would be one column per learning rate
    assert list(result.ranking.index) == ["Fidelity", "Controllability", "Diversity", "Base preservation"]
    assert len(result.fidelity_correlations) > 0
    # every finding is in the summary; a correlation over 4 checkpoints says nothing, one seed gives no interval
    assert len(summary["findings"]) == len(result.findings.table) >= 17
    assert "vendi<trigger> (Pearson r): paper -0.68, here n too small (4 checkpoints)" in result.summary
    assert "inconclusive (1 seed(s); an interval needs 3)" in result.summary
    assert '<section id="findings">' in (tmp_path / "eval" / "report.html").read_text(encoding="utf-8")
    # the world's own prompts were used
    prompts = {p["prompt"] for p in json.loads((tmp_path / "eval" / "prompts.json").read_text(encoding="utf-8"))}
    assert "zorb toy, outlined style" in prompts and "zorb toy" in prompts
    # alter diversity is a Vendi score per prompt: some prompt has two images, so it is not pinned to 1
    raw = load_table(tmp_path / "eval" / "raw_metrics.csv")
    vendi = raw[(raw["metric"] == "vendi") & (raw["prompt_type"] == "alter")]["value"]
    assert (vendi > 1.0 + 1e-6).any(), vendi.tolist()
    check_report_in_browser(tmp_path / "eval" / "report.html")
    # the adapters learned the concept: fidelity on <trigger> above the base model's
    fidelity = result.trigger_fidelity.loc["zorb_toy"]
    tuned = [m for m in fidelity.index if m != "base"]
    assert len(tuned) == 4
    for model in tuned:
        assert fidelity[model] > fidelity["base"] + 0.05, fidelity.to_dict()


@pytest.mark.slow
def test_ctrl_c_while_workers_train_is_one_line_and_stops_them(tmp_path):
    """A terminal's Ctrl-C (SIGINT to the whole process group) while the worker processes train:
    exit 130, the one-line notice that a re-run resumes, no traceback or leaked-semaphore warning,
    and no worker left running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from higanbana.cli import main; "
        f"sys.exit(main(['demo', '--plan', 'quick', '--workers', '2', '--no-progress', '--out', {str(tmp_path)!r}]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    for line in proc.stdout:
        if line.startswith("training 2 run(s) in 2 processes"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines() == ["interrupted; a re-run of the demo skips the work already done"], err
    with pytest.raises(ProcessLookupError):  # the group is gone: the workers stopped with the parent
        for _ in range(50):
            os.killpg(proc.pid, 0)
            time.sleep(0.1)
