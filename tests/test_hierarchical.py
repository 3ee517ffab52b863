"""Hierarchical VAEs (pyro_vae.hierarchical): several latent layers, ladder or bottom-up guides.

Checked against a two-layer linear-Gaussian model whose log p(x) is exact; the estimators
against each other; the per-layer weights on the sites; training, resume, reload, evaluation,
figures and the commands on small data.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from pyro_vae.checkpoint import load_checkpoint, load_run
from pyro_vae.config import load_config
from pyro_vae.data import ImageData, Splits
from pyro_vae.elbo import evaluate, make_elbo
from pyro_vae.hierarchical import HierarchicalVAE, build_hierarchical_vae, latent_site
from pyro_vae.labelled import make_training_loss
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.linear_gaussian import two_layer_linear_gaussian
from pyro_vae.plotting import make_figures
from pyro_vae.priors import PRIORS
from pyro_vae.train import fit

from helpers import one_line

INFERENCES = ("ladder", "bottom_up")
SHAPE = (1, 6, 6)


def small_config(inference: str = "ladder", **overrides):
    return load_config(None, {"model.z_dims": [4, 2], "model.inference": inference, "model.hidden_dim": 16,
                              "train.epochs": 2, "train.batch_size": 16, "data.val_size": 32, **overrides})


def small_vae(inference: str = "ladder", seed: int = 0, **overrides) -> HierarchicalVAE:
    pyro.set_rng_seed(seed)
    return build_hierarchical_vae(small_config(inference, **overrides).model, SHAPE)


def binary_images(n: int, seed: int = 0) -> torch.Tensor:
    """Binary 6 x 6 images: one of two bars (a row or a column) at a random place, and noise."""
    g = torch.Generator().manual_seed(seed)
    on = torch.full((n, *SHAPE), 0.05)
    where = torch.randint(0, 6, (n,), generator=g)
    rows = torch.rand(n, generator=g) < 0.5
    for i in range(n):
        if rows[i]:
            on[i, 0, where[i], :] = 0.95
        else:
            on[i, 0, :, where[i]] = 0.95
    return torch.bernoulli(on, generator=g)


def small_splits() -> Splits:
    return Splits(train=ImageData(binary_images(96, 0)), val=ImageData(binary_images(32, 1)),
                  test=ImageData(binary_images(32, 2)))


# -- the bound against the truth ---------------------------------------------------------------

@pytest.mark.parametrize("inference", INFERENCES)
def test_with_the_exact_posterior_every_weight_is_the_exact_likelihood(inference):
    """Both guides can be the exact posterior of the two-layer linear-Gaussian model: then every
    importance weight p(x, z1, z2) / q(z1, z2|x) is p(x), and the ELBO, the IWAE bounds and the
    estimate all equal the closed form (a float32 identity, no statistics)."""
    vae, x, exact = two_layer_linear_gaussian(inference)
    estimates = evaluate(vae, x, num_samples=7)
    assert estimates["test_elbo"] == pytest.approx(exact.mean().item(), abs=1e-4)
    assert estimates["test_log_likelihood"] == pytest.approx(exact.mean().item(), abs=1e-4)
    assert sum(estimates["kl_per_layer"]) == pytest.approx(estimates["test_kl"], abs=1e-4)


@pytest.mark.statistical
@pytest.mark.parametrize("inference", INFERENCES)
def test_importance_sampling_over_both_layers_converges_to_the_exact_likelihood(inference, seed):
    """A shifted guide: the ELBO and the IWAE bounds lie below log p(x) and rise with K, and the
    K = 5000 estimate is within 0.02 nats of it (mean over 50 images). Its error is at most a
    bias of var(w/p) / 2K < 2e-4 nats plus noise of standard error sqrt(var(w/p) / K / 50),
    1.2e-3 (ladder) and 2.3e-3 (bottom-up) nats with var(w/p) 0.37 and 1.36 measured: 0.02 is
    8 standard errors or more, a false-failure rate below 1e-12 for normal errors. The ELBO's
    gap (0.16 and 0.42 nats) is tens of its standard errors; the bounds of K = 1, 5, 50 are
    ordered with gaps (0.1 nats or more) far beyond their noise."""
    vae, x, exact = two_layer_linear_gaussian(inference, shift=0.2)
    estimates = evaluate(vae, x, num_samples=5000, seed=seed)
    truth = exact.mean().item()
    assert estimates["test_log_likelihood"] == pytest.approx(truth, abs=0.02)
    bounds = estimates["iwae_bounds"]
    assert estimates["test_elbo"] < bounds["5"] < bounds["50"] < truth + 0.02
    assert estimates["test_elbo"] < truth - 0.1


@pytest.mark.statistical
def test_the_analytic_kl_is_the_elbo_for_the_ladder_and_not_for_the_bottom_up_guide(seed):
    """TraceMeanField_ELBO takes each layer's KL in closed form given the draws above it. The
    ladder draws in the model's order, so its expectation is Trace_ELBO's: 8 repeats of 200
    particles each, the means within 5 standard errors of their difference (false-failure rate
    below 1e-6 for normal errors; SE about 0.01 nats). The bottom-up guide draws z1 first, and
    its per-site KL at the later z2 is another number (0.64 nats lower here, over 30 standard
    errors of 8 repeats): Pyro warns of the site order, and the config refuses the pair."""
    def mean_and_error(estimator, vae, x, first_seed):
        values = []
        for repeat in range(8):
            pyro.set_rng_seed(first_seed + repeat)
            values.append(-estimator.loss(vae.model_body, vae.guide_body, x) / len(x))
        return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))

    options = dict(num_particles=200, vectorize_particles=True, max_plate_nesting=1)
    vae, x, _ = two_layer_linear_gaussian("ladder", shift=0.5, inflate=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of the site order
        sampled, sampled_error = mean_and_error(Trace_ELBO(**options), vae, x, 1000 * seed)
        analytic, analytic_error = mean_and_error(TraceMeanField_ELBO(**options), vae, x, 1000 * seed + 500)
    assert abs(sampled - analytic) < 5 * math.hypot(sampled_error, analytic_error)

    vae, x, _ = two_layer_linear_gaussian("bottom_up", shift=0.5, inflate=1.5)
    sampled, _ = mean_and_error(Trace_ELBO(**options), vae, x, 1000 * seed)
    with pytest.warns(UserWarning, match="mean field restriction"):
        analytic, _ = mean_and_error(TraceMeanField_ELBO(**options), vae, x, 1000 * seed + 500)
    assert sampled - analytic > 0.3


def test_analytic_with_the_bottom_up_guide_is_refused_in_one_line():
    with pytest.raises(Exception) as error:
        small_config("bottom_up", **{"objective.elbo": "analytic"})
    one_line(error, "objective.elbo = 'analytic'", "bottom_up", "ladder")
    assert small_vae("bottom_up").why_no_closed_form_kl() is not None
    assert small_vae("ladder").why_no_closed_form_kl() is None
    assert small_vae("ladder", **{"model.guide": "iaf"}).why_no_closed_form_kl() is not None


# -- the programs and the estimators -----------------------------------------------------------

@pytest.mark.parametrize("inference", INFERENCES)
def test_each_layer_is_its_own_site_in_the_data_plate(inference):
    vae = small_vae(inference)
    x = binary_images(5)
    guide_trace = poutine.trace(vae.guide_body).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model_body, trace=guide_trace)).get_trace(x)
    order = [name for name, site in guide_trace.nodes.items() if site["type"] == "sample" and name != "data"]
    assert order == (["z1", "z2"] if inference == "bottom_up" else ["z2", "z1"])
    assert [n for n, s in model_trace.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and n != "data"] == ["z2", "z1"]
    for layer, size in enumerate((4, 2)):
        site = guide_trace.nodes[latent_site(layer)]
        assert site["value"].shape == (5, size) and site["fn"].has_rsample
        assert [f.name for f in site["cond_indep_stack"]] == ["data"]
    assert vae.latent_sites == ("z1", "z2")


@pytest.mark.parametrize("inference", INFERENCES)
def test_the_programs_run_in_stock_pyro_svi(inference):
    pyro.clear_param_store()
    vae = small_vae(inference)
    x = binary_images(32)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), loss=Trace_ELBO())
    losses = [svi.step(x) for _ in range(15)]
    assert all(math.isfinite(loss) for loss in losses)
    assert statistics.mean(losses[-3:]) < statistics.mean(losses[:3])  # fixed seed and data: deterministic
    assert any("top_down" in name for name in pyro.get_param_store().keys())
    pyro.clear_param_store()


# every pair but analytic with the bottom-up guide, which is refused
# (test_analytic_with_the_bottom_up_guide_is_refused_in_one_line)
@pytest.mark.parametrize("inference, estimator, particles", [
    (inference, estimator, particles) for inference in INFERENCES
    for estimator, particles in [("mc", 1), ("analytic", 2), ("iwae", 3), ("stl", 2), ("iwae_dreg", 3)]
    if not (estimator == "analytic" and inference == "bottom_up")])
def test_every_estimator_gives_every_network_a_gradient(inference, estimator, particles):
    vae = small_vae(inference)
    loss = make_elbo(estimator, particles).differentiable_loss(vae.model_body, vae.guide_body, binary_images(8))
    loss.backward()
    assert math.isfinite(loss.item())
    for part in ("encoder", "up", "top_down", "decoder"):
        grads = [p.grad for p in getattr(vae, part).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), part
        assert any(g.abs().sum() > 0 for g in grads), part


@pytest.mark.parametrize("inference", INFERENCES)
def test_each_layer_is_weighted_by_beta_times_its_own_weight_in_model_and_guide(inference):
    """The training loss hands objective.betas to both programs: the site of layer l is scaled
    by beta * betas[l] on both sides (a weight of 0 masks it); x stays unscaled."""
    vae = small_vae(inference)
    objective = small_config(inference, **{"objective.betas": [0.5, 0.0]}).objective
    loss = make_training_loss(vae, objective)
    seen = {}

    class Recording:
        def differentiable_loss(self, model, guide, *args, **kwargs):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
            for side, trace in (("model", model_trace), ("guide", guide_trace)):
                for name in vae.latent_sites:
                    site = trace.nodes[name]
                    seen[side, name] = 0.0 if site["mask"] is False else float(site["scale"])
            assert model_trace.nodes["x"]["scale"] == 1.0
            return torch.zeros(())

    loss.estimator = Recording()
    loss(binary_images(4), beta=0.4, reconstruction_weight=1.0)
    assert seen == {("model", "z1"): 0.2, ("guide", "z1"): 0.2, ("model", "z2"): 0.0, ("guide", "z2"): 0.0}


@pytest.mark.parametrize("inference", INFERENCES)
@pytest.mark.parametrize("estimator, particles", [("mc", 1), ("iwae", 2), ("iwae_dreg", 2)])
def test_shard_losses_add_up_over_every_layer(inference, estimator, particles, assert_shards_add_up):
    """What DDP needs: SharedNoise draws every layer's noise from the whole batch's."""
    assert_shards_add_up(small_vae(inference), binary_images(7), estimator, particles, layer_betas=(1.0, 0.5))


# -- the parts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prior", sorted(PRIORS))
def test_every_prior_sits_at_the_top_layer(prior):
    vae = small_vae("bottom_up", **{"model.prior": prior})
    assert vae.prior().event_shape == (2,)
    assert torch.isfinite(vae.elbo_per_image(binary_images(3))).all()
    assert vae.sample_images(3).shape == (3, *SHAPE)


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_every_likelihood_decodes_the_bottom_layer(likelihood):
    binary = LIKELIHOODS[likelihood].accepts == "binary"
    vae = small_vae(**{"model.likelihood": likelihood, "data.binarize": "dynamic" if binary else "none"})
    x = binary_images(3) if binary else binary_images(3) * 0.8 + 0.1
    assert torch.isfinite(vae.elbo_per_image(x)).all()


@pytest.mark.parametrize("inference", INFERENCES)
def test_an_iaf_follows_every_layer(inference):
    vae = small_vae(inference, **{"model.guide": "iaf"})
    assert len(vae.guide_nets) == 2 and all(len(list(g.parameters())) for g in vae.guide_nets)
    result = evaluate(vae, binary_images(6), num_samples=10)
    assert math.isfinite(result["test_log_likelihood"])


def test_the_layer_networks_take_the_units_of_a_gated_architecture():
    vae = small_vae(**{"model.arch": "gated_mlp", "model.layer_hidden_dim": 8})
    assert type(vae.top_down[0].body[0]).__name__ == "GatedDense" and vae.top_down[0].loc.in_features == 8


def test_the_layer_networks_of_mlp_bn_normalize_and_the_shape_check_leaves_their_statistics():
    from pyro_vae.networks import FeatureBatchNorm

    vae = small_vae("bottom_up", **{"model.arch": "mlp_bn", "model.layer_hidden_dim": 8})
    norms = [m for m in vae.modules() if isinstance(m, FeatureBatchNorm)]
    assert isinstance(vae.top_down[0].body[1], FeatureBatchNorm) and isinstance(vae.up[0].body[1], FeatureBatchNorm)
    assert len(norms) == 4 and all(m.num_batches_tracked == 0 for m in norms)  # built and checked, not trained
    assert vae.training


def test_an_mlp_bn_run_resumes_exactly_and_reloads_its_running_statistics(tmp_path, assert_resumes_exactly):
    from pyro_vae.networks import FeatureBatchNorm

    splits = small_splits()
    config = small_config("bottom_up", **{"model.arch": "mlp_bn", "train.epochs": 2})
    whole = assert_resumes_exactly(config, splits)  # buffers included: every state_dict entry
    reloaded = load_run(tmp_path / "whole")
    assert not reloaded.training
    for a, b in zip(reloaded.modules(), whole.vae.modules()):
        if isinstance(a, FeatureBatchNorm):
            assert a.num_batches_tracked > 0 and torch.equal(a.running_var, b.running_var)
    x = splits.test.images[:4]
    for a, b in zip(reloaded.codes(x), whole.vae.codes(x)):
        assert torch.equal(a, b)


# -- training, resume, reload, evaluation ------------------------------------------------------

@pytest.mark.parametrize("inference", INFERENCES)
def test_a_run_resumes_exactly_and_reloads(inference, tmp_path, assert_resumes_exactly):
    splits = small_splits()
    config = small_config(inference, **{"train.epochs": 3, "objective.beta_schedule": "warmup",
                                        "objective.beta_epochs": 2, "objective.betas": [1.0, 0.5]})
    whole = assert_resumes_exactly(config, splits)
    assert all(math.isfinite(r["val_elbo"]) for r in whole.history)
    reloaded = load_run(tmp_path / "whole")
    assert isinstance(reloaded, HierarchicalVAE) and reloaded.inference == inference
    x = splits.test.images[:4]
    for a, b in zip(reloaded.codes(x), whole.vae.codes(x)):
        assert torch.equal(a, b)


def test_a_final_phase_trains_the_last_epochs_with_its_own_estimator(monkeypatch):
    from pyro_vae.estimators import DReG_IWAE_ELBO

    calls = []
    original = DReG_IWAE_ELBO.differentiable_loss
    monkeypatch.setattr(DReG_IWAE_ELBO, "differentiable_loss",
                        lambda self, *args, **kwargs: calls.append(self.num_particles) or original(self, *args, **kwargs))
    splits = small_splits()
    config = small_config("bottom_up", **{"train.epochs": 3, "objective.final_elbo": "iwae_dreg",
                                          "objective.final_epochs": 1, "objective.final_particles": 3})
    result = fit(config, splits, run_dir=None, progress=False)
    assert [r["elbo"] for r in result.history] == ["mc", "mc", "iwae_dreg"]
    steps = math.ceil(len(splits.train) / config.train.batch_size)
    assert calls == [3] * steps  # every step of the last epoch, with its particles, and no other
    assert all(math.isfinite(r["train_loss"]) for r in result.history)


def test_a_run_with_a_final_phase_resumes_exactly_before_and_in_it(tmp_path):
    splits = small_splits()
    # the schedule's length pins the phase: a run stopped early keeps it where the whole run has it
    config = small_config("bottom_up", **{"train.epochs": 4, "train.lr_schedule_epochs": 4,
                                          "objective.final_elbo": "iwae_dreg", "objective.final_epochs": 2,
                                          "objective.final_particles": 2})
    whole = fit(config, splits, tmp_path / "whole", progress=False)
    for stop in (1, 3):  # before the phase, and inside it
        part = tmp_path / f"part{stop}"
        fit(config.replace(**{"train.epochs": stop}), splits, part, progress=False)
        resumed = fit(config, splits, part, checkpoint=load_checkpoint(part), progress=False)
        for key, value in whole.vae.state_dict().items():
            assert torch.equal(value, resumed.vae.state_dict()[key]), key
        assert [r["train_loss"] for r in whole.history] == [r["train_loss"] for r in resumed.history]
        assert [r["elbo"] for r in resumed.history] == ["mc", "mc", "iwae_dreg", "iwae_dreg"]


@pytest.mark.parametrize("overrides, words", [
    ({"objective.final_elbo": "iwae_dreg"}, ("objective.final_elbo = 'iwae_dreg'", "objective.final_epochs = 0")),
    ({"objective.final_epochs": 2}, ("objective.final_elbo = ''", "objective.final_epochs = 2")),
    ({"objective.final_elbo": "iwae_dreg", "objective.final_epochs": 3}, ("objective.final_epochs = 3",
                                                                         "train.epochs = 2")),
    ({"objective.final_elbo": "analytic", "objective.final_epochs": 1}, ("objective.final_elbo = 'analytic'",
                                                                        "bottom_up")),
    ({"objective.final_elbo": "nope", "objective.final_epochs": 1}, ("objective.final_elbo", "iwae_dreg")),
])
def test_a_final_phase_that_cannot_train_is_refused_in_one_line(overrides, words):
    with pytest.raises(Exception) as error:
        small_config("bottom_up", **overrides)
    one_line(error, *words)


def test_evaluation_reports_each_layer():
    vae = small_vae()
    result = evaluate(vae, binary_images(20), num_samples=50)
    assert len(result["kl_per_layer"]) == 2 and len(result["active_units_per_layer"]) == 2
    assert sum(result["kl_per_layer"]) == pytest.approx(result["test_kl"], rel=1e-5)
    assert result["active_units"] == sum(result["active_units_per_layer"])
    assert result["test_elbo"] <= result["iwae_bounds"]["5"] <= result["test_log_likelihood"] + 1e-4
    assert result["z_dims"] == [4, 2]


def test_vectors_train_and_evaluate():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(160, 3, generator=g) @ torch.randn(3, 8, generator=g)
    splits = Splits(train=ImageData(data[:96]), val=ImageData(data[96:128]), test=ImageData(data[128:]))
    config = small_config(**{"model.likelihood": "gaussian_learned", "data.binarize": "none", "data.dataset": "mnist"})
    result = fit(config, splits, progress=False)
    assert math.isfinite(result.history[-1]["val_elbo"])
    assert result.vae.sample_images(2).shape == (2, 8)
    figures = make_figures(result.vae, splits.test.images, None, result.history)
    assert "layer_samples" not in figures and "reconstructions" in figures


def test_figures_show_each_layer():
    vae = small_vae()
    figures = make_figures(vae, binary_images(40), None, [])
    assert {"layer_reconstructions", "layer_samples", "reconstructions", "samples", "latent_space"} <= set(figures)
    assert "manifold" not in figures and "latent_traversals" not in figures
    rows = vae.vary_each_layer(5)
    assert rows.shape == (2, 5, *SHAPE)
    assert not torch.equal(rows[0, 0], rows[0, 1]) and not torch.equal(rows[1, 0], rows[1, 1])


# -- the command line --------------------------------------------------------------------------

TINY = ["--set", "model.z_dims=[4, 2]", "--set", "model.hidden_dim=16", "--set", "train.batch_size=32", "--quiet"]


@pytest.mark.parametrize("inference", INFERENCES)
def test_train_evaluate_plot_compare_sample_resume_from_the_command_line(inference, tmp_path, run_cli):
    data = tmp_path / "images.npy"
    np.save(data, (binary_images(120).squeeze(1).numpy() * 255).astype(np.uint8))
    run = tmp_path / "run"
    status, _, err = run_cli("train", "--data", str(data), *TINY, "--set", f"model.inference={inference}",
                             "--epochs", "1", "--out", str(run))
    assert status == 0, err
    status, out, err = run_cli("evaluate", str(run), "-k", "4", "--quiet")
    assert status == 0, err
    result = json.loads(out)
    assert len(result["kl_per_layer"]) == 2 and math.isfinite(result["test_log_likelihood"])
    status, _, err = run_cli("plot", str(run))
    assert status == 0, err
    assert (run / "layer_reconstructions.png").exists() and (run / "layer_samples.png").exists()
    status, out, err = run_cli("compare-elbo", str(run), "--estimators", "mc", "analytic", "iwae:3", "--repeats", "2",
                               "--grad-samples", "2", "--limit", "6")
    assert status == 0, err
    compared = [r["estimator"] for r in json.loads((run / "elbo_comparison.json").read_text())]
    assert compared == (["mc", "analytic", "iwae:3"] if inference == "ladder" else ["mc", "iwae:3"])
    assert ("leaving out 'analytic'" in err) == (inference == "bottom_up")
    status, _, err = run_cli("sample", str(run), "--num", "3", "--out", str(tmp_path / "s.npy"))
    assert status == 0, err
    status, _, err = run_cli("train", "--resume", str(run), "--epochs", "2")
    assert status == 0, err
    assert load_checkpoint(run)["epoch"] == 2


def test_tensorboards_validation_terms_sum_the_layers():
    from pyro_vae.monitor import validation_terms

    terms = validation_terms(small_vae(), binary_images(20), seed=0)
    assert terms["kl"] > 0 and math.isfinite(terms["reconstruction"]) and 0 <= terms["active_units"] <= 6


def test_compare_training_leaves_analytic_out_for_the_bottom_up_guide(tmp_path, run_cli, monkeypatch):
    import pyro_vae.compare as compare

    data = tmp_path / "images.npy"
    np.save(data, (binary_images(60).squeeze(1).numpy() * 255).astype(np.uint8))
    asked = []

    def trap(config, splits, out, estimators, *args, **kwargs):
        asked.extend(estimators)
        raise KeyboardInterrupt  # nothing trains

    monkeypatch.setattr(compare, "train_side_by_side", trap)
    with pytest.raises(KeyboardInterrupt):
        run_cli("compare-training", "--data", str(data), *TINY, "--set", "model.inference=bottom_up",
                "--out", str(tmp_path / "runs"))
    assert asked and "analytic" not in asked


def test_compare_training_trains_each_estimator_without_a_configs_final_phase(tmp_path, run_cli, monkeypatch):
    import pyro_vae.compare as compare

    data = tmp_path / "images.npy"
    np.save(data, (binary_images(60).squeeze(1).numpy() * 255).astype(np.uint8))
    config = tmp_path / "final.toml"  # a phase longer than the comparison's one epoch
    config.write_text('[objective]\nfinal_elbo = "iwae_dreg"\nfinal_epochs = 6\nfinal_particles = 5\n')
    seen = []

    def trap(config, splits, out, estimators, *args, **kwargs):
        seen.append(config.objective)
        raise KeyboardInterrupt  # nothing trains

    monkeypatch.setattr(compare, "train_side_by_side", trap)
    with pytest.raises(KeyboardInterrupt):
        run_cli("compare-training", "--config", str(config), "--data", str(data), *TINY, "--epochs", "1",
                "--out", str(tmp_path / "runs"))
    assert seen and seen[0].final_elbo == "" and seen[0].final_epochs == 0
