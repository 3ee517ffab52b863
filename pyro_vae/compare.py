"""Comparing ELBO estimators: their noise, their gradients, their cost, and what they train.

:func:`compare_estimators` scores estimators on a trained VAE; :func:`train_side_by_side`
trains one config once per estimator. Both return plain records (lists of dicts) that the CLI
prints, saves as JSON and CSV, and plots.

References:
    Rainforth et al. (2018), Tighter Variational Bounds are Not Necessarily Better: the
    signal-to-noise ratio ``|E[g]| / std[g]`` of gradient estimates, per parameter.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .data import prepare
from .config import LABELS_BY
from .elbo import evaluate, make_elbo
from .labelled import make_label_elbo
from .seeding import seeded
from .train import fit

#: Estimators compared by default: name, or name:particles. Each of "stl" and "iwae_dreg" follows
#: the estimator whose value and expected gradient it keeps, with less noise in the encoder's.
DEFAULT_ESTIMATORS = ("mc", "analytic", "stl", "iwae:5", "iwae_dreg:5", "iwae:50", "iwae_dreg:50")
#: Estimators trained side by side by default: one run each, so the costly K = 50 ones are left out.
DEFAULT_TRAINING_ESTIMATORS = ("mc", "analytic", "stl", "iwae:5", "iwae_dreg:5")

# compare_estimators' seed s draws pass r with torch seeded SEEDS_PER_CALL * s + r and gradient
# draw g with SEEDS_PER_CALL * s + GRADIENT_SEEDS + g. Torch's CPU generator keeps only the low
# 32 bits of a seed, so these stay below 2**32: 65,536 seeds, each with 65,536 draws of its own.
SEEDS_PER_CALL, GRADIENT_SEEDS = 2**16, 10_000

#: Particles x images whose gradient graph is held at once: a gradient draw is accumulated over
#: chunks of ``GRADIENT_CHUNK_ROWS // K`` images, so its memory is bounded by this setting, not
#: by the batch or K. A flow guide scored by the path-derivative estimators keeps a network
#: pass per latent dimension per row in the graph (the flow is inverted), which over a whole
#: batch at K = 50 outgrew a 24 GB machine.
GRADIENT_CHUNK_ROWS = 1024


def parse_estimator(spec: str) -> tuple[str, int]:
    """``"iwae:50"`` -> ``("iwae", 50)``; ``"mc"`` -> ``("mc", 1)``."""
    name, _, particles = spec.partition(":")
    try:
        k = int(particles) if particles else 1
    except ValueError:
        raise ValueError(f"estimator {spec!r}: expected NAME or NAME:PARTICLES, e.g. iwae:50") from None
    if k < 1:
        raise ValueError(f"estimator {spec!r}: the number of particles must be >= 1")
    make_elbo(name, k)  # refuses unknown names with the list of valid ones
    return name, k


def _flat_grads(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


def _snr(samples: torch.Tensor) -> tuple[float | None, float | None]:
    """Mean over parameters of |mean| / std, and of the variance, across gradient samples."""
    if samples.shape[1] == 0:  # a part without parameters
        return None, None
    mean, std = samples.mean(0), samples.std(0)
    usable = std > 0
    return (mean[usable].abs() / std[usable]).mean().item(), samples.var(0).mean().item()


def compare_estimators(vae, images: torch.Tensor, estimators=DEFAULT_ESTIMATORS, repeats: int = 5,
                       grad_samples: int = 20, grad_batch: int = 256, batch_size: int = 500,
                       seed: int = 0, grad_chunk_rows: int = GRADIENT_CHUNK_ROWS) -> list[dict]:
    """Score each estimator on ``images`` as they are (already binarized if the model is).

    For each: the estimate in nats per image (mean over ``repeats`` passes over all images with
    different seeds, and its standard deviation across repeats: the estimator's noise); the
    gradient of the per-image loss on a fixed batch of ``grad_batch`` images, drawn
    ``grad_samples`` times: its variance and signal-to-noise ratio for the encoder and the
    decoder parameters; and the seconds per gradient step (forward and backward).

    Pass ``r`` draws with torch seeded with ``65536 * seed + r``, gradient draw ``g`` with
    ``65536 * seed + 10_000 + g`` (inside :func:`~pyro_vae.seeding.seeded`, on the images'
    device, so the caller's random state is left as it was). Every estimator gets the same
    seeds, so their differences are not blurred by different draws; ``seed = 0`` gives the
    numbers of earlier versions, and distinct seeds share no draw.

    Memory is bounded by ``batch_size`` (the estimates, without gradients) and by
    ``grad_chunk_rows`` (particles x images in one gradient graph; a draw's gradient is summed
    over chunks of ``grad_chunk_rows // K`` images), whatever the number of images. Up to
    ``grad_chunk_rows`` particles x images a draw is one chunk, as before chunks existed.

    :param seed: ``0 <= seed < 65536``; ``repeats <= 10_000`` and ``grad_samples <= 55_536``.
    """
    if not 0 <= seed < SEEDS_PER_CALL:
        raise ValueError(f"seed = {seed}: must be in [0, {SEEDS_PER_CALL})")
    if repeats > GRADIENT_SEEDS or grad_samples > SEEDS_PER_CALL - GRADIENT_SEEDS:
        raise ValueError(f"repeats = {repeats}, grad_samples = {grad_samples}: at most "
                         f"{GRADIENT_SEEDS} and {SEEDS_PER_CALL - GRADIENT_SEEDS}")
    # a model of several parts per side (a hierarchical VAE) says which are the guide's own
    groups = getattr(vae, "parameter_groups", None)
    guide_parts, model_parts = groups() if groups is not None else ([vae.encoder], [vae.decoder, vae.likelihood])
    encoder = list(_trainable(guide_parts))
    decoder = list(_trainable(model_parts))
    records = []
    for spec in estimators:
        name, k = parse_estimator(spec)
        estimator = make_elbo(name, k)
        estimates = _estimates(vae, estimator, images, repeats, batch_size, seed)
        grads_encoder, grads_decoder, seconds = _gradient_draws(vae, estimator, images[:grad_batch], encoder, decoder,
                                                                grad_samples, seed, max(1, grad_chunk_rows // k))
        snr_encoder, var_encoder = _snr(grads_encoder)
        snr_decoder, var_decoder = _snr(grads_decoder)
        records.append({
            "estimator": spec,
            "estimate": statistics.mean(estimates),
            "estimate_std": statistics.stdev(estimates) if repeats > 1 else 0.0,
            "grad_snr_encoder": snr_encoder,
            "grad_snr_decoder": snr_decoder,
            "grad_variance_encoder": var_encoder,
            "grad_variance_decoder": var_decoder,
            "seconds_per_step": statistics.median(seconds),
            "repeats": repeats,
            "grad_samples": grad_samples,
            "num_images": len(images),
        })
    return records


def _trainable(modules):
    """The parameters of ``modules`` that require a gradient, each once (a part may share one)."""
    seen = set()
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield p


def _estimates(vae, estimator, images: torch.Tensor, repeats: int, batch_size: int, seed: int) -> list[float]:
    """The estimate in nats per image, once per pass over ``images`` (pass ``r`` seeded as
    :func:`compare_estimators` says)."""
    estimates = []
    for repeat in range(repeats):
        with seeded(SEEDS_PER_CALL * seed + repeat, images.device), torch.no_grad():
            total = sum(estimator.loss(vae.model_body, vae.guide_body, images[i : i + batch_size])
                        for i in range(0, len(images), batch_size))
        estimates.append(-float(total) / len(images))  # Pyro's losses are floats or 0-d tensors
    return estimates


def _gradient_draws(vae, estimator, batch: torch.Tensor, encoder: list, decoder: list, grad_samples: int,
                    seed: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """``grad_samples`` draws of the per-image loss's gradient on ``batch``: the encoder's and
    the decoder's parameters as ``(grad_samples, parameters)`` tensors, and each draw's seconds.
    Each draw sums the gradients of chunks of ``chunk`` images (the loss is a sum over images),
    so only one chunk's graph is held at a time."""
    grads_encoder, grads_decoder, seconds = [], [], []
    n_encoder = sum(p.numel() for p in encoder)
    params = encoder + decoder
    for sample in range(grad_samples):
        with seeded(SEEDS_PER_CALL * seed + GRADIENT_SEEDS + sample, batch.device):
            started = time.perf_counter()
            grads = None
            for i in range(0, len(batch), chunk):
                loss = estimator.differentiable_loss(vae.model_body, vae.guide_body, batch[i : i + chunk]) / len(batch)
                part = _flat_grads(loss, params) if params else torch.zeros(0)
                grads = part if grads is None else grads + part
            seconds.append(time.perf_counter() - started)
        grads_encoder.append(grads[:n_encoder])
        grads_decoder.append(grads[n_encoder:])
    return torch.stack(grads_encoder), torch.stack(grads_decoder), seconds


def compare_label_estimators(vae, images: torch.Tensor, ways=LABELS_BY, repeats: int = 5, grad_samples: int = 20,
                             grad_batch: int = 256, batch_size: int = 500, seed: int = 0, temperature: float = 0.5,
                             grad_chunk_rows: int = GRADIENT_CHUNK_ROWS) -> list[dict]:
    """How a semi-supervised VAE's latent label is handled, compared as :func:`compare_estimators`
    compares estimators of z: for each way of :data:`~pyro_vae.config.LABELS_BY` (``y`` summed
    out by enumeration, sampled with the score function, or relaxed at ``temperature``), the
    bound on ``images`` taken as unlabelled (nats per image, mean and standard deviation over
    ``repeats`` passes), the signal-to-noise ratio of the gradient for the classifier q(y|x)
    and for the decoder over ``grad_samples`` draws on ``grad_batch`` images, and the seconds
    per step. Enumeration has no noise from ``y`` and costs one decoder pass per class; the
    relaxed bound is another bound (of the relaxed model), so its value differs. Seeds as in
    :func:`compare_estimators`; memory bounded by ``batch_size`` and ``grad_chunk_rows`` (for
    enumeration, rows times classes).

    :param vae: a semi-supervised :class:`~pyro_vae.labelled.LabelledVAE`.
    """
    if not getattr(vae, "semi_supervised", False):
        raise ValueError("compare_label_estimators needs a semi-supervised VAE (a classifier q(y|x) and a latent y)")
    classifier = [p for p in vae.classifier.parameters() if p.requires_grad]
    decoder = [p for p in [*vae.decoder.parameters(), *vae.likelihood.parameters()] if p.requires_grad]
    records = []
    for way in ways:
        estimator = make_label_elbo(way)

        def program(function, way=way):
            # the way and temperature reach both programs, as beta does
            return lambda x: function(x, labels_by=way, temperature=temperature)

        bound = _ProgramPair(program(vae.model_body), program(vae.guide_body))
        estimates = _estimates(bound, estimator, images, repeats, batch_size, seed)
        rows = grad_chunk_rows // vae.num_classes if way == "enumerate" else grad_chunk_rows
        grads_classifier, grads_decoder, seconds = _gradient_draws(bound, estimator, images[:grad_batch], classifier,
                                                                   decoder, grad_samples, seed, max(1, rows))
        snr_classifier, var_classifier = _snr(grads_classifier)
        snr_decoder, var_decoder = _snr(grads_decoder)
        records.append({
            "estimator": way,
            "estimate": statistics.mean(estimates),
            "estimate_std": statistics.stdev(estimates) if repeats > 1 else 0.0,
            "grad_snr_classifier": snr_classifier,
            "grad_snr_decoder": snr_decoder,
            "grad_variance_classifier": var_classifier,
            "grad_variance_decoder": var_decoder,
            "seconds_per_step": statistics.median(seconds),
            "repeats": repeats,
            "grad_samples": grad_samples,
            "num_images": len(images),
            "temperature": temperature if way == "gumbel_softmax" else None,
        })
    return records


class _ProgramPair:
    """A model and a guide under the names the helpers above read (``model_body``, ``guide_body``)."""

    def __init__(self, model_body, guide_body):
        self.model_body, self.guide_body = model_body, guide_body


def train_side_by_side(config, splits, out_dir, estimators=DEFAULT_TRAINING_ESTIMATORS, num_samples: int = 1000,
                       progress: bool = False, seed: int = 0, plugins=()) -> tuple[list[dict], dict]:
    """Train ``config`` once per estimator (same epochs and seed), then evaluate each.

    ``plugins``: recorded with each run, as :func:`~pyro_vae.train.fit` does.

    Returns one record per estimator (final test log-likelihood and ELBO) and the training
    histories by estimator. Runs go to ``out_dir/<estimator>``; a finished one is reused.
    Training draws with ``config.train.seed``, evaluation (:func:`~pyro_vae.elbo.evaluate`)
    with ``seed``; the caller's random state (torch, Python's and NumPy's) is left as it was.
    """
    test = prepare(splits.test, config.data.binarize)
    records, histories = [], {}
    for spec in estimators:
        name, k = parse_estimator(spec)
        variant = config.replace(**{"objective.elbo": name, "objective.num_particles": k})
        run_dir = Path(out_dir) / spec.replace(":", "_k")
        checkpoint = load_checkpoint(run_dir) if (run_dir / "checkpoint.pt").exists() else None
        result = fit(variant, splits, run_dir=run_dir, checkpoint=checkpoint, progress=progress, plugins=plugins)
        scores = evaluate(result.vae, test, num_samples=num_samples, seed=seed)
        histories[spec] = result.history
        records.append({
            "estimator": spec,
            "epochs": len(result.history),
            "train_seconds": sum(r["seconds"] for r in result.history),
            "val_elbo": result.history[-1]["val_elbo"] if result.history else None,
            "test_elbo": scores["test_elbo"],
            "test_log_likelihood": scores["test_log_likelihood"],
            "eval_num_samples": num_samples,
        })
    return records, histories
