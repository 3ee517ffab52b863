"""ELBO estimators by name, and evaluation: the ELBO and the importance-sampled log-likelihood.

Training uses the estimators of :func:`make_elbo`: Pyro's, and those of
:mod:`pyro_vae.estimators` (the IWAE bound, and two with less noisy guide gradients: ``stl``,
``iwae_dreg``), which are :class:`pyro.infer.ELBO` subclasses. Evaluation computes per-image
numbers from the VAE's own densities (``encode``, ``decode``, ``prior``), in chunks, without gradients.

References:
    Burda, Grosse & Salakhutdinov (2015), Importance Weighted Autoencoders: the
    importance-sampled estimate of log p(x) used to compare VAEs (with K = 5000).
    Roeder, Wu & Duvenaud (2017), Sticking the Landing (``stl``).
    Tucker, Lawson, Gu & Maddison (2018), Doubly Reparameterized Gradient Estimators for Monte
    Carlo Objectives (``iwae_dreg``).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from .estimators import DReG_IWAE_ELBO, IWAE_ELBO, STL_ELBO
from .guides import representative_code
from .likelihoods import fused_log_prob
from .seeding import seeded


# Pyro's JIT variants are not offered: on the default MLP VAE, JitTrace_ELBO with these
# networks was several times slower per step than Trace_ELBO (docs/results.md).
ELBOS = {
    "mc": Trace_ELBO,  # Monte Carlo estimate of every term
    "analytic": TraceMeanField_ELBO,  # closed-form KL where known
    "iwae": IWAE_ELBO,  # importance-weighted bound with num_particles samples per image
    "stl": STL_ELBO,  # the ELBO; the guide's gradient without its score-function term
    "iwae_dreg": DReG_IWAE_ELBO,  # the IWAE bound; doubly reparameterized guide gradient
}

#: The estimators whose value is the K-sample IWAE bound (K = num_particles), not the ELBO.
IWAE_BOUNDS = frozenset({"iwae", "iwae_dreg"})

#: Upper bound on the elements of one decoded chunk (samples x images x pixels), unless one
#: group of the largest bound's K needs more. 2**22 float32 values are 16 MiB: the decoder's
#: output stays in the CPU's caches for the elementwise passes of log p(x|z) that follow it.
#: ``benchmarks/evaluate.py`` measures it: larger chunks were slower, smaller ones gained
#: nothing (docs/results.md).
MAX_CHUNK_ELEMENTS = 2**22

#: Decoded values (samples x images x values of a datum) from which :func:`evaluate` on a CPU
#: scores Bernoulli pixels by a compiled kernel (:func:`~pyro_vae.likelihoods.fused_log_prob`).
#: Compiling costs seconds once; the kernel saves a little per value (``benchmarks/evaluate.py``
#: measures both; docs/results.md has the figures). The threshold is where the two about
#: cancel: K = 1000 on the 10,000 MNIST test images is 7.8 x 10^9 values and pays, while
#: smaller evaluations, the tests', stay eager.
FUSE_MIN_ELEMENTS = 2**32


def make_elbo(name: str = "mc", num_particles: int = 1):
    """An estimator with ``differentiable_loss(model, guide, *args, **kwargs)``, by name:
    ``"mc"`` (``Trace_ELBO``), ``"analytic"`` (``TraceMeanField_ELBO``), ``"iwae"``
    (:class:`IWAE_ELBO` with K = ``num_particles``), and two with the gradients of the same
    bounds made less noisy: ``"stl"`` (:class:`STL_ELBO`, the ELBO) and ``"iwae_dreg"``
    (:class:`DReG_IWAE_ELBO`, the IWAE bound).

    Several particles are drawn as one vectorized batch. The model has one plate, "data"
    (``max_plate_nesting = 1``, so no estimator runs the model first to find its plates).
    """
    if name not in ELBOS:
        raise ValueError(f"unknown ELBO estimator {name!r}; choose one of {sorted(ELBOS)}")
    if ELBOS[name] in (Trace_ELBO, TraceMeanField_ELBO):  # Pyro's, which vectorize only when asked
        return ELBOS[name](num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)
    return ELBOS[name](num_particles=num_particles, max_plate_nesting=1)


def _device_of(vae) -> torch.device:
    tensor = next(itertools.chain(vae.parameters(), vae.buffers()), None)  # a VAE may hold fixed buffers only
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def elbo_per_image(vae, x: torch.Tensor) -> torch.Tensor:
    """One-sample Monte Carlo ELBO of each image: ``log p(x|z) + log p(z) - log q(z|x)``, shape ``(B,)``.

    A model with more latent sites than z (a :class:`~pyro_vae.labelled.LabelledVAE`) gives
    its own bound by its ``elbo_per_image`` method."""
    own = getattr(vae, "elbo_per_image", None)
    if own is not None:
        return own(x)
    q = vae.encode(x)
    z = q.sample()
    return vae.decode(z).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)


@torch.no_grad()
def mean_elbo(vae, images: torch.Tensor, batch_size: int = 1000) -> float:
    """The one-sample ELBO averaged over ``images`` (nats per image), batches moved to ``vae``'s device."""
    device = _device_of(vae)
    total = sum(elbo_per_image(vae, images[i : i + batch_size].to(device)).sum().item()
                for i in range(0, len(images), batch_size))
    return total / len(images)


#: The IWAE bounds that evaluation reports besides the full-K estimate (Burda et al. 2015).
BOUND_KS = (1, 5, 50)


class Estimates(NamedTuple):
    """Per-image estimates in nats, each of shape ``(B,)``; ``elbo == reconstruction - kl``.

    ``bounds[K]`` estimates the K-sample IWAE bound: the mean, over the disjoint groups of K
    of the drawn samples, of each group's log-mean-exp weight (``bounds[1]`` is the ELBO).
    """

    log_likelihood: torch.Tensor
    elbo: torch.Tensor
    reconstruction: torch.Tensor  # E_q[log p(x|z)]
    kl: torch.Tensor  # E_q[log q(z|x) - log p(z)], unscaled (beta = 1)
    bounds: dict


def _elements_per_sample(prior, pixels: int) -> int:
    # a mixture prior evaluates every component at every z: (k, B, components, z_dim) values
    mixture = getattr(prior, "mixture_distribution", None)
    components = mixture.logits.shape[-1] if mixture is not None else 1
    return pixels + components * prior.event_shape[-1]


def _chunk_size(prior, x: torch.Tensor, num_samples: int, ks: list[int]) -> int:
    """Samples of z per chunk for the batch ``x``: under :data:`MAX_CHUNK_ELEMENTS` elements,
    a multiple of every K in ``ks`` (whole groups for the bounds), at least one group."""
    group = math.lcm(*ks) if ks else 1
    per_sample = x.shape[0] * _elements_per_sample(prior, x[0].numel())
    chunk = max(1, min(num_samples, MAX_CHUNK_ELEMENTS // per_sample))
    return max(group, chunk - chunk % group)


@torch.no_grad()
def importance_sampled(vae, x: torch.Tensor, num_samples: int, bound_ks=BOUND_KS) -> Estimates:
    """Importance-sampled log-likelihood and ELBO (split into its terms) of each image of ``x``.

    With log weights ``w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x)`` for ``z_k ~ q(z|x)``:
    ``log p(x) ~= logsumexp_k w_k - log K`` (a stochastic lower bound that tightens as K
    grows) and ``ELBO ~= mean_k w_k``. Samples are drawn in chunks whose size stays under
    :data:`MAX_CHUNK_ELEMENTS`, so memory does not grow with K; chunks hold whole groups of
    every K in ``bound_ks`` (those up to ``num_samples``), for the bounds.
    """
    q = vae.encode(x)
    prior = vae.prior()
    ks = [k for k in bound_ks if k <= num_samples]
    chunk = _chunk_size(prior, x, num_samples, ks)
    zeros = torch.zeros(x.shape[:1], device=x.device)
    log_sum = torch.full(x.shape[:1], -math.inf, device=x.device)
    reconstruction, kl = zeros.clone(), zeros.clone()
    bound_sums, bound_groups = {k: zeros.clone() for k in ks}, {k: 0 for k in ks}
    for start in range(0, num_samples, chunk):
        z = q.sample((min(chunk, num_samples - start),))  # (k, B, z_dim)
        log_px_z = vae.decode(z).log_prob(x)  # (k, B)
        log_ratio = q.log_prob(z) - prior.log_prob(z)
        log_w = log_px_z - log_ratio
        log_sum = torch.logaddexp(log_sum, log_w.logsumexp(0))
        reconstruction += log_px_z.sum(0)
        kl += log_ratio.sum(0)
        for k in ks:
            groups = len(log_w) // k  # a last, partial group (num_samples not a multiple of k) is left out
            grouped = log_w[: groups * k].reshape(groups, k, log_w.shape[-1])
            bound_sums[k] += (grouped.logsumexp(1) - math.log(k)).sum(0)
            bound_groups[k] += groups
    reconstruction /= num_samples
    kl /= num_samples
    bounds = {k: bound_sums[k] / bound_groups[k] for k in ks if bound_groups[k]}
    return Estimates(log_sum - math.log(num_samples), reconstruction - kl, reconstruction, kl, bounds)


#: A latent dimension is active when Cov_x(E_q[z_d | x]) exceeds this (Burda et al. 2015); for a
#: guide without a mean (a flow) the deterministic code stands for E_q[z | x] (``VAE.code``).
ACTIVE_UNIT_THRESHOLD = 0.01


def kl_per_dimension(q, prior) -> torch.Tensor | None:
    """Closed-form ``KL(q(z_d|x) || p(z_d))`` of each latent dimension, shape ``(B, z_dim)``,
    when both are diagonal Gaussians (the KL then splits over dimensions); else ``None``.

    Both must be ``Normal(...).to_event(1)`` themselves: a flow's base is a diagonal Gaussian
    too, but the flow is not, so a ``TransformedDistribution`` gives ``None``."""
    def diagonal_normal(d) -> bool:
        return isinstance(d, torch.distributions.Independent) and isinstance(d.base_dist, torch.distributions.Normal)

    if not (diagonal_normal(q) and diagonal_normal(prior)):
        return None
    return torch.distributions.kl_divergence(q.base_dist, prior.base_dist)


@torch.no_grad()
def evaluate(vae, images: torch.Tensor, num_samples: int = 1000, batch_size: int = 100, progress: bool = False,
             seed: int = 0, compiled: bool | None = None) -> dict:
    """Test log-likelihood and ELBO (with its reconstruction and KL terms), in nats per image.

    All come from the same ``num_samples`` importance samples per image; the ELBO is the
    unweighted one (beta = 1), whatever beta trained the model. The samples are drawn from
    torch's generators seeded with ``seed`` (on ``vae``'s device) inside
    :func:`~pyro_vae.seeding.seeded`: the same seed gives the same numbers (those of
    ``torch.manual_seed(seed)`` before the call), and the caller's random state is left as it was.

    ``compiled``: score Bernoulli pixels by one compiled kernel
    (:func:`~pyro_vae.likelihoods.fused_log_prob`; other likelihoods are unaffected). ``None``
    (the default) compiles on a CPU from :data:`FUSE_MIN_ELEMENTS` decoded values on, where it
    pays; the two forms differ by the float32 rounding of the sum over the pixels (about 1e-4
    nats at a few hundred nats an image), and each is reproducible.

    A model with more latent sites than z (a :class:`~pyro_vae.hierarchical.HierarchicalVAE`)
    is evaluated by its own ``evaluate`` method, with the same arguments and keys.
    """
    own = getattr(vae, "evaluate", None)
    if own is not None:
        return own(images, num_samples=num_samples, batch_size=batch_size, progress=progress, seed=seed,
                   compiled=compiled)
    if num_samples < 1:
        raise ValueError(f"num_samples = {num_samples}: must be >= 1")
    if compiled not in (None, True, False):
        raise ValueError(f"compiled = {compiled!r}: must be True, False or None (decided by the size)")
    parts, z_locs, kls = [], [], []
    prior = vae.prior()
    bar = tqdm(total=len(images), desc=f"evaluate K={num_samples}", unit="img", disable=not progress)
    device = _device_of(vae)
    if compiled is None:
        compiled = device.type == "cpu" and num_samples * math.prod(images.shape) >= FUSE_MIN_ELEMENTS
    with seeded(seed, device), fused_log_prob(compiled):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            parts.append(importance_sampled(vae, x, num_samples))
            q = vae.encode(x)
            z_locs.append(representative_code(q))  # E[z|x] for the Gaussian; draws nothing
            kls.append(kl_per_dimension(q, prior))
            bar.update(len(x))
    bar.close()
    mean = {field: torch.cat([getattr(p, field) for p in parts]).mean().item() for field in Estimates._fields[:4]}
    bounds = {str(k): torch.cat([p.bounds[k] for p in parts]).mean().item() for k in parts[0].bounds}
    bounds[str(num_samples)] = mean["log_likelihood"]
    activity = torch.cat(z_locs).var(0)
    return {
        "test_elbo": mean["elbo"],
        "test_log_likelihood": mean["log_likelihood"],
        "test_reconstruction": mean["reconstruction"],
        "test_kl": mean["kl"],
        # None where the prior is not a diagonal Gaussian (mixture, VampPrior)
        "kl_per_dimension": None if kls[0] is None else torch.cat(kls).mean(0).tolist(),
        # which reported terms are in closed form; all others are importance-sampled
        "closed_form_terms": [] if kls[0] is None else ["kl_per_dimension"],
        "active_units": int((activity > ACTIVE_UNIT_THRESHOLD).sum()),
        # the K-sample importance-weighted bound for several K; the largest is test_log_likelihood
        "iwae_bounds": bounds,
        "num_samples": num_samples,
        "num_images": len(images),
    }
