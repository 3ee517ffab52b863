"""The estimators of :mod:`pyro_vae.estimators` as Pyro ELBOs, on models that are not VAEs.

Two Gaussian models whose posterior and log p(x) are known exactly:

- **global**: ``mu ~ N(0, 1)``, ``x_i ~ N(mu, s)`` for i in a plate: one latent shared by
  the plate, where a per-datum bound would not bound log p(x);
- **hierarchical**: ``mu ~ N(0, 1)``, ``z_i ~ N(mu, t)``, ``x_i ~ N(z_i, s)``: a plate of
  local latents beside a global one, and a guide whose second site depends on the first draw.

With the exact posterior as guide, every importance weight equals p(x): the IWAE bound is
log p(x) on every draw, and the path-derivative guide gradients (STL, DReG) are zero on every
draw. With another guide, the statistical tests compare expectations within stated tolerances.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_vae.estimators import DReG_IWAE_ELBO, IWAE_ELBO, STL_ELBO
from pyro_vae.seeding import seeded

ESTIMATORS = [IWAE_ELBO, STL_ELBO, DReG_IWAE_ELBO]
S, T = 0.7, 0.5  # the noise of x, and the spread of the local latents around mu
X = torch.tensor([0.3, -1.2, 0.8, 2.1, 0.5])


# -- the global model: mu ~ N(0, 1), x_i ~ N(mu, S) -------------------------------------------

def global_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, S), obs=x)


def global_posterior(x) -> tuple[float, float]:
    precision = 1.0 + len(x) / S**2
    return float(x.sum() / S**2 / precision), precision**-0.5


def global_log_px(x) -> float:
    n = len(x)
    return dist.MultivariateNormal(torch.zeros(n), torch.ones(n, n) + S**2 * torch.eye(n)).log_prob(x).item()


def make_global_guide(loc: float, scale: float):
    def guide(x):
        mu_loc = pyro.param("mu_loc", torch.tensor(loc))
        mu_scale = pyro.param("mu_scale", torch.tensor(scale), constraint=dist.constraints.positive)
        pyro.sample("mu", dist.Normal(mu_loc, mu_scale))

    return guide


# -- the hierarchical model: mu ~ N(0, 1), z_i ~ N(mu, T), x_i ~ N(z_i, S) ----------------------

def hierarchical_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(mu, T))
        pyro.sample("x", dist.Normal(z, S), obs=x)


def hierarchical_log_px(x) -> float:
    n = len(x)
    return dist.MultivariateNormal(torch.zeros(n), torch.ones(n, n) + (T**2 + S**2) * torch.eye(n)).log_prob(x).item()


def exact_hierarchical_parameters(x) -> dict:
    """p(mu | x) and p(z_i | mu, x_i) = N(a mu + b x_i, c): the exact posterior, as guide parameters."""
    precision = 1.0 + len(x) / (T**2 + S**2)
    z_precision = 1 / T**2 + 1 / S**2
    return {"mu_loc": float(x.sum() / (T**2 + S**2) / precision), "mu_scale": precision**-0.5,
            "a": 1 / T**2 / z_precision, "b": 1 / S**2 / z_precision, "c": z_precision**-0.5}


def make_hierarchical_guide(parameters: dict):
    def guide(x):
        p = {name: pyro.param(name, torch.tensor(value),
                              constraint=dist.constraints.positive if name in ("mu_scale", "c") else dist.constraints.real)
             for name, value in parameters.items()}
        mu = pyro.sample("mu", dist.Normal(p["mu_loc"], p["mu_scale"]))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(p["a"] * mu + p["b"] * x, p["c"]))

    return guide


def guide_gradients(estimator, model, guide, x) -> dict:
    """The gradient of the estimator's loss in each guide parameter, on one draw."""
    pyro.clear_param_store()
    loss = estimator.differentiable_loss(model, guide, x)
    names = sorted(pyro.get_param_store().keys())
    params = [pyro.param(name).unconstrained() for name in names]
    return dict(zip(names, torch.autograd.grad(loss, params)))


# -- Pyro's interface ---------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_they_are_pyro_elbos_that_step_in_stock_svi(estimator):
    """SVI's step is loss_and_grads: the loss of the draw and its gradient, which Adam applies."""
    elbo = estimator(num_particles=3)
    assert isinstance(elbo, pyro.infer.ELBO)
    guide = make_global_guide(0.0, 1.0)
    pyro.clear_param_store()
    with seeded(5):
        expected = guide_gradients(elbo, global_model, guide, X)
    pyro.clear_param_store()
    with seeded(5):
        loss = elbo.loss_and_grads(global_model, guide, X)
    store = pyro.get_param_store()
    for name, g in expected.items():
        torch.testing.assert_close(store[name].unconstrained().grad, g)
    with seeded(5):
        assert loss == elbo.loss(global_model, guide, X)
    pyro.clear_param_store()
    svi = SVI(global_model, guide, Adam({"lr": 0.05}), loss=elbo)
    with seeded(5):
        assert svi.step(X) == loss
    # Adam's first step moves each parameter by the learning rate, against its gradient's sign
    assert pyro.param("mu_loc").item() == pytest.approx(-0.05 * math.copysign(1, expected["mu_loc"].item()), abs=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_called_they_give_a_module_whose_forward_is_the_differentiable_loss(estimator):
    pyro.clear_param_store()
    elbo = estimator(num_particles=2)
    module = elbo(global_model, make_global_guide(0.0, 1.0))
    assert isinstance(module, torch.nn.Module)
    with seeded(3):
        called = module(X)
    with seeded(3):
        direct = elbo.differentiable_loss(global_model, make_global_guide(0.0, 1.0), X)
    assert called.requires_grad and torch.equal(called, direct)
    with seeded(3):
        assert elbo.loss(global_model, make_global_guide(0.0, 1.0), X) == direct.item()


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("vectorize", [True, False])
def test_the_particles_drawn_one_after_another_give_the_same_bound_at_the_exact_posterior(estimator, vectorize):
    pyro.clear_param_store()
    guide = make_hierarchical_guide(exact_hierarchical_parameters(X))
    loss = estimator(num_particles=4, vectorize_particles=vectorize).loss(hierarchical_model, guide, X)
    # STL's value is the ELBO, IWAE's and DReG's the IWAE bound: all log p(x) at the exact posterior
    assert -loss == pytest.approx(hierarchical_log_px(X), abs=1e-4)


# -- refusals: one line naming the site --------------------------------------------------------

def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_sites_they_cannot_weigh_are_refused_with_one_line_naming_them(estimator):
    pyro.clear_param_store()

    def model(x):
        pyro.sample("k", dist.Poisson(3.0))
        global_model(x)

    def discrete(x):
        pyro.sample("k", dist.Poisson(3.0))
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    def enumerated(x):
        pyro.sample("k", dist.Categorical(torch.ones(3) / 3), infer={"enumerate": "parallel"})
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    def auxiliary(x):
        pyro.sample("extra", dist.Normal(0.0, 1.0))
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    def missing(x):
        pass

    cases = [(model, discrete, "guide site 'k' draws from Poisson, which has no reparameterized sampler"),
             (model, enumerated, "guide site 'k' is enumerated"),
             (global_model, auxiliary, "guide site 'extra' is not a latent site of the model"),
             (global_model, missing, "model site 'mu' is latent but the guide does not sample it")]
    for model_, guide, words in cases:
        with pytest.raises(ValueError) as error:
            estimator(num_particles=2).differentiable_loss(model_, guide, X)
        assert words in _one_line(error) and estimator.__name__ in _one_line(error)


# -- the bound follows the model's plates --------------------------------------------------------

@pytest.mark.parametrize("estimator", [IWAE_ELBO, DReG_IWAE_ELBO])
@pytest.mark.parametrize("num_particles", [1, 7])
def test_at_the_exact_posterior_the_iwae_bound_is_log_px_on_every_draw(estimator, num_particles):
    for seed in range(5):
        pyro.clear_param_store()  # both guides name their parameters mu_loc and mu_scale
        with seeded(seed):
            bound = -estimator(num_particles=num_particles).loss(global_model, make_global_guide(*global_posterior(X)), X)
        assert bound == pytest.approx(global_log_px(X), abs=1e-4)
        pyro.clear_param_store()
        with seeded(seed):
            bound = -estimator(num_particles=num_particles).loss(
                hierarchical_model, make_hierarchical_guide(exact_hierarchical_parameters(X)), X)
        assert bound == pytest.approx(hierarchical_log_px(X), abs=1e-4)


def _relative_weight_variance(loc: float, scale: float) -> float:
    """Var_q[w] / E_q[w]^2 for w = p(mu | x) / q(mu), by quadrature (both Gaussian): it sets the
    spread of the K-sample estimate, about sqrt(rho / K) in log space."""
    post_loc, post_scale = global_posterior(X)
    grid = torch.linspace(-10.0, 10.0, 200_001, dtype=torch.float64)
    p = dist.Normal(torch.tensor(post_loc, dtype=torch.float64), post_scale).log_prob(grid).exp()
    q = dist.Normal(torch.tensor(loc, dtype=torch.float64), scale).log_prob(grid).exp()
    return torch.trapezoid(p**2 / q, grid).item() - 1.0


@pytest.mark.statistical
def test_with_a_shared_latent_the_iwae_bound_converges_to_log_px_from_below(seed):
    """K = 20,000 draws of a guide off the posterior: the estimate is within 6 standard
    deviations (delta method, sqrt(rho / K), rho the weights' relative variance by quadrature)
    plus its bias (rho / (2K)) of log p(x). A per-datum logsumexp, wrong for a latent that the
    plate shares, misses by over a nat here. False-failure rate per run: about 2e-9 (normal
    approximation of the mean of 20,000 weights of finite variance)."""
    pyro.clear_param_store()
    loc, scale = global_posterior(X)
    guide_loc, guide_scale = loc + 0.5 * scale, 1.3 * scale
    K = 20_000
    with seeded(seed):
        bound = -IWAE_ELBO(num_particles=K).loss(global_model, make_global_guide(guide_loc, guide_scale), X)
    rho = _relative_weight_variance(guide_loc, guide_scale)
    assert 0 < rho < 1  # a guide whose weights have finite, moderate variance
    assert abs(bound - global_log_px(X)) < 6 * math.sqrt(rho / K) + rho / (2 * K)


def test_subsampling_scales_each_datums_bound():
    """Exact posterior, local latents only: the bound on a subsample of B of N data is (N / B)
    times the sum of their log p(x_i), exactly (every weight is p(x_i))."""
    pyro.clear_param_store()
    n, index = len(X), torch.tensor([1, 3])

    def model(x):
        with pyro.plate("data", n, subsample=index) as i:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, S), obs=x[i])

    def guide(x):
        precision = 1.0 + 1 / S**2
        with pyro.plate("data", n, subsample=index) as i:
            pyro.sample("z", dist.Normal(x[i] / S**2 / precision, precision**-0.5))

    expected = n / len(index) * dist.Normal(0.0, (1 + S**2) ** 0.5).log_prob(X[index]).sum().item()
    for estimator in ESTIMATORS:
        assert -estimator(num_particles=3).loss(model, guide, X) == pytest.approx(expected, abs=1e-4)


def test_a_masked_datum_leaves_the_bound():
    pyro.clear_param_store()
    mask = torch.tensor([False, True, True, True, True])

    def model(x):
        with pyro.plate("data", len(x)), poutine.mask(mask=mask):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, S), obs=x)

    def guide(x):
        precision = 1.0 + 1 / S**2
        with pyro.plate("data", len(x)), poutine.mask(mask=mask):
            pyro.sample("z", dist.Normal(x / S**2 / precision, precision**-0.5))

    expected = dist.Normal(0.0, (1 + S**2) ** 0.5).log_prob(X[1:]).sum().item()
    for estimator in ESTIMATORS:
        assert -estimator(num_particles=3).loss(model, guide, X) == pytest.approx(expected, abs=1e-4)


def test_stl_values_the_elbo_as_trace_elbo_does_with_a_scaled_site():
    """poutine.scale on the global latent, in model and guide: the same draws give the same value."""
    pyro.clear_param_store()

    def model(x):
        with poutine.scale(scale=0.5):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, S), obs=x)

    def guide(x):
        with poutine.scale(scale=0.5):
            pyro.sample("mu", dist.Normal(0.2, 0.4))

    for seed in range(3):
        with seeded(seed):
            stl = STL_ELBO().loss(model, guide, X)
        with seeded(seed):
            mc = Trace_ELBO().loss(model, guide, X)
        assert stl == pytest.approx(mc, rel=1e-6)


# -- gradients ------------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", [STL_ELBO, DReG_IWAE_ELBO])
@pytest.mark.parametrize("num_particles", [1, 3])
def test_at_the_exact_posterior_the_path_derivative_guide_gradient_is_zero_on_every_draw(estimator, num_particles):
    """Both latents, mu and the z_i that depend on it: log w is constant in them, so the
    path derivative vanishes, draw by draw (the score-function term would not)."""
    guide = make_hierarchical_guide(exact_hierarchical_parameters(X))
    for seed in range(5):
        with seeded(seed):
            grads = guide_gradients(estimator(num_particles=num_particles), hierarchical_model, guide, X)
        for name, g in grads.items():
            assert g.abs().max() < 1e-4, (name, g)
    with seeded(0):
        grads = guide_gradients(Trace_ELBO(), hierarchical_model, guide, X)
    assert max(g.abs().max() for g in grads.values()) > 1e-2  # Trace_ELBO's has the score term's noise


def _mean_and_standard_error(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return samples.mean(0), samples.std(0) / math.sqrt(len(samples))


@pytest.mark.statistical
@pytest.mark.parametrize("new, old, particles", [(STL_ELBO, Trace_ELBO, 1), (DReG_IWAE_ELBO, IWAE_ELBO, 3)])
def test_the_expected_guide_gradient_is_the_one_they_replace(seed, new, old, particles):
    """On a guide off the posterior, over 2,000 draws each: every component of the mean gradient
    difference (STL - Trace_ELBO; DReG - IWAE) is within 5 standard errors of 0. Five
    components (the guide's parameters): false-failure rate per run 5 x 5.7e-7, about 3e-6
    (normal approximation of a mean of 2,000 independent draws)."""
    off = {"mu_loc": 0.2, "mu_scale": 0.6, "a": 0.5, "b": 0.3, "c": 0.5}
    guide = make_hierarchical_guide(off)
    differences = []
    with seeded(seed):
        for _ in range(2000):
            g_new = guide_gradients(new(num_particles=particles) if new is not STL_ELBO else new(), hierarchical_model,
                                    guide, X)
            kwargs = {"num_particles": particles, "vectorize_particles": True} if old is IWAE_ELBO else {}
            g_old = guide_gradients(old(**kwargs), hierarchical_model, guide, X)
            differences.append(torch.stack([g_new[k] - g_old[k] for k in sorted(off)]))
    mean, error = _mean_and_standard_error(torch.stack(differences))
    assert (mean.abs() < 5 * error).all(), (mean, error)
    assert (error > 0).all()
