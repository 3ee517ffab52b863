"""The ELBO estimators against exact answers on a linear-Gaussian VAE (probabilistic PCA),
and the estimator comparison. Statistical checks use fixed seeds and 4 standard errors."""

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_vae.compare import compare_estimators, parse_estimator, train_side_by_side
from pyro_vae.config import load_config
from pyro_vae.linear_gaussian import linear_gaussian
from pyro_vae.model import build_vae
from pyro_vae.priors import make_prior


def per_image_estimates(estimator, vae, x, draws, seed=0):
    """``draws`` independent estimates of the per-image ELBO (nats per image)."""
    values = []
    for draw in range(draws):
        pyro.set_rng_seed(seed + draw)
        values.append(-estimator.loss(vae.model_body, vae.guide_body, x) / len(x))
    return torch.tensor(values)


def test_exact_posterior_gives_the_exact_log_likelihood_with_zero_variance():
    vae, x, exact = linear_gaussian()
    mc = per_image_estimates(Trace_ELBO(), vae, x, draws=5)
    assert mc.std() < 1e-4  # log p(x|z) + log p(z) - log q(z|x) = log p(x) for every z
    assert mc.mean().item() == pytest.approx(exact.mean().item(), abs=1e-4)
    # the analytic estimator still samples its reconstruction term: right mean, some noise
    analytic = per_image_estimates(TraceMeanField_ELBO(), vae, x, draws=200)
    assert abs(analytic.mean() - exact.mean()) < 4 * analytic.std() / math.sqrt(len(analytic))
    assert analytic.std() > 1e-3


def test_analytic_and_mc_agree_in_expectation_and_bound_log_px():
    vae, x, exact = linear_gaussian(diagonal_posterior=False, shift=0.4, inflate=1.5)
    mc = per_image_estimates(Trace_ELBO(), vae, x, draws=400)
    analytic = per_image_estimates(TraceMeanField_ELBO(), vae, x, draws=400, seed=10_000)
    se = math.sqrt(mc.var() / len(mc) + analytic.var() / len(analytic))
    assert abs(mc.mean() - analytic.mean()) < 4 * se
    # both are below log p(x) by KL(q || posterior), far more than their noise
    for values in (mc, analytic):
        assert values.mean() + 4 * values.std() / math.sqrt(len(values)) < exact.mean()


def test_analytic_estimator_has_lower_variance(splits):
    """On a VAE whose guide is far from its posterior (untrained, synthetic binary images), the
    closed-form KL removes noise from the estimate and, more so, from the encoder's gradient.
    (With a guide close to the posterior the Monte Carlo KL can cancel reconstruction noise,
    so this is not a law: the comparison command measures it on real models.)"""
    torch.manual_seed(0)
    vae = build_vae(load_config(None, {"model.z_dim": 4, "model.hidden_dim": 32}).model, (1, 8, 8))
    x = torch.bernoulli(splits.train.images[:64], generator=torch.Generator().manual_seed(0))
    encoder = list(vae.encoder.parameters())
    variances = {}
    for estimator in (Trace_ELBO(), TraceMeanField_ELBO()):
        values, grads = [], []
        for draw in range(300):
            pyro.set_rng_seed(draw)
            loss = estimator.differentiable_loss(vae.model_body, vae.guide_body, x) / len(x)
            values.append(loss.item())
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, encoder)]))
        variances[type(estimator).__name__] = (torch.tensor(values).var(), torch.stack(grads).var(0).sum())
    (value_mc, grad_mc), (value_analytic, grad_analytic) = variances["Trace_ELBO"], variances["TraceMeanField_ELBO"]
    # F-test: a variance ratio above 1.5 with 299 degrees of freedom each is far beyond chance
    assert value_mc / value_analytic > 1.5
    assert grad_mc / grad_analytic > 1.5


@pytest.mark.parametrize("prior_name", ["standard_normal", "learned_gaussian"])
def test_closed_form_kl_matches_monte_carlo(prior_name):
    torch.manual_seed(0)
    prior_module = make_prior(prior_name, 3)
    with torch.no_grad():
        for p in prior_module.parameters():
            p.add_(0.5 * torch.randn_like(p))
    prior = prior_module()
    q = torch.distributions.Independent(torch.distributions.Normal(torch.randn(4, 3), torch.rand(4, 3) + 0.3), 1)
    z = q.sample((200_000,))
    samples = q.log_prob(z) - prior.log_prob(z)
    se = samples.std(0) / math.sqrt(len(samples))
    closed = torch.distributions.kl_divergence(q, prior)
    assert ((samples.mean(0) - closed).abs() < 4 * se).all()


def test_parse_estimator():
    assert parse_estimator("iwae:50") == ("iwae", 50)
    assert parse_estimator("mc") == ("mc", 1)
    for bad in ("iwae:x", "iwae:0", "renyi"):
        with pytest.raises(ValueError):
            parse_estimator(bad)


def test_compare_estimators_on_the_exact_posterior():
    vae, x, exact = linear_gaussian()
    records = compare_estimators(vae, x, ["mc", "analytic", "iwae:4"], repeats=3, grad_samples=4, grad_batch=16)
    assert [r["estimator"] for r in records] == ["mc", "analytic", "iwae:4"]
    for r in records:
        assert r["seconds_per_step"] > 0
        if r["estimator"] == "analytic":  # its sampled reconstruction term keeps some noise
            assert r["estimate"] == pytest.approx(exact.mean().item(), abs=0.05)
        else:  # every importance weight equals p(x): exact, whatever the draw
            assert r["estimate"] == pytest.approx(exact.mean().item(), abs=1e-3)
            assert r["estimate_std"] < 1e-4


def test_compare_estimators_ranks_bounds():
    vae, x, exact = linear_gaussian(diagonal_posterior=False, shift=0.4, inflate=1.5)
    records = {r["estimator"]: r for r in compare_estimators(vae, x, ["mc", "iwae:20"], repeats=4, grad_samples=3)}
    assert records["mc"]["estimate"] < records["iwae:20"]["estimate"] < exact.mean().item()


def test_train_side_by_side(tmp_path, splits, tiny_config):
    records, histories = train_side_by_side(tiny_config, splits, tmp_path, ["mc", "iwae:3"], num_samples=4)
    assert [r["estimator"] for r in records] == ["mc", "iwae:3"]
    assert set(histories) == {"mc", "iwae:3"}
    assert all(math.isfinite(r["test_log_likelihood"]) for r in records)
    assert (tmp_path / "iwae_k3" / "checkpoint.pt").is_file()
