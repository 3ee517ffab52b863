"""Each prior is a normalized density whose samples have the moments it claims.

Statistical tests draw from the ``seed`` fixture (tests/conftest.py) and state their
false-failure rate per run; the priors they draw from are fixed (``build``).
"""

import math

import pytest
import torch

from pyro_vae.networks import MLPEncoder
import pyro.distributions as dist

from pyro_vae.priors import PRIORS, DiagonalGaussianMixture, make_prior
from pyro_vae.seeding import seeded

Z_DIM = 2
IMAGE_SHAPE = (1, 4, 4)


def build(name):
    torch.manual_seed(0)
    encoder = MLPEncoder(IMAGE_SHAPE, Z_DIM, 8)
    options = {"num_components": 4} if name in ("mixture", "vamp") else {}
    prior = make_prior(name, Z_DIM, encoder=encoder, image_shape=IMAGE_SHAPE, **options)
    with torch.no_grad():  # move learnable priors away from their initial values
        for p in prior.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return prior


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_prior_shapes(name):
    p = build(name)()
    assert p.event_shape == (Z_DIM,) and p.batch_shape == ()
    assert p.sample((5,)).shape == (5, Z_DIM)
    assert p.expand((3,)).log_prob(torch.zeros(3, Z_DIM)).shape == (3,)


@pytest.mark.statistical
@pytest.mark.parametrize("name", sorted(PRIORS))
def test_prior_density_normalizes(name, seed):
    """E_g[p(z) / g(z)] = 1 for a broad Gaussian proposal g: the mean of 200,000 draws is within
    5 standard errors (normal, two-sided; p / g is bounded, g being broader than every part of
    p): false-failure rate 5.7e-7 per run."""
    p = build(name)()
    g = torch.distributions.Normal(torch.zeros(Z_DIM), 4.0 * torch.ones(Z_DIM))
    with seeded(seed), torch.no_grad():
        z = g.sample((200_000,))
        ratio = (p.log_prob(z) - g.log_prob(z).sum(-1)).exp().double()
    se = ratio.std().item() / math.sqrt(len(ratio))
    assert abs(ratio.mean().item() - 1) < 5 * se


@pytest.mark.statistical
@pytest.mark.parametrize("name", sorted(PRIORS))
def test_prior_samples_have_the_claimed_moments(name, seed):
    """Per latent dimension, the mean and the variance of 100,000 draws are within 5 standard
    errors of the claimed ones (normal, two-sided; the variance's standard error
    sqrt((m4 - var^2) / n) from the draws' fourth central moment m4, as mixtures have heavier
    tails than a Gaussian): 4 checks, false-failure rate 4 x 5.7e-7 = 2.3e-6 per run."""
    p = build(name)()
    with seeded(seed), torch.no_grad():
        z = p.sample((100_000,)).double()
    mean, var = p.mean.double(), p.variance.double()
    se_mean = (var / len(z)).sqrt()
    assert ((z.mean(0) - mean).abs() < 5 * se_mean).all()
    m4 = (z - z.mean(0)).pow(4).mean(0)
    se_var = ((m4 - z.var(0) ** 2) / len(z)).sqrt()
    assert ((z.var(0) - var).abs() < 5 * se_var).all()


def test_standard_normal_and_learned_gaussian_start_at_n01():
    for name in ("standard_normal", "learned_gaussian"):
        p = make_prior(name, 3)()
        torch.testing.assert_close(p.mean, torch.zeros(3))
        torch.testing.assert_close(p.stddev, torch.ones(3))


def test_vamp_prior_is_the_mixture_of_posteriors_at_pseudo_inputs():
    prior = build("vamp")
    u = prior.pseudo_inputs()
    assert u.shape == (4, *IMAGE_SHAPE) and (u > 0).all() and (u < 1).all()
    loc, scale = prior._encoder[0](u)
    z = torch.randn(7, Z_DIM)
    components = torch.distributions.Normal(loc, scale)
    expected = (components.log_prob(z[:, None, :]).sum(-1)).logsumexp(-1) - math.log(4)
    torch.testing.assert_close(prior().log_prob(z), expected)
    with pytest.raises(ValueError, match="encoder"):
        make_prior("vamp", Z_DIM)


@pytest.mark.parametrize("how", ["as built", "expanded by a plate", "expanded twice", "built expanded"])
def test_mixture_log_prob_and_its_gradients_match_the_elementwise_reference(how):
    """Values and parameter gradients agree with torch's elementwise mixture, whether the
    mixture is used as built, expanded (as ``pyro.plate`` does, once or nested), or built
    from parameters that are already expanded views (torch's elementwise form)."""
    torch.manual_seed(3)
    locs = (torch.randn(7, 5) * 2).requires_grad_()
    scales = (torch.rand(7, 5) * 0.5 + 0.05).requires_grad_()
    logits = torch.randn(7).requires_grad_()
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Independent(torch.distributions.Normal(locs, scales), 1),
    )
    if how == "built expanded":
        fast = DiagonalGaussianMixture(dist.Categorical(logits=logits.expand(6, 7)),
                                       dist.Normal(locs.expand(6, 7, 5), scales.expand(6, 7, 5)).to_event(1))
    else:
        fast = DiagonalGaussianMixture(dist.Categorical(logits=logits), dist.Normal(locs, scales).to_event(1))
    z = torch.randn(4, 6, 5) * 2
    if how == "expanded by a plate":
        fast, reference = fast.expand((6,)), reference.expand((6,))
    elif how == "expanded twice":
        fast, reference = fast.expand((6,)).expand((4, 6)), reference.expand((4, 6))
    fast_value, reference_value = fast.log_prob(z), reference.log_prob(z)
    assert fast_value.shape == reference_value.shape
    torch.testing.assert_close(fast_value, reference_value, rtol=1e-5, atol=1e-4)
    weights = torch.randn(reference_value.shape)  # a generic direction, not only the sum
    fast_grads = torch.autograd.grad((fast_value * weights).sum(), (locs, scales, logits))
    reference_grads = torch.autograd.grad((reference_value * weights).sum(), (locs, scales, logits))
    for fast_grad, reference_grad in zip(fast_grads, reference_grads):
        torch.testing.assert_close(fast_grad, reference_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("data_domain", ["unit_interval", "real"])
def test_vamp_prior_on_vectors_keeps_its_pseudo_inputs_where_the_data_lives(data_domain):
    """Pseudo-inputs have the datum's shape; in [0, 1] for data there, unconstrained for real data."""
    torch.manual_seed(0)
    encoder = MLPEncoder((5,), Z_DIM, 8)
    prior = make_prior("vamp", Z_DIM, encoder=encoder, image_shape=(5,), data_domain=data_domain, num_components=3)
    with torch.no_grad():
        prior.raw_pseudo_inputs.mul_(30)  # far outside [0, 1] before any squashing
    u = prior.pseudo_inputs()
    assert u.shape == (3, 5)
    if data_domain == "real":
        assert u is prior.raw_pseudo_inputs and (u.abs() > 1).any()
    else:
        assert ((u >= 0) & (u <= 1)).all()
    p = prior()
    assert p.event_shape == (Z_DIM,) and p.batch_shape == ()
    with pytest.raises(ValueError, match="data_domain"):
        make_prior("vamp", Z_DIM, encoder=encoder, image_shape=(5,), data_domain="counts")
