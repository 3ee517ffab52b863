"""Labelled VAEs (pyro_vae.labelled): the conditional VAE and the semi-supervised M2 model.

The sum over the classes that Pyro's enumeration computes is checked against the same sum
written out; the sampled estimators of a latent label against it in expectation; the
labelled draw, the epoch order, training, resume, evaluation and the commands on small data.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pyro
import pytest
import torch
from helpers import one_line
from launch import TORCHRUN, TORCHRUN_ENV
from pyro.infer import SVI, TraceEnum_ELBO, Trace_ELBO

from pyro_vae.checkpoint import load_checkpoint, load_run
from pyro_vae.config import load_config
from pyro_vae.contract import ConfigError, DataError
from pyro_vae.data import from_tensors, load_splits
from pyro_vae.distributed import shard_bounds
from pyro_vae.labelled import (LabelledLoss, LabelledVAE, build_labelled_vae, choose_labelled,
                               class_log_likelihoods, evaluate_labelled, labelled_epoch_items, labelled_order,
                               make_label_elbo)
from pyro_vae import train as train_module
from pyro_vae.train import fit

NUM_CLASSES = 3
IMAGE_SHAPE = (1, 4, 4)


def refused(kind, message: str, function, *args, **kwargs) -> None:
    """``function(*args, **kwargs)`` raises ``kind`` with one line holding ``message``."""
    with pytest.raises(kind) as error:
        function(*args, **kwargs)
    one_line(error, message)


def small_config(labels: str = "semi_supervised", **overrides):
    return load_config(None, {"model.labels": labels, "model.z_dim": 2, "model.hidden_dim": 16,
                              "train.batch_size": 16, "train.labelled_per_batch": 4, "train.epochs": 2, **overrides})


def small_vae(labels: str = "semi_supervised", seed: int = 0) -> LabelledVAE:
    pyro.set_rng_seed(seed)
    return build_labelled_vae(small_config(labels).model, IMAGE_SHAPE, NUM_CLASSES)


def class_data(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary 4 x 4 images of three classes: class c lights its own rows often, others rarely."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    on = torch.full((n, 4, 4), 0.1)
    for c in range(NUM_CLASSES):
        on[labels == c, c] = 0.9
    return torch.bernoulli(on, generator=generator).unsqueeze(1), labels


# -- the objective -------------------------------------------------------------------------------

@pytest.mark.statistical
def test_enumeration_sums_the_classes_out_as_the_bound_written_out(seed):
    """TraceEnum_ELBO's loss of unlabelled items is -sum_y q(y|x) [ELBO(x|y) + log p(y) - log
    q(y|x)], z drawn once per class: its mean over 4,000 vectorized particles against the same
    sum with 20,000 draws per class, within 5 standard errors of the difference (false-failure
    rate below 1e-6 for normal errors)."""
    vae = small_vae(seed=seed)
    x, _ = class_data(6, seed=seed)
    pyro.set_rng_seed(seed)
    enumerated = make_label_elbo("enumerate", num_particles=4000)
    with torch.no_grad():
        loss = enumerated.loss(vae.model_body, vae.guide_body, x)
        # the reference: per class, E_q(z|x,y)[log p(x|z,y) + log p(z) - log q(z|x,y)] by many draws
        z_loc, z_scale = vae.encoder(x)
        y = torch.eye(NUM_CLASSES).unsqueeze(1)
        q = vae.guide_net(*vae.head(z_loc, z_scale, y))
        z = q.sample((20000,))
        terms = vae.decode(z, y).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)  # (draws, C, B)
        q_y = vae.classify(x).softmax(-1).T  # (C, B)
        per_class = terms.mean(0)
        reference = -(q_y * (per_class - math.log(NUM_CLASSES) - q_y.log())).sum()
        # the loss's standard error: the sum over items and classes of q_y-weighted draws, one
        # draw per class and particle, averaged over 4,000 particles
        variance = ((q_y ** 2) * terms.var(0)).sum() / 4000 + ((q_y ** 2) * terms.var(0)).sum() / 20000
    assert abs(loss - reference.item()) < 5 * variance.sqrt().item()


@pytest.mark.statistical
def test_the_score_function_estimates_the_enumerated_bound(seed):
    """Sampling y (score function) estimates the same bound as summing it out: 6,000 draws of
    each (60 batches of 100 copies of the items: each batch's loss over 100 is the mean of 100
    independent draws), means within 5 estimated standard errors (59 degrees of freedom each:
    a false-failure rate below 1e-4)."""
    vae = small_vae(seed=seed)
    x, _ = class_data(4, seed=seed)
    batch = x.repeat(100, 1, 1, 1)
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        draws = torch.tensor([make_label_elbo("score_function").loss(vae.model_body, vae.guide_body, batch,
                                                                      labels_by="score_function") / 100
                              for _ in range(60)])
        exact = torch.tensor([make_label_elbo("enumerate").loss(vae.model_body, vae.guide_body, batch) / 100
                              for _ in range(60)])
    error = (draws.var() / len(draws) + exact.var() / len(exact)).sqrt()
    assert abs(draws.mean() - exact.mean()) < 5 * error


@pytest.mark.statistical
def test_the_score_functions_classifier_gradient_is_enumerations_in_expectation(seed):
    """The classifier's output bias: the gradient of the score-function estimator (one draw of y,
    its baseline) averaged over 6,000 draws against enumeration's (no noise from y) over 1,000,
    each coordinate within 5 estimated standard errors of the difference (for normal means with
    the variances estimated from 40 and 60 groups, a false-failure rate below 1e-4 for the three
    coordinates). Draws come as copies of the items in one batch: the loss is a
    sum over items, so a batch of R copies gives the sum of R independent draws."""
    vae = small_vae(seed=seed)
    x, _ = class_data(6, seed=seed)
    bias = vae.classifier.loc.bias

    def draws(labels_by: str, calls: int, copies: int) -> torch.Tensor:
        estimator = make_label_elbo(labels_by)
        batch = x.repeat(copies, 1, 1, 1)
        grads = [torch.autograd.grad(estimator.differentiable_loss(vae.model_body, vae.guide_body, batch, None,
                                                                   labels_by=labels_by), bias)[0] / copies
                 for _ in range(calls)]
        return torch.stack(grads)  # each the mean of ``copies`` draws

    pyro.set_rng_seed(seed)
    # 40 and 60 means, so the standard errors are estimated with 39 and 59 degrees of freedom
    exact, sampled = draws("enumerate", 40, 25), draws("score_function", 60, 100)
    error = (exact.var(0) / len(exact) + sampled.var(0) / len(sampled)).sqrt()
    assert ((exact.mean(0) - sampled.mean(0)).abs() < 5 * error).all(), (exact.mean(0), sampled.mean(0), error)


@pytest.mark.parametrize("labels_by", ["enumerate", "score_function", "gumbel_softmax"])
def test_every_way_of_handling_a_latent_label_trains_the_classifier_from_unlabelled_items(labels_by):
    vae = small_vae()
    x, _ = class_data(8)
    loss = LabelledLoss(vae, make_label_elbo(labels_by), make_label_elbo("enumerate"), labels_by=labels_by)
    value = loss(x, torch.full((8,), -1))
    value.backward()
    grads = [p.grad for p in vae.classifier.parameters() if p.grad is not None]
    assert torch.isfinite(value) and grads and any(bool(g.abs().sum() > 0) for g in grads)


def test_the_loss_of_a_mixed_batch_is_the_sum_of_its_parts():
    """Unlabelled items' bound + labelled items' bound + the weighted classification term."""
    vae = small_vae()
    x, y = class_data(8)
    given = torch.where(torch.arange(8) < 3, y, torch.full_like(y, -1))
    loss = LabelledLoss(vae, make_label_elbo("enumerate"), Trace_ELBO(max_plate_nesting=1), classifier_weight=2.0)
    pyro.set_rng_seed(1)
    whole = loss(x, given)
    pyro.set_rng_seed(1)
    parts = (TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(vae.model_body, vae.guide_body, x[3:], None)
             + Trace_ELBO(max_plate_nesting=1).differentiable_loss(vae.model_body, vae.guide_body, x[:3], y[:3])
             + 2.0 * torch.nn.functional.cross_entropy(vae.classify(x[:3]), y[:3], reduction="sum"))
    torch.testing.assert_close(whole, parts)


@pytest.mark.parametrize("labels, known", [("semi_supervised", range(7, 10)), ("semi_supervised", range(0, 10)),
                                           ("semi_supervised", range(0)), ("conditional", range(0, 10))])
def test_the_shards_of_a_labelled_batch_add_up_to_the_batch(labels, known):
    """What DDP relies on, for a labelled batch laid out as an epoch's order lays it (unlabelled
    items, then the labelled ones): three ranks' losses and gradients, each drawing its rows of
    the whole batch's noise, add up to the one process's. With 3 labelled items of 10, the
    first ranks hold none of them and the last none of the unlabelled: they score one item with
    weight 0, so that every rank draws the batch's noise in the same order."""
    vae = small_vae(labels)
    x, y = class_data(10)
    given = torch.where(torch.isin(torch.arange(10), torch.tensor(list(known), dtype=torch.long)), y,
                        torch.full_like(y, -1))
    latent = make_label_elbo("enumerate") if labels == "semi_supervised" else Trace_ELBO(max_plate_nesting=1)
    loss = LabelledLoss(vae, latent, Trace_ELBO(max_plate_nesting=1), classifier_weight=2.0)
    params = [p for name, p in vae.named_parameters() if not name.startswith("baseline.")]
    pyro.set_rng_seed(5)
    whole = loss(x, given, beta=0.7)
    whole_grads = [torch.zeros_like(p) if g is None else g
                   for p, g in zip(params, torch.autograd.grad(whole, params, allow_unused=True))]
    total, total_grads = 0.0, [torch.zeros_like(p) for p in params]
    for rank in range(3):
        begin, end = shard_bounds(len(x), rank, 3)
        pyro.set_rng_seed(5)  # every rank holds the same random stream
        part = loss(x[begin:end], given, shard=(begin, end, len(x)), beta=0.7)
        total = total + part
        for acc, g in zip(total_grads, torch.autograd.grad(part, params, allow_unused=True)):
            acc += 0 if g is None else g
    # sums over 3 shards against one sum: equal up to float rounding
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-4)
    for a, b in zip(total_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_programs_run_in_stock_pyro_svi():
    """vae.model and vae.guide in Pyro's SVI: TraceEnum_ELBO sums the label of unlabelled items
    out, Trace_ELBO takes labelled ones; the parts are in Pyro's param store under the VAE's name."""
    pyro.clear_param_store()
    vae = small_vae()
    x, y = class_data(8)
    optimizer = pyro.optim.Adam({"lr": 1e-2})
    unlabelled = SVI(vae.model, vae.guide, optimizer, TraceEnum_ELBO(max_plate_nesting=1))
    labelled = SVI(vae.model, vae.guide, optimizer, Trace_ELBO(max_plate_nesting=1))
    assert math.isfinite(unlabelled.step(x)) and math.isfinite(labelled.step(x, y))
    names = list(pyro.get_param_store().keys())
    assert any(name.startswith(f"{vae.name}.classifier$$$") for name in names), names
    assert any(name.startswith(f"{vae.name}.decoder$$$") for name in names), names
    pyro.clear_param_store()


def test_the_classifier_may_be_of_another_architecture():
    from pyro_vae.networks import ConvEncoder, MLPDecoder

    vae = build_labelled_vae(small_config(**{"model.classifier_arch": "conv"}).model, IMAGE_SHAPE, NUM_CLASSES)
    assert isinstance(vae.classifier, ConvEncoder) and isinstance(vae.decoder, MLPDecoder)
    assert vae.classify(class_data(5)[0]).shape == (5, NUM_CLASSES)


def test_a_class_prior_gives_each_class_its_own_gaussian_and_their_mixture_without_a_label():
    from pyro_vae.labelled import ClassPrior

    pyro.set_rng_seed(0)
    vae = build_labelled_vae(small_config("conditional", **{"model.class_prior": True}).model, IMAGE_SHAPE,
                             NUM_CLASSES)
    assert isinstance(vae.prior_net, ClassPrior)
    with torch.no_grad():
        vae.prior_net.locs.copy_(torch.tensor([[-4.0, 0.0], [0.0, 0.0], [4.0, 0.0]]))
    y = torch.eye(NUM_CLASSES)
    assert torch.equal(vae.prior(y).mean, vae.prior_net.locs)
    z = torch.tensor([[4.0, 0.0]])
    # the marginal is the mean of the classes' densities
    expected = vae.prior(y.unsqueeze(1)).log_prob(z).logsumexp(0) - math.log(NUM_CLASSES)
    torch.testing.assert_close(vae.prior().log_prob(z), expected)
    # the model scores z under p(z|y): a labelled item's loss is finite, and the draws of a class sit at its mean
    x, labels = class_data(6)
    assert math.isfinite(Trace_ELBO(max_plate_nesting=1).loss(vae.model_body, vae.guide_body, x, labels))
    decoded = vae.sample_images(4, labels=torch.full((4,), 2))
    assert decoded.shape == (4, *IMAGE_SHAPE)


def test_a_conditional_vae_has_no_classifier_and_needs_every_label():
    vae = small_vae("conditional")
    x, y = class_data(6)
    assert vae.classifier is None
    assert math.isfinite(Trace_ELBO(max_plate_nesting=1).loss(vae.model_body, vae.guide_body, x, y))
    with pytest.raises(ValueError, match="needs the label of every item"):
        Trace_ELBO(max_plate_nesting=1).loss(vae.model_body, vae.guide_body, x)


# -- which labels, in which order ----------------------------------------------------------------

def test_the_labelled_items_are_balanced_across_classes_and_drawn_by_the_seed():
    labels = torch.arange(300) % NUM_CLASSES
    chosen = choose_labelled(labels, 10, NUM_CLASSES, seed=0)
    counts = torch.bincount(labels[chosen], minlength=NUM_CLASSES)
    assert len(chosen) == 10 and len(set(chosen.tolist())) == 10
    assert sorted(counts.tolist()) == [3, 3, 4]
    assert torch.equal(chosen, choose_labelled(labels, 10, NUM_CLASSES, seed=0))
    assert not torch.equal(chosen, choose_labelled(labels, 10, NUM_CLASSES, seed=1))
    refused(ConfigError, "class 2 has 1 training items", choose_labelled, torch.tensor([0, 0, 1, 1, 2]), 6, 3, 0)


def test_an_epoch_sees_every_unlabelled_item_once_and_labelled_ones_in_every_batch():
    labels = torch.full((103,), -1)
    labels[[5, 17, 60]] = torch.tensor([0, 1, 2])
    order = labelled_order(labels, batch_size=10, per_batch=2, generator=torch.Generator().manual_seed(0))
    unlabelled = order[labels[order] < 0]
    assert sorted(unlabelled.tolist()) == (labels < 0).nonzero().flatten().tolist()
    batches = order.split(10)
    assert all(int((labels[b] >= 0).sum()) == 2 for b in batches)
    assert len(batches) == math.ceil(100 / 8)
    drawn = torch.bincount(order[labels[order] >= 0], minlength=103)[[5, 17, 60]]
    assert int(drawn.max() - drawn.min()) <= 1  # passes over the labelled items, each drawn alike
    assert torch.equal(order, labelled_order(labels, 10, 2, torch.Generator().manual_seed(0)))
    assert len(order) == labelled_epoch_items(labels, 10, 2)
    assert labelled_epoch_items(labels, 1, 2) == len(labelled_order(labels, 1, 2, torch.Generator())) == 103


# -- training, resume, evaluation ----------------------------------------------------------------

def labelled_splits(n: int = 240):
    x, y = class_data(n)
    return from_tensors(x, y, val_fraction=0.2, test_fraction=0.2)


def test_a_semi_supervised_run_learns_to_classify_from_a_few_labels():
    """Six labels of 144 training items; on data this easy the classifier should be near perfect.
    Deterministic (fixed data and seed), so it is a check of learning, not a statistical test."""
    config = small_config(**{"data.labelled": 6, "train.epochs": 40, "train.lr": 1e-2})
    result = fit(config, labelled_splits(), progress=False)
    assert result.history[-1]["val_accuracy"] >= 0.9
    assert all("val_accuracy" in record and math.isfinite(record["val_elbo"]) for record in result.history)


def test_a_labelled_run_resumes_exactly(assert_resumes_exactly):
    assert_resumes_exactly(small_config(**{"data.labelled": 6, "train.epochs": 3}), labelled_splits())


def test_a_semi_supervised_run_with_a_class_prior_trains_and_evaluates():
    config = small_config(**{"data.labelled": 6, "model.class_prior": True, "train.epochs": 1})
    result = fit(config, labelled_splits(), progress=False)
    x, y = class_data(12)
    scores = evaluate_labelled(result.vae, x, y, num_samples=10)
    assert math.isfinite(result.history[-1]["val_elbo"]) and math.isfinite(scores["test_log_likelihood"])


def test_a_labelled_run_reloads_as_a_labelled_vae(tmp_path):
    fit(small_config("conditional", **{"train.epochs": 1}), labelled_splits(), tmp_path / "run", progress=False)
    vae = load_run(tmp_path / "run")
    assert isinstance(vae, LabelledVAE) and vae.num_classes == NUM_CLASSES and vae.classifier is None
    assert load_checkpoint(tmp_path / "run")["num_classes"] == NUM_CLASSES


def test_tensorboard_shows_a_labelled_runs_validation_accuracy(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = small_config(**{"data.labelled": 6, "train.tensorboard": True})
    result = fit(config, labelled_splits(), tmp_path, progress=False)
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    accuracy = accumulator.Scalars("validation/accuracy")
    assert [e.step for e in accuracy] == [1, 2]
    assert [e.value for e in accuracy] == pytest.approx([r["val_accuracy"] for r in result.history])
    assert len(accumulator.Scalars("validation/reconstruction")) == 2  # the terms at the predicted class


def test_evaluation_sums_the_classes_out_and_scores_the_classifier():
    vae = small_vae().eval()
    x, y = class_data(12)
    result = evaluate_labelled(vae, x, y, num_samples=50, batch_size=5)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        joint = torch.cat([class_log_likelihoods(vae, x[s : s + 5], 50) for s in range(0, 12, 5)])
    joint = joint - math.log(NUM_CLASSES)
    assert result["test_log_likelihood"] == pytest.approx(joint.logsumexp(-1).mean().item(), abs=1e-4)
    assert result["generative_accuracy"] == pytest.approx((joint.argmax(-1) == y).float().mean().item())
    assert result["test_accuracy"] == pytest.approx((vae.classify(x).argmax(-1) == y).float().mean().item())
    # log p(x) is at least the largest class's share of it
    assert result["test_log_likelihood"] >= joint.max(-1).values.mean().item() - 1e-5


def test_samples_of_a_chosen_class_have_its_shape():
    vae = small_vae("conditional").eval()
    images = vae.sample_images(5, labels=torch.full((5,), 2))
    assert images.shape == (5, *IMAGE_SHAPE)


# -- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"data.labelled": 10}, "data.labelled = 10: only a semi-supervised run"),
    ({"model.labels": "semi_supervised", "objective.elbo": "iwae"}, "objective.elbo = 'iwae' with model.labels"),
    ({"model.labels": "semi_supervised", "train.batch_size": 8, "train.labelled_per_batch": 8},
     "train.labelled_per_batch = 8 leaves no room"),
    ({"model.labels": "supervised"}, "model.labels = 'supervised': choose one of"),
    ({"objective.labels_by": "sample"}, "objective.labels_by = 'sample': choose one of"),
    ({"model.class_prior": True}, "model.class_prior = true learns p(z|y)"),
    ({"model.labels": "conditional", "model.class_prior": True, "model.prior": "mixture"},
     "model.class_prior = true replaces model.prior = 'mixture'"),
    ({"objective.temperature": 0.0}, "objective.temperature = 0.0: must be > 0"),
])
def test_label_keys_are_checked_against_each_other(overrides, message):
    refused(ConfigError, message, load_config, None, overrides)


def test_labels_on_data_without_them_are_one_line():
    splits = from_tensors(class_data(60)[0])
    refused(DataError, "needs labelled data; this data has none", fit, small_config("conditional"), splits,
             progress=False)


def test_more_labelled_items_than_training_items_are_one_line():
    refused(ConfigError, "data.labelled = 500: more than the 144 training items", fit,
             small_config(**{"data.labelled": 500}), labelled_splits(), progress=False)


def test_the_ways_of_handling_the_label_are_compared_side_by_side():
    from pyro_vae.compare import compare_label_estimators

    vae = small_vae()
    x, _ = class_data(20)
    records = compare_label_estimators(vae, x, repeats=3, grad_samples=3, grad_batch=10)
    assert [r["estimator"] for r in records] == ["enumerate", "score_function", "gumbel_softmax"]
    for record in records:
        assert all(math.isfinite(record[key]) for key in ("estimate", "estimate_std", "grad_snr_classifier",
                                                           "grad_snr_decoder", "seconds_per_step")), record
    with pytest.raises(ValueError, match="needs a semi-supervised VAE"):
        compare_label_estimators(small_vae("conditional"), x)


# -- the commands ------------------------------------------------------------------------------------

@pytest.mark.mnist
def test_two_processes_train_a_semi_supervised_run_as_one_does(tmp_path, mnist_dir):
    """torchrun with two ranks against one process, the same config: the same weights up to
    float rounding (each rank's matrix products run over its own rows). The batches of 50 put
    their 10 labelled items last, so one rank holds labelled items and the other none."""
    overrides = {"model.labels": "semi_supervised", "data.labelled": 20, "data.train_limit": 420,
                 "data.val_size": 200, "train.epochs": 1, "train.batch_size": 50, "train.labelled_per_batch": 10,
                 "model.hidden_dim": 32, "model.z_dim": 4}
    args = [a for key, value in overrides.items() for a in ("--set", f"{key}={value}")]
    run = tmp_path / "run"
    launched = subprocess.run([*TORCHRUN, "-m", "pyro_vae", "train", *args, "--out", str(run), "--quiet", "--device", "cpu",
                               "--data-dir", str(mnist_dir)], capture_output=True, text=True, timeout=300,
                              env=TORCHRUN_ENV)
    assert launched.returncode == 0, launched.stderr[-3000:]
    splits = load_splits("mnist", mnist_dir, val_size=200, train_limit=420)
    single = fit(load_config(None, overrides), splits, progress=False)
    state = load_checkpoint(run)
    for name, value in single.vae.state_dict().items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-4, atol=1e-5, msg=f"parameter {name}")
    assert state["history"][0]["train_loss"] == pytest.approx(single.history[0]["train_loss"], rel=1e-5)
    assert state["history"][0]["val_accuracy"] == pytest.approx(single.history[0]["val_accuracy"], abs=0.01)


def test_sampling_the_label_under_torchrun_is_refused_in_one_line(monkeypatch):
    from pyro_vae.distributed import Runtime

    monkeypatch.setattr(train_module, "current_runtime", lambda device=None: Runtime(rank=0, world_size=2))
    config = small_config(**{"data.labelled": 6, "objective.labels_by": "score_function"})
    refused(ValueError, "objective.labels_by = 'score_function' trains in one process", fit, config,
            labelled_splits(), progress=False)

@pytest.mark.mnist
def test_train_and_evaluate_a_semi_supervised_run_on_mnist(tmp_path, mnist_dir):
    """The command line: train with 20 labels on 600 images, then evaluate reports accuracy."""
    overrides = {"model.labels": "semi_supervised", "data.labelled": 20, "data.train_limit": 600, "data.val_size": 500,
                 "train.epochs": 1, "train.batch_size": 100, "train.labelled_per_batch": 10, "model.hidden_dim": 32,
                 "model.z_dim": 4, "model.class_prior": "true"}
    args = [a for key, value in overrides.items() for a in ("--set", f"{key}={value}")]
    run = tmp_path / "run"
    common = ["--data-dir", str(mnist_dir)]
    trained = subprocess.run([sys.executable, "-m", "pyro_vae", "train", *args, "--out", str(run), "--quiet", *common],
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "pyro_vae", "evaluate", str(run), "-k", "5", "--limit", "200", "--quiet",
                           *common], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["num_images"] == 200
    assert math.isfinite(result["test_log_likelihood"]) and result["test_log_likelihood"] < 0
    assert result["prior"].startswith("class_prior")  # not model.prior's default, which the class prior replaced
    compared = subprocess.run([sys.executable, "-m", "pyro_vae", "compare-elbo", str(run), "--limit", "40", "--repeats",
                               "2", "--grad-samples", "2", *common], capture_output=True, text=True, timeout=300)
    assert compared.returncode == 0, compared.stderr[-2000:]
    records = json.loads((run / "label_comparison.json").read_text())
    assert [r["estimator"] for r in records] == ["enumerate", "score_function", "gumbel_softmax"]
    assert (run / "label_comparison.png").exists()


def test_enumeration_is_the_sum_over_the_classes_written_by_hand_in_float64():
    """With z held at the mean of q(z|x,y) (a point mass in the guide, so no draw stands between
    the two), TraceEnum_ELBO's loss of unlabelled items is -sum_y q(y|x) [log p(x|z_y, y) +
    log p(z_y) + log p(y) - log q(y|x)], written out class by class: equal in float64 up to
    rounding. What enumeration adds (the classes, their weights q(y|x), log p(y) and the
    entropy of q(y|x)) is checked exactly; how z is drawn is the statistical test's above."""
    from pyro.poutine.messenger import Messenger

    class ZAtItsMean(Messenger):
        def _process_message(self, msg):
            if msg["type"] == "sample" and msg["name"] == "z" and not msg["is_observed"]:
                msg["fn"] = pyro.distributions.Delta(msg["fn"].mean, event_dim=msg["fn"].event_dim)

    vae = small_vae().double()
    x = class_data(7)[0].double()

    def guide(*args, **kwargs):
        with ZAtItsMean():
            return vae.guide_body(*args, **kwargs)

    with torch.no_grad():
        loss = TraceEnum_ELBO(max_plate_nesting=1).loss(vae.model_body, guide, x)
        z_loc, z_scale = vae.encoder(x)
        written = torch.zeros(len(x), dtype=torch.float64)
        log_q_y = vae.classify(x).log_softmax(-1)  # (B, C)
        for c in range(NUM_CLASSES):
            y = torch.nn.functional.one_hot(torch.full((len(x),), c), NUM_CLASSES).double()
            z = vae.guide_net(*vae.head(z_loc, z_scale, y)).mean
            elbo_c = vae.decode(z, y).log_prob(x) + vae.prior().log_prob(z)
            written += log_q_y[:, c].exp() * (elbo_c - math.log(NUM_CLASSES) - log_q_y[:, c])
    assert loss == pytest.approx(-written.sum().item(), rel=1e-12)


def _linear_gaussian_mixture(seed: int, stretch: float):
    """A conditional VAE that is a mixture of linear-Gaussian models, one per class: p(z) =
    N(0, I), p(x|z,y) = N(W z + a_y, I), so p(x|y) = N(a_y, W W^T + I) in closed form. W's
    columns are orthogonal, so the exact posterior N(M (x - a_y), S) has a diagonal S, which the
    Gaussian guide family holds; its guide is that posterior with the scales times ``stretch``.
    Returns the VAE (float64), 16 items drawn from it with their classes, and the exact mean
    log p(x) = logsumexp_y [log p(x|y) + log p(y)]."""
    config = small_config("conditional", **{"model.likelihood": "gaussian", "model.likelihood_options.scale": 1.0})
    vae = build_labelled_vae(config.model, IMAGE_SHAPE, NUM_CLASSES).double()
    pixels, z_dim = math.prod(IMAGE_SHAPE), config.model.z_dim
    generator = torch.Generator().manual_seed(seed)
    W = 0.8 * torch.linalg.qr(torch.randn(pixels, z_dim, generator=generator, dtype=torch.float64))[0]
    A = 0.5 * torch.randn(NUM_CLASSES, pixels, generator=generator, dtype=torch.float64)  # a_y, one row each
    S = 1 / (1 + (W * W).sum(0))  # the posterior's variances: (I + W^T W)^-1, diagonal
    M = S.unsqueeze(-1) * W.T  # the posterior mean is M (x - a_y)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.device_of = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))  # evaluation reads the device off it

        def forward(self, h):  # h = [z, one-hot y]
            return (h[..., :z_dim] @ W.T + h[..., z_dim:] @ A).reshape(*h.shape[:-1], *IMAGE_SHAPE)

    class Encoder(torch.nn.Module):
        def forward(self, x):
            loc = x.flatten(1) @ M.T
            return loc, (stretch * S.sqrt()).expand_as(loc)

    class Head(torch.nn.Module):
        def forward(self, z_loc, z_scale, y):
            loc = z_loc - y @ (A @ M.T)
            return loc, z_scale.expand_as(loc)

    vae.decoder, vae.encoder, vae.head = Decoder(), Encoder(), Head()
    y = torch.arange(16) % NUM_CLASSES
    covariance = W @ W.T + torch.eye(pixels, dtype=torch.float64)
    x = A[y] + torch.randn(16, pixels, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(covariance).T
    per_class = torch.distributions.MultivariateNormal(A, covariance).log_prob(x.unsqueeze(1))  # (16, C)
    exact = (per_class - math.log(NUM_CLASSES)).logsumexp(-1).mean().item()
    return vae, x.reshape(16, *IMAGE_SHAPE), y, exact


def test_the_importance_sampled_log_likelihood_is_exact_with_the_exact_posterior():
    """With q(z|x,y) the exact posterior every importance weight is p(x|y): evaluate_labelled's
    log p(x), summed over the classes, equals the closed form up to rounding for any K."""
    vae, images, y, exact = _linear_gaussian_mixture(seed=0, stretch=1.0)
    with torch.no_grad():
        estimate = evaluate_labelled(vae, images, y, num_samples=3)["test_log_likelihood"]
    assert estimate == pytest.approx(exact, abs=1e-9)


@pytest.mark.statistical
def test_the_importance_sampled_log_likelihood_converges_to_the_closed_form(seed):
    """With a proposal 1.5 times broader than the posterior in each of the 2 dimensions, the
    weights' relative variance is (1.5^2 / sqrt(2 * 1.5^2 - 1))^2 - 1 = 0.45, so at K = 5000
    each log p(x|y) has a standard error of about sqrt(0.45 / 5000) = 0.0095 nats and a bias of
    0.45 / (2 K) = 5e-5; the mean over 16 items about 0.0024. 0.02 nats is 8 such standard errors
    (a false-failure rate below 1e-12 for normal errors)."""
    vae, images, y, exact = _linear_gaussian_mixture(seed=seed, stretch=1.5)
    with torch.no_grad():
        estimate = evaluate_labelled(vae, images, y, num_samples=5000, seed=seed)["test_log_likelihood"]
    assert abs(estimate - exact) < 0.02
