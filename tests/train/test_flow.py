"""Flow matching for SD3/Flux: the noise-level distributions and shifts against the SD3 paper's
formulas written here and diffusers' own implementations, interpolation and velocity, loss weights,
and Flux's 2×2 latent packing against diffusers' pipeline (exact)."""

from __future__ import annotations

import math

import pytest
import torch

from higanbana.errors import ConfigError
from higanbana.train import flow


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_schemes_map_their_draws_as_the_paper_writes():
    n = 64
    # the same per-sample draws the function makes, mapped by the formulas of SD3 §3.1
    normal = torch.stack([torch.randn((), generator=g, dtype=torch.float64) for g in gens(n)])
    uniform = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens(n)])
    got = flow.sample_sigmas(gens(n), scheme="logit_normal", logit_mean=0.3, logit_std=0.8)
    torch.testing.assert_close(got, 1 / (1 + torch.exp(-(0.3 + 0.8 * normal))), rtol=0, atol=1e-15)
    torch.testing.assert_close(flow.sample_sigmas(gens(n), scheme="uniform"), uniform, rtol=0, atol=0)
    s = 1.29
    mode = 1 - uniform - s * (torch.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
    torch.testing.assert_close(flow.sample_sigmas(gens(n), scheme="mode", mode_scale=s), mode, rtol=0, atol=1e-15)
    assert ((mode >= 0) & (mode <= 1)).all()


def test_logit_normal_has_the_asked_moments_and_reproduces_per_sample():
    sig = flow.sample_sigmas(gens(20000), logit_mean=-0.5, logit_std=1.5)
    logit = torch.log(sig / (1 - sig))
    assert logit.mean().item() == pytest.approx(-0.5, abs=0.05)
    assert logit.std().item() == pytest.approx(1.5, abs=0.05)
    # each sample's level depends on its own generator only (a batch split differently is the same)
    torch.testing.assert_close(flow.sample_sigmas(gens(3, seed=5)), flow.sample_sigmas(gens(5, seed=3))[2:])


def test_bad_scheme_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="expected one of"):
        flow.sample_sigmas(gens(1), scheme="cosine")
    with pytest.raises(ConfigError, match="not monotone"):
        flow.sample_sigmas(gens(1), scheme="mode", mode_scale=2.0)
    with pytest.raises(ConfigError, match="logit_std"):
        flow.sample_sigmas(gens(1), logit_std=0.0)
    with pytest.raises(ConfigError, match="shift"):
        flow.shift_sigmas(torch.tensor([0.5]), 0.0)
    with pytest.raises(ConfigError, match="loss weighting"):
        flow.loss_weight(torch.tensor([0.5]), "snr")


def test_shifts_against_diffusers_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sig = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    # SD3: FlowMatchEulerDiscreteScheduler(shift=3.0) spaces its sigmas by the same map
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    base = torch.linspace(1, 1000, 1000, dtype=torch.float64).flip(0) / 1000
    torch.testing.assert_close(flow.shift_sigmas(base, 3.0), sched.sigmas.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flow.shift_sigmas(sig, 1.0), sig)
    # Flux: the exponential time shift at μ
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    for mu in (0.5, 0.8, 1.15):
        torch.testing.assert_close(flow.flux_shift(sig, mu), flux.time_shift(mu, 1.0, sig), rtol=1e-12, atol=1e-12)
    assert flow.flux_shift(torch.tensor([0.0, 1.0]), 1.0).tolist() == [0.0, 1.0]


def test_flux_mu_is_linear_through_its_anchors():
    assert flow.flux_mu(256) == pytest.approx(0.5)
    assert flow.flux_mu(4096) == pytest.approx(1.15)
    assert flow.flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)  # a 512² image: 32×32 packed


def test_interpolation_and_velocity():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 16, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 16, 8, 8, generator=g)
    eps = eps.double()
    sig = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    xt = flow.interpolate(x0, eps, sig)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], eps[2])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    # the velocity is the derivative of the path in σ (central difference, exact for a line)
    h = 1e-3
    d = (flow.interpolate(x0, eps, sig.clamp(h, 1 - h) + h) - flow.interpolate(x0, eps, sig.clamp(h, 1 - h) - h)) / (
        2 * h
    )
    torch.testing.assert_close(d, flow.velocity(x0, eps), rtol=1e-9, atol=1e-9)


def test_loss_weights_against_diffusers():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sig = torch.linspace(0.05, 1.0, 20, dtype=torch.float64)
    for scheme in ("sigma_sqrt", "cosmap", "none"):
        ref = compute_loss_weighting_for_sd3(scheme, sig)
        torch.testing.assert_close(flow.loss_weight(sig, scheme), ref.double(), rtol=1e-6, atol=0)  # theirs: float32


def test_flux_packing_is_diffusers_and_inverts_exactly():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(2))
    packed = flow.pack_latents(x)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(flow.unpack_latents(packed, 6, 10), x)
    ids = flow.latent_ids(6, 10)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    with pytest.raises(ConfigError, match="must be even"):
        flow.pack_latents(torch.zeros(1, 16, 5, 4))
    with pytest.raises(ConfigError, match="do not match"):
        flow.unpack_latents(packed, 8, 10)
