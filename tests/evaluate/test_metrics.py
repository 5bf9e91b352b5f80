"""The paper's metrics against known answers and independent float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from higanbana.errors import HiganbanaError
from higanbana.evaluate import metrics as M


def _rand(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_vendi_known_answers():
    assert M.vendi(torch.ones(7, 5)) == pytest.approx(1.0)  # n identical images: one mode
    assert M.vendi(torch.eye(6) * 3.0) == pytest.approx(6.0)  # n orthogonal: n modes (scale-free)
    two = torch.cat([torch.eye(2)[[0]].repeat(3, 1), torch.eye(2)[[1]].repeat(3, 1)])
    assert M.vendi(two) == pytest.approx(2.0)  # two equal clusters
    z = _rand(20, 8, 0)
    zn = z / z.norm(dim=1, keepdim=True)
    lam = torch.linalg.eigvalsh(torch.einsum("id,jd->ij", zn, zn) / 20)
    lam = lam[lam > 1e-15]
    assert M.vendi(z) == pytest.approx(math.exp(-float((lam * lam.log()).sum())), rel=1e-9)
    assert 1.0 <= M.vendi(z) <= 8.0 + 1e-9  # at most the rank


def test_vendi_per_group_averages_groups():
    z = torch.cat([torch.eye(4), torch.ones(4, 4)])
    assert M.vendi_per_group(z, [0] * 4 + [1] * 4) == pytest.approx((4.0 + 1.0) / 2)
    with pytest.raises(HiganbanaError, match="group labels"):
        M.vendi_per_group(z, [0, 1])


def test_fidelity_identity_and_reference():
    """1 − S_C = ½(SCD + Var1 + Var2), and S_C is the mean over all cross pairs."""
    z1, z2 = _rand(11, 6, 1), _rand(7, 6, 2)
    a, b = z1 / z1.norm(dim=1, keepdim=True), z2 / z2.norm(dim=1, keepdim=True)
    s_c = float(torch.einsum("id,jd->ij", a, b).mean())
    f = M.fidelity(z1, z2)
    assert f["fidelity_cos"] == pytest.approx(s_c, rel=1e-12)
    assert f["fidelity_scd"] == pytest.approx(float(((a.mean(0) - b.mean(0)) ** 2).sum()), rel=1e-12)
    lhs = 1 - f["fidelity_cos"]
    rhs = 0.5 * (f["fidelity_scd"] + M.spread_variance(z1) + M.spread_variance(z2))
    assert lhs == pytest.approx(rhs, rel=1e-12)
    same = M.fidelity(z1, z1)
    assert same["fidelity_scd"] == pytest.approx(0.0, abs=1e-15)


def test_text_alignment_pairs_each_image_with_its_text():
    img = _rand(5, 4, 3)
    txt = img.clone() * 2.0
    assert M.text_alignment(img, txt) == pytest.approx(1.0)
    per = M.text_alignment(img, -txt, per_image=True)
    assert torch.allclose(per, torch.full((5,), -1.0, dtype=torch.float64))
    shuffled = M.text_alignment(img, txt[[1, 2, 3, 4, 0]])
    assert shuffled < 1.0
    with pytest.raises(HiganbanaError, match="5 images but 4 texts"):
        M.text_alignment(img, txt[:4])


def test_gram_and_style_loss():
    act = _rand(3 * 4 * 5 * 6, 1, 4).reshape(3, 4, 5, 6)
    g = M.gram(act)
    ref = torch.einsum("ncx,ndx->ncd", act.reshape(3, 4, 30), act.reshape(3, 4, 30)) / (4 * 30)
    assert torch.allclose(g, ref)
    grams = [g, M.gram(act[:, :2])]
    assert M.style_loss(grams, grams) == 0.0  # identical images
    other = [M.gram(act.flip(0)), M.gram(act[:, :2].flip(0))]
    per = M.style_loss(grams, other, per_pair=True)
    expected = ((g - other[0]) ** 2).sum((1, 2)) + ((grams[1] - other[1]) ** 2).sum((1, 2))
    assert torch.allclose(per, expected) and per[1] == 0  # the middle image is paired with itself
    with pytest.raises(HiganbanaError, match="Gram shapes differ"):
        M.style_loss([g], [g[:, :2, :2]])


def test_bad_shapes_are_clear():
    with pytest.raises(HiganbanaError, match=r"expected features of shape \(n ≥ 1, d\)"):
        M.vendi(torch.zeros(0, 3))


# ----------------------------------------------------------------------------- the registry


def _toy(**change):
    fields = dict(
        name="toy",
        criterion="Toyness",
        direction="higher",
        label="Toy",
        inputs=("image_features",),
        compute=lambda image_features: float(image_features.mean()),
    )
    return M.Metric(**{**fields, **change})


def test_registry_declares_the_papers_metrics():
    from higanbana.evaluate import aggregate as agg

    names = ["fidelity_cos", "fidelity_scd", "text_alignment", "vendi", "style_loss", "quality"]
    assert [m.name for m in M.registry()] == names
    assert agg.metric_directions() == {
        "fidelity_cos": "higher",
        "fidelity_scd": "lower",
        "text_alignment": "higher",
        "vendi": "higher",
        "style_loss": "lower",
        "quality": "higher",
    }
    assert [agg.label(n) for n in names] == [
        "Image similarity (cos)",
        "Image similarity (SCD)",
        "Text similarity",
        "Vendi",
        "Style preservation (loss)",
        "Image quality",
    ]
    assert agg.label("vendi", "alter") == "Vendi <alter>" and agg.label("mine") == "mine"
    assert agg.ranked_criteria() == {
        "Fidelity": ("fidelity_cos", ("train", "trigger", "alter")),
        "Controllability": ("text_alignment", ("alter",)),
        "Diversity": ("vendi", ("trigger", "alter")),
        "Base preservation": ("style_loss", ("style",)),
    }
    style = next(m for m in M.registry() if m.name == "style_loss")
    assert style.against_base and style.measured_on("style", base_model=False)
    assert not style.measured_on("style", base_model=True) and not style.measured_on("alter", base_model=False)
    assert all(m.measured_on("train", base_model=True) for m in M.registry() if m.name != "style_loss")


def test_every_input_has_a_provider_in_measure():
    from higanbana.evaluate.run import _SetInputs

    for name in M.INPUTS:
        assert callable(getattr(_SetInputs, name, None)), name


def test_metric_computations_match_the_functions():
    z, ref = _rand(6, 4, 1), _rand(5, 4, 2)
    by_name = {m.name: m for m in M.registry()}
    assert by_name["fidelity_cos"].compute(image_features=z, train_features=ref) == M.cosine_similarity(z, ref)
    assert by_name["fidelity_scd"].compute(image_features=z, train_features=ref) == M.centroid_distance(z, ref)
    groups = [0, 0, 0, 1, 1, 1]
    vendi = by_name["vendi"]
    assert vendi.compute(image_features=z, prompt_type="alter", prompt_indices=groups) == M.vendi_per_group(z, groups)
    assert vendi.compute(image_features=z, prompt_type="trigger", prompt_indices=groups) == M.vendi(z)
    grams_a = [_rand(4, 3, 3).reshape(4, 3, 1).expand(4, 3, 3)]
    grams_b = [_rand(4, 3, 4).reshape(4, 3, 1).expand(4, 3, 3)]
    chunks = [
        ([g[:2] for g in grams_a], [g[:2] for g in grams_b]),
        ([g[2:] for g in grams_a], [g[2:] for g in grams_b]),
    ]
    assert by_name["style_loss"].compute(style_grams=chunks) == pytest.approx(M.style_loss(grams_a, grams_b))
    assert by_name["quality"].compute(quality_scores=torch.tensor([1.0, 2.0])) == 1.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "vendi"}, "'vendi' is already registered"),
        ({"name": ""}, "non-empty name"),
        ({"direction": "up"}, "direction must be 'higher' or 'lower'"),
        ({"inputs": ("image_feature",)}, r"unknown input 'image_feature' \(did you mean 'image_features'\?\)"),
        ({"compute": lambda z: 0.0}, "does not take its inputs"),
        ({"prompt_types": ("styles",)}, r"unknown prompt type 'styles' \(did you mean 'style'\?\)"),
        ({"prompt_types": ()}, "prompt_types is empty"),
        ({"prompt_types": ("alter",), "ranked_on": ("train",)}, "not within prompt_types"),
        ({"criterion": M.FIDELITY, "ranked_on": ("train",)}, "'Fidelity' is already ranked by 'fidelity_cos'"),
    ],
)
def test_bad_declarations_are_refused(change, message):
    before = M.registry()
    with pytest.raises(HiganbanaError, match=message):
        M.register(_toy(**change))
    assert M.registry() == before


def test_registered_adds_for_the_block_and_restores_even_on_error():
    before = M.registry()
    with pytest.raises(RuntimeError, match="inside"), M.registered(_toy()) as added:
        assert [m.name for m in added] == ["toy"]

        @M.declare("toy2", criterion="Toyness", direction="lower", label="Toy 2", inputs=("prompt_type",))
        def _toy2(prompt_type):
            return 1.0

        assert [m.name for m in M.registry()][-2:] == ["toy", "toy2"]
        raise RuntimeError("inside")
    assert M.registry() == before
