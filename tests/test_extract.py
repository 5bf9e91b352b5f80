"""Extraction of LoRA / LoCon / Tucker / Full files from a weight difference (tools/extract.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from higanbana.algorithms import algorithm_class, make_adapter
from higanbana.errors import ConfigError, HiganbanaError
from higanbana.tools.extract import choose_rank, extract, extract_module, format_report, reconstruct


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _low_rank(shape: tuple[int, ...], rank: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    out, rest = shape[0], int(torch.tensor(shape[1:]).prod())
    up = torch.randn(out, rank, generator=g, dtype=torch.float64)
    down = torch.randn(rank, rest, generator=g, dtype=torch.float64)
    return (0.01 * up @ down).reshape(shape).to(dtype)


def _with_singular_values(rows: int, cols: int, s: list[float], seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


def _load(algo: str, layer: nn.Module, tensors: dict[str, torch.Tensor]):
    options = algorithm_class(algo).options_from_state(tensors, layer)
    adapter = make_adapter(algo, layer, dtype=layer.weight.dtype, **options)
    adapter.load_state_tensors(tensors)
    return adapter


def _layer(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Linear(40, 48) if kind == "linear" else nn.Conv2d(16, 24, 3, padding=1)
    return layer.to(dtype)


# ----------------------------------------------------------------------------- rank-r recovery
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("split", ["balanced", "up"])
def test_fixed_rank_recovers_known_update_and_loads_into_lora(kind, dtype, split):
    layer = _layer(kind, dtype)
    r = 4
    delta = _low_rank(tuple(layer.weight.shape), r, dtype)
    tuned = layer.weight.detach() + delta
    tensors, rep = extract_module(delta, mode="fixed", linear_param=r, conv_param=r, sigma_split=split, name="m")
    assert rep.kind == "lora" and rep.rank == r and rep.rel_error <= 1e-5
    assert tensors["lora_down.weight"].shape == (r, *layer.weight.shape[1:])
    assert tensors["lora_up.weight"].shape == (layer.weight.shape[0], r, *(1,) * (layer.weight.dim() - 2))
    alpha = tensors["alpha"]
    assert alpha.dim() == 0 and alpha.dtype == torch.float32 and float(alpha) == r
    assert tensors["lora_down.weight"].dtype == dtype
    assert _rel(reconstruct(tensors, tuple(delta.shape)), delta) <= 1e-5
    adapter = _load("lora", layer, tensors)
    merged = adapter.merged_weight(1.0).detach()
    assert _rel(merged, tuned) <= 1e-5
    assert float((merged - tuned).abs().max()) <= 1e-5
    if split == "up":  # LyCORIS convention: down = Vᵀ has orthonormal rows
        down = tensors["lora_down.weight"].flatten(1).double()
        assert torch.allclose(down @ down.T, torch.eye(r, dtype=torch.float64), atol=1e-5)
    else:  # balanced: up and down carry the same norms per rank channel
        up_n = tensors["lora_up.weight"].flatten(1).norm(dim=0)
        down_n = tensors["lora_down.weight"].flatten(1).norm(dim=1)
        assert torch.allclose(up_n, down_n, rtol=1e-4)


def test_fixed_rank_above_true_rank_is_still_exact_and_fp16_output():
    delta = _low_rank((48, 40), 3, torch.float32)
    tensors, rep = extract_module(delta, mode="fixed", linear_param=8, conv_param=8, dtype=torch.float16)
    assert rep.rank == 8 and tensors["lora_up.weight"].dtype == torch.float16
    assert tensors["alpha"].dtype == torch.float32
    assert rep.rel_error < 2e-3  # fp16 rounding of the stored factors, measured from them


# ----------------------------------------------------------------------------- rank selection
SIGMAS = [8.0 / 2**i for i in range(30)]  # 8, 4, 2, 1, 0.5, ...; Σσ ≈ 16


@pytest.mark.parametrize(
    ("mode", "param", "rank"),
    [
        ("fixed", 5, 5),
        ("fixed", 100, 30),  # clipped to the full rank
        ("threshold", 1.0, 4),  # σ ≥ 1 (inclusive)
        ("threshold", 1.01, 3),
        ("threshold", 100.0, 1),  # at least one direction
        ("ratio", 0.125, 4),  # σ ≥ 0.125·σ_max = 1
        ("ratio", 0.3, 2),
        ("ratio", 0.0, 30),
        ("quantile", 0.5, 1),  # cum σ: 8, 12, 14, 15, ... of 16
        ("quantile", 0.7, 2),  # 12 ≥ 11.2
        ("quantile", 0.8, 3),  # 14 ≥ 12.8 (LyCORIS: #(cum < 12.8) = 2)
        ("quantile", 0.9, 4),  # 15 ≥ 14.4
        ("quantile", 1.0, 30),
        ("quantile", 0.0, 1),
    ],
)
def test_modes_pick_expected_rank(mode, param, rank):
    s = torch.tensor(SIGMAS)
    assert choose_rank(s, mode, param) == rank
    delta = _with_singular_values(40, 30, SIGMAS)
    if mode in ("threshold", "ratio"):  # the SVD returns σ = 1 ± 1e-15: stay off the boundary
        param *= 1 - 1e-9
    _, rep = extract_module(delta, mode=mode, linear_param=param, conv_param=param, full_fallback=False)
    assert rep.rank == rank


def test_quantile_is_cumulative_sigma_not_sigma_squared_and_ignores_zero_tail():
    # cumulative σ: 3, 5, 6 of 6 → q = 5/6 reaches rank 2 exactly; σ² would give 9, 13 of 14
    assert choose_rank(torch.tensor([3.0, 2.0, 1.0]), "quantile", 5 / 6) == 2
    assert choose_rank(torch.tensor([3.0, 2.0, 1.0]), "quantile", 0.84) == 3
    assert choose_rank(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0]), "quantile", 1.0) == 3


def test_linear_and_conv_use_their_own_parameter():
    conv = _low_rank((24, 16, 3, 3), 6, torch.float64)
    lin = _low_rank((24, 16, 1, 1), 6, torch.float64)  # 1×1 conv counts as linear
    _, rc = extract_module(conv, mode="fixed", linear_param=2, conv_param=3)
    _, rl = extract_module(lin, mode="fixed", linear_param=2, conv_param=3)
    assert (rc.rank, rl.rank) == (3, 2)


def test_bad_options():
    d = _low_rank((20, 30), 2, torch.float32)
    with pytest.raises(ConfigError, match="mode"):
        extract_module(d, mode="percent", linear_param=2, conv_param=2)
    with pytest.raises(ConfigError, match="integer"):
        extract_module(d, mode="fixed", linear_param=2.5, conv_param=2)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        extract_module(d, mode="ratio", linear_param=2.0, conv_param=0.5)
    with pytest.raises(ConfigError, match="Linear/Conv"):
        extract_module(torch.ones(5), mode="fixed", linear_param=2, conv_param=2)


# ----------------------------------------------------------------------------- Tucker
def _tucker(shape: tuple[int, ...], r: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """``Σ up[o,a]·mid[a,c,κ]·down[c,i]``: Tucker rank ``r`` over both the out and in modes."""
    g = _gen(seed)
    up = torch.randn(shape[0], r, generator=g, dtype=torch.float64)
    mid = torch.randn(r, r, *shape[2:], generator=g, dtype=torch.float64)
    down = torch.randn(r, shape[1], generator=g, dtype=torch.float64)
    return (0.01 * torch.einsum("oa,ackl,ci->oikl", up, mid, down)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tucker_recovers_tucker_product_and_loads_into_locon_tucker(dtype):
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 20, 3, padding=1).to(dtype)
    r = 3
    delta = _tucker((20, 16, 3, 3), r, dtype)
    tuned = layer.weight.detach() + delta
    for mode, param in (("fixed", r), ("ratio", 1e-4)):
        tensors, rep = extract_module(delta, mode=mode, linear_param=1, conv_param=param, use_tucker=True)
        assert rep.kind == "tucker" and rep.rank == r and rep.rel_error <= 1e-5
        assert tensors["lora_down.weight"].shape == (r, 16, 1, 1)
        assert tensors["lora_mid.weight"].shape == (r, r, 3, 3)
        assert tensors["lora_up.weight"].shape == (20, r, 1, 1)
        adapter = _load("lora", layer, tensors)
        assert adapter.use_tucker
        assert _rel(adapter.merged_weight(1.0), tuned) <= 1e-5
    # a Linear (or 1×1 conv) ignores use_tucker
    _, rep = extract_module(_low_rank((20, 16), 2, dtype), mode="fixed", linear_param=2, conv_param=2, use_tucker=True)
    assert rep.kind == "lora"


def test_tucker_on_noisy_delta_is_near_the_plain_svd_optimum():
    # a Tucker form is a rank-r ΔW, so the plain rank-r SVD error is a lower bound for it
    signal = _tucker((32, 24, 3, 3), 4, torch.float32)
    noise = torch.randn(32, 24, 3, 3, generator=_gen(2))
    delta = signal + 0.05 * signal.norm() / noise.norm() * noise
    _, plain = extract_module(delta, mode="fixed", linear_param=1, conv_param=4)
    _, tuck = extract_module(delta, mode="fixed", linear_param=1, conv_param=4, use_tucker=True)
    assert tuck.kind == "tucker" and plain.kind == "lora"
    assert plain.rel_error <= tuck.rel_error <= 1.1 * plain.rel_error, (plain.rel_error, tuck.rel_error)


# ----------------------------------------------------------------------------- full fallback, skipping
def test_full_fallback_writes_diff_and_diff_b_that_load_into_full():
    torch.manual_seed(0)
    layer = nn.Linear(8, 10)
    g = _gen(3)
    dw, db = 0.01 * torch.randn(10, 8, generator=g), 0.01 * torch.randn(10, generator=g)
    tensors, rep = extract_module(dw, mode="fixed", linear_param=4, conv_param=4, diff_b=db)  # 4 ≥ 8/2
    assert rep.kind == "full" and set(tensors) == {"diff", "diff_b"}
    adapter = _load("full", layer, tensors)
    assert torch.allclose(adapter.merged_weight(1.0), layer.weight + dw, atol=1e-7)
    assert torch.allclose(adapter.merged_bias(1.0), layer.bias + db, atol=1e-7)
    # rank 3 < 4 stays low-rank and reports the bias it cannot hold
    tensors, rep = extract_module(dw, mode="fixed", linear_param=3, conv_param=3, diff_b=db)
    assert rep.kind == "lora" and rep.bias_dropped and "diff_b" not in tensors
    # data-dependent modes fall back after the SVD; full_fallback=False keeps the factors
    _, rep = extract_module(dw, mode="ratio", linear_param=0.0, conv_param=0.0)
    assert rep.kind == "full"
    _, rep = extract_module(dw, mode="ratio", linear_param=0.0, conv_param=0.0, full_fallback=False)
    assert rep.kind == "lora" and rep.rank == 8 and rep.rel_error < 1e-6


def test_unchanged_layers_are_skipped():
    w = torch.randn(10, 8)
    tensors, rep = extract_module(torch.zeros(10, 8), mode="fixed", linear_param=2, conv_param=2)
    assert tensors is None and rep.kind == "skipped"
    tiny = torch.full((10, 8), 1e-9)
    _, rep = extract_module(tiny, mode="fixed", linear_param=2, conv_param=2)
    assert rep.kind == "lora"  # default tolerance 0: any change counts
    _, rep = extract_module(tiny, mode="fixed", linear_param=2, conv_param=2, min_diff=1e-6)
    assert rep.kind == "skipped"
    # bias-only change: Full with a zero diff
    b = torch.randn(10)
    out, reps = extract(
        [("same", w, w.clone(), b, b.clone()), ("bias", w, w.clone(), b, b + 1)],
        mode="fixed",
        linear_param=2,
        conv_param=2,
        progress=False,
    )
    assert [r.kind for r in reps] == ["skipped", "full"]
    assert set(out) == {"bias.diff", "bias.diff_b"} and out["bias.diff"].abs().max() == 0


# ----------------------------------------------------------------------------- randomized SVD
def test_randomized_matches_exact_error_on_low_rank_plus_noise():
    # rank-8 signal + noise at 10 % of its norm; the exact rank-16 error is noise-dominated (~0.09).
    # Measured (torch 2.13 CPU, 5 draws): randomized/exact error ratio 1.005–1.006 with oversample 8,
    # niter 2 (1.010–1.011 with 4/1, 1.24–1.29 with 8/0); we require ≤ 1 % worse.
    g = _gen(4)
    for trial in range(3):
        signal = _low_rank((256, 384), 8, torch.float32, seed=10 + trial)
        noise = torch.randn(256, 384, generator=g)
        delta = signal + 0.1 * signal.norm() / noise.norm() * noise
        kw = {"mode": "fixed", "linear_param": 16, "conv_param": 16}
        _, exact = extract_module(delta, **kw)
        _, rand = extract_module(delta, randomized=True, oversample=8, niter=2, **kw)
        assert rand.rank == 16 and rand.kind == "lora"
        assert rand.rel_error <= 1.01 * exact.rel_error, (rand.rel_error, exact.rel_error)
    conv = _tucker((32, 16, 3, 3), 4, torch.float32)
    _, rep = extract_module(conv, mode="fixed", linear_param=4, conv_param=4, randomized=True, use_tucker=True)
    assert rep.kind == "tucker" and rep.rel_error < 1e-4


@pytest.mark.parametrize("mode", ["threshold", "ratio", "quantile"])
def test_randomized_needs_fixed_mode(mode):
    with pytest.raises(ConfigError, match="fixed"):
        extract_module(torch.randn(20, 30), mode=mode, linear_param=0.5, conv_param=0.5, randomized=True)


# ----------------------------------------------------------------------------- whole model
def test_extract_many_modules_and_report():
    base = {
        "lora_unet_a": (torch.randn(24, 16), torch.randn(24)),
        "lora_unet_b": (torch.randn(12, 8, 3, 3), None),
        "lora_unet_c": (torch.randn(6, 4), torch.randn(6)),
    }
    pairs = []
    for i, (name, (w, b)) in enumerate(base.items()):
        tuned = w if name == "lora_unet_c" else w + _low_rank(tuple(w.shape), 2, torch.float32, seed=i)
        pairs.append((name, w.half(), tuned.half(), b, None if b is None else b.clone()))
    out, reps = extract(pairs, mode="fixed", linear_param=2, conv_param=2, use_tucker=True, progress=True)
    assert [r.kind for r in reps] == ["lora", "tucker", "skipped"]
    assert set(out) == {
        "lora_unet_a.lora_down.weight",
        "lora_unet_a.lora_up.weight",
        "lora_unet_a.alpha",
        "lora_unet_b.lora_down.weight",
        "lora_unet_b.lora_mid.weight",
        "lora_unet_b.lora_up.weight",
        "lora_unet_b.alpha",
    }
    text = format_report(reps)
    assert "lora 1, tucker 1, skipped 1" in text and "relative error: mean" in text
    with pytest.raises(ConfigError, match="differ"):
        extract([("x", torch.zeros(2, 3), torch.zeros(3, 2), None, None)], progress=False)


# --------------------------------------------------------------------------- whole models (higanbana extract)
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_extract_from_models_recovers_a_known_low_rank_update(kind, tmp_path):
    from higanbana.cli import main
    from higanbana.formats.sd_network import load_sd_network, sd_network
    from higanbana.models.tiny import save_tiny_sd, tiny_sd_parts

    base = tiny_sd_parts(kind, seed=0)
    save_tiny_sd(base, tmp_path / "base")
    tuned = tiny_sd_parts(kind, seed=0)
    net = sd_network(tuned, "full", "lora", rank=2)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    net.merge()  # tuned = base + a rank-2 update on every adapted layer
    save_tiny_sd(tuned, tmp_path / "tuned")
    out = tmp_path / "extracted.safetensors"
    args = ["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), str(out), "--linear-param", "2"]
    assert main(args) == 0
    assert main(args) == 2  # the output exists: refused without --overwrite
    fresh = tiny_sd_parts(kind, seed=0)
    loaded = load_sd_network(out, fresh)
    assert set(loaded.adapters) == set(net.adapters)  # exactly the changed layers, nothing else
    loaded.merge()
    for name, record in net.records.items():
        got = loaded.parts[record.prefix].module.get_submodule(record.path).weight
        want = net.parts[record.prefix].module.get_submodule(record.path).weight
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_extract_refuses_different_architectures(tmp_path):
    from higanbana.models.sd import SDParts
    from higanbana.models.tiny import save_tiny_sd, tiny_sd_parts
    from higanbana.tools.extract import extract_models

    base = tiny_sd_parts("sd1", seed=0)
    other = tiny_sd_parts("sd1", seed=0)
    other = SDParts("sd1", tiny_sd_parts("sd2", seed=0).unet, other.text_encoders, tokenizers=other.tokenizers)
    save_tiny_sd(base, tmp_path / "a")
    save_tiny_sd(other, tmp_path / "b")
    with pytest.raises(HiganbanaError, match="differ at module lora_unet_"):
        extract_models(tmp_path / "a", tmp_path / "b", tmp_path / "x.safetensors", kind="sd1")
