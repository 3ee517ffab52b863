"""ELBO estimators by name, and evaluation: the ELBO and the importance-sampled log-likelihood.

Training uses the estimators of :func:`make_elbo`: Pyro's, the IWAE bound, and two with less
noisy guide gradients (``stl``, ``iwae_dreg``). Evaluation computes per-image numbers from the
VAE's own densities (``encode``, ``decode``, ``prior``), in chunks, without gradients.

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

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from .guides import representative_code
from .likelihoods import fused_log_prob
from .seeding import seeded


class IWAE_ELBO:
    """The importance-weighted bound of Burda et al. (2015), per datapoint, with K particles.

    ``log (1/K) sum_k p(x, z_k) / q(z_k|x)`` for each image, ``z_k ~ q(z|x)`` reparameterized,
    summed over the batch. K = 1 is the ELBO; the bound tightens towards log p(x) as K grows.
    Written out rather than Pyro's ``RenyiELBO(alpha=0)``: the logsumexp must run over the
    particles of each datapoint separately (Pyro issue #3104 questions whether RenyiELBO does
    so for models with local latents), and ``tests/test_elbo.py`` checks this one against a
    hand-written bound. Site scales (beta) and masks apply to the log weights as in the ELBO.

    :param num_particles: K, the importance samples per datapoint.
    :param max_plate_nesting: plates in the model; the particles get the next dimension left.
    """

    def __init__(self, num_particles: int = 5, max_plate_nesting: int = 1):
        self.num_particles = num_particles
        self.max_plate_nesting = max_plate_nesting

    def log_weights(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """``log p(x, z_k) - log q(z_k|x)`` with shape ``(K, B)``."""
        with pyro.plate("iwae_particles", self.num_particles, dim=-(self.max_plate_nesting + 1)):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        log_w = 0.0
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            trace.compute_log_prob()
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    log_w = log_w + sign * site["log_prob"]
        return log_w

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_w = self.log_weights(model, guide, *args, **kwargs)
        bound = log_w.logsumexp(0) - math.log(self.num_particles)
        return -bound.sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()


class _DetachedScores(NamedTuple):
    """The guide's draw and both programs' log-densities at a detached copy of it (or at the
    draw itself, for :func:`_score_at_detached_draws`'s ``stop_score_by_detaching``)."""

    z: torch.Tensor  # the latent site's reparameterized draw, its graph to the guide's parameters kept
    z0: torch.Tensor  # the same values as a leaf that requires grad, the densities scored there; or z itself
    log_p: torch.Tensor  # log p(x, z0), shape (K, B), scaled and masked as the model's sites
    log_q: torch.Tensor  # log q(z0|x), shape (K, B), scaled and masked as the guide's site


def _with_detached_parameters(fn):
    """A diagonal Gaussian ``fn`` (``Normal``, possibly expanded and ``Independent``) with its
    parameters detached, or None for any other family (a flow's parameters live in its
    transforms' networks, out of reach of a copy)."""
    event_dims = 0
    while isinstance(fn, torch.distributions.Independent):
        event_dims, fn = event_dims + fn.reinterpreted_batch_ndims, fn.base_dist
    if type(fn) not in (pyro.distributions.Normal, torch.distributions.Normal):
        return None
    return pyro.distributions.Normal(fn.loc.detach(), fn.scale.detach()).to_event(event_dims)


def _score_at_detached_draws(model, guide, num_particles: int, max_plate_nesting: int, args,
                             kwargs, stop_score_by_detaching: bool = False) -> _DetachedScores:
    """Draw K particles from the guide, then score model and guide at ``z0 = z.detach()``.

    The model is replayed at ``z0``, so its parameters get gradients at fixed z; ``log q(z0|x)``
    is the guide site's own distribution (``site["fn"]``, whatever its family) at ``z0``, so
    the guide's parameters reach the loss only through what the caller does with ``z``. For
    a flow guide ``fn.log_prob(z0)`` misses Pyro's transform cache (keyed on the drawn tensor,
    not on a copy) and inverts the flow: right, and slower (for an autoregressive flow, one
    network pass per latent dimension).

    ``stop_score_by_detaching``: where the guide's family allows it (a diagonal Gaussian),
    score both programs at ``z`` itself, ``log q`` from a copy of the guide's distribution with
    its parameters detached; ``z0`` is then ``z``. The gradient of ``log p - log q`` is already
    the path derivative (Roeder et al.'s own form), so one backward pass gives it, where the
    detached draw needs a second pass through the decoder for ``d log w / dz``.
    """
    with pyro.plate("iwae_particles", num_particles, dim=-(max_plate_nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        latents = [(name, site) for name, site in guide_trace.nodes.items()
                   if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)]
        # A second latent site's distribution may depend on the first draw, which would then
        # have to be replayed at z0 too; the VAEs here have one.
        if len(latents) != 1:
            raise ValueError(f"path-derivative estimators take a guide with one latent site; got "
                             f"{[name for name, _ in latents]}")
        (name, site), = latents
        if not site["fn"].has_rsample:
            raise ValueError(f"path-derivative estimators need a reparameterized guide; site {name!r} draws from "
                             f"{type(site['fn']).__name__}, which has no rsample")
        z = site["value"]
        frozen = _with_detached_parameters(site["fn"]) if stop_score_by_detaching else None
        if frozen is not None:
            z0, q, replayed = z, frozen, guide_trace
        else:
            z0, q = z.detach().requires_grad_(torch.is_grad_enabled()), site["fn"]
            replayed = guide_trace.copy()  # a copy of the node table: the guide's own node keeps z
            replayed.nodes[name] = {**site, "value": z0}
        model_trace = poutine.trace(poutine.replay(model, trace=replayed)).get_trace(*args, **kwargs)
    model_trace.compute_log_prob()
    log_p = sum(s["log_prob"] for s in model_trace.nodes.values() if s["type"] == "sample")
    log_q = scale_and_mask(q.log_prob(z0, *site["args"], **site["kwargs"]), site["scale"], site["mask"])
    return _DetachedScores(z, z0, log_p, log_q)


def _path_derivative_loss(scores: _DetachedScores, model_weights: torch.Tensor, path_weights: torch.Tensor,
                          bound: torch.Tensor) -> torch.Tensor:
    """``-bound`` in value; in gradient, ``-sum(model_weights * grad log p(x, z0))`` for the
    model's parameters and ``-sum(path_weights * d log w / dz) dz/dphi`` for the guide's.

    ``log w = log p(x, z0) - log q(z0|x)``. Its gradient in ``z0`` is taken here and detached,
    so ``log q``'s own dependence on the guide's parameters (the score-function term) never
    reaches the loss, and ``g . z`` carries ``g dz/dphi`` to them; the model's parameters see
    ``log p`` at fixed ``z0``. A parameter that the model and the guide share (a VampPrior's
    encoder) gets both parts. The weights, shape (K, B), must be detached.
    """
    surrogate = -(model_weights * scores.log_p).sum()
    log_w = scores.log_p - scores.log_q
    # Without autograd (evaluation) the value is all; a fully masked objective (beta = 0 and
    # reconstruction_weight = 0) leaves log w without a graph, and the guide nothing to learn.
    if torch.is_grad_enabled() and log_w.requires_grad:
        # retain_graph: the surrogate backpropagates through log p(x, z0) once more
        (g,) = torch.autograd.grad((path_weights * log_w).sum(), [scores.z0], retain_graph=True, allow_unused=True)
        if g is not None:
            surrogate = surrogate - (g * scores.z).sum()
    return surrogate - surrogate.detach() - bound.detach()


class STL_ELBO:
    """The ELBO with the "sticking the landing" gradient of Roeder, Wu & Duvenaud (2017).

    Value: ``-(1/K) sum_k log w_k`` summed over the batch, ``log w_k = log p(x, z_k) -
    log q(z_k|x)``, ``z_k ~ q(z|x)`` reparameterized: ``Trace_ELBO``'s estimate on the same
    draws. Gradient: ``Trace_ELBO``'s without the score-function term ``-grad_phi log q_phi(z)``
    at fixed z, whose expectation is zero; the guide's parameters get only the path derivative
    ``(1/K) sum_k d log w_k / dz_k dz_k/dphi``. The same expectation, and none of the noise that
    term adds: with the exact posterior as guide, ``log w`` is constant in z and the guide's
    gradient is exactly zero on every draw. Any reparameterized guide with one latent site;
    site scales (beta) and masks apply as in the ELBO. A diagonal Gaussian guide is scored at
    the draw with its parameters detached (one backward pass: 1.05x ``mc``'s step, measured by
    ``benchmarks/estimators.py``); another family at a detached copy of the draw, which takes
    ``d log w / dz`` in a second pass.

    :param num_particles: K, the draws per datapoint, as one vectorized batch.
    :param max_plate_nesting: plates in the model; the particles get the next dimension left.

    References:
        Roeder, Wu & Duvenaud (2017), Sticking the Landing: Simple, Lower-Variance Gradient
        Estimators for Variational Inference.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = 1):
        self.num_particles = num_particles
        self.max_plate_nesting = max_plate_nesting

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        scores = _score_at_detached_draws(model, guide, self.num_particles, self.max_plate_nesting, args, kwargs,
                                          stop_score_by_detaching=True)
        bound = (scores.log_p - scores.log_q).sum() / self.num_particles
        if scores.z0 is scores.z:  # scored at z with q's parameters detached: the gradient is STL's
            return -bound
        uniform = torch.full_like(scores.log_p, 1.0 / self.num_particles)
        return _path_derivative_loss(scores, uniform, uniform, bound)

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()


class DReG_IWAE_ELBO:
    """The IWAE bound with the doubly reparameterized gradient of Tucker, Lawson, Gu & Maddison.

    Value: :class:`IWAE_ELBO`'s bound ``log (1/K) sum_k w_k`` per datapoint, summed over the
    batch. Gradient, with normalized weights ``w~_k = w_k / sum_j w_j``: the model's parameters
    get IWAE's own ``sum_k w~_k grad_theta log p(x, z_k)``; the guide's get ``sum_k w~_k^2
    d log w_k / dz_k dz_k/dphi``, the path derivative with squared weights. It equals IWAE's
    guide gradient ``sum_k w~_k (d log w_k / dz_k dz_k/dphi - grad_phi log q_phi(z_k))`` in
    expectation: reparameterizing the score term once more gives ``E[sum_k w~_k grad_phi log
    q_phi(z_k)] = E[sum_k (w~_k - w~_k^2) d log w_k / dz_k dz_k/dphi]``, since ``dw~_k / dz_k =
    (w~_k - w~_k^2) d log w_k / dz_k``; and it drops that term's noise. IWAE's guide gradient
    has a signal-to-noise ratio that falls as O(1/sqrt(K)) (Rainforth et al. 2018); this one's
    rises, asymptotically as O(sqrt(K)) (not monotonically: ``tests/test_gradient_estimators.py``
    measured a dip between K = 1 and 100). Any reparameterized guide with one latent site; site
    scales (beta) and masks apply to the log weights as in the ELBO.

    :param num_particles: K, the importance samples per datapoint.
    :param max_plate_nesting: plates in the model; the particles get the next dimension left.

    References:
        Tucker, Lawson, Gu & Maddison (2018), Doubly Reparameterized Gradient Estimators for
        Monte Carlo Objectives (ICLR 2019).
        Rainforth et al. (2018), Tighter Variational Bounds are Not Necessarily Better.
    """

    def __init__(self, num_particles: int = 5, max_plate_nesting: int = 1):
        self.num_particles = num_particles
        self.max_plate_nesting = max_plate_nesting

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        scores = _score_at_detached_draws(model, guide, self.num_particles, self.max_plate_nesting, args, kwargs)
        log_w = (scores.log_p - scores.log_q).detach()
        weights = log_w.softmax(0)  # w~_k of each datapoint, over its particles
        bound = (log_w.logsumexp(0) - math.log(self.num_particles)).sum()
        return _path_derivative_loss(scores, weights, weights**2, bound)

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()


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

    Several particles are drawn as one vectorized batch. The model has one plate, "data".
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
    """One-sample Monte Carlo ELBO of each image: ``log p(x|z) + log p(z) - log q(z|x)``, shape ``(B,)``."""
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
    """
    if num_samples < 1:
        raise ValueError(f"num_samples = {num_samples}: must be >= 1")
    if compiled not in (None, True, False):
        raise ValueError(f"compiled = {compiled!r}: must be True, False or None (decided by the size)")
    parts, z_locs, kls = [], [], []
    prior = vae.prior()
    bar = tqdm(total=len(images), desc=f"evaluate K={num_samples}", unit="img", disable=not progress)
    device = _device_of(vae)
    if compiled is None:
        compiled = device.type == "cpu" and num_samples * images.numel() >= FUSE_MIN_ELEMENTS
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
