"""Figures and a self-contained HTML report of an evaluation (docs/design.md §5).

Figures use matplotlib's Agg canvas directly (no pyplot, no display). The report embeds every image
as a base64 data URI and its CSS inline, so it opens offline and fetches nothing.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from higanbana.errors import ConfigError, HiganbanaError
from higanbana.evaluate.aggregate import (
    PROMPT_TYPES,
    _require,
    atomic_write,
    average_hierarchy,
    column_order,
    label,
    models_frame,
    save_table,
)

Pair = tuple[tuple[str, str], tuple[str, str]]

DEFAULT_PAIRS: list[Pair] = [
    (("text_alignment", "alter"), ("fidelity_cos", "alter")),
    (("vendi", "trigger"), ("fidelity_scd", "trigger")),
    (("style_loss", "style"), ("fidelity_cos", "train")),
]
"""The paper's scatter pairs, (x, y) as (metric, prompt_type)."""

MARKERS = "osD^vP*Xhp<>"


# ----------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return path


def _column_label(col) -> str:
    if isinstance(col, tuple) and len(col) == 2:
        return label(str(col[0]), str(col[1]))
    return str(col)


def correlation_heatmap(corr: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Annotated Pearson-correlation heatmap (diverging colours, -1..1) written as a PNG."""
    if corr.empty:
        raise HiganbanaError("correlation matrix is empty: nothing to plot")
    n = len(corr.columns)
    size = max(4.0, 0.6 * n + 3.0)
    fig = _new_figure(size + 1.0, size)
    ax = fig.add_subplot()
    im = ax.imshow(corr.to_numpy(dtype=float), cmap="RdBu_r", vmin=-1, vmax=1)
    labels = [_column_label(c) for c in corr.columns]
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(corr.index)), [_column_label(c) for c in corr.index], fontsize=8)
    fontsize = max(5, min(9, int(120 / max(n, 1))))
    for i in range(len(corr.index)):
        for j in range(n):
            v = corr.iat[i, j]
            if np.isfinite(v):
                color = "white" if abs(v) > 0.6 else "black"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fontsize, color=color)
    fig.colorbar(im, ax=ax, shrink=0.8, label="Pearson r")
    ax.set_title("Correlation of normalised scores")
    return _save_figure(fig, path)


def _group_columns(models: pd.DataFrame, drop: Sequence[str]) -> list[str]:
    return [c for c in models.columns if c not in ("model", *drop)]


def pair_points(
    scores: pd.DataFrame,
    models: pd.DataFrame,
    pair: Pair,
    *,
    group_without: Sequence[str] = ("seed",),
    value: str = "score",
) -> pd.DataFrame:
    """Per model group (config without seed): mean and standard error of x and y over seeds x concepts."""
    _require(scores, ("model", "concept", "prompt_type", "metric", value), "scores")
    (mx, px), (my, py) = pair
    models = models_frame(models)
    keys = ["model", "concept"]
    concept = scores.groupby([*keys, "metric", "prompt_type"], sort=False)[value].mean()
    try:
        x = concept.xs((mx, px), level=("metric", "prompt_type")).rename("x")
        y = concept.xs((my, py), level=("metric", "prompt_type")).rename("y")
    except KeyError:
        return pd.DataFrame(columns=["group", "x", "y", "x_se", "y_se", "n"])
    xy = pd.concat([x, y], axis=1, join="inner").reset_index()
    gcols = _group_columns(models, group_without)
    xy = xy.merge(models, on="model", how="left")
    if gcols:
        # parameters some models lack are NaN (pandas 3 keeps NaN through astype(str)): show them as ""
        labels = xy[gcols].map(_text)
        xy["group"] = labels.agg(", ".join, axis=1)
    else:
        xy["group"] = xy["model"]
    agg = xy.groupby("group", sort=False).agg(
        x=("x", "mean"), y=("y", "mean"), x_sd=("x", "std"), y_sd=("y", "std"), n=("x", "size")
    )
    root = np.sqrt(agg["n"].astype(float))
    agg["x_se"] = (agg.pop("x_sd") / root).fillna(0.0)
    agg["y_se"] = (agg.pop("y_sd") / root).fillna(0.0)
    first = xy.drop_duplicates("group").set_index("group")
    for c in gcols:
        agg[c] = first[c]
    return agg.reset_index()


def _text(value: object) -> str:
    """A parameter value as a label ("" for a missing one; pandas 3 keeps NaN through astype(str))."""
    return "" if pd.isna(value) else str(value)


def scatter_pairs(
    scores: pd.DataFrame,
    models: pd.DataFrame,
    pairs: Sequence[Pair] | None,
    path: str | os.PathLike,
    *,
    color_by: str | None = "algo",
    marker_by: str | None = None,
    group_without: Sequence[str] = ("seed",),
) -> Path:
    """Scatter plots of metric pairs, one point per model group with standard-error bars, one subplot each.

    ``pairs`` is a list of ((x_metric, x_prompt), (y_metric, y_prompt)); None uses :data:`DEFAULT_PAIRS`.
    Pairs without data are drawn as empty panels saying so.
    """
    pairs = list(DEFAULT_PAIRS if pairs is None else pairs)
    if not pairs:
        raise ConfigError("scatter_pairs needs at least one metric pair")
    models = models_frame(models)
    for col in (color_by, marker_by):
        if col is not None and col not in models.columns:
            raise ConfigError(f"models table has no column {col!r} to colour or mark by; it has {list(models.columns)}")
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig = _new_figure(4.6 * cols + 1.8, 4.2 * rows)
    shown = models.loc[models["model"].isin(scores["model"].astype(str).unique())]
    color_values = sorted(shown[color_by].map(_text).unique()) if color_by else ["all"]
    cmap = colormaps["tab10"]
    colors = {v: cmap(i % 10) for i, v in enumerate(color_values)}
    marker_values = sorted(shown[marker_by].map(_text).unique()) if marker_by else []
    markers = {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(marker_values)}
    for k, pair in enumerate(pairs):
        ax = fig.add_subplot(rows, cols, k + 1)
        pts = pair_points(scores, models, pair, group_without=group_without)
        (mx, px), (my, py) = pair
        ax.set_xlabel(label(mx, px), fontsize=9)
        ax.set_ylabel(label(my, py), fontsize=9)
        if pts.empty:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
            continue
        for _, p in pts.iterrows():
            c = colors[_text(p[color_by])] if color_by and color_by in pts else colors["all"]
            m = markers.get(_text(p[marker_by]), "o") if marker_by and marker_by in pts else "o"
            ax.errorbar(p["x"], p["y"], xerr=p["x_se"], yerr=p["y_se"], fmt=m, color=c, ms=6, capsize=2, lw=1)
        ax.grid(alpha=0.3)
    handles = []
    if color_by:
        handles += [Line2D([], [], marker="o", ls="", color=colors[v], label=f"{color_by}={v}") for v in color_values]
    if marker_by:
        handles += [Line2D([], [], marker=markers[v], ls="", color="gray", label=f"{marker_by}={v}") for v in markers]
    if handles:
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle("Normalised scores (mean ± s.e. over seeds × concepts)", fontsize=11)
    fig.tight_layout()
    return _save_figure(fig, path)


def importance_chart(importance: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Horizontal bar chart of permutation importance, one panel per criterion; a bar per feature and
    scope (``lr [algo=lora]`` for an importance within one algorithm)."""
    importance = importance.dropna(subset=["criterion"])
    criteria = list(dict.fromkeys(importance["criterion"]))
    if not criteria:
        raise HiganbanaError("importance table is empty: nothing to plot")
    scope = importance["scope"] if "scope" in importance else pd.Series("all models", index=importance.index)
    labels = [
        f if s == "all models" else f"{f} [{s}]" for f, s in zip(importance["feature"].astype(str), scope, strict=True)
    ]
    importance = importance.assign(label=labels)
    fig = _new_figure(3.2 * len(criteria) + 0.5, 0.35 * importance["label"].nunique() + 1.8)
    for k, crit in enumerate(criteria):
        ax = fig.add_subplot(1, len(criteria), k + 1)
        sub = importance.loc[importance["criterion"] == crit]
        ax.barh(sub["label"], sub["importance_mean"], xerr=sub["importance_std"], color="#4878a8")
        ax.set_title(str(crit), fontsize=9)
        ax.tick_params(labelsize=8)
        if k:
            ax.set_yticklabels([])
        ax.invert_yaxis()
    fig.suptitle("Permutation importance of hyper-parameters", fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def image_grid(images: Sequence, *, limit: int = 8, size: int = 96, columns: int = 4) -> bytes:
    """JPEG bytes of up to ``limit`` images (paths or PIL images), each fitted into ``size`` px squares."""
    from PIL import Image

    images = list(images)[:limit]
    if not images:
        raise HiganbanaError("image_grid got no images")
    cols = min(columns, len(images))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * size, rows * size), "white")
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            img = item.convert("RGB")
        else:
            try:
                with Image.open(item) as f:
                    img = f.convert("RGB")
            except (OSError, ValueError) as e:
                raise HiganbanaError(f"cannot read image {item}: {e}") from e
        img.thumbnail((size, size))
        x = (i % cols) * size + (size - img.width) // 2
        y = (i // cols) * size + (size - img.height) // 2
        grid.paste(img, (x, y))
    buf = io.BytesIO()
    grid.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# ----------------------------------------------------------------------------- HTML


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _data_uri(data: bytes) -> str:
    mime = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _img(png: bytes, alt: str, cls: str = "fig") -> str:
    return f'<img class="{cls}" alt="{_esc(alt)}" src="{_data_uri(png)}">'


def _fmt(v) -> str:
    if isinstance(v, float | np.floating):
        return "" if not np.isfinite(v) else f"{v:.4g}"
    if v is None or v is pd.NA:
        return ""
    return str(v)


def _cell_style(v, shade: bool) -> str:
    if not shade or not isinstance(v, float | np.floating) or not np.isfinite(v):
        return ""
    t = float(np.clip(v, 0.0, 1.0))
    return f' style="background:hsl({int(120 * t)},60%,85%)"'


def _html_table(df: pd.DataFrame, *, shade: bool = False, index: bool = True) -> str:
    """Escaped HTML table; (metric, prompt) column tuples get human labels; scores can be shaded."""
    names = [n for n in df.index.names if n is not None]
    head = [_esc(", ".join(map(str, names)))] if index else []
    head += [_esc(_column_label(c)) for c in df.columns]
    out = ['<div class="scroll"><table><thead><tr>', *(f"<th>{h}</th>" for h in head), "</tr></thead><tbody>"]
    for idx, row in df.iterrows():
        out.append("<tr>")
        if index:
            name = ", ".join(map(str, idx)) if isinstance(idx, tuple) else idx
            out.append(f"<th>{_esc(name)}</th>")
        for v in row:
            out.append(f"<td{_cell_style(v, shade)}>{_esc(_fmt(v))}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _wide(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """model x (metric, prompt_type) table in the registry's metric order, then prompt order."""
    wide = df.pivot_table(index="model", columns=["metric", "prompt_type"], values=value, aggfunc="mean", sort=False)
    return wide[column_order(wide.columns)]


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:12px;margin:8px 0 16px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}th{background:#f3f3f3}
thead th{position:sticky;top:0}tbody th{text-align:left;font-weight:600}
img.fig{max-width:100%;height:auto;border:1px solid #eee}
img.grid{display:block;image-rendering:auto}
.notes{color:#555}.muted{color:#888}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
nav a{margin-right:12px}.scroll{overflow-x:auto;max-width:100%}
"""


def write_report(
    out_dir: str | os.PathLike,
    *,
    raw: pd.DataFrame,
    scores: pd.DataFrame,
    models: pd.DataFrame,
    ranking: pd.DataFrame | None,
    corr: pd.DataFrame | None,
    importance: pd.DataFrame | None = None,
    findings: Any = None,
    image_grids: Mapping[tuple[str, str], Sequence] | None = None,
    title: str = "higanbana evaluation",
    notes: Sequence[str] = (),
    pairs: Sequence[Pair] | None = None,
    color_by: str | None = "algo",
    marker_by: str | None = None,
) -> Path:
    """Write ``out_dir/report.html`` (self-contained) plus raw_metrics.csv, scores.csv, ranking.csv.

    Sections: notes, the paper's findings (``findings``, a :class:`~higanbana.evaluate.findings.Findings`;
    also findings.csv), tentative ranking, correlation heatmap, scatter plots, importance (if given),
    normalised scores, raw metrics per concept, image grids (``image_grids`` maps (model, prompt_type)
    to image paths or PIL images; up to 8 shown per cell).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = models_frame(models)
    if color_by is not None and color_by not in models.columns:
        color_by = None
    if marker_by is not None and marker_by not in models.columns:
        raise ConfigError(f"models table has no column {marker_by!r} to mark by")

    save_table(raw, out / "raw_metrics.csv")
    save_table(scores, out / "scores.csv")
    if ranking is not None:
        save_table(ranking.reset_index(), out / "ranking.csv")
    if corr is not None and not corr.empty:
        flat = corr.copy()
        flat.index = [f"{m}/{p}" for m, p in flat.index]
        flat.columns = [f"{m}/{p}" for m, p in flat.columns]
        save_table(flat.rename_axis("metric").reset_index(), out / "correlations.csv")
    if importance is not None:
        save_table(importance, out / "importance.csv")

    sections: list[tuple[str, str, str]] = []  # (anchor, heading, body)

    if findings is not None:
        save_table(findings.table, out / "findings.csv")
        sections.append(("findings", "The paper's findings, re-measured", _findings_html(findings)))

    if ranking is not None:
        body = _html_table(ranking)
        body += '<p class="muted">Rank of each group\'s mean normalised score, 1 = worst, higher = better.</p>'
        sections.append(("ranking", "Tentative ranking", body))

    if corr is not None and not corr.empty:
        png = correlation_heatmap(corr, out / "correlations.png").read_bytes()
        sections.append(("correlations", "Metric correlations", _img(png, "correlation heatmap")))

    scatter = scatter_pairs(scores, models, pairs, out / "scatter.png", color_by=color_by, marker_by=marker_by)
    sections.append(("scatter", "Metric trade-offs", _img(scatter.read_bytes(), "scatter plots")))

    if importance is not None:
        dropped = importance["note"].dropna() if "note" in importance.columns else []
        table = importance.dropna(subset=["feature"]) if "feature" in importance.columns else importance
        body = ""
        if len(table):
            cols = ["scope", "feature", "criterion", "importance_mean", "importance_std"]
            body += _img(importance_chart(table, out / "importance.png").read_bytes(), "importance")
            body += _html_table(table[[c for c in cols if c in table]], index=False)
        if len(dropped):
            body += '<p class="muted">Only hyper-parameters that vary independently are scored:</p>'
            body += "<ul>" + "".join(f'<li class="muted">{_esc(n)}</li>' for n in dropped) + "</ul>"
        sections.append(("importance", "Hyper-parameter importance", body))

    avg = average_hierarchy(scores)
    body = ""
    categories = ["all", *sorted(c for c in avg["category"].unique() if c != "all")]
    for cat in categories:
        wide = _wide(avg.loc[avg["category"] == cat], "score")
        inner = _html_table(wide, shade=True)
        body += f"<details{' open' if cat == 'all' else ''}><summary>{_esc(cat)}</summary>{inner}</details>"
    sections.append(("scores", "Normalised scores (1 = best)", body))

    body = ""
    for concept in sorted(raw["concept"].astype(str).unique()):
        sub = raw.loc[raw["concept"].astype(str) == concept]
        cat = ", ".join(sorted(sub["category"].astype(str).unique())) if "category" in sub else ""
        inner = ""
        subclasses = sorted(sub["subclass"].astype(str).unique()) if "subclass" in sub else [""]
        for sc in subclasses:
            part = sub if "subclass" not in sub else sub.loc[sub["subclass"].astype(str) == sc]
            inner += (f"<h4>{_esc(sc)}</h4>" if sc else "") + _html_table(_wide(part, "value"))
        heading = f"{concept} ({cat})" if cat else concept
        body += f"<details><summary>{_esc(heading)}</summary>{inner}</details>"
    sections.append(("raw", "Raw metrics per concept", body))

    if image_grids:
        grid_models = list(dict.fromkeys(m for m, _ in image_grids))
        types = [p for p in PROMPT_TYPES if any(k[1] == p for k in image_grids)]
        types += sorted({k[1] for k in image_grids} - set(types))
        head = "".join(f"<th>{_esc(p)}</th>" for p in types)
        rows = [f'<div class="scroll"><table><thead><tr><th>model</th>{head}</tr></thead><tbody>']
        for m in grid_models:
            rows.append(f"<tr><th>{_esc(m)}</th>")
            for p in types:
                imgs = image_grids.get((m, p))
                cell = _img(image_grid(imgs), f"{m} {p}", "grid") if imgs else ""
                rows.append(f"<td>{cell}</td>")
            rows.append("</tr>")
        rows.append("</tbody></table></div>")
        sections.append(("images", "Samples", "".join(rows)))

    nav = "".join(f'<a href="#{a}">{_esc(h)}</a>' for a, h, _ in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
    ]
    n_models = raw["model"].nunique()
    n_concepts = raw["concept"].nunique()
    summary = f"{n_models} models (incl. reference), {n_concepts} concepts, {len(raw)} metric rows."
    parts.append(f'<ul class="notes"><li>{_esc(summary)}</li>{"".join(f"<li>{_esc(n)}</li>" for n in notes)}</ul>')
    parts.append(f"<nav>{nav}</nav>")
    for anchor, heading, body in sections:
        parts.append(f'<section id="{_esc(anchor)}"><h2>{_esc(heading)}</h2>{body}</section>')
    parts.append("</body></html>\n")
    text = "\n".join(parts)
    path = out / "report.html"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def _findings_html(findings: Any) -> str:
    """The findings table (value, 95 % interval, verdict per finding) and the ranking with intervals."""
    from .findings import describe, display_table

    body = f'<p class="muted">{_esc(describe(findings))}. Reproduced: the interval excludes 0 on the paper\'s side; '
    body += "not reproduced: on the other side; inconclusive: it holds 0.</p>"
    body += _html_table(display_table(findings), index=False)
    if not findings.ranking.empty:
        body += '<h3>Ranking with intervals</h3><p class="muted">rank here [95 % interval] / the paper\'s '
        body += "Table 1 (higher = better)</p>" + _html_table(findings.ranking)
    return body


def _demo(out_dir: str) -> Path:
    """Write a report of synthetic metrics (used by scripts/screenshot_report.sh's documentation)."""
    from PIL import Image

    from higanbana.evaluate.aggregate import (  # lazy: aggregate imports pandas
        correlations,
        importance,
        rank_normalize,
        synthetic_metrics,
        tentative_ranking,
    )

    raw, models = synthetic_metrics()
    scores = rank_normalize(raw)
    rng = np.random.default_rng(0)
    grids = {}
    for m in models["model"]:
        for p in PROMPT_TYPES:
            grids[(m, p)] = [Image.new("RGB", (64, 64), tuple(rng.integers(40, 230, 3).tolist())) for _ in range(8)]
    return write_report(
        out_dir,
        raw=raw,
        scores=scores,
        models=models,
        ranking=tentative_ranking(scores, models),
        corr=correlations(scores),
        importance=importance(scores, models, ["algo", "lr"]),
        image_grids=grids,
        marker_by="lr",
        title="higanbana evaluation (synthetic demo)",
        notes=["Random metric values: this report only demonstrates the layout."],
    )


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m higanbana.evaluate.report OUT_DIR  (writes a synthetic demo report)")
    print(_demo(sys.argv[1]))
