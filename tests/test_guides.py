"""Guide families q(z|x): the IAF's density against the change of variables and against the
truth (a linear-Gaussian VAE), training, evaluation, plots, exact resume and sharded draws
with every guide, the analytic ELBO refused where there is no closed-form KL, registration of
a family of one's own and a plugin's family through the command line.

Statistical tests draw from the ``seed`` fixture (tests/conftest.py) and state their
false-failure rate per run; the problems they draw on (networks, data) are fixed.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

import pyro_vae
from pyro_vae import cli
from pyro_vae.checkpoint import load_checkpoint, load_run
from pyro_vae.components import ComponentError, has_closed_form_kl, register_guide
from pyro_vae.config import ConfigError, load_config
from pyro_vae.distributed import SharedNoise, shard_bounds
from pyro_vae.elbo import evaluate, importance_sampled, kl_per_dimension
from pyro_vae.guides import GUIDES, DiagonalGaussian, InverseAutoregressiveFlow, representative_code
from pyro_vae.linear_gaussian import linear_gaussian
from pyro_vae.model import LATENT, VAE, build_vae
from pyro_vae.plotting import make_figures
from pyro_vae.priors import PRIORS
from pyro_vae.seeding import seeded
from pyro_vae.train import fit

from helpers import one_line
from launch import TORCHRUN, TORCHRUN_ENV
from parts import binary_batch, small_vae


def comparable(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second", "peak_memory_mb")} for r in history]


def iaf(z_dim: int, seed: int = 0, **options) -> InverseAutoregressiveFlow:
    with seeded(seed):
        return InverseAutoregressiveFlow(z_dim, **options)


def iaf_config(tiny_config, **overrides):
    return tiny_config.replace(**{"model.guide": "iaf", **overrides})


# -- the IAF's density ---------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"stable": True}, {"num_flows": 3, "hidden_layers": 2}])
def test_iaf_log_prob_is_the_change_of_variables_density(options):
    """log q(z) = log N(z_0; z_loc, z_scale) - log |det dz/dz_0|, the Jacobian from autograd."""
    guide = iaf(3, hidden_dim=12, **options)
    with seeded(1):
        z_loc, z_scale = torch.randn(4, 3), torch.rand(4, 3) + 0.5
        q = guide(z_loc, z_scale)
        z0 = q.base_dist.sample()
    assert q.batch_shape == (4,) and q.event_shape == (3,) and q.has_rsample

    def flow(transforms, v):  # a fresh tensor each call: the transforms recompute, nothing cached is reused
        for transform in transforms:
            v = transform(v)
        return v

    z = flow(q.transforms, z0)
    log_q = q.log_prob(z)
    for i in range(len(z0)):
        one = guide(z_loc[i : i + 1], z_scale[i : i + 1])  # the flows of datum i (its context)
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(one.transforms, v.unsqueeze(0)).squeeze(0), z0[i])
        expected = q.base_dist.log_prob(z0)[i] - torch.linalg.slogdet(jacobian).logabsdet
        torch.testing.assert_close(log_q[i], expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(z, z0, atol=1e-2)  # the flows do move the base sample


@pytest.mark.parametrize("stable", [False, True])
def test_iaf_log_prob_at_any_z_is_the_log_prob_at_its_sample(stable):
    """Its own sample is scored from the transforms' cache; a copy of it, and draws with a
    leading sample dimension (importance sampling), by inverting each flow: the same values."""
    guide = iaf(4, stable=stable)
    with seeded(2):
        q = guide(torch.randn(5, 4), torch.rand(5, 4) + 0.3)
        z = q.rsample()
        cached, inverted = q.log_prob(z), q.log_prob(z.detach().clone())
        torch.testing.assert_close(inverted, cached, rtol=1e-5, atol=1e-4)
        many = q.rsample((7,))
        assert many.shape == (7, 5, 4)
        torch.testing.assert_close(q.log_prob(many.clone()), q.log_prob(many), rtol=1e-5, atol=1e-4)
    # The gradient of log q(z) at its own reparameterized draw reaches the encoder's output
    # through the context and the flows' Jacobians: the base Gaussian alone would give exactly
    # zero (log N(z_loc + z_scale eps; z_loc, z_scale) does not depend on z_loc). So it is
    # nonzero, and it is the derivative: autograd against central differences, in float64,
    # each evaluation drawing the same eps.
    guide = guide.double()
    z_scale = torch.ones(5, 4, dtype=torch.float64)

    def log_q_at_its_draw(z_loc):
        with seeded(3):
            q = guide(z_loc, z_scale)
            return q.log_prob(q.rsample())

    z_loc = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    (gradient,) = torch.autograd.grad(log_q_at_its_draw(z_loc).sum(), z_loc)
    assert gradient.abs().max() > 1e-2
    assert torch.autograd.gradcheck(log_q_at_its_draw, (z_loc,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.statistical
def test_iaf_importance_sampling_converges_to_the_exact_log_likelihood(seed):
    """On a linear-Gaussian VAE (exact log p(x), pyro_vae/linear_gaussian.py) with an IAF
    guide, the importance weights w = p(x, z) / q(z|x), z ~ q, with log q by inversion at a
    copy of z, have mean p(x); and importance_sampled's log p(x) estimate (K = 2000, log q from
    the cache) lies within its standard error of the truth, far above the ELBO.

    The flows are damped (|log scale| <= 0.3, shifts about a third of the base's spread) and
    the base widened, so that the weights have finite variance (measured: r = w / p(x) has
    kurtosis 7, max 10 over 40,000 draws). Test 1: the mean of the 40,000 ratios is within 5
    standard errors of 1 (two-sided, normal): 5.7e-7. Test 2: the mean over 20 images of
    log p(x) - estimate is within 5 standard errors (delta method, se = std(r) / sqrt(K) per
    image) plus the estimator's bias bound var(r) / K: 5.7e-7. Together below 1.2e-6 per run.
    A log q off by 0.05 nats moves test 1 by 7 standard errors; the ELBO is 2.5 nats below.
    """
    linear, x, exact = linear_gaussian(diagonal_posterior=False, shift=0.3, inflate=2.0, num_images=20)
    guide = iaf(2, hidden_dim=16)
    for flow in guide.flows:
        flow.kwargs.update(log_scale_min_clip=-0.3, log_scale_max_clip=0.3)
        with torch.no_grad():
            flow.nn.layers[-1].weight.mul_(0.3)
    vae = VAE(linear.encoder, linear.decoder, linear.likelihood, linear.prior_net, guide=guide)
    K = 2000
    with seeded(seed), torch.no_grad():
        q = vae.encode(x)
        z = q.sample((K,))
        log_w = vae.decode(z).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z.clone())
        ratio = (log_w - exact).exp()  # (K, images)
        se = ratio.std() / math.sqrt(ratio.numel())
        assert abs(ratio.mean() - 1) < 5 * se
        estimate = importance_sampled(vae, x, num_samples=K).log_likelihood
    se_images = (ratio.var(0) / K).sum().sqrt() / len(x)  # of the mean over images of log p-hat
    bias = (ratio.var(0) / K).mean()
    gap = (exact - estimate).mean()
    assert abs(gap) < 5 * se_images + bias
    elbo_gap = (exact - log_w.mean(0)).mean()
    assert elbo_gap > 1.0 > 20 * (5 * se_images + bias)  # the test has teeth


def test_representative_code_is_the_mean_or_the_flowed_base_mean():
    z_loc, z_scale = torch.randn(3, 2), torch.rand(3, 2) + 0.1
    assert representative_code(DiagonalGaussian(2)(z_loc, z_scale)) is z_loc
    guide = iaf(2)
    q = guide(z_loc, z_scale)
    expected = z_loc
    for transform in q.transforms:
        expected = transform(expected)
    torch.testing.assert_close(representative_code(q), expected)
    with pytest.raises(NotImplementedError):
        q.mean  # noqa: B018  (why the code exists)


# -- in a VAE ------------------------------------------------------------------------------------

def test_the_default_guide_changes_nothing_in_the_vae():
    """Parameter-free and built last: the same parameters, state and draws as a VAE without it."""
    config = load_config(None, {"model.z_dim": 3, "model.hidden_dim": 8})
    assert config.model.guide == "gaussian" and config.model.guide_options == {}
    with seeded(0):
        vae = build_vae(config.model, (1, 4, 4))
    assert isinstance(vae.guide_net, DiagonalGaussian) and not list(vae.guide_net.parameters())
    assert not any(key.startswith("guide_net") for key in vae.state_dict())
    x = torch.rand(5, 1, 4, 4)
    q = vae.encode(x)
    z_loc, z_scale = vae.encoder(x)
    assert type(q) is dist.Independent and torch.equal(q.mean, z_loc) and torch.equal(q.stddev, z_scale)
    assert torch.equal(vae.code(x), z_loc)


def test_an_iaf_vae_has_its_flows_as_parameters_and_state():
    config = load_config(None, {"model.z_dim": 3, "model.hidden_dim": 8, "model.guide": "iaf",
                                "model.guide_options": {"num_flows": 3, "hidden_dim": 5}})
    vae = build_vae(config.model, (1, 4, 4))
    assert isinstance(vae.guide_net, InverseAutoregressiveFlow) and len(vae.guide_net.flows) == 3
    names = [name for name, _ in vae.named_parameters()]
    assert any(name.startswith("guide_net.flows.2.") for name in names)
    orders = [flow.nn.permutation.tolist() for flow in vae.guide_net.flows]
    assert orders == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]  # alternating: the permutation between flows
    x = torch.rand(6, 1, 4, 4)
    assert vae.encode(x).batch_shape == (6,) and vae.code(x).shape == (6, 3)
    assert vae.reconstruct(x).shape == x.shape and kl_per_dimension(vae.encode(x), vae.prior()) is None


def test_an_iaf_in_one_dimension_is_a_context_conditioned_affine_map():
    """Pyro warns that an autoregressive network of one input is an affine map: it is allowed,
    quietly (warnings are errors in this suite)."""
    guide = iaf(1, hidden_dim=4)
    q = guide(torch.zeros(3, 1), torch.ones(3, 1))
    z = q.rsample()
    torch.testing.assert_close(q.log_prob(z.clone()), q.log_prob(z), rtol=1e-5, atol=1e-5)


@pytest.mark.statistical
@pytest.mark.parametrize("elbo, particles", [("mc", 1), ("mc", 3), ("iwae", 4)])
def test_an_iaf_guide_trains(splits, tiny_config, elbo, particles, seed):
    """Over 4 epochs of a run seeded ``seed``, the training loss falls and the validation ELBO
    rises. Measured over train.seed 0-9: the loss falls by 4.1 to 10.8 nats and the ELBO rises by
    3.2 to 7.8; for each estimator and check, zero lies 3.9 or more standard deviations below
    the mean: false-failure rate below 1e-4 per run (normal, one-sided, both checks)."""
    config = iaf_config(tiny_config, **{"objective.elbo": elbo, "objective.num_particles": particles,
                                        "train.epochs": 4, "train.seed": seed})
    result = fit(config, splits, progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert result.history[-1]["val_elbo"] > result.history[0]["val_elbo"]


def test_an_iaf_run_evaluates_plots_and_round_trips(tmp_path, splits, tiny_config):
    config = iaf_config(tiny_config, **{"model.z_dim": 2})
    result = fit(config, splits, run_dir=tmp_path, progress=False)
    vae = load_run(tmp_path)
    assert isinstance(vae.guide_net, InverseAutoregressiveFlow)
    for (name, a), (_, b) in zip(result.vae.state_dict().items(), vae.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.bernoulli(splits.test.images, generator=torch.Generator().manual_seed(0))
    scores = evaluate(vae, x, num_samples=20)
    assert scores["kl_per_dimension"] is None and scores["closed_form_terms"] == []
    assert math.isfinite(scores["test_log_likelihood"]) and scores["test_log_likelihood"] >= scores["test_elbo"]
    assert evaluate(vae, x, num_samples=20) == scores  # seeded: the same numbers again
    figures = make_figures(vae, x, splits.test.labels, result.history)
    assert {"reconstructions", "samples", "latent_space", "manifold", "latent_traversals"} <= set(figures)
    # Active units where the setup decides them: the flows made the identity (each MADE output
    # layer zeroed), so the representative code is z_loc; z_loc made constant along dimension 1
    # and 100 times as spread along dimension 0 (its variance over these images, 0.008 to 0.28
    # as trained with seeds 0-5, then 84 or more, against the threshold 0.01).
    with torch.no_grad():
        for flow in vae.guide_net.flows:
            flow.nn.layers[-1].weight.zero_()
            flow.nn.layers[-1].bias.zero_()
        vae.encoder.loc.weight[1] = 0.0
        vae.encoder.loc.weight[0] *= 100
        torch.testing.assert_close(representative_code(vae.encode(x)), vae.encoder(x)[0])
    assert evaluate(vae, x, num_samples=2)["active_units"] == 1


def test_an_iaf_run_resumes_exactly(tmp_path, splits, tiny_config):
    config = iaf_config(tiny_config, **{"train.epochs": 3})
    full = fit(config, splits, progress=False)
    fit(config.replace(**{"train.epochs": 1}), splits, run_dir=tmp_path, progress=False)
    resumed = fit(config, splits, run_dir=tmp_path, checkpoint=load_checkpoint(tmp_path), progress=False)
    assert comparable(resumed.history) == comparable(full.history)
    for (name, a), (_, b) in zip(full.vae.state_dict().items(), resumed.vae.state_dict().items()):
        assert torch.equal(a, b), name


# -- the analytic ELBO needs a closed-form KL of the pair -----------------------------------------

def test_closed_form_kl_is_derived_per_guide_and_prior():
    vae = build_vae(load_config(None, {"model.z_dim": 2, "model.hidden_dim": 8, "model.guide": "iaf"}).model, (3,))
    flows = InverseAutoregressiveFlow(2)
    state = torch.get_rng_state()
    assert has_closed_form_kl(PRIORS["standard_normal"], DiagonalGaussian) is True
    assert has_closed_form_kl(PRIORS["standard_normal"], InverseAutoregressiveFlow) is False
    assert has_closed_form_kl(PRIORS["mixture"], InverseAutoregressiveFlow) is False
    assert has_closed_form_kl(PRIORS["learned_gaussian"], flows) is False
    assert has_closed_form_kl(vae.prior_net, vae.guide_net) is False
    assert has_closed_form_kl(vae.prior_net) is True  # about the Gaussian, as before
    assert torch.equal(state, torch.get_rng_state())  # probes draw from a private stream


def test_the_analytic_elbo_with_an_iaf_guide_is_refused_with_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError) as error:
        load_config(None, {"model.guide": "iaf", "objective.elbo": "analytic"})
    message = one_line(error)
    for words in ("objective.elbo = 'analytic'", "model.guide = 'iaf'", "'standard_normal'", "'mc'", "['gaussian']"):
        assert words in message, message
    load_config(None, {"model.guide": "iaf", "objective.elbo": "iwae"})


def test_compare_elbo_leaves_out_analytic_for_an_iaf_guide_in_both_modes(tmp_path, mnist_dir, capsys):
    tiny = ["--set", "model.guide=iaf", "--set", "model.hidden_dim=16", "--set", "model.z_dim=3",
            "--set", "data.train_limit=300", "--set", "data.val_size=200", "--data-dir", str(mnist_dir)]
    # --train with the default estimators: analytic is left out with a note, the rest train
    assert cli.main(["compare-elbo", "--train", *tiny, "--epochs", "1", "--num-samples", "5",
                     "--out", str(tmp_path / "side"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "guide 'iaf' and prior 'standard_normal' have no closed-form KL; leaving out 'analytic'" in err
    trained = (tmp_path / "side" / "training_comparison.csv").read_text()
    assert "analytic" not in trained and "iwae_dreg:5" in trained
    # asked for by name, it is refused rather than dropped
    assert cli.main(["compare-elbo", "--train", *tiny, "--epochs", "1", "--estimators", "mc", "analytic",
                     "--out", str(tmp_path / "named"), "--quiet"]) == 2
    assert "objective.elbo = 'analytic'" in capsys.readouterr().err
    # on a trained run: the pair decides (the guide's KL, not the prior's alone), with a note
    assert cli.main(["train", *tiny, "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert cli.main(["compare-elbo", str(tmp_path / "run"), "--estimators", "analytic", "mc", "stl",
                     "--limit", "20", "--repeats", "2", "--grad-samples", "2"]) == 0
    assert "leaving out 'analytic'" in capsys.readouterr().err
    compared = (tmp_path / "run" / "elbo_comparison.csv").read_text()
    assert "analytic" not in compared and "stl" in compared


@pytest.mark.parametrize("options, words", [
    ({"num_flows": 0}, ["model.guide_options.num_flows", ">= 1"]),
    ({"hidden_dim": 2}, ["model.guide_options.hidden_dim = 2", "z_dim = 3"]),
    ({"stable": 1}, ["model.guide_options.stable", "true or false"]),
    ({"depth": 2}, ["not an option of guide 'iaf'", "num_flows"]),
])
def test_iaf_options_are_checked_before_anything_is_read(options, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, {"model.guide": "iaf", "model.z_dim": 3, "model.guide_options": options})
    one_line(error, *words)


# -- a family of one's own -----------------------------------------------------------------------

class LaplaceGuide(nn.Module):
    """q(z|x) = Laplace(z_loc, spread * z_scale): heavier tails; a learned log spread."""

    option_bounds = {"spread": (0.0, False)}

    def __init__(self, z_dim: int, spread: float = 1.0):
        super().__init__()
        self.log_spread = nn.Parameter(torch.tensor(math.log(spread)))

    def forward(self, z_loc, z_scale):
        return dist.Laplace(z_loc, z_scale * self.log_spread.exp()).to_event(1)


def _guide_class(init="z_dim", forward=lambda self, z_loc, z_scale: None, **attributes):
    scope = {"nn": nn}
    exec(f"def __init__(self, {init}):\n    nn.Module.__init__(self)", scope)  # a constructor of that signature
    namespace = {"__init__": scope["__init__"], **attributes}
    if forward is not None:
        namespace["forward"] = forward
    return type("Part", (nn.Module,), namespace)


@pytest.mark.usefixtures("restore_registries")
def test_a_registered_guide_is_used_by_name_and_public():
    assert "register_guide" in pyro_vae.__all__ and pyro_vae.register_guide is register_guide
    assert register_guide("laplace")(LaplaceGuide) is LaplaceGuide and GUIDES["laplace"] is LaplaceGuide
    config = load_config(None, {"model.guide": "laplace", "model.guide_options.spread": 2, "model.z_dim": 2,
                                "model.hidden_dim": 8})
    vae = build_vae(config.model, (1, 4, 4))
    assert isinstance(vae.guide_net, LaplaceGuide) and math.isclose(vae.guide_net.log_spread.exp().item(), 2.0)
    # derived from torch's KL registry: it has a rule for Laplace against Normal, none against a mixture
    assert has_closed_form_kl(PRIORS["standard_normal"], LaplaceGuide) is True
    assert has_closed_form_kl(PRIORS["mixture"], LaplaceGuide) is False
    config.replace(**{"objective.elbo": "analytic"})
    with pytest.raises(ConfigError, match="model.prior = 'mixture' lacks"):
        config.replace(**{"objective.elbo": "analytic", "model.prior": "mixture"})
    with pytest.raises(ComponentError, match="taken by"):
        register_guide("iaf", LaplaceGuide)


@pytest.mark.usefixtures("restore_registries")
@pytest.mark.parametrize("part, words", [
    (object, ["not a torch.nn.Module subclass"]),
    (_guide_class(init="image_shape"), ["must take", "z_dim"]),
    (_guide_class(init="z_dim, flows"), ["'flows' has no default"]),
    (_guide_class(init="z_dim, sizes=(1, 2)"), ["option 'sizes'", "tuple"]),
    (_guide_class(forward=lambda self, params: None), ["forward must take two arguments (z_loc, z_scale)"]),
    (_guide_class(forward=None), ["defines no forward"]),
    (_guide_class(has_closed_form_kl="no"), ["has_closed_form_kl is 'no'"]),
])
def test_a_guide_that_breaks_the_contract_is_refused_when_registered(part, words):
    with pytest.raises(ComponentError) as error:
        register_guide("mine", part)
    message = one_line(error)
    assert message.startswith("cannot register guide 'mine'")
    for word in words:
        assert word in message, message
    assert "mine" not in GUIDES


class NoEventGuide(LaplaceGuide):
    def forward(self, z_loc, z_scale):
        return dist.Laplace(z_loc, z_scale)


class ScoreOnlyGuide(LaplaceGuide):
    def forward(self, z_loc, z_scale):
        return dist.Poisson(z_scale).to_event(1)  # no reparameterized draws


@pytest.mark.usefixtures("restore_registries")
@pytest.mark.parametrize("part, words", [
    (NoEventGuide, ["guide NoEventGuide (model.guide = 'mine')", "batch shape (2, 3)", "expected (2,) and (z_dim,) = (3,)"]),
    (ScoreOnlyGuide, ["guide ScoreOnlyGuide", "no reparameterized sampler"]),
])
def test_build_vae_checks_a_guide_once_and_names_it(part, words):
    register_guide("mine", part)
    with pytest.raises(ConfigError) as error:
        build_vae(load_config(None, {"model.guide": "mine", "model.z_dim": 3, "model.hidden_dim": 8}).model, (1, 4, 4))
    one_line(error, *words)


PLUGIN = '''
import math

import pyro.distributions as dist
import torch
from torch import nn

import pyro_vae


@pyro_vae.register_guide("plugin_laplace")
class PluginLaplace(nn.Module):
    def __init__(self, z_dim: int, spread: float = 1.0):
        super().__init__()
        self.log_spread = nn.Parameter(torch.tensor(math.log(spread)))

    def forward(self, z_loc, z_scale):
        return dist.Laplace(z_loc, z_scale * self.log_spread.exp()).to_event(1)
'''


@pytest.mark.usefixtures("restore_registries")
def test_a_plugin_guide_trains_and_evaluates_through_the_command_line(tmp_path, capsys):
    import numpy as np

    plugin = tmp_path / "my_guide.py"
    plugin.write_text(PLUGIN)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "images.npy", (rng.random((60, 6, 6)) < 0.3).astype(np.float32))
    run = tmp_path / "run"
    try:
        status = cli.main(["train", "--plugin", str(plugin), "--data", str(tmp_path / "images.npy"), "--quiet",
                           "--set", "model.guide=plugin_laplace", "--set", "model.guide_options.spread=1.5",
                           "--set", "model.z_dim=2", "--set", "model.hidden_dim=8", "--set", "train.batch_size=16",
                           "--epochs", "1", "--out", str(run)])
    except SystemExit as exit:
        status = exit.code
    assert status == 0, capsys.readouterr().err
    state = load_checkpoint(run)
    assert state["plugins"] == [str(plugin.resolve())] and "guide_net.log_spread" in state["model"]
    # a fresh process knows nothing of the plugin: the run imports it again
    done = subprocess.run([sys.executable, "-m", "pyro_vae", "evaluate", str(run), "-k", "4", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


# -- data-parallel draws -------------------------------------------------------------------------

def test_shared_noise_gives_each_rank_the_single_process_flow_draws():
    """Each rank draws the whole batch's base noise, keeps its rows and pushes them through its
    flows: image by image the single process's z and log q, up to the rounding of products over
    other numbers of rows (compared within float tolerance, never bit for bit)."""
    vae, x = small_vae(guide="iaf"), binary_batch()
    pyro.set_rng_seed(3)
    single = poutine.trace(vae.guide_body).get_trace(x).nodes[LATENT]
    z, log_q = single["value"], single["fn"].log_prob(single["value"])
    for rank in range(3):
        begin, end = shard_bounds(len(x), rank, 3)
        pyro.set_rng_seed(3)  # every rank holds the same random stream
        with SharedNoise(LATENT, begin, end, len(x)):
            site = poutine.trace(vae.guide_body).get_trace(x[begin:end]).nodes[LATENT]
        torch.testing.assert_close(site["value"], z[begin:end], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(site["fn"].log_prob(site["value"]), log_q[begin:end], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("estimator, particles", [("mc", 1), ("mc", 3), ("iwae", 4)])
def test_shard_losses_of_an_iaf_vae_add_up_to_the_batch_loss_and_gradient(estimator, particles,
                                                                         assert_shards_add_up):
    assert_shards_add_up(small_vae(guide="iaf"), binary_batch(), estimator, particles, grad_atol=1e-4)


@pytest.mark.mnist
def test_two_processes_with_an_iaf_guide_take_the_steps_of_one(tmp_path, mnist_dir):
    """torchrun, two CPU processes (gloo): the flows train data-parallel as in one process."""

    from pyro_vae.data import load_splits

    overrides = {"data.train_limit": 505, "data.val_size": 500, "train.batch_size": 101, "train.epochs": 1,
                 "model.hidden_dim": 32, "model.z_dim": 4, "model.guide": "iaf"}
    args = [a for key, value in overrides.items() for a in ("--set", f"{key}={value}")]
    command = [*TORCHRUN, "-m", "pyro_vae", "train", *args, "--out", str(tmp_path / "run"), "--quiet", "--device", "cpu", "--data-dir", str(mnist_dir)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env=TORCHRUN_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    splits = load_splits("mnist", mnist_dir, val_size=500, train_limit=505)
    single = fit(load_config(None, overrides), splits, progress=False)
    state = load_checkpoint(tmp_path / "run")
    for name, value in single.vae.state_dict().items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-5, atol=1e-6, msg=f"parameter {name}")
    assert state["history"][0]["train_loss"] == pytest.approx(single.history[0]["train_loss"], rel=1e-5)
