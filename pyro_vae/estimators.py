"""ELBO estimators that Pyro lacks, as :class:`pyro.infer.ELBO` subclasses: the IWAE bound,
and two estimators with less noisy guide gradients, STL and DReG.

They work in stock :class:`pyro.infer.SVI` on any model whose latent sites are
reparameterized (several sites, nested plates, subsampling, ``poutine.scale`` and masks)::

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=STL_ELBO(num_particles=4))
    svi.step(data)

and the model need not be a VAE. A site they cannot handle (one that is not reparameterized,
an enumerated one, a guide site the model lacks, a model latent the guide lacks) is refused
with one line naming it.

**The bound follows the plates.** The K particles are K draws of every latent. The IWAE
bound ``log (1/K) sum_k w_k`` is taken separately for each element of a plate only where
every site of model and guide lies in that plate, so that p and q factorize over its
elements (a VAE's data plate); over any other plate the log weights are summed first, since a
latent outside it is shared by its elements and the per-element logsumexp would not bound
log p(x). Subsampling scales of a kept plate multiply the per-element bounds; other scales
(``poutine.scale``, such as beta) weight the log densities inside the weights, as in the ELBO.

References:
    Burda, Grosse & Salakhutdinov (2015), Importance Weighted Autoencoders.
    Roeder, Wu & Duvenaud (2017), Sticking the Landing: Simple, Lower-Variance Gradient
    Estimators for Variational Inference.
    Tucker, Lawson, Gu & Maddison (2018), Doubly Reparameterized Gradient Estimators for Monte
    Carlo Objectives (ICLR 2019).
    Rainforth et al. (2018), Tighter Variational Bounds are Not Necessarily Better.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.util import site_is_subsample

from .seeding import probing

__all__ = ["IWAE_ELBO", "STL_ELBO", "DReG_IWAE_ELBO"]

#: The name of the plate that draws the particles side by side (Pyro's own ELBOs' name).
PARTICLES = "num_particles_vectorized"


class _Weights(NamedTuple):
    """The log densities of K particles, per element of the plates that every site lies in.

    ``log_p``, ``log_q``: shape ``(K, *kept)`` (1 in the dimensions summed over), scaled and
    masked as their sites, the kept plates' subsampling factor divided out; ``scale``: that
    factor, which multiplies each element's bound. ``latents``: the guide's latent draws,
    ``{name: value}``; ``leaves``: the detached copies the densities were scored at, if any.
    """

    log_p: torch.Tensor
    log_q: torch.Tensor
    scale: float
    latents: dict
    leaves: dict


class _ParticleELBO(ELBO):
    """What the three estimators share: K particles per step, drawn side by side in one plate
    (``vectorize_particles``, the default) or one after another; the sites checked; the log
    weights reduced along the model's plates (see the module's docstring).

    :param num_particles: K, the draws of every latent per step.
    :param max_plate_nesting: the model's plates, not counting the particles' (unlike Pyro's
        own ELBOs, whose count includes it); ``inf``: found by running model and guide once.
    :param vectorize_particles: draw the K particles as one batch, in a plate left of the
        model's; ``False``: K runs of model and guide, their weights stacked.
    :param retain_graph: passed to ``backward`` by :meth:`loss_and_grads`.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: float = float("inf"),
                 vectorize_particles: bool = True, retain_graph: bool | None = None):
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles = {num_particles!r}: must be an integer >= 1")
        # the base would add one plate for the particles to max_plate_nesting; here it stays the model's count
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=False, retain_graph=retain_graph)
        self.vectorize_particles = vectorize_particles

    # -- Pyro's ELBO interface -------------------------------------------------------------------

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The estimate of the negative bound, as a number."""
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss as a number, its gradient accumulated into every parameter it reaches (what
        :class:`pyro.infer.SVI` calls before its optimizer steps)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return loss.item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError  # each estimator's own

    def _get_trace(self, model, guide, args, kwargs):
        """One draw: the guide's trace and the model's replayed on it (Pyro's ELBO interface)."""
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        return model_trace, guide_trace

    # -- the particles ---------------------------------------------------------------------------

    def _nesting(self, model, guide, args, kwargs) -> int:
        if self.max_plate_nesting == float("inf"):
            # a look at the plates, on a private random stream: the caller's draws stay as they were
            with poutine.block(), probing():
                model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
            dims = [frame.dim for trace in (model_trace, guide_trace) for site in trace.nodes.values()
                    if site["type"] == "sample" for frame in site["cond_indep_stack"] if frame.vectorized]
            self.max_plate_nesting = -min(dims) if dims else 0
        return int(self.max_plate_nesting)

    def _draws(self, model, guide, args, kwargs, detach: bool = False, one_pass: bool = False) -> list[_Weights]:
        """The particles' weights: one :class:`_Weights` of K particles when vectorized, else K of one.

        ``detach``: score model and guide at detached copies of the latent draws, leaves that
        require grad (what the path-derivative estimators differentiate); the draws keep their
        graph to the guide's parameters in ``latents``. ``one_pass``: where the guide has one
        latent site drawn from a diagonal Gaussian, score both programs at the draw itself
        instead, ``log q`` from a copy of its distribution with the parameters detached
        (``leaves`` then stays empty): the gradient of ``log p - log q`` is then already the
        path derivative, in one backward pass, where the detached copy needs a second pass
        through the model for ``d log w / dz``.
        """
        nesting = self._nesting(model, guide, args, kwargs)
        if not self.vectorize_particles:
            return [self._draw(model, guide, args, kwargs, nesting, None, detach, one_pass)
                    for _ in range(self.num_particles)]
        with pyro.plate(PARTICLES, self.num_particles, dim=-(nesting + 1)):
            return [self._draw(model, guide, args, kwargs, nesting, -(nesting + 1), detach, one_pass)]

    def _draw(self, model, guide, args, kwargs, nesting: int, particle_dim: int | None, detach: bool,
              one_pass: bool) -> _Weights:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        _check_guide_sites(type(self).__name__, guide_trace)
        latents = {name: site["value"] for name, site in guide_trace.nodes.items() if _is_latent(site)}
        leaves = {}
        frozen = _with_detached_parameters(guide_trace.nodes[next(iter(latents))]["fn"]) \
            if detach and one_pass and len(latents) == 1 else None
        if frozen is not None:
            name = next(iter(latents))
            scored = guide_trace.copy()  # a copy of the node table: the guide's own node keeps its fn
            scored.nodes[name] = {**guide_trace.nodes[name], "fn": frozen}
            guide_trace = scored
        elif detach:
            leaves = {name: z.detach().requires_grad_(torch.is_grad_enabled()) for name, z in latents.items()}
            if len(latents) > 1:  # a later site's distribution may depend on an earlier draw: rerun at the leaves
                guide_trace = poutine.trace(poutine.replay(guide, trace=_with_values(guide_trace, leaves))
                                            ).get_trace(*args, **kwargs)
            else:  # one site: its distribution is the one that drew, scored at the leaf below
                guide_trace = _with_values(guide_trace, leaves)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        _check_pairing(type(self).__name__, model_trace, guide_trace)
        log_p, log_q, scale = _reduce_along_plates(model_trace, guide_trace, nesting, particle_dim)
        return _Weights(log_p, log_q, scale, latents, leaves)

    def _weights(self, model, guide, args, kwargs, detach: bool = False, one_pass: bool = False) -> _Weights:
        """All K particles in one :class:`_Weights`, the particles in the first dimension."""
        draws = self._draws(model, guide, args, kwargs, detach, one_pass)
        if len(draws) == 1 and self.vectorize_particles:
            return draws[0]
        stack = lambda key: torch.stack([getattr(d, key) for d in draws])  # noqa: E731
        return _Weights(stack("log_p"), stack("log_q"), draws[0].scale,
                        {name: [d.latents[name] for d in draws] for name in draws[0].latents},
                        {name: [d.leaves[name] for d in draws] for name in draws[0].leaves})


def _is_latent(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def _with_values(trace, values: dict):
    """A copy of ``trace``'s node table with the sites of ``values`` holding those values (the
    original trace, and the draws in it, are left as they were)."""
    copy = trace.copy()
    for name, value in values.items():
        copy.nodes[name] = {**trace.nodes[name], "value": value}
    return copy


def _check_guide_sites(estimator: str, guide_trace) -> None:
    """Refuse, with one line naming the site, a guide latent these estimators cannot draw and weigh."""
    for name, site in guide_trace.nodes.items():
        if not _is_latent(site):
            continue
        if site["infer"].get("enumerate"):
            raise ValueError(f"{estimator}: guide site {name!r} is enumerated; these estimators draw every latent "
                             "(use pyro.infer.TraceEnum_ELBO to sum it out)")
        if not site["fn"].has_rsample:
            raise ValueError(f"{estimator}: guide site {name!r} draws from {type(site['fn']).__name__}, which has no "
                             "reparameterized sampler (rsample)")


def _check_pairing(estimator: str, model_trace, guide_trace) -> None:
    """Refuse, with one line naming the site, a guide latent the model lacks, or the reverse."""
    model_latents = {name for name, site in model_trace.nodes.items() if _is_latent(site)}
    for name, site in guide_trace.nodes.items():
        if _is_latent(site) and name not in model_latents:
            raise ValueError(f"{estimator}: guide site {name!r} is not a latent site of the model (auxiliary guide "
                             "sites have no density in the model to weigh)")
    for name in model_latents:
        if name not in guide_trace.nodes:
            raise ValueError(f"{estimator}: model site {name!r} is latent but the guide does not sample it")


def _reduce_along_plates(model_trace, guide_trace, nesting: int, particle_dim: int | None):
    """``log p`` of the model's sample sites and ``log q`` of the guide's latent ones, each summed
    over the sites and over every plate dimension that not all sites lie in.

    :returns: ``(log_p, log_q, scale)``: each of shape ``(K, *batch)`` with the particles (when
        ``particle_dim`` is given) and ``nesting`` batch dimensions, 1 where summed; ``scale``
        is the product of the kept plates' subsampling factors, divided out of both.
    """
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    sites = ([site for site in model_trace.nodes.values() if site["type"] == "sample" and not site_is_subsample(site)],
             [site for site in guide_trace.nodes.values() if _is_latent(site)])
    frames = [{f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLES}
              for group in sites for site in group]
    kept = set.intersection(*frames) if frames else set()
    scale = math.prod(f.full_size / f.size for f in kept if f.full_size is not None)
    rank = nesting + (1 if particle_dim is not None else 0)
    keep = {f.dim for f in kept} | ({particle_dim} if particle_dim is not None else set())
    summed = [d for d in range(-rank, 0) if d not in keep]
    totals = []
    for group in sites:
        total = 0.0
        for site in group:
            log_prob = site["log_prob"]
            log_prob = log_prob.reshape((1,) * (rank - log_prob.dim()) + tuple(log_prob.shape))
            total = total + (log_prob.sum(summed, keepdim=True) if summed else log_prob)
        totals.append(total if scale == 1 else total / scale)
    log_p, log_q = (torch.as_tensor(t) for t in totals)
    return log_p, log_q, scale


def _path_derivative_loss(weights: _Weights, model_weights: torch.Tensor, path_weights: torch.Tensor,
                          bound: torch.Tensor) -> torch.Tensor:
    """``-bound`` in value; in gradient, ``-sum(model_weights * grad log p(x, z0))`` for the
    model's parameters and ``-sum(path_weights * d log w / dz) dz/dphi`` for the guide's.

    ``log w = log p(x, z0) - log q(z0|x)`` at the detached draws ``z0``. Its gradient in each
    ``z0`` is taken here and detached, so ``log q``'s own dependence on the guide's parameters
    (the score-function term) never reaches the loss, and ``g . z`` carries ``g dz/dphi`` to
    them, ``z``'s dependence on earlier draws included; the model's parameters see ``log p``
    at fixed ``z0``. A parameter that model and guide share (a VampPrior's encoder) gets both
    parts. The weights, shape (K, ...), must be detached.
    """
    surrogate = -(model_weights * weights.log_p).sum()
    log_w = weights.log_p - weights.log_q
    leaves, draws = _flat(weights.leaves), _flat(weights.latents)
    # Without autograd (evaluation) the value is all; a fully masked objective (beta = 0 and
    # reconstruction_weight = 0) leaves log w without a graph, and the guide nothing to learn.
    if torch.is_grad_enabled() and log_w.requires_grad:
        # retain_graph: the surrogate backpropagates through log p(x, z0) once more
        grads = torch.autograd.grad((path_weights * log_w).sum(), leaves, retain_graph=True, allow_unused=True)
        for g, z in zip(grads, draws):
            if g is not None:
                surrogate = surrogate - (g * z).sum()
    return surrogate - surrogate.detach() - bound.detach()


def _flat(values: dict) -> list:
    return [v for value in values.values() for v in (value if isinstance(value, list) else [value])]


def _with_detached_parameters(fn):
    """A diagonal Gaussian ``fn`` (``Normal``, possibly expanded and ``Independent``) with its
    parameters detached, or None for any other family (a flow's parameters live in its
    transforms' networks, out of reach of a copy)."""
    event_dims = 0
    while isinstance(fn, torch.distributions.Independent):
        event_dims, fn = event_dims + fn.reinterpreted_batch_ndims, fn.base_dist
    if type(fn) not in (dist.Normal, torch.distributions.Normal):
        return None
    return dist.Normal(fn.loc.detach(), fn.scale.detach()).to_event(event_dims)


class IWAE_ELBO(_ParticleELBO):
    """The importance-weighted bound of Burda et al. (2015) with K particles.

    ``log (1/K) sum_k p(x, z_k) / q(z_k|x)``, ``z_k ~ q(z|x)`` reparameterized, for each
    element of the plates every site lies in (each image of a VAE), summed; over plates that
    share a latent, the whole plate's weights (see the module's docstring). K = 1 is the ELBO;
    the bound tightens towards log p(x) as K grows. The gradient is the bound's own (IWAE's).

    Written out rather than Pyro's ``RenyiELBO(alpha=0)``, which takes one logsumexp over the
    particles of the whole model: right where a latent is shared by the plate, looser for a
    VAE, whose images each get their own.
    """

    def __init__(self, num_particles: int = 5, max_plate_nesting: float = float("inf"),
                 vectorize_particles: bool = True, retain_graph: bool | None = None):
        super().__init__(num_particles, max_plate_nesting, vectorize_particles, retain_graph)

    def log_weights(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """``log p(x, z_k) - log q(z_k|x)``, shape ``(K, *batch)``: the particles first, then the
        model's plate dimensions, 1 in those summed over (see the module's docstring), before
        the kept plates' subsampling factor."""
        weights = self._weights(model, guide, args, kwargs)
        return weights.log_p - weights.log_q

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        weights = self._weights(model, guide, args, kwargs)
        log_w = weights.log_p - weights.log_q
        bound = log_w.logsumexp(0) - math.log(self.num_particles)
        return -(weights.scale * bound.sum() if weights.scale != 1 else bound.sum())


class STL_ELBO(_ParticleELBO):
    """The ELBO with the "sticking the landing" gradient of Roeder, Wu & Duvenaud (2017).

    Value: ``-(1/K) sum_k log w_k`` summed over the plates, ``log w_k = log p(x, z_k) -
    log q(z_k|x)``, ``z_k ~ q(z|x)`` reparameterized: ``Trace_ELBO``'s estimate on the same
    draws. Gradient: ``Trace_ELBO``'s without the score-function term ``-grad_phi log q_phi(z)``
    at fixed z, whose expectation is zero; the guide's parameters get only the path derivative
    ``(1/K) sum_k d log w_k / dz_k dz_k/dphi``. The same expectation, and none of the noise that
    term adds: with the exact posterior as guide, ``log w`` is constant in z and the guide's
    gradient is exactly zero on every draw.

    A guide with one latent site whose distribution is a diagonal Gaussian is scored at the draw
    with its parameters detached, one backward pass; any other guide at detached copies of the
    draws (the guide run again there when it has several sites, since a later site may depend
    on an earlier draw), which takes ``d log w / dz`` in a second pass (``benchmarks/estimators.py``
    times both forms).
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        weights = self._weights(model, guide, args, kwargs, detach=True, one_pass=True)
        bound = weights.scale * (weights.log_p - weights.log_q).sum() / self.num_particles
        if not _flat(weights.leaves):  # scored at z with q's parameters detached: the gradient is STL's
            return -bound
        uniform = torch.full_like(weights.log_p, weights.scale / self.num_particles)
        return _path_derivative_loss(weights, uniform, uniform, bound)


class DReG_IWAE_ELBO(_ParticleELBO):
    """The IWAE bound with the doubly reparameterized gradient of Tucker, Lawson, Gu & Maddison.

    Value: :class:`IWAE_ELBO`'s bound. Gradient, with normalized weights ``w~_k = w_k /
    sum_j w_j`` (per element of the kept plates): the model's parameters get IWAE's own
    ``sum_k w~_k grad_theta log p(x, z_k)``; the guide's get ``sum_k w~_k^2 d log w_k / dz_k
    dz_k/dphi``, the path derivative with squared weights. It equals IWAE's guide gradient
    ``sum_k w~_k (d log w_k / dz_k dz_k/dphi - grad_phi log q_phi(z_k))`` in expectation:
    reparameterizing the score term once more gives ``E[sum_k w~_k grad_phi log q_phi(z_k)] =
    E[sum_k (w~_k - w~_k^2) d log w_k / dz_k dz_k/dphi]``, since ``dw~_k / dz_k = (w~_k -
    w~_k^2) d log w_k / dz_k``; and it drops that term's noise. IWAE's guide gradient has a
    signal-to-noise ratio that falls as O(1/sqrt(K)) (Rainforth et al. 2018); this one's rises,
    asymptotically as O(sqrt(K)).
    """

    def __init__(self, num_particles: int = 5, max_plate_nesting: float = float("inf"),
                 vectorize_particles: bool = True, retain_graph: bool | None = None):
        super().__init__(num_particles, max_plate_nesting, vectorize_particles, retain_graph)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        weights = self._weights(model, guide, args, kwargs, detach=True)
        log_w = (weights.log_p - weights.log_q).detach()
        normalized = log_w.softmax(0)  # w~_k of each element, over its particles
        bound = weights.scale * (log_w.logsumexp(0) - math.log(self.num_particles)).sum()
        return _path_derivative_loss(weights, weights.scale * normalized, weights.scale * normalized**2, bound)
