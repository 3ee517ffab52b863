"""Priors p(z): modules whose ``forward()`` returns the distribution of one latent vector.

The returned distribution has ``event_shape == (z_dim,)`` and no batch shape;
``pyro.plate("data", ...)`` broadcasts it over the images of a batch. Options
(``model.prior_options`` in a config) are the keyword arguments of a prior's constructor
after ``z_dim`` and ``encoder``; ``option_bounds`` states their allowed range.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F


class DiagonalGaussianMixture(dist.MixtureSameFamily):
    """A mixture of diagonal Gaussians whose ``log_prob`` runs as matrix products.

    ``MixtureSameFamily.log_prob`` evaluates every component at every point elementwise, an
    ``(N, K, D)`` tensor: for a VampPrior with K = 500 and importance sampling with thousands of
    points per image, that dominated evaluation. Expanding the square,
    ``sum_d (z_d - m_kd)^2 / s_kd^2 = z^2 @ (1/s^2)^T - 2 z @ (m/s^2)^T + sum_d m_kd^2 / s_kd^2``
    gives ``(N, K)`` with two products, computed in float64 because the expanded terms are large
    and nearly cancel near a narrow component (tests compare it with torch's elementwise form). ``pyro.plate`` expands the mixture without
    copying its ``(K, D)`` parameters; that case takes the fast path too, others fall back.
    """

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        base = self.component_distribution.base_dist
        loc, scale, logits = base.loc, base.scale, self.mixture_distribution.logits
        lead = loc.dim() - 2
        shared = all(stride == 0 for t in (loc, scale) for stride in t.stride()[:lead]) and all(
            stride == 0 for stride in logits.stride()[:lead]
        )
        if not shared:
            return super().log_prob(value)
        index = (0,) * lead
        loc, scale, logits = loc[index].double(), scale[index].double(), logits[index]
        z = value.double()
        precision = scale.pow(-2)
        squared = z.pow(2) @ precision.T - 2 * z @ (loc * precision).T + (loc.pow(2) * precision).sum(-1)
        log_normalizer = -scale.log().sum(-1) - 0.5 * loc.shape[-1] * math.log(2 * math.pi)
        log_components = (log_normalizer - 0.5 * squared).to(value.dtype)
        return (log_components + torch.log_softmax(logits, -1)).logsumexp(-1)


def _softplus_inverse(value: float) -> float:
    return torch.tensor(float(value)).expm1().log().item()


class StandardNormal(nn.Module):
    """p(z) = N(0, I). Loc and scale are buffers, so ``.to(device)`` moves them."""

    option_bounds: dict = {}
    has_closed_form_kl = True

    def __init__(self, z_dim: int, encoder=None, image_shape=None):
        super().__init__()
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self):
        return dist.Normal(self.loc, self.scale).to_event(1)


class LearnedGaussian(nn.Module):
    """p(z) = N(loc, diag(scale^2)) with learned ``loc`` and ``scale`` (initially N(0, I))."""

    option_bounds: dict = {}
    has_closed_form_kl = True

    def __init__(self, z_dim: int, encoder=None, image_shape=None):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(z_dim))
        self.raw_scale = nn.Parameter(torch.full((z_dim,), _softplus_inverse(1.0)))

    def forward(self):
        return dist.Normal(self.loc, F.softplus(self.raw_scale)).to_event(1)


class Mixture(nn.Module):
    """A mixture of ``num_components`` diagonal Gaussians with learned weights, means and scales.

    Means start spread out (standard normal draws), scales at 1, weights equal, so the
    components are distinct from the first step.
    """

    option_bounds = {"num_components": (1, True)}
    has_closed_form_kl = False

    def __init__(self, z_dim: int, encoder=None, image_shape=None, num_components: int = 10):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.locs = nn.Parameter(torch.randn(num_components, z_dim))
        self.raw_scales = nn.Parameter(torch.full((num_components, z_dim), _softplus_inverse(1.0)))

    def forward(self):
        components = dist.Normal(self.locs, F.softplus(self.raw_scales)).to_event(1)
        return DiagonalGaussianMixture(dist.Categorical(logits=self.logits), components)


class VampPrior(nn.Module):
    """The VampPrior: p(z) = (1/K) sum_k q(z | u_k), a uniform mixture of the guide's
    posteriors at K learned pseudo-inputs u_k (``num_components``).

    The pseudo-inputs live in [0, 1] like the data (a sigmoid of free parameters). The prior
    shares the guide's encoder, so it changes as the encoder learns.

    Reference: Tomczak & Welling (2018), VAE with a VampPrior.
    """

    option_bounds = {"num_components": (1, True)}
    has_closed_form_kl = False

    def __init__(self, z_dim: int, encoder=None, image_shape=None, num_components: int = 500):
        super().__init__()
        if encoder is None or image_shape is None:
            raise ValueError("the VampPrior needs the encoder and the image shape")
        # held in a list so the encoder stays registered once, as the VAE's own module
        self._encoder = [encoder]
        # start near grey 0.5 with small noise (Tomczak & Welling initialize near the data mean)
        self.raw_pseudo_inputs = nn.Parameter(0.1 * torch.randn(num_components, *image_shape))

    def pseudo_inputs(self) -> torch.Tensor:
        return torch.sigmoid(self.raw_pseudo_inputs)

    def forward(self):
        loc, scale = self._encoder[0](self.pseudo_inputs())
        components = dist.Normal(loc, scale).to_event(1)
        weights = torch.zeros(loc.shape[0], device=loc.device)
        return DiagonalGaussianMixture(dist.Categorical(logits=weights), components)


PRIORS = {
    "standard_normal": StandardNormal,
    "learned_gaussian": LearnedGaussian,
    "mixture": Mixture,
    "vamp": VampPrior,
}


def make_prior(name: str, z_dim: int, encoder=None, image_shape=None, **options) -> nn.Module:
    """The prior ``name`` over ``z_dim`` latents, with its ``options``.

    ``encoder`` and ``image_shape`` are needed by priors defined through the guide (VampPrior).
    """
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of {sorted(PRIORS)}")
    return PRIORS[name](z_dim, encoder=encoder, image_shape=image_shape, **options)
