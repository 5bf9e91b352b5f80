"""The paper's findings, re-measured with bootstrap intervals and a verdict each.

An experiment (or the demo) re-measures what the paper reports: the tentative ranking of its
Table 1 (rank agreement per criterion as Kendall's τ-b), the fidelity trade-offs of its Fig. 6c
(Pearson correlations of rank scores), the SCD correction (with the squared centroid distance the
fidelity–diversity correlation rises towards 0), and the directions of "Influence of
hyperparameters" (more epochs, a higher learning rate, a larger capacity: fidelity up,
controllability and diversity down).

The uncertainty comes from two sources, and the bootstrap resamples both: the seeds (every run of a
seed is kept or dropped together, so paired comparisons stay paired) and the concepts (each
replicate averages its draw within categories, then over categories, as the point estimate does).
Rank scores are normalised once, over all checkpoints (as the report's); the replicates reweight
them. A statistic over too few models says "n too small" instead of a number; fewer than
:data:`MIN_SEEDS` seeds give no interval. The verdict compares the 95 % interval with the paper's
sign: *reproduced* when it excludes 0 on the paper's side, *not reproduced* when on the other side,
*inconclusive* otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from higanbana.evaluate import metrics
from higanbana.evaluate.aggregate import models_frame, ranked_criteria

__all__ = [
    "FIG6C",
    "MIN_CHECKPOINTS",
    "MIN_SEEDS",
    "PAPER_RANKING",
    "Findings",
    "describe",
    "display_table",
    "find",
    "format_findings",
    "paper_columns",
]

#: The paper's Table 1 (higher = better), by criterion and column.
PAPER_RANKING: dict[str, dict[str, int]] = {
    metrics.FIDELITY: {"lora": 3, "loha": 2, "lokr": 4, "native (higher lr)": 5, "native (lower lr)": 1},
    metrics.CONTROLLABILITY: {"lora": 2, "loha": 4, "lokr": 1, "native (higher lr)": 3, "native (lower lr)": 5},
    metrics.DIVERSITY: {"lora": 3, "loha": 4, "lokr": 2, "native (higher lr)": 1, "native (lower lr)": 5},
}

#: The paper's Fig. 6c: ((metric, prompt type), (metric, prompt type)) -> Pearson r of rank scores.
FIG6C: dict[tuple[tuple[str, str], tuple[str, str]], float] = {
    (("fidelity_cos", "trigger"), ("vendi", "trigger")): -0.68,
    (("fidelity_cos", "alter"), ("text_alignment", "alter")): -0.66,
    (("fidelity_cos", "train"), ("vendi", "trigger")): -0.42,
    (("fidelity_cos", "alter"), ("style_loss", "style")): -0.26,
}
#: The SCD correction: r(SCD<trigger>, Vendi<trigger>) is +0.02 where the cosine's is −0.68.
SCD_PAIR = (("fidelity_scd", "trigger"), ("vendi", "trigger"))
SCD_PAPER = (0.02, -0.68)

#: Hyper-parameter -> (what the finding says, columns that only re-state it and are not matched on).
DIRECTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "epoch": ("more epochs", ()),
    "lr": ("a higher learning rate", ("unet_lr", "text_encoder_lr", "learning_rate")),
    "capacity": ("a larger capacity", ("rank", "alpha", "factor", "dim", "linear_dim", "linear_alpha")),
}
#: The paper's direction per criterion when any of them grows: +1 up, −1 down.
DIRECTION_SIGNS: dict[str, int] = {metrics.FIDELITY: 1, metrics.CONTROLLABILITY: -1, metrics.DIVERSITY: -1}

#: fewer fine-tuned checkpoints than this and a correlation over them is noise, whatever its value
MIN_CHECKPOINTS = 8
#: fewer seeds than this and a bootstrap over them cannot tell noise from an effect
MIN_SEEDS = 3
N_TOO_SMALL = "n too small"


@dataclass
class Findings:
    """``table``: one row per finding (``finding, statistic, paper, value, low, high, n, verdict``;
    value/low/high are NaN where the n is too small); ``ranking``: criterion × column cells such as
    ``"3 [2–4]"`` (rank, 95 % interval; higher = better); ``seeds``, ``concepts``: what was resampled."""

    table: pd.DataFrame
    ranking: pd.DataFrame
    seeds: int
    concepts: int
    replicates: int


def paper_columns(models: pd.DataFrame, group_by: str) -> dict[str, str]:
    """Our ranking column -> the paper's Table 1 column: a column of LoRA, LoHa or LoKr runs is that
    algorithm; of exactly two columns of native (``full``) runs, the one with the higher learning
    rate is "native (higher lr)" (the paper's 5e-6), the other "native (lower lr)" (1e-6)."""
    models = models_frame(models)
    if group_by not in models or "algo" not in models:
        return {}
    out: dict[str, str] = {}
    native: list[tuple[float, str]] = []
    for column, rows in models.loc[models["model"] != "base"].groupby(models[group_by].astype(str)):
        algos = set(rows["algo"].astype(str))
        if len(algos) != 1:
            continue
        algo = algos.pop()
        if algo in ("lora", "loha", "lokr"):
            out[column] = algo
        elif algo == "full" and "lr" in rows and rows["lr"].nunique() == 1:
            native.append((float(rows["lr"].iloc[0]), column))
    if len(native) == 2 and native[0][0] != native[1][0]:
        low, high = sorted(native)
        out[high[1]], out[low[1]] = "native (higher lr)", "native (lower lr)"
    if len(set(out.values())) != len(out):  # two columns claim one paper column: no mapping is safe
        return {}
    return out


# ----------------------------------------------------------------------------- the data as arrays


@dataclass
class _Data:
    models: list[str]
    concepts: list[str]
    categories: np.ndarray  # concept -> category index
    seeds: np.ndarray  # model -> seed index
    n_seeds: int
    columns: dict[tuple[str, str], np.ndarray]  # (metric, prompt) -> (model, concept) scores
    criteria: dict[str, np.ndarray]  # criterion -> (model, concept) scores


def _arrays(scores: pd.DataFrame, models: pd.DataFrame, criteria) -> _Data:
    df = scores.copy()
    for col in ("category", "subclass"):
        if col not in df:
            df[col] = ""
    by = ["model", "category", "concept", "prompt_type", "metric"]
    mean = df.groupby(by, sort=False)["score"].mean()  # over sub-classes
    names = [m for m in models_frame(models)["model"].astype(str) if m in set(df["model"].astype(str))]
    concept_cat = df.drop_duplicates("concept").set_index("concept")["category"].astype(str)
    concepts = sorted(concept_cat.index.astype(str))
    cat_names = sorted(set(concept_cat))
    categories = np.array([cat_names.index(concept_cat[c]) for c in concepts])
    frame = models_frame(models).set_index("model")
    seed_values = frame["seed"].reindex(names).astype(str) if "seed" in frame else pd.Series("0", index=names)
    seed_names = sorted(set(seed_values))
    seeds = np.array([seed_names.index(s) for s in seed_values])

    wide = mean.reset_index().pivot_table(
        index=["model", "concept"], columns=["metric", "prompt_type"], values="score", aggfunc="mean"
    )
    full = pd.MultiIndex.from_product([names, concepts], names=["model", "concept"])
    wide = wide.reindex(full)
    columns = {col: wide[col].to_numpy(float).reshape(len(names), len(concepts)) for col in wide.columns}
    crit: dict[str, np.ndarray] = {}
    for name, (metric, prompt_types) in criteria.items():
        prompt_types = [prompt_types] if isinstance(prompt_types, str) else list(prompt_types)
        parts = [columns[(metric, p)] for p in prompt_types if (metric, p) in columns]
        if parts:  # the mean over the prompt types measured; NaN where none is (a missing metric)
            stack = np.stack(parts)
            count = np.isfinite(stack).sum(axis=0)
            total = np.where(np.isfinite(stack), stack, 0.0).sum(axis=0)
            crit[name] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return _Data(names, concepts, categories, seeds, len(seed_names), columns, crit)


def _model_means(values: np.ndarray, concept_w: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """(model, concept) -> model: weighted mean within each category, then the mean over categories."""
    per_cat = []
    for cat in np.unique(categories):
        w = concept_w * (categories == cat)
        if w.sum() > 0:
            per_cat.append((values * w).sum(axis=1) / w.sum())
    return np.mean(per_cat, axis=0)


def _pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Weighted Pearson r (integer weights = rows repeated); NaN rows dropped."""
    ok = np.isfinite(x) & np.isfinite(y) & (w > 0)
    if ok.sum() < 2:
        return float("nan")
    cov = np.cov(x[ok], y[ok], aweights=w[ok])
    den = np.sqrt(cov[0, 0] * cov[1, 1])
    return float(cov[0, 1] / den) if den > 0 else float("nan")


# ----------------------------------------------------------------------------- statistics


def _direction_pairs(models: pd.DataFrame, names: list[str], factor: str, features: Sequence[str]):
    """(low, high) model index pairs: models equal in every other hyper-parameter, lowest and highest
    ``factor`` value of each such group (``features`` names the hyper-parameters)."""
    frame = models_frame(models).set_index("model").reindex(names)
    if factor not in frame or frame[factor].dropna().nunique() < 2:
        return []
    skip = {factor, *DIRECTIONS[factor][1]}
    keys = [f for f in features if f in frame and f not in skip]
    values = pd.to_numeric(frame[factor], errors="coerce")
    pairs = []
    groups = frame.groupby(keys, dropna=False, sort=False).indices if keys else {(): np.arange(len(names))}
    for idx in groups.values():
        idx = [i for i in idx if np.isfinite(values.iloc[i])]
        if len(idx) < 2:
            continue
        vals = values.iloc[idx].to_numpy()
        if vals.min() == vals.max():
            continue
        pairs.append((idx[int(np.argmin(vals))], idx[int(np.argmax(vals))]))
    return pairs


def _statistics(d: _Data, seed_w: np.ndarray, concept_w: np.ndarray, plan) -> np.ndarray:
    """Every finding's statistic under these seed and concept weights (one bootstrap replicate)."""
    model_w = seed_w[d.seeds].astype(float)
    out = []
    per_model = {name: _model_means(v, concept_w, d.categories) for name, v in d.criteria.items()}
    rank_cells = []
    for criterion, groups, paper, _names in plan["ranking"]:
        means = np.array([np.average(per_model[criterion][g], weights=model_w[g]) if model_w[g].sum() else np.nan
                          for g in groups])  # fmt: skip
        ranks = stats.rankdata(means, method="min")  # 1 (worst) .. k, ties the lowest: the report's ranking
        rank_cells.append(ranks)
        out.append(stats.kendalltau(ranks, paper).statistic if np.isfinite(means).all() else np.nan)
    rows_w = (model_w[:, None] * concept_w[None, :]).ravel()
    for a, b in plan["correlations"]:
        out.append(_pearson(d.columns[a].ravel(), d.columns[b].ravel(), rows_w))
    if plan["scd"]:
        (scd, vendi), cos = SCD_PAIR, ("fidelity_cos", "trigger")
        r_scd = _pearson(d.columns[scd].ravel(), d.columns[vendi].ravel(), rows_w)
        r_cos = _pearson(d.columns[cos].ravel(), d.columns[vendi].ravel(), rows_w)
        out.append(r_scd - r_cos)
    for criterion, pairs in plan["directions"]:
        low, high = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        # a pair of one seed is one draw of it; of two seeds, of both
        w = np.where(d.seeds[high] == d.seeds[low], model_w[high], model_w[high] * model_w[low])
        diff = per_model[criterion][high] - per_model[criterion][low]
        out.append(float(np.average(diff, weights=w)) if w.sum() else np.nan)
    return np.concatenate([np.array(out, float), *rank_cells]) if rank_cells else np.array(out, float)


def _verdict(low: float, high: float, sign: int) -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive"
    if (low > 0 and sign > 0) or (high < 0 and sign < 0):
        return "reproduced"
    if (low > 0 and sign < 0) or (high < 0 and sign > 0):
        return "not reproduced"
    return "inconclusive"


def find(
    scores: pd.DataFrame,
    models: pd.DataFrame,
    *,
    group_by: str = "algo",
    features: Sequence[str] | None = None,
    columns: Mapping[str, str] | None = None,
    replicates: int = 1000,
    seed: int = 0,
    criteria: Mapping[str, tuple[str, Sequence[str]]] | None = None,
) -> Findings:
    """The paper's findings on rank ``scores`` (:func:`~higanbana.evaluate.aggregate.rank_normalize`)
    of the checkpoints in ``models``, with bootstrap intervals over seeds and concepts.

    ``group_by`` is the ranking's column; ``columns`` maps our columns to the paper's Table 1
    columns (default :func:`paper_columns`); ``features`` are the hyper-parameters a direction's
    pairs must agree on (default: every column of ``models`` but ``model`` and ``config``; an
    experiment passes its hyper-parameters, so its labels such as the ranking column are not matched).
    """
    criteria = dict(ranked_criteria() if criteria is None else criteria)
    models = models_frame(models)
    models = models.loc[models["model"].astype(str) != "base"].copy()
    models["model"] = models["model"].astype(str)
    if features is None:
        features = [c for c in models.columns if c not in ("model", "config")]
    columns = paper_columns(models, group_by) if columns is None else dict(columns)
    d = _arrays(scores, models, criteria)
    n_models = len(d.models)
    rows: list[dict] = []
    plan: dict = {"ranking": [], "correlations": [], "scd": False, "directions": []}

    groups_of = models.set_index("model")[group_by].astype(str).reindex(d.models) if group_by in models else None
    for criterion, paper in PAPER_RANKING.items():
        title = f"Ranking agreement with Table 1: {criterion} (Kendall τ-b)"
        mapped = [(ours, theirs) for ours, theirs in columns.items() if theirs in paper]
        if groups_of is None or criterion not in d.criteria or len(mapped) < 3:
            rows.append({"finding": title, "paper": 1.0, "n": len(mapped), "unit": "columns", "sign": 1,
                         "measured": False})  # fmt: skip
            continue
        idx = [np.flatnonzero(groups_of.to_numpy() == ours) for ours, _ in mapped]
        plan["ranking"].append((criterion, idx, np.array([paper[t] for _, t in mapped], float), [o for o, _ in mapped]))
        rows.append({"finding": title, "paper": 1.0, "n": len(mapped), "unit": "columns", "sign": 1,
                     "measured": True})  # fmt: skip
    for (a, b), paper in FIG6C.items():
        title = f"Fig. 6c: {a[0]}<{a[1]}> vs {b[0]}<{b[1]}> (Pearson r)"
        ok = a in d.columns and b in d.columns and n_models >= MIN_CHECKPOINTS
        rows.append({"finding": title, "paper": paper, "n": n_models, "unit": "checkpoints", "sign": -1,
                     "measured": ok})  # fmt: skip
        if ok:
            plan["correlations"].append((a, b))
    title = "SCD correction: r(SCD<trigger>, Vendi<trigger>) − r(cos<trigger>, Vendi<trigger>)"
    scd_ok = all(c in d.columns for c in (*SCD_PAIR, ("fidelity_cos", "trigger"))) and n_models >= MIN_CHECKPOINTS
    rows.append({"finding": title, "paper": round(SCD_PAPER[0] - SCD_PAPER[1], 2), "n": n_models,
                 "unit": "checkpoints", "sign": 1, "measured": scd_ok})  # fmt: skip
    plan["scd"] = scd_ok
    for factor, (words, _aliases) in DIRECTIONS.items():
        pairs = _direction_pairs(models, d.models, factor, features)
        for criterion, sign in DIRECTION_SIGNS.items():
            arrow = "up" if sign > 0 else "down"
            title = f"{words[0].upper()}{words[1:]} → {criterion} {arrow} (mean paired rank-score change)"
            ok = bool(pairs) and criterion in d.criteria
            rows.append({"finding": title, "paper": arrow, "n": len(pairs), "unit": "pairs", "sign": sign,
                         "measured": ok})  # fmt: skip
            if ok:
                plan["directions"].append((criterion, pairs))

    n_stats = sum(1 for r in rows if r["measured"])
    rng = np.random.default_rng(seed)
    concepts_w = np.ones(len(d.concepts))
    point = _statistics(d, np.ones(d.n_seeds), concepts_w, plan)
    boot = None
    if d.n_seeds >= MIN_SEEDS and replicates > 0:
        boot = np.stack([
            _statistics(d, np.bincount(rng.integers(0, d.n_seeds, d.n_seeds), minlength=d.n_seeds),
                        np.bincount(rng.integers(0, len(d.concepts), len(d.concepts)), minlength=len(d.concepts)),
                        plan)
            for _ in range(replicates)
        ])  # fmt: skip
    i = 0
    table = []
    for r in rows:
        value = low = high = float("nan")
        if r["measured"]:
            value = float(point[i])
            if boot is not None:
                finite = boot[:, i][np.isfinite(boot[:, i])]
                if len(finite) >= 0.9 * len(boot):
                    low, high = (float(q) for q in np.quantile(finite, [0.025, 0.975]))
            i += 1
        if not r["measured"]:
            verdict = N_TOO_SMALL
        elif boot is None:
            verdict = f"inconclusive ({d.n_seeds} seed(s); an interval needs {MIN_SEEDS})"
        else:
            verdict = _verdict(low, high, r["sign"])
        table.append({"finding": r["finding"], "paper": r["paper"], "value": value, "low": low, "high": high,
                      "n": f"{r['n']} {r['unit']}", "verdict": verdict})  # fmt: skip
    ranking = _ranking_cells(plan, point[n_stats:], None if boot is None else boot[:, n_stats:], columns)
    return Findings(pd.DataFrame(table), ranking, d.n_seeds, len(d.concepts), replicates if boot is not None else 0)


def _ranking_cells(plan, point: np.ndarray, boot: np.ndarray | None, columns: Mapping[str, str]) -> pd.DataFrame:
    """Criterion × column: "rank [95 % interval] / the paper's rank"."""
    cells: dict[str, dict[str, str]] = {}
    at = 0
    for criterion, _groups, paper, names in plan["ranking"]:
        for j, ours in enumerate(names):
            rank = f"{point[at + j]:g}"
            if boot is not None:
                lo, hi = np.quantile(boot[:, at + j], [0.025, 0.975])
                rank += f" [{lo:g}–{hi:g}]"
            name = ours if ours == columns[ours] else f"{ours} (paper: {columns[ours]})"
            cells.setdefault(criterion, {})[name] = f"{rank} / {paper[j]:g}"
        at += len(names)
    return pd.DataFrame(cells).T.rename_axis("criterion")


def _number(x: object) -> str:
    if isinstance(x, str):
        return x
    return f"{x:+.2f}" if np.isfinite(x) else N_TOO_SMALL


def display_table(findings: Findings) -> pd.DataFrame:
    """The findings as text cells: finding, paper, here, 95 % interval ("" without one), n, verdict."""
    t = findings.table
    return pd.DataFrame(
        {
            "finding": t["finding"],
            "paper": [_number(p) for p in t["paper"]],
            "here": [_number(v) for v in t["value"]],
            "95 % interval": [
                f"[{lo:+.2f}, {hi:+.2f}]" if np.isfinite(lo) else "" for lo, hi in zip(t["low"], t["high"], strict=True)
            ],
            "n": t["n"],
            "verdict": t["verdict"],
        }
    )


def describe(findings: Findings) -> str:
    """What was resampled, in one sentence."""
    if findings.replicates:
        return (
            f"{findings.seeds} seeds × {findings.concepts} concepts; 95 % bootstrap intervals over seeds and "
            f"concepts ({findings.replicates} replicates)"
        )
    return f"{findings.seeds} seed(s) × {findings.concepts} concept(s): no intervals, fewer than {MIN_SEEDS} seeds"


def format_findings(findings: Findings) -> str:
    """The findings as plain text: one line per finding, and the ranking with intervals."""
    lines = [f"The paper's findings, re-measured — {describe(findings)}:"]
    for row in display_table(findings).to_dict("records"):
        here = f"{row['here']} {row['95 % interval']}".rstrip()
        lines.append(f"- {row['finding']}: paper {row['paper']}, here {here} ({row['n']}) — {row['verdict']}")
    if not findings.ranking.empty:
        lines += ["", "Ranking with 95 % intervals (rank here [interval] / the paper's; higher = better):"]
        lines.append(findings.ranking.to_string())
    return "\n".join(lines)
