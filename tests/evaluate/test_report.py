"""HTML report and figures: self-contained, escaped, image grids; optional headless-Chromium screenshot."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from higanbana.errors import HiganbanaError
from higanbana.evaluate import aggregate as agg
from higanbana.evaluate import report

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "screenshot_report.sh"
EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def data():
    raw, models = agg.synthetic_metrics(lrs=(1e-4, 5e-4), seeds=(1, 2), seed=3)
    evil = models["model"].iloc[1]
    raw["model"] = raw["model"].replace(evil, EVIL)
    models["model"] = models["model"].replace(evil, EVIL)
    scores = agg.rank_normalize(raw)
    return raw, models, scores


def _png_ok(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("L"), dtype=float)
    assert arr.std() > 1.0  # not blank


def test_heatmap_and_scatter(tmp_path, data):
    _, models, scores = data
    corr = agg.correlations(scores)
    _png_ok(report.correlation_heatmap(corr, tmp_path / "c.png"))
    _png_ok(report.scatter_pairs(scores, models, None, tmp_path / "s.png", marker_by="lr"))
    pts = report.pair_points(scores, models, report.DEFAULT_PAIRS[0])
    assert len(pts) == 6  # 3 algos x 2 lrs; seeds averaged
    assert (pts["n"] == 2 * 3).all()  # seeds x concepts
    assert (pts["x_se"] > 0).all()


def test_write_report_self_contained_escaped_with_grids(tmp_path, data):
    raw, models, scores = data
    img = tmp_path / "sample.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(img)
    grids = {
        (EVIL, "train"): [img] * 10,
        ("base", "style"): [Image.new("RGB", (50, 50), (0, 0, 255))],
    }
    imp = agg.importance(scores, models, ["algo", "lr"], seed=0, n_repeats=2)
    out = report.write_report(
        tmp_path / "rep",
        raw=raw,
        scores=scores,
        models=models,
        ranking=agg.tentative_ranking(scores, models),
        corr=agg.correlations(scores),
        importance=imp,
        image_grids=grids,
        title="eval & <b>test</b>",
        notes=["note <i>1</i>"],
    )
    assert out == tmp_path / "rep" / "report.html"
    text = out.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<link" not in text and "@import" not in text
    # heatmap, scatter, importance chart + 2 grid cells
    assert text.count('src="data:image/png;base64,') == 3
    assert text.count('src="data:image/jpeg;base64,') == 2
    assert "<script" not in text.lower()
    assert html_escaped(EVIL) in text
    assert "eval &amp; &lt;b&gt;test&lt;/b&gt;" in text and "note &lt;i&gt;1&lt;/i&gt;" in text
    for section in ("Tentative ranking", "Metric correlations", "Hyper-parameter importance", "Samples"):
        assert section in text
    for name in ("raw_metrics.csv", "scores.csv", "ranking.csv"):
        assert (tmp_path / "rep" / name).is_file()
    assert len(list((tmp_path / "rep").glob("*.html"))) == 1
    ranking = pd.read_csv(tmp_path / "rep" / "ranking.csv")
    assert list(ranking.columns) == ["criterion", "lora", "loha", "lokr"]


def html_escaped(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_image_grid_limits_and_errors(tmp_path):
    from io import BytesIO

    data = report.image_grid([Image.new("RGB", (200, 100))] * 12, limit=8, size=96, columns=4)
    with Image.open(BytesIO(data)) as im:
        assert im.size == (4 * 96, 2 * 96)
    with pytest.raises(HiganbanaError, match="cannot read image"):
        report.image_grid([tmp_path / "missing.png"])
    with pytest.raises(HiganbanaError, match="no images"):
        report.image_grid([])


def test_write_report_minimal(tmp_path, data):
    raw, models, scores = data
    small = agg.importance(scores.loc[scores["model"] == EVIL], models, ["lr"])
    out = report.write_report(
        tmp_path, raw=raw, scores=scores, models=models.drop(columns="algo"), ranking=None, corr=None, importance=small
    )
    text = out.read_text(encoding="utf-8")
    assert "at least 4 models" in text
    assert "Tentative ranking" not in text


@pytest.mark.skipif(
    not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")) and not os.environ.get("CI"),
    reason="no headless Chromium on PATH (CI installs it and runs this test: there a missing browser fails)",
)
def test_screenshot_in_headless_chromium(tmp_path, data):
    raw, models, scores = data
    html_path = report.write_report(
        tmp_path / "rep",
        raw=raw,
        scores=scores,
        models=models,
        ranking=agg.tentative_ranking(scores, models),
        corr=agg.correlations(scores),
    )
    png = tmp_path / "shot.png"
    res = subprocess.run(
        ["bash", str(SCRIPT), str(html_path), str(png), "1000,1200"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    _png_ok(png)
    with Image.open(png) as im:
        assert im.size == (1000, 1200)


def test_screenshot_script_usage_errors(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr
    res = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "none.html"), "x.png"], capture_output=True, text=True)
    assert res.returncode == 2 and "no such report" in res.stderr
