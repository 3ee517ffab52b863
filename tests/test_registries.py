"""Every likelihood x prior pair trains, evaluates, samples and round-trips a checkpoint."""

import math

import pytest
import torch

from pyro_vae.checkpoint import load_run
from pyro_vae.elbo import evaluate, importance_sampled
from pyro_vae.guides import GUIDES
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.priors import PRIORS
from pyro_vae.train import fit


@pytest.mark.parametrize("prior", sorted(PRIORS))
@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_every_pair_trains_evaluates_samples_and_round_trips(tmp_path, splits, tiny_config, likelihood, prior):
    overrides = {
        "model.likelihood": likelihood,
        "model.prior": prior,
        "data.binarize": "dynamic" if LIKELIHOODS[likelihood].accepts == "binary" else "none",
        "train.epochs": 3,
    }
    if prior in ("mixture", "vamp"):
        overrides["model.prior_options"] = {"num_components": 5}
    config = tiny_config.replace(**overrides)
    result = fit(config, splits, run_dir=tmp_path, progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]

    vae = load_run(tmp_path)
    x = splits.test.images[:16]
    if config.data.binarize != "none":
        x = torch.bernoulli(x)
    torch.manual_seed(0)
    log_px, elbo, _, _, _ = importance_sampled(result.vae, x, num_samples=8)
    torch.manual_seed(0)
    log_px_loaded = importance_sampled(vae, x, num_samples=8).log_likelihood
    assert torch.isfinite(log_px).all() and (log_px >= elbo - 1e-4).all()
    torch.testing.assert_close(log_px, log_px_loaded)
    closed_form = evaluate(vae, x, num_samples=2)["closed_form_terms"]
    assert closed_form == ([] if prior in ("mixture", "vamp") else ["kl_per_dimension"])
    images = vae.sample_images(4)
    assert images.shape == (4, *splits.test.image_shape) and torch.isfinite(images).all()


VECTOR_SHAPE = (6,)


def vectors(accepts: str, n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if accepts == "binary":
        return torch.bernoulli(torch.full((n, *VECTOR_SHAPE), 0.3), generator=g)
    if accepts == "unit_interval":
        return torch.rand(n, *VECTOR_SHAPE, generator=g)
    return torch.randn(n, *VECTOR_SHAPE, generator=g) * 2  # real values, outside [0, 1]


@pytest.mark.parametrize("prior", sorted(PRIORS))
@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_every_pair_works_on_vector_data(likelihood, prior):
    """Vectors (D,): a loss and gradients, the importance-sampled bound, samples of the right shape."""
    import pyro
    from pyro.infer import Trace_ELBO

    from pyro_vae.config import load_config
    from pyro_vae.model import build_vae

    overrides = {"model.likelihood": likelihood, "model.prior": prior, "model.z_dim": 2, "model.hidden_dim": 8,
                 "data.binarize": "dynamic" if LIKELIHOODS[likelihood].accepts == "binary" else "none"}
    if prior in ("mixture", "vamp"):
        overrides["model.prior_options"] = {"num_components": 3}
    torch.manual_seed(0)
    vae = build_vae(load_config(None, overrides).model, VECTOR_SHAPE)
    x = vectors(LIKELIHOODS[likelihood].accepts)
    pyro.set_rng_seed(0)
    loss = Trace_ELBO().differentiable_loss(vae.model_body, vae.guide_body, x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)
    estimates = importance_sampled(vae, x, num_samples=4)
    assert estimates.log_likelihood.shape == (len(x),) and torch.isfinite(estimates.log_likelihood).all()
    assert vae.sample_images(3).shape == (3, *VECTOR_SHAPE) and vae.reconstruct(x).shape == x.shape


@pytest.mark.parametrize("kind, name", [("likelihood", n) for n in sorted(LIKELIHOODS)]
                         + [("prior", n) for n in sorted(PRIORS)] + [("guide", n) for n in sorted(GUIDES)])
def test_every_built_in_part_meets_the_contract_it_is_registered_under(kind, name):
    """Registering a built-in again runs every registration check; the same class is no conflict."""
    from pyro_vae.components import register_guide, register_likelihood, register_prior

    registry, register = {"likelihood": (LIKELIHOODS, register_likelihood), "prior": (PRIORS, register_prior),
                          "guide": (GUIDES, register_guide)}[kind]
    cls = registry[name]
    assert register(name, cls) is cls and registry[name] is cls


def test_every_built_in_architecture_meets_the_contract():
    from pyro_vae.components import register_networks
    from pyro_vae.networks import ARCHITECTURES

    for name, (encoder, decoder) in sorted(ARCHITECTURES.items()):
        assert register_networks(name, encoder, decoder) == (encoder, decoder)


@pytest.mark.parametrize("guide", sorted(GUIDES))
def test_every_guide_trains_evaluates_samples_and_round_trips(tmp_path, splits, tiny_config, guide):
    config = tiny_config.replace(**{"model.guide": guide, "train.epochs": 3})
    result = fit(config, splits, run_dir=tmp_path, progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    vae = load_run(tmp_path)
    x = torch.bernoulli(splits.test.images[:16], generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    estimates = importance_sampled(result.vae, x, num_samples=8)
    torch.manual_seed(0)
    torch.testing.assert_close(importance_sampled(vae, x, num_samples=8).log_likelihood, estimates.log_likelihood)
    assert torch.isfinite(estimates.log_likelihood).all() and (estimates.log_likelihood >= estimates.elbo - 1e-4).all()
    scores = evaluate(vae, x, num_samples=4)
    assert scores["closed_form_terms"] == (["kl_per_dimension"] if guide == "gaussian" else [])
    assert vae.code(x).shape == (16, config.model.z_dim) and vae.reconstruct(x).shape == x.shape


@pytest.mark.parametrize("guide", sorted(GUIDES))
@pytest.mark.parametrize("prior", sorted(PRIORS))
def test_every_guide_and_prior_work_on_vector_data(guide, prior):
    """A loss and gradients (flows included), the importance-sampled bound, codes of the right shape."""
    import pyro
    from pyro.infer import Trace_ELBO

    from pyro_vae.config import load_config
    from pyro_vae.model import build_vae

    overrides = {"model.guide": guide, "model.prior": prior, "model.z_dim": 2, "model.hidden_dim": 8}
    if prior in ("mixture", "vamp"):
        overrides["model.prior_options"] = {"num_components": 3}
    torch.manual_seed(0)
    vae = build_vae(load_config(None, overrides).model, VECTOR_SHAPE)
    x = vectors("binary")
    pyro.set_rng_seed(0)
    loss = Trace_ELBO().differentiable_loss(vae.model_body, vae.guide_body, x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.guide_net.parameters())
    estimates = importance_sampled(vae, x, num_samples=4)
    assert torch.isfinite(estimates.log_likelihood).all()
    assert vae.code(x).shape == (len(x), 2) and vae.reconstruct(x).shape == x.shape
