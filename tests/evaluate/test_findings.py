"""The paper's findings with bootstrap intervals: statistics against independent references (scipy's
τ-b, numpy's Pearson on repeated rows, the report's correlation matrix) and verdicts on synthetic
experiments whose effects are known."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from higanbana.evaluate import aggregate as A
from higanbana.evaluate import findings as F

CONCEPTS = {"castle": "scenes", "toy": "objects", "ink": "styles"}
# column -> (algo, learning rates); native has one column per learning rate, as the paper's Table 1
COLUMNS = {
    "lora": ("lora", (1e-4, 5e-4)),
    "loha": ("loha", (1e-4, 5e-4)),
    "lokr": ("lokr", (1e-4, 5e-4)),
    "native lr 5e-06": ("full", (5e-6,)),
    "native lr 1e-06": ("full", (1e-6,)),
}
PAPER_COLUMN = {"lora": "lora", "loha": "loha", "lokr": "lokr"}
PAPER_COLUMN |= {"native lr 5e-06": "native (higher lr)", "native lr 1e-06": "native (lower lr)"}


def experiment(seeds=(0, 1, 2, 3), epochs=(10, 20), epoch_effect=1.0, noise=0.3, rng_seed=0):
    """(raw, models) of a grid whose criteria follow the paper: each column's level is its Table 1
    rank; more epochs and the higher learning rate raise fidelity and lower controllability,
    diversity and style preservation by ``epoch_effect`` (epochs) and 1 (lr); SCD is pure noise, so
    its correlation with diversity is near 0 where the cosine's is negative."""
    rng = np.random.default_rng(rng_seed)
    rows, models = [], []
    paper = F.PAPER_RANKING
    for column, (algo, lrs) in COLUMNS.items():
        for lr_i, lr in enumerate(lrs):
            lr_step = lr_i if len(lrs) > 1 else 0
            for seed, (e_i, epoch) in itertools.product(seeds, enumerate(epochs)):
                model = f"{column}-lr{lr:g}-s{seed}-e{epoch}"
                models.append({"model": model, "algo": algo, "lr": lr, "seed": seed, "epoch": epoch, "column": column})
                push = epoch_effect * e_i + lr_step
                pc = PAPER_COLUMN[column]
                level = {
                    "fid": 2 * paper["Fidelity"][pc] + push,
                    "ctrl": 2 * paper["Controllability"][pc] - push,
                    "div": 2 * paper["Diversity"][pc] - push,
                }
                for concept, category in CONCEPTS.items():

                    def add(metric, prompt, value, model=model, concept=concept, category=category):
                        rows.append((model, concept, category, "", prompt, metric, value + noise * rng.normal()))

                    for prompt in ("train", "trigger", "alter"):
                        add("fidelity_cos", prompt, level["fid"])
                    add("fidelity_scd", "trigger", 0.0)
                    add("text_alignment", "alter", level["ctrl"])
                    for prompt in ("trigger", "alter"):
                        add("vendi", prompt, level["div"])
                    add("style_loss", "style", level["fid"])  # lower is better: preservation falls with fit
    raw = pd.DataFrame(rows, columns=[*A.KEY_COLUMNS, "value"])
    return raw, pd.DataFrame(models)


def run(raw, models, **kwargs):
    kwargs.setdefault("features", ["algo", "lr", "seed", "epoch"])
    kwargs.setdefault("replicates", 300)
    return F.find(A.rank_normalize(raw), models, group_by="column", **kwargs)


def verdicts(found) -> dict[str, str]:
    return dict(zip(found.table["finding"], found.table["verdict"], strict=True))


def test_paper_columns_map_algorithms_and_the_two_native_learning_rates():
    _raw, models = experiment(seeds=(0,))
    assert F.paper_columns(models, "column") == PAPER_COLUMN
    # one native column only: which of the paper's two it is cannot be told
    one = models.loc[models["column"] != "native lr 1e-06"]
    assert "native lr 5e-06" not in F.paper_columns(one, "column")
    # a column mixing algorithms maps to nothing
    mixed = models.assign(column=np.where(models["algo"] == "loha", "lora", models["column"]))
    assert "lora" not in F.paper_columns(mixed, "column")


def test_an_experiment_like_the_paper_reproduces_every_finding():
    found = run(*experiment())
    v = verdicts(found)
    assert found.seeds == 4 and found.concepts == 3 and found.replicates == 300
    assert {k: x for k, x in v.items() if "capacity" not in k} == {k: "reproduced" for k in v if "capacity" not in k}
    # no capacity column in this grid: said, not guessed
    capacity = found.table[found.table["finding"].str.contains("capacity")]
    assert set(capacity["verdict"]) == {F.N_TOO_SMALL} and capacity["value"].isna().all()
    ranking = found.table[found.table["finding"].str.startswith("Ranking")]
    assert np.allclose(ranking["value"], 1.0)  # the levels are Table 1's ranks
    assert (found.table.dropna(subset=["low"]).eval("low <= value <= high")).all()
    assert list(found.ranking.index) == ["Fidelity", "Controllability", "Diversity"]
    assert found.ranking.loc["Fidelity", "lokr"].endswith("/ 4")


def test_reversed_effects_are_not_reproduced():
    found = run(*experiment(epoch_effect=-3.0))
    v = verdicts(found)
    assert v["More epochs → Fidelity up (mean paired rank-score change)"] == "not reproduced"
    assert v["More epochs → Diversity down (mean paired rank-score change)"] == "not reproduced"


def test_no_effect_is_inconclusive():
    found = run(*experiment(epoch_effect=0.0, noise=3.0))
    v = verdicts(found)
    assert v["More epochs → Fidelity up (mean paired rank-score change)"] == "inconclusive"


def test_one_seed_gives_values_without_intervals_and_few_checkpoints_n_too_small():
    raw, models = experiment(seeds=(0,))
    found = run(raw, models)
    assert found.replicates == 0 and found.table["low"].isna().all()
    assert all(v.startswith("inconclusive (1 seed(s)") or v == F.N_TOO_SMALL for v in found.table["verdict"])
    few = models.loc[models["algo"].isin(["lora", "lokr"]) & (models["lr"] == 5e-4) & (models["epoch"] == 20)]
    found = run(raw.loc[raw["model"].isin(few["model"])], few)
    corr = found.table[found.table["finding"].str.startswith(("Fig. 6c", "SCD"))]
    assert set(corr["verdict"]) == {F.N_TOO_SMALL} and corr["value"].isna().all()
    assert set(found.table[found.table["finding"].str.startswith("Ranking")]["verdict"]) == {F.N_TOO_SMALL}
    assert "n too small" in F.format_findings(found)


def test_point_estimates_match_independent_references():
    raw, models = experiment(seeds=(0, 1, 2), noise=1.0, rng_seed=3)
    scores = A.rank_normalize(raw)
    found = F.find(scores, models, group_by="column", features=["algo", "lr", "seed", "epoch"], replicates=0)
    table = found.table.set_index("finding")
    corr = A.correlations(scores)  # the report's matrix: Pearson over (model, concept) rows
    for (a, b), _paper in F.FIG6C.items():
        title = f"Fig. 6c: {a[0]}<{a[1]}> vs {b[0]}<{b[1]}> (Pearson r)"
        assert table.loc[title, "value"] == pytest.approx(corr.loc[a, b], abs=1e-12)
    scd = corr.loc[F.SCD_PAIR[0], F.SCD_PAIR[1]] - corr.loc[("fidelity_cos", "trigger"), ("vendi", "trigger")]
    assert table.filter(like="SCD correction", axis=0)["value"].iloc[0] == pytest.approx(scd, abs=1e-12)
    # the ranking's τ: the report's tentative ranking against Table 1, by scipy
    ranking = A.tentative_ranking(scores, models, group_by="column")
    for criterion, paper in F.PAPER_RANKING.items():
        ours = [ranking.loc[criterion, c] for c in PAPER_COLUMN]
        tau = stats.kendalltau(ours, [paper[PAPER_COLUMN[c]] for c in PAPER_COLUMN]).statistic
        assert table.loc[f"Ranking agreement with Table 1: {criterion} (Kendall τ-b)", "value"] == pytest.approx(tau)
    # more epochs: the mean over runs of the per-model criterion score at 20 minus at 10
    per_model = A.criterion_scores(scores)
    m = models.set_index("model")
    hi, lo = m.index[m["epoch"] == 20], m.index[m["epoch"] == 10]
    pair = {(r.column, r.lr, r.seed): r.Index for r in m.loc[lo].itertuples()}
    diffs = [per_model.loc[h, "Fidelity"] - per_model.loc[pair[(m.loc[h, "column"], m.loc[h, "lr"], m.loc[h, "seed"])],
                                                           "Fidelity"] for h in hi]  # fmt: skip
    assert table.loc["More epochs → Fidelity up (mean paired rank-score change)", "value"] == pytest.approx(
        np.mean(diffs), abs=1e-12
    )


def test_weighted_pearson_against_repeated_rows():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=12), rng.normal(size=12)
    w = rng.integers(0, 4, size=12)
    repeated = np.corrcoef(np.repeat(x, w), np.repeat(y, w))[0, 1]
    assert F._pearson(x, y, w.astype(float)) == pytest.approx(repeated, abs=1e-12)
    x[3] = np.nan  # a missing value drops its row
    keep = np.arange(12) != 3
    repeated = np.corrcoef(np.repeat(x[keep], w[keep]), np.repeat(y[keep], w[keep]))[0, 1]
    assert F._pearson(x, y, w.astype(float)) == pytest.approx(repeated, abs=1e-12)


def test_the_bootstrap_is_reproducible_and_its_interval_covers_the_estimate():
    raw, models = experiment(seeds=(0, 1, 2), noise=1.0)
    one, two = run(raw, models, seed=5), run(raw, models, seed=5)
    pd.testing.assert_frame_equal(one.table, two.table)
    finite = one.table.dropna(subset=["low"])
    assert len(finite) > 0 and (finite["low"] <= finite["high"]).all()
