"""Evaluation estimators against exact answers on a linear-Gaussian VAE (probabilistic PCA,
`pyro_vae.linear_gaussian`).

With z ~ N(0, I) and x ~ N(Wz + b, s^2 I), log p(x) = log N(x; b, W W^T + s^2 I) exactly, and
the posterior is Gaussian: Cov = (I + W^T W / s^2)^-1, mean = Cov W^T (x - b) / s^2.
"""

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyro_vae.elbo as elbo_module
from pyro_vae.elbo import IWAE_ELBO, elbo_per_image, evaluate, importance_sampled, make_elbo, mean_elbo
from pyro_vae.linear_gaussian import X_DIM, linear_gaussian


def test_exact_posterior_gives_exact_log_likelihood_and_elbo():
    vae, x, exact = linear_gaussian()
    estimates = importance_sampled(vae, x, num_samples=7)
    torch.testing.assert_close(estimates.log_likelihood, exact, rtol=0, atol=1e-4)
    torch.testing.assert_close(estimates.elbo, exact, rtol=0, atol=1e-4)
    torch.testing.assert_close(estimates.elbo, estimates.reconstruction - estimates.kl)
    torch.testing.assert_close(elbo_per_image(vae, x), exact, rtol=0, atol=1e-4)


@pytest.mark.parametrize("max_elements", [elbo_module.MAX_CHUNK_ELEMENTS, 50 * X_DIM * 7])
def test_importance_sampling_converges_to_exact_log_likelihood(monkeypatch, max_elements):
    # the second case forces chunks of 7 samples: chunking must not change the estimate's law
    monkeypatch.setattr(elbo_module, "MAX_CHUNK_ELEMENTS", max_elements)
    vae, x, exact = linear_gaussian(diagonal_posterior=False, shift=0.3, inflate=1.5)
    torch.manual_seed(2)
    log_px_5000, elbo, _, _, bounds = importance_sampled(vae, x, num_samples=5000)
    log_px_5 = importance_sampled(vae, x, num_samples=5).log_likelihood
    gap_5000 = (exact - log_px_5000).mean().item()
    # a lower bound in expectation that tightens with K; at K = 5000 within 0.01 nats here
    assert abs(gap_5000) < 0.01
    assert (exact - log_px_5).mean().item() > gap_5000
    # the ELBO is below log p(x) by KL(q || posterior) > 0 for this distorted guide
    assert (elbo < exact).all()
    # the K-sample bounds rise with K towards log p(x); K = 1 is the ELBO on the same samples
    torch.testing.assert_close(bounds[1], elbo)
    means = [bounds[k].mean().item() for k in (1, 5, 50)] + [log_px_5000.mean().item()]
    assert means == sorted(means) and means[-1] < exact.mean().item() + 0.01


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


def test_kl_term_matches_the_closed_form():
    """The sampled KL term of evaluation agrees with KL(q || p) in closed form (4 standard errors)."""
    vae, x, _ = linear_gaussian(diagonal_posterior=False, shift=0.4, inflate=1.3)
    torch.manual_seed(3)
    estimates = importance_sampled(vae, x, num_samples=4000)
    exact_kl = torch.distributions.kl_divergence(vae.encode(x), vae.prior())
    q = vae.encode(x)
    z = q.sample((4000,))
    se = (q.log_prob(z) - vae.prior().log_prob(z)).std(0) / math.sqrt(4000)
    assert ((estimates.kl - exact_kl).abs() < 4 * se).all()


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


def test_iwae_bound_tightens_with_k_towards_log_px():
    """Averaged over 50 images and 20 repeats, the bound rises with K and stays below log p(x)."""
    vae, x, exact = linear_gaussian(diagonal_posterior=False, shift=0.4, inflate=1.5)
    torch.manual_seed(10)
    bounds = {}
    for K in (1, 5, 50):
        estimator = IWAE_ELBO(num_particles=K)
        bounds[K] = sum(-estimator.loss(vae.model_body, vae.guide_body, x) for _ in range(20)) / (20 * len(x))
    total = exact.mean().item()
    assert bounds[1] < bounds[5] < bounds[50] < total
    assert total - bounds[50] < 0.25 * (total - bounds[1])
