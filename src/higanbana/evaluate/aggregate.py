"""Aggregation of evaluation metrics (docs/design.md §5): rank normalisation, class averaging, rankings, importance.

Raw metrics are a long table, one row per (model, concept, prompt_type, metric), with columns
``model, concept, category, subclass, prompt_type, metric, value``. Model hyper-parameters live in a
separate ``models`` table (index or column ``model``; free-form columns such as ``algo``, ``lr``,
``preset``, ``capacity``, ``epoch``, ``seed``). Each metric's direction, label, criterion and ranked
prompt types are read from the metric registry (:func:`higanbana.evaluate.metrics.registry`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from higanbana.errors import ConfigError, HiganbanaError, nearest
from higanbana.evaluate import metrics, prompts
from higanbana.safeio import atomic_path

PROMPT_TYPES: tuple[str, ...] = prompts.PROMPT_TYPES

KEY_COLUMNS: tuple[str, ...] = ("model", "concept", "category", "subclass", "prompt_type", "metric")
"""Columns of a raw metric table besides ``value``."""

FIDELITY_CONTRASTS: tuple[tuple[str, str], ...] = (("fidelity_scd", "trigger"),)
"""(metric, prompt type) columns that stand for fidelity in :func:`fidelity_correlations` besides the
ranked fidelity metric: SCD on ``<trigger>``, fidelity without the low diversity the cosine rewards."""


def metric_directions() -> dict[str, str]:
    """Metric name -> direction ("higher" or "lower" is better), from the registry."""
    return {m.name: m.direction for m in metrics.registry()}


def ranked_criteria() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Criterion -> (metric, prompt types averaged) of every ranked metric in the registry, e.g. fidelity
    averages the cosine image similarity of the train, trigger and alter prompts, diversity the Vendi
    score of the trigger and alter prompts."""
    return {m.criterion: (m.name, m.ranked_on) for m in metrics.registry() if m.ranked_on}


def label(metric: str, prompt_type: str | None = None) -> str:
    """Human name of a metric, with the prompt type in angle brackets when given."""
    name = next((m.label for m in metrics.registry() if m.name == metric), metric)
    return f"{name} <{prompt_type}>" if prompt_type else name


def column_order(columns: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(metric, prompt_type) columns sorted as the registry declares the metrics, then by prompt type;
    unregistered metrics and prompt types go last, by name."""
    order = {m.name: i for i, m in enumerate(metrics.registry())}
    pts = {p: i for i, p in enumerate(PROMPT_TYPES)}
    return sorted(columns, key=lambda c: (order.get(c[0], len(order)), c[0], pts.get(c[1], len(pts)), c[1]))


# ----------------------------------------------------------------------------- files


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it over ``path``
    (:func:`higanbana.safeio.atomic_path`: fsync'd, removed on any error, Ctrl-C included)."""
    with atomic_path(path) as tmp:
        write(str(tmp))


def _parquet_engine() -> str:
    for engine in ("pyarrow", "fastparquet"):
        if importlib.util.find_spec(engine) is not None:
            return engine
    raise HiganbanaError("writing or reading .parquet needs pyarrow or fastparquet: pip install pyarrow")


def save_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` atomically as .csv, .json (records) or .parquet, chosen by the suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
    elif suffix == ".json":
        records = json.loads(df.to_json(orient="records", double_precision=15))
        text = json.dumps(records, indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    elif suffix == ".parquet":
        engine = _parquet_engine()
        atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False, engine=engine))
    else:
        raise ConfigError(f"{path}: unknown table format {suffix!r}; use .csv, .json or .parquet")
    return path


def load_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by :func:`save_table`; key columns come back as strings ("" for empty)."""
    path = Path(path)
    if not path.is_file():
        raise HiganbanaError(f"{path}: no such table")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        df = pd.read_csv(path, dtype=dict.fromkeys(KEY_COLUMNS, str))  # model ids like "1e-4" stay strings
    elif suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise HiganbanaError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(records, list):
            raise HiganbanaError(f"{path}: expected a JSON list of records")
        df = pd.DataFrame.from_records(records)
    elif suffix == ".parquet":
        df = pd.read_parquet(path, engine=_parquet_engine())
    else:
        raise ConfigError(f"{path}: unknown table format {suffix!r}; use .csv, .json or .parquet")
    for col in KEY_COLUMNS:
        if col in df.columns:
            df[col] = ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in df[col]]
    return df


# ----------------------------------------------------------------------------- helpers


def _require(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(f"{what} lacks column(s) {missing}; it has {list(df.columns)}")


def _directions(names: Iterable[str], extra: Mapping[str, str] | None) -> dict[str, str]:
    table = {**metric_directions(), **(extra or {})}
    out = {}
    for m in names:
        if m not in table:
            raise ConfigError(f"unknown metric {m!r}{nearest(m, table)}; pass directions={{{m!r}: 'higher'}}")
        if table[m] not in ("higher", "lower"):
            raise ConfigError(f"metric {m!r}: direction must be 'higher' or 'lower', not {table[m]!r}")
        out[m] = table[m]
    return out


def models_frame(models: pd.DataFrame) -> pd.DataFrame:
    """The models table with ``model`` as a string column (accepts it as the index too)."""
    if "model" not in models.columns:
        models = models.rename_axis("model").reset_index()
    models = models.copy()
    models["model"] = models["model"].astype(str)
    if models["model"].duplicated().any():
        dup = sorted(models.loc[models["model"].duplicated(), "model"].unique())
        raise ConfigError(f"models table lists model(s) {dup} more than once")
    return models


def _hierarchy_cols(df: pd.DataFrame) -> list[str]:
    return [c for c in ("category", "concept", "subclass") if c in df.columns]


# ----------------------------------------------------------------------------- normalisation


def rank_normalize(
    raw: pd.DataFrame,
    *,
    exclude_models: Sequence[str] = ("base",),
    directions: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Rank models per (concept, subclass, prompt_type, metric) and map ranks to [0, 1], 1 = best.

    Ties get the average rank; lower-is-better metrics are reversed; a group of one model scores 0.5.
    Models in ``exclude_models`` (the base model, a reference) are dropped first. Adds ``score``.
    """
    _require(raw, ("model", "concept", "prompt_type", "metric", "value"), "raw metrics")
    df = raw.loc[~raw["model"].astype(str).isin([str(m) for m in exclude_models])].copy()
    if df.empty:
        raise HiganbanaError(f"no models left to rank after excluding {list(exclude_models)}")
    dirs = _directions(df["metric"].unique(), directions)
    df["value"] = pd.to_numeric(df["value"], errors="raise").astype(float)
    keys = [c for c in ("category", "concept", "subclass", "prompt_type", "metric") if c in df.columns]
    dup = df.duplicated(["model", *keys])
    if dup.any():
        row = df.loc[dup].iloc[0]
        raise HiganbanaError(f"duplicate metric rows, e.g. {dict(row[['model', *keys]])}")
    # Negate lower-is-better values so one ascending rank serves both directions.
    signed = df["value"].where(df["metric"].map(dirs) == "higher", -df["value"])
    groups = signed.groupby([df[k] for k in keys], sort=False, dropna=False)
    rank = groups.rank(method="average")
    n = groups.transform("count")
    df["score"] = np.where(n > 1, (rank - 1) / (n - 1).clip(lower=1), 0.5)
    df.loc[df["value"].isna(), "score"] = np.nan
    return df.reset_index(drop=True)


def average_hierarchy(scores: pd.DataFrame, value: str = "score") -> pd.DataFrame:
    """Average sub-class -> concept -> category per (model, prompt_type, metric), plus category "all".

    Returns a long frame with columns model, category, prompt_type, metric and ``value``; "all" is
    the mean over categories.
    """
    _require(scores, ("model", "prompt_type", "metric", value), "scores")
    df = scores.copy()
    for col in ("category", "concept", "subclass"):
        if col not in df.columns:
            df[col] = ""
    base = ["model", "prompt_type", "metric"]
    sub = df.groupby([*base, "category", "concept", "subclass"], sort=False)[value].mean().reset_index()
    concept = sub.groupby([*base, "category", "concept"], sort=False)[value].mean().reset_index()
    category = concept.groupby([*base, "category"], sort=False)[value].mean().reset_index()
    overall = category.groupby(base, sort=False)[value].mean().reset_index()
    overall["category"] = "all"
    out = pd.concat([category, overall], ignore_index=True)
    return out[["model", "category", "prompt_type", "metric", value]]


def criterion_scores(
    scores: pd.DataFrame,
    criteria: Mapping[str, tuple[str, Sequence[str]]] | None = None,
    *,
    category: str = "all",
    value: str = "score",
) -> pd.DataFrame:
    """Model x criterion table of category-averaged scores (columns absent when a metric is missing)."""
    criteria = ranked_criteria() if criteria is None else criteria
    avg = average_hierarchy(scores, value)
    avg = avg.loc[avg["category"] == category]
    if avg.empty:
        raise HiganbanaError(f"no scores for category {category!r}")
    out = {}
    for name, spec in criteria.items():
        try:
            metric, prompt_types = spec
        except (TypeError, ValueError):
            raise ConfigError(f"criterion {name!r}: expected (metric, prompt_types), got {spec!r}") from None
        prompt_types = [prompt_types] if isinstance(prompt_types, str) else list(prompt_types)
        sel = avg.loc[(avg["metric"] == metric) & avg["prompt_type"].isin(prompt_types)]
        if not sel.empty:
            out[name] = sel.groupby("model", sort=False)[value].mean()
    if not out:
        raise HiganbanaError(f"no scores match any criterion {dict(criteria)}")
    return pd.DataFrame(out).rename_axis("model")


def tentative_ranking(
    scores: pd.DataFrame,
    models: pd.DataFrame,
    group_by: str = "algo",
    criteria: Mapping[str, tuple[str, Sequence[str]]] | None = None,
) -> pd.DataFrame:
    """The paper's Table 1: criteria as rows, groups as columns, entry = rank of the group's mean score.

    Ranks run 1 (worst) .. k (best) among the k groups, ties share the lowest rank. ``criteria`` maps a
    criterion to (metric, prompt types) (default :func:`ranked_criteria`); criteria without data are left out.
    """
    models = models_frame(models)
    _require(models, (group_by,), "models table")
    per_model = criterion_scores(scores, criteria)
    groups = models.set_index("model")[group_by].reindex(per_model.index)
    if groups.isna().any():
        raise ConfigError(f"models table has no {group_by!r} for model(s) {sorted(groups[groups.isna()].index)}")
    means = per_model.groupby(groups.astype(str), sort=False).mean().T
    ranking = means.rank(axis=1, method="min").astype("Int64")
    ranking.index.name = "criterion"
    ranking.columns.name = group_by
    return ranking


# ----------------------------------------------------------------------------- correlations


def correlations(scores: pd.DataFrame, value: str = "score") -> pd.DataFrame:
    """Pearson correlation between (metric, prompt_type) columns over (model, concept, subclass) rows.

    No class aggregation (paper Fig. 6). Index and columns are a (metric, prompt_type) MultiIndex.
    """
    _require(scores, ("model", "concept", "prompt_type", "metric", value), "scores")
    rows = ["model", *(c for c in ("category", "concept", "subclass") if c in scores.columns)]
    wide = scores.pivot_table(index=rows, columns=["metric", "prompt_type"], values=value, aggfunc="mean")
    return wide[column_order(wide.columns)].corr(method="pearson")


def fidelity_correlations(
    corr: pd.DataFrame, criteria: Mapping[str, tuple[str, Sequence[str]]] | None = None
) -> pd.Series:
    """Correlations of fidelity (the ranked fidelity metric per prompt type, and :data:`FIDELITY_CONTRASTS`)
    with the other criteria's (metric, prompt type) columns, indexed by ("metric/prompt", "metric/prompt")."""
    criteria = ranked_criteria() if criteria is None else criteria
    criterion_of = {m.name: m.criterion for m in metrics.registry()}
    ranked = {m.name for m in metrics.registry() if m.criterion == metrics.FIDELITY and m.ranked_on}
    fid = [c for c in corr.columns if c[0] in ranked or c in FIDELITY_CONTRASTS]
    wanted = {
        (metric, pt)
        for metric, pts in criteria.values()
        if criterion_of.get(metric) != metrics.FIDELITY
        for pt in ([pts] if isinstance(pts, str) else pts)
    }
    other = [c for c in corr.columns if c in wanted]
    data = {(f"{a[0]}/{a[1]}", f"{b[0]}/{b[1]}"): corr.loc[a, b] for a in fid for b in other}
    idx = pd.MultiIndex.from_tuples(list(data), names=["fidelity", "other"])
    return pd.Series(list(data.values()), index=idx, name="pearson", dtype=float)


# ----------------------------------------------------------------------------- importance


def _feature_matrix(models: pd.DataFrame, features: Sequence[str]) -> pd.DataFrame:
    _require(models, features, "models table")
    x = pd.DataFrame(index=models.index)
    for f in features:
        col = models[f]
        num = pd.to_numeric(col, errors="coerce")
        if num.notna().sum() == col.notna().sum() and col.notna().any():
            x[f] = num.fillna(-1.0).astype(float)  # missing (e.g. native capacity) -> its own level
        else:
            x[f] = pd.Categorical(col.astype(str)).codes.astype(float)
    return x


def _determines(x: pd.DataFrame, g: str, f: str) -> bool:
    """Whether feature ``f`` takes one value per value of ``g`` over these models (``f`` is a function of ``g``)."""
    return bool((x.groupby(g)[f].nunique() <= 1).all())


def independent_features(models: pd.DataFrame, features: Sequence[str]) -> tuple[list[str], list[str]]:
    """The features worth an importance, and a note per feature left out or merged.

    A feature the same in every model says nothing (dropped); two features that split the models
    identically (``lr`` and ``unet_lr``) are one column counted twice (merged: ``lr = unet_lr``); a
    feature with one value per value of another (``alpha`` fixed within each ``algo``) only
    re-encodes it (dropped). What remains varies independently of the rest.
    """
    x = _feature_matrix(models, features)
    notes: list[str] = []
    kept: list[str] = []
    merged: dict[str, list[str]] = {}
    for f in features:
        if x[f].nunique() <= 1:
            notes.append(f"{f}: dropped, the same in every model")
            continue
        same = next((g for g in kept if _determines(x, g, f) and _determines(x, f, g)), None)
        if same is not None:
            merged.setdefault(same, []).append(f)
            notes.append(f"{f}: merged into {same} (the same split of the models)")
            continue
        kept.append(f)
    for f in list(kept):
        owner = next((g for g in kept if g != f and _determines(x, g, f)), None)
        if owner is not None:
            kept.remove(f)
            notes.append(f"{f}: dropped, it only re-encodes {owner} (one value per {owner})")
    labels = {f: " = ".join([f, *merged.get(f, [])]) for f in kept}
    return [labels[f] for f in kept], notes


def importance(
    scores: pd.DataFrame,
    models: pd.DataFrame,
    features: Sequence[str],
    *,
    seed: int = 0,
    criteria: Mapping[str, tuple[str, Sequence[str]]] | None = None,
    n_repeats: int = 10,
    within: str | None = "algo",
) -> pd.DataFrame:
    """Permutation importance of each hyper-parameter for each criterion.

    A gradient-boosting regressor per criterion maps ordinal-coded features to the model's
    category-averaged score; returns rows (feature, criterion, importance_mean, importance_std,
    scope). Only features that vary independently are scored (:func:`independent_features`; a
    merged pair is labelled ``lr = unet_lr``), over all models (scope ``all models``) and, where
    ``within`` is a feature and one of its values has at least 4 models, within that value (scope
    ``algo=lora``: what matters *inside* an algorithm, not between them). What was dropped or merged,
    and a scope with too few models, is a ``note`` row. With fewer than 4 models the frame holds
    only a note.
    """
    cols = ["feature", "criterion", "importance_mean", "importance_std", "scope"]
    features = list(features)
    if not features:
        raise ConfigError("importance needs at least one feature column")
    models = models_frame(models)
    per_model = criterion_scores(scores, criteria)
    models = models.loc[models["model"].isin(per_model.index)].reset_index(drop=True)
    if len(models) < 4:
        note = f"importance needs at least 4 models with scores, got {len(models)}"
        return pd.DataFrame({**{c: pd.Series(dtype=float) for c in cols}, "note": pd.Series([note], dtype=str)})
    _require(models, features, "models table")
    rows: list[tuple] = []
    notes: list[str] = []
    scopes = [("all models", models)]
    if within in features:
        for value, group in models.groupby(within, sort=True):
            if len(group) >= 4:
                scopes.append((f"{within}={value}", group.reset_index(drop=True)))
    for scope, group in scopes:
        candidates = [f for f in features if scope == "all models" or f != within]
        labels, dropped = independent_features(group, candidates)
        notes.extend(f"{scope}: {note}" for note in dropped)
        if not labels:
            notes.append(f"{scope}: no hyper-parameter varies independently")
            continue
        rows.extend(_importance_rows(per_model, group, labels, scope, seed, n_repeats))
    out = pd.DataFrame(rows, columns=cols)
    if notes:
        out = pd.concat([out, pd.DataFrame({"note": notes})], ignore_index=True)
    return out


def _importance_rows(per_model, models, labels, scope, seed, n_repeats) -> list[tuple]:
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.inspection import permutation_importance

    x = _feature_matrix(models, [label.split(" = ")[0] for label in labels])
    rows = []
    for criterion in per_model.columns:
        y = per_model[criterion].reindex(models["model"]).to_numpy(dtype=float)
        ok = ~np.isnan(y)
        if ok.sum() < 4:
            continue
        reg = GradientBoostingRegressor(n_estimators=100, max_depth=3, min_samples_leaf=1, random_state=seed)
        reg.fit(x[ok], y[ok])
        res = permutation_importance(reg, x[ok], y[ok], n_repeats=n_repeats, random_state=seed)
        for f, m, s in zip(labels, res.importances_mean, res.importances_std, strict=True):
            rows.append((f, criterion, float(m), float(s), scope))
    return rows


def shap_values(
    scores: pd.DataFrame,
    models: pd.DataFrame,
    features: Sequence[str],
    criterion: str,
    *,
    seed: int = 0,
    criteria: Mapping[str, tuple[str, Sequence[str]]] | None = None,
) -> pd.DataFrame:
    """SHAP values (model x feature) of a tree model for one criterion; needs the optional ``shap``."""
    if importlib.util.find_spec("shap") is None:
        raise HiganbanaError("shap_values needs the optional package shap: pip install shap")
    import shap
    from sklearn.ensemble import GradientBoostingRegressor

    models = models_frame(models)
    per_model = criterion_scores(scores, criteria)
    if criterion not in per_model.columns:
        raise ConfigError(f"no scores for criterion {criterion!r}{nearest(criterion, per_model.columns)}")
    models = models.loc[models["model"].isin(per_model.index)].reset_index(drop=True)
    x = _feature_matrix(models, list(features))
    y = per_model[criterion].reindex(models["model"]).to_numpy(dtype=float)
    reg = GradientBoostingRegressor(n_estimators=100, max_depth=3, min_samples_leaf=1, random_state=seed)
    reg.fit(x, y)
    values = shap.TreeExplainer(reg).shap_values(x)
    return pd.DataFrame(values, index=models["model"], columns=list(features))


# ----------------------------------------------------------------------------- synthetic data


def synthetic_metrics(
    *,
    algos: Sequence[str] = ("lora", "loha", "lokr"),
    lrs: Sequence[float] = (1e-4, 5e-4),
    seeds: Sequence[int] = (1,),
    concepts: Mapping[str, str] | None = None,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A random (raw, models) pair for demos and tests: every algo x lr x seed plus "base"."""
    rng = np.random.default_rng(seed)
    concepts = concepts or {"castle": "scenes", "bunny": "toys", "abukuma": "anime"}
    model_rows = [{"model": "base", "algo": "base", "lr": np.nan, "seed": np.nan}]
    for a in algos:
        for lr in lrs:
            for s in seeds:
                model_rows.append({"model": f"{a}-lr{lr:g}-s{s}", "algo": a, "lr": lr, "seed": s})
    models = pd.DataFrame(model_rows)
    scale = {"fidelity_cos": (0.6, 0.1), "fidelity_scd": (0.25, 0.05), "text_alignment": (0.22, 0.04)}
    scale |= {"vendi": (6.0, 2.0), "style_loss": (0.02, 0.01)}
    rows = []
    for m in models["model"]:
        for concept, cat in concepts.items():
            for pt in PROMPT_TYPES:
                for metric, (mu, sd) in scale.items():
                    if metric == "style_loss" and pt != "style":
                        continue
                    v = 0.0 if metric == "style_loss" and m == "base" else abs(rng.normal(mu, sd))
                    rows.append((m, concept, cat, "", pt, metric, float(v)))
    raw = pd.DataFrame(rows, columns=[*KEY_COLUMNS, "value"])
    return raw, models
