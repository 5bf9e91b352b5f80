"""Aggregation: rank normalisation, class averaging, tentative ranking, correlations, importance, tables."""

import importlib.util

import numpy as np
import pandas as pd
import pytest

from higanbana.errors import ConfigError, HiganbanaError
from higanbana.evaluate import aggregate as agg


def _raw(rows):
    """Rows of (model, concept, category, subclass, prompt_type, metric, value)."""
    return pd.DataFrame(rows, columns=[*agg.KEY_COLUMNS, "value"])


def _score(df, model, **where):
    sel = df["model"] == model
    for k, v in where.items():
        sel &= df[k] == v
    assert sel.sum() == 1, (model, where)
    return float(df.loc[sel, "score"].iloc[0])


def test_rank_normalize_ties_reverse_and_base_excluded():
    values = {"a": 0.1, "b": 0.5, "c": 0.5, "d": 0.9, "base": 100.0}
    rows = []
    for m, v in values.items():
        rows.append((m, "castle", "scenes", "", "train", "fidelity_cos", v))
        rows.append((m, "castle", "scenes", "", "train", "fidelity_scd", v))
    s = agg.rank_normalize(_raw(rows))
    assert "base" not in set(s["model"])
    # N = 4: ranks 1, 2.5, 2.5, 4 -> (r - 1) / 3
    expect = {"a": 0.0, "b": 0.5, "c": 0.5, "d": 1.0}
    for m, e in expect.items():
        assert _score(s, m, metric="fidelity_cos") == pytest.approx(e)
        assert _score(s, m, metric="fidelity_scd") == pytest.approx(1 - e)  # a distance: reversed


def test_rank_normalize_single_model_groups_and_separate_groups():
    rows = [
        ("a", "castle", "scenes", "", "train", "vendi", 3.0),
        ("a", "bunny", "toys", "", "train", "vendi", 1.0),
        ("b", "bunny", "toys", "", "train", "vendi", 2.0),
        ("a", "bunny", "toys", "", "alter", "vendi", 5.0),
        ("b", "bunny", "toys", "", "alter", "vendi", 4.0),
    ]
    s = agg.rank_normalize(_raw(rows))
    assert _score(s, "a", concept="castle") == 0.5
    assert _score(s, "a", concept="bunny", prompt_type="train") == 0.0
    assert _score(s, "a", concept="bunny", prompt_type="alter") == 1.0
    kept = agg.rank_normalize(_raw([*rows, ("base", "castle", "scenes", "", "train", "vendi", 9.0)]), exclude_models=())
    assert _score(kept, "base", concept="castle") == 1.0


def test_rank_normalize_errors():
    with pytest.raises(ConfigError, match="did you mean 'vendi'"):
        agg.rank_normalize(_raw([("a", "c", "k", "", "train", "vendy", 1.0)]))
    with pytest.raises(ConfigError, match="value"):
        agg.rank_normalize(_raw([("a", "c", "k", "", "train", "vendi", 1.0)]).drop(columns="value"))
    dup = [("a", "c", "k", "", "train", "vendi", 1.0)] * 2
    with pytest.raises(HiganbanaError, match="duplicate"):
        agg.rank_normalize(_raw(dup))
    custom = agg.rank_normalize(
        _raw([("a", "c", "k", "", "train", "mine", 1.0), ("b", "c", "k", "", "train", "mine", 2.0)]),
        directions={"mine": "lower"},
    )
    assert _score(custom, "a") == 1.0


def test_average_hierarchy_known_means():
    s = pd.DataFrame(
        [
            # category anime: concept abukuma has two sub-classes (0.0, 1.0 -> 0.5), concept ika 1.0
            ("m", "abukuma", "anime", "uniform", "train", "vendi", 0.0),
            ("m", "abukuma", "anime", "casual", "train", "vendi", 1.0),
            ("m", "ika", "anime", "", "train", "vendi", 1.0),
            # category scenes: one concept, 0.2
            ("m", "castle", "scenes", "", "train", "vendi", 0.2),
        ],
        columns=[*agg.KEY_COLUMNS, "score"],
    )
    out = agg.average_hierarchy(s).set_index("category")["score"]
    assert out["anime"] == pytest.approx(0.75)  # mean(0.5, 1.0), not mean of 3 rows
    assert out["scenes"] == pytest.approx(0.2)
    assert out["all"] == pytest.approx((0.75 + 0.2) / 2)


def _criteria_frame():
    """3 algos x 2 seeds; 'lokr' best on fidelity and worst on diversity, 'loha' the reverse."""
    fid = {"lora": 0.5, "loha": 0.2, "lokr": 0.9}
    div = {"lora": 5.0, "loha": 9.0, "lokr": 1.0}
    rows, models = [], []
    for algo in fid:
        for seed in (1, 2):
            m = f"{algo}-s{seed}"
            models.append({"model": m, "algo": algo, "seed": seed})
            for concept, cat in (("castle", "scenes"), ("bunny", "toys")):
                jitter = 0.01 * seed
                for pt in ("train", "trigger", "alter"):
                    rows.append((m, concept, cat, "", pt, "fidelity_cos", fid[algo] + jitter))
                for pt in ("trigger", "alter"):
                    rows.append((m, concept, cat, "", pt, "vendi", div[algo] + jitter))
    return _raw(rows), pd.DataFrame(models)


def test_tentative_ranking_shape_and_order():
    raw, models = _criteria_frame()
    scores = agg.rank_normalize(raw)
    table = agg.tentative_ranking(scores, models)
    assert list(table.index) == ["Fidelity", "Diversity"]  # criteria without data are left out
    assert table.loc["Fidelity"].to_dict() == {"lora": 2, "loha": 1, "lokr": 3}
    assert table.loc["Diversity"].to_dict() == {"lora": 2, "loha": 3, "lokr": 1}
    # models given with the model id as index; custom criteria
    custom = agg.tentative_ranking(
        scores, models.set_index("model"), criteria={"Fid (train)": ("fidelity_cos", "train")}
    )
    assert custom.loc["Fid (train)", "lokr"] == 3
    with pytest.raises(ConfigError, match="preset"):
        agg.tentative_ranking(scores, models, group_by="preset")


def test_correlations_plus_minus_one():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        x = rng.normal()
        for concept in ("castle", "bunny"):
            x2 = x + (1.0 if concept == "bunny" else 0.0)
            rows.append((f"m{i}", concept, "scenes", "", "trigger", "fidelity_cos", x2))
            rows.append((f"m{i}", concept, "scenes", "", "trigger", "vendi", -2 * x2))
            rows.append((f"m{i}", concept, "scenes", "", "alter", "text_alignment", 3 * x2 + 1))
    raw = _raw(rows).rename(columns={"value": "score"})
    corr = agg.correlations(raw)
    assert corr.loc[("fidelity_cos", "trigger"), ("vendi", "trigger")] == pytest.approx(-1.0)
    assert corr.loc[("fidelity_cos", "trigger"), ("text_alignment", "alter")] == pytest.approx(1.0)
    fid = agg.fidelity_correlations(corr)
    assert fid[("fidelity_cos/trigger", "vendi/trigger")] == pytest.approx(-1.0)
    assert fid[("fidelity_cos/trigger", "text_alignment/alter")] == pytest.approx(1.0)


def test_importance_lr_most_important_and_too_few_models():
    rng = np.random.default_rng(1)
    rows, models = [], []
    for algo in ("lora", "loha", "lokr"):
        for lr in (1e-4, 5e-4, 1e-3, 2e-3):
            for seed in (1, 2):
                m = f"{algo}-{lr:g}-s{seed}"
                models.append({"model": m, "algo": algo, "lr": lr, "seed": seed})
                for concept in ("castle", "bunny"):
                    v = np.log10(lr) + 0.001 * rng.normal()  # depends on lr only
                    rows.append((m, concept, "scenes", "", "alter", "text_alignment", v))
    scores = agg.rank_normalize(_raw(rows))
    models = pd.DataFrame(models)
    imp = agg.importance(scores, models, ["algo", "lr", "seed"], seed=0)
    assert set(imp.columns) == {"feature", "criterion", "importance_mean", "importance_std", "scope"}
    assert set(imp["scope"]) == {"all models", "algo=lora", "algo=loha", "algo=lokr"}  # 8 models per algo
    inside = imp.loc[(imp["scope"] == "algo=lora") & (imp["criterion"] == "Controllability")]
    assert set(inside["feature"]) == {"lr", "seed"}  # algo is constant there
    imp = imp.loc[imp["scope"] == "all models"]
    ctrl = imp.loc[imp["criterion"] == "Controllability"].set_index("feature")["importance_mean"]
    assert ctrl.idxmax() == "lr"
    assert ctrl["lr"] > 10 * max(ctrl["algo"], ctrl["seed"], 1e-6)
    few = agg.importance(scores.loc[scores["model"].isin(models["model"][:3])], models, ["lr"])
    assert few.dropna(subset=["feature"]).empty
    assert "at least 4 models" in few["note"].iloc[0]


def test_importance_scores_only_hyper_parameters_that_vary_independently():
    """alpha fixed per algorithm only re-encodes the algorithm; lr and unet_lr are one column; a
    constant column says nothing — each is left out with a note, not given an importance."""
    models = []
    for algo in ("lora", "loha", "lokr", "ia3"):
        for lr in (1e-4, 5e-4):
            for seed in (1, 2):
                row = {"model": f"{algo}-{lr:g}-s{seed}", "algo": algo, "lr": lr, "unet_lr": lr, "seed": seed}
                row.update({"alpha": 4} if algo in ("lora", "loha") else {})
                row["preset"] = "attn-mlp"
                models.append(row)
    kept, notes = agg.independent_features(pd.DataFrame(models), ["algo", "alpha", "lr", "unet_lr", "seed", "preset"])
    assert kept == ["algo", "lr = unet_lr", "seed"]
    assert any(n.startswith("alpha: dropped, it only re-encodes algo") for n in notes)
    assert any(n.startswith("unet_lr: merged into lr") for n in notes)
    assert any(n.startswith("preset: dropped, the same in every model") for n in notes)


def test_shap_values_optional():
    if importlib.util.find_spec("shap") is not None:
        pytest.skip("shap installed; the missing-package error is not reachable")
    raw, models = _criteria_frame()
    with pytest.raises(HiganbanaError, match="pip install shap"):
        agg.shap_values(agg.rank_normalize(raw), models, ["algo"], "Fidelity")


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    raw, _ = agg.synthetic_metrics(concepts={"castle": "scenes"})
    raw.loc[raw["model"] == "base", "model"] = "1e-4"  # a model id that looks like a number stays a string
    path = agg.save_table(raw, tmp_path / f"t{suffix}")
    back = agg.load_table(path)
    pd.testing.assert_frame_equal(back, raw, check_dtype=False, check_exact=False, rtol=1e-12)
    assert (back["subclass"] == "").all()
    assert not list(tmp_path.glob(".*tmp"))  # temporary file renamed


def test_table_format_errors(tmp_path):
    df = pd.DataFrame({"a": [1]})
    with pytest.raises(ConfigError, match="unknown table format"):
        agg.save_table(df, tmp_path / "t.xlsx")
    with pytest.raises(HiganbanaError, match="no such table"):
        agg.load_table(tmp_path / "missing.csv")
    if importlib.util.find_spec("pyarrow") or importlib.util.find_spec("fastparquet"):
        agg.save_table(df, tmp_path / "t.parquet")
        assert agg.load_table(tmp_path / "t.parquet")["a"].tolist() == [1]
    else:
        with pytest.raises(HiganbanaError, match="pip install pyarrow"):
            agg.save_table(df, tmp_path / "t.parquet")
