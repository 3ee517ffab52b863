"""Evaluation estimators against exact answers on a linear-Gaussian VAE (probabilistic PCA,
`pyro_vae.linear_gaussian`).

With z ~ N(0, I) and x ~ N(Wz + b, s^2 I), log p(x) = log N(x; b, W W^T + s^2 I) exactly, and
the posterior is Gaussian: Cov = (I + W^T W / s^2)^-1, mean = Cov W^T (x - b) / s^2.

Statistical tests draw from the ``seed`` fixture (tests/conftest.py) and state their
false-failure rate per run.
"""

import math
import random

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyro_vae.elbo as elbo_module
from pyro_vae.elbo import IWAE_ELBO, elbo_per_image, evaluate, importance_sampled, make_elbo, mean_elbo
from pyro_vae.linear_gaussian import X_DIM, Z_DIM, linear_gaussian
from pyro_vae.seeding import seeded


def test_exact_posterior_gives_exact_log_likelihood_and_elbo():
    vae, x, exact = linear_gaussian()
    estimates = importance_sampled(vae, x, num_samples=7)
    torch.testing.assert_close(estimates.log_likelihood, exact, rtol=0, atol=1e-4)
    torch.testing.assert_close(estimates.elbo, exact, rtol=0, atol=1e-4)
    torch.testing.assert_close(estimates.elbo, estimates.reconstruction - estimates.kl)
    torch.testing.assert_close(elbo_per_image(vae, x), exact, rtol=0, atol=1e-4)


@pytest.mark.statistical
@pytest.mark.parametrize("max_elements", [elbo_module.MAX_CHUNK_ELEMENTS, 50 * (X_DIM + Z_DIM) * 500])
def test_importance_sampling_converges_to_exact_log_likelihood(monkeypatch, max_elements, seed):
    """At K = 50,000 the estimate of log p(x), averaged over 50 images, is within 0.01 nats.

    Its noise: the importance weights of this guide have relative variance Var(w) / p(x)^2
    = 4.4 per image (bounded weights: q is wider than the posterior), so by the delta method
    log p_K(x) has standard deviation sqrt(4.4 / K) per image and the 50-image mean
    sqrt(4.4 / K / 50) = 0.0013 (bias 4.4 / 2K = 4e-5); measured over 100 seeds at K = 5000,
    0.0048, i.e. 0.0015 at K = 50,000. 0.01 is 6.6 of those (normal, two-sided): false-failure
    rate 4e-11 per run. The bounds of K = 1, 5, 50 and 50,000 are 2.4, 0.52 and 0.05 nats
    apart, over 50 of their standard errors; the ELBO of each image lies 2.9 nats (KL(q ||
    posterior)) below log p(x), its noise 3.7 / sqrt(K) = 0.016: no false failures.
    """
    # the second case forces 100 chunks of 500 samples (50 images x (6 pixels + 2 latents) each):
    # chunking must not change the estimate's law
    monkeypatch.setattr(elbo_module, "MAX_CHUNK_ELEMENTS", max_elements)
    vae, x, exact = linear_gaussian(diagonal_posterior=False, shift=0.3, inflate=1.5)
    with seeded(seed):
        log_px, elbo, _, _, bounds = importance_sampled(vae, x, num_samples=50_000)
    gap = (exact - log_px).mean().item()
    # a lower bound in expectation that tightens with K; at K = 50,000 within 0.01 nats here
    assert abs(gap) < 0.01
    # the ELBO is below log p(x) by KL(q || posterior) > 0 for this distorted guide
    assert (elbo < exact).all()
    # the K-sample bounds rise with K towards log p(x); K = 1 is the ELBO on the same samples
    torch.testing.assert_close(bounds[1], elbo)
    means = [bounds[k].mean().item() for k in (1, 5, 50)] + [log_px.mean().item()]
    assert means == sorted(means)


def test_log_likelihood_estimate_is_at_least_the_elbo_estimate():
    vae, x, _ = linear_gaussian(diagonal_posterior=False, shift=1.0, inflate=0.7)
    log_px, elbo, _, _, _ = importance_sampled(vae, x, num_samples=20)
    assert (log_px >= elbo - 1e-5).all()  # log-mean-exp >= mean, on the same samples


def test_elbo_per_image_equals_pyro_trace_elbo():
    vae, x, _ = linear_gaussian(diagonal_posterior=False, shift=0.5)
    pyro.set_rng_seed(4)
    ours = elbo_per_image(vae, x).sum()
    pyro.set_rng_seed(4)
    pyros = -Trace_ELBO().loss(vae.model_body, vae.guide_body, x)
    assert math.isclose(ours.item(), pyros, rel_tol=1e-5)


def test_mean_elbo_is_batch_size_independent():
    vae, x, exact = linear_gaussian()  # exact guide: no sampling noise
    assert math.isclose(mean_elbo(vae, x, batch_size=7), exact.mean().item(), rel_tol=1e-5)


@pytest.mark.statistical
def test_kl_term_matches_the_closed_form(seed):
    """The sampled KL term of evaluation agrees with KL(q || p) in closed form, for each of 50
    images within 5.5 standard errors of a 4000-sample mean (normal, two-sided; the standard
    errors from 4000 other draws): false-failure rate 50 x 3.8e-8 = 1.9e-6 per run."""
    vae, x, _ = linear_gaussian(diagonal_posterior=False, shift=0.4, inflate=1.3)
    q = vae.encode(x)
    with seeded(seed):
        estimates = importance_sampled(vae, x, num_samples=4000)
        z = q.sample((4000,))
    exact_kl = torch.distributions.kl_divergence(q, vae.prior())
    se = (q.log_prob(z) - vae.prior().log_prob(z)).std(0) / math.sqrt(4000)
    assert ((estimates.kl - exact_kl).abs() < 5.5 * se).all()


def test_evaluate_is_seeded_and_leaves_the_global_state():
    vae, x, _ = linear_gaussian(diagonal_posterior=False, shift=0.4, inflate=1.3)
    torch.manual_seed(123)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first = evaluate(vae, x, num_samples=5)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert evaluate(vae, x, num_samples=5) == first
    other = evaluate(vae, x, num_samples=5, seed=1)
    assert other["test_log_likelihood"] != first["test_log_likelihood"]
    # seed 0 draws what torch.manual_seed(0) before the call drew in earlier versions
    torch.manual_seed(0)
    assert first["test_log_likelihood"] == importance_sampled(vae, x, num_samples=5).log_likelihood.mean().item()


def test_evaluate_reports_per_image_means():
    vae, x, exact = linear_gaussian()
    result = evaluate(vae, x, num_samples=3, batch_size=16)
    assert result["num_images"] == 50 and result["num_samples"] == 3
    assert set(result["iwae_bounds"]) == {"1", "3"}  # K = 1 (the ELBO) and the full K
    assert result["iwae_bounds"]["1"] == pytest.approx(result["test_elbo"])
    assert math.isclose(result["test_log_likelihood"], exact.mean().item(), rel_tol=1e-5)
    assert math.isclose(result["test_elbo"], result["test_reconstruction"] - result["test_kl"], rel_tol=1e-5)
    # the closed-form KL per dimension adds up to the closed-form KL; both latents vary with x
    closed_form = torch.distributions.kl_divergence(vae.encode(x), vae.prior()).mean().item()
    assert math.isclose(sum(result["kl_per_dimension"]), closed_form, rel_tol=1e-5)
    assert result["active_units"] == 2
    assert result["closed_form_terms"] == ["kl_per_dimension"]
    with pytest.raises(ValueError, match="num_samples"):
        evaluate(vae, x, num_samples=0)


def test_active_units_count_dimensions_that_vary_with_x():
    vae, x, _ = linear_gaussian()
    vae.decoder.W[:, 1] = 0.0  # the second latent no longer explains x: its posterior is the prior
    vae.encoder.__init__(vae.decoder.W, vae.decoder.b)
    result = evaluate(vae, x, num_samples=2)
    assert result["active_units"] == 1
    assert result["kl_per_dimension"][1] == pytest.approx(0.0, abs=1e-6)


def test_make_elbo_refuses_unknown_names():
    assert isinstance(make_elbo("mc"), Trace_ELBO)
    assert isinstance(make_elbo("iwae", 5), IWAE_ELBO) and make_elbo("iwae", 5).num_particles == 5
    with pytest.raises(ValueError, match="choose one of"):
        make_elbo("renyi")


def test_iwae_matches_a_hand_written_bound():
    """-loss = sum_b [logsumexp_k (log p(x_b|z_kb) + log p(z_kb) - log q(z_kb|x_b)) - log K]."""
    vae, x, _ = linear_gaussian(diagonal_posterior=False, shift=0.5, inflate=1.4)
    K = 6
    pyro.set_rng_seed(8)
    loss = IWAE_ELBO(num_particles=K).differentiable_loss(vae.model_body, vae.guide_body, x)
    pyro.set_rng_seed(8)
    q = vae.encode(x)
    z = q.rsample((K,))  # the same draws: (K, B, z_dim) standard normals in the same order
    log_w = vae.decode(z).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)
    expected = -(log_w.logsumexp(0) - math.log(K)).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-4)


def test_iwae_with_one_particle_is_the_elbo():
    vae, x, _ = linear_gaussian(diagonal_posterior=False, shift=0.5)
    pyro.set_rng_seed(9)
    iwae = IWAE_ELBO(num_particles=1).loss(vae.model_body, vae.guide_body, x)
    pyro.set_rng_seed(9)
    elbo = Trace_ELBO().loss(vae.model_body, vae.guide_body, x)
    assert math.isclose(iwae, elbo, rel_tol=1e-6)


@pytest.mark.statistical
def test_iwae_bound_tightens_with_k_towards_log_px(seed):
    """Averaged over 50 images and 20 repeats, the bound rises with K and stays below log p(x).

    Per pass (measured over 20): K = 1: -12.61 +- 0.71, K = 5: -9.12 +- 0.32, K = 50: -7.93
    +- 0.061, log p(x) = -7.79. The closest call, K = 50 below log p(x), holds by 0.14 nats,
    10 standard errors of the 20-pass mean; the others by 16 or more (normal): false-failure
    rate below 1e-20 per run.
    """
    vae, x, exact = linear_gaussian(diagonal_posterior=False, shift=0.4, inflate=1.5)
    bounds = {}
    with seeded(seed):
        for K in (1, 5, 50):
            estimator = IWAE_ELBO(num_particles=K)
            bounds[K] = sum(-estimator.loss(vae.model_body, vae.guide_body, x) for _ in range(20)) / (20 * len(x))
    total = exact.mean().item()
    assert bounds[1] < bounds[5] < bounds[50] < total
    assert total - bounds[50] < 0.25 * (total - bounds[1])


def test_evaluate_compiles_the_bernoulli_score_only_when_it_pays(monkeypatch):
    """``compiled=None`` decides by the decoded values against FUSE_MIN_ELEMENTS; True and False
    force it; the numbers of the two forms agree to float32 rounding."""
    from pyro_vae import likelihoods
    from pyro_vae.config import ModelConfig
    from pyro_vae.model import build_vae

    calls = []
    kernel = likelihoods._compiled_log_sigmoid_sum

    def spy(logits, sign):
        calls.append(logits.shape)
        return kernel(logits, sign)

    monkeypatch.setattr(likelihoods, "_compiled_log_sigmoid_sum", spy)
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(z_dim=4, hidden_dim=16), (1, 6, 6)).eval()
    images = torch.bernoulli(torch.full((30, 1, 6, 6), 0.3))
    eager = evaluate(vae, images, num_samples=50, batch_size=10)
    assert calls == []  # 50 * 30 * 36 values: far below FUSE_MIN_ELEMENTS
    fused = evaluate(vae, images, num_samples=50, batch_size=10, compiled=True)
    assert len(calls) == 3 and calls[0][-1] == 36
    monkeypatch.setattr(elbo_module, "FUSE_MIN_ELEMENTS", 50 * images.numel())
    evaluate(vae, images, num_samples=50, batch_size=10)
    assert len(calls) == 6
    evaluate(vae, images, num_samples=50, batch_size=10, compiled=False)
    assert len(calls) == 6
    for key in ("test_log_likelihood", "test_elbo", "test_reconstruction", "test_kl"):
        assert fused[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-4), key
    with pytest.raises(ValueError, match="compiled"):
        evaluate(vae, images, num_samples=5, compiled="yes")
