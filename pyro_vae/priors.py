"""Priors p(z): modules whose ``forward()`` returns the distribution of one latent vector.

The returned distribution has ``event_shape == (z_dim,)`` and no batch shape;
``pyro.plate("data", ...)`` broadcasts it over the data of a batch. A prior's constructor
takes ``z_dim`` and, if it needs them, the model's ``encoder``, ``image_shape`` (the shape of
one datum) and ``data_domain`` (what the likelihood accepts); its other keyword arguments are
its options (``model.prior_options`` in a config), and ``option_bounds`` states their allowed
range. Whether a prior has a closed-form KL is derived from torch's KL registry
(:func:`pyro_vae.components.has_closed_form_kl`), not declared. A prior of one's own is added
with :func:`pyro_vae.register_prior`, whose docstring is the contract.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from .contract import model_arguments


class DiagonalGaussianMixture(dist.MixtureSameFamily):
    """A mixture of diagonal Gaussians whose ``log_prob`` runs as matrix products.

    ``MixtureSameFamily.log_prob`` evaluates every component at every point elementwise, an
    ``(N, K, D)`` tensor: for a VampPrior with K = 500 and importance sampling with thousands of
    points per image, that dominated evaluation. Expanding the square,
    ``sum_d (z_d - m_kd)^2 / s_kd^2 = z^2 @ (1/s^2)^T - 2 z @ (m/s^2)^T + sum_d m_kd^2 / s_kd^2``
    gives ``(N, K)`` with two products, computed in float64 because the expanded terms are large
    and nearly cancel near a narrow component (tests compare it with torch's elementwise form).
    The fast path needs one set of ``(K, D)`` parameters, which ``expand`` (as ``pyro.plate``
    does) carries along; a mixture built from batched parameters falls back to torch's form.
    """

    def __init__(self, mixture_distribution, component_distribution, validate_args=None):
        super().__init__(mixture_distribution, component_distribution, validate_args=validate_args)
        base = component_distribution.base_dist
        # The unexpanded (K, D) parameters, carried through ``expand``: indexing them out of a
        # plate-expanded view would cost a backward pass that fills a zero tensor of the
        # expanded (N, K, D) shape (a fifth of a VampPrior step at batch 256, K = 500:
        # docs/results.md).
        self._shared = (base.loc, base.scale, mixture_distribution.logits) if base.loc.dim() == 2 else None

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiagonalGaussianMixture, _instance)
        new = super().expand(batch_shape, _instance=new)
        new._shared = self._shared
        return new

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        if self._shared is None:  # built from batched parameters: torch's elementwise form
            return super().log_prob(value)
        batch_shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        return self._shared_log_prob(value, *self._shared).expand(batch_shape)

    @staticmethod
    def _shared_log_prob(value, loc, scale, logits):
        loc, scale = loc.double(), scale.double()
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

    def __init__(self, z_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self):
        return dist.Normal(self.loc, self.scale).to_event(1)


class LearnedGaussian(nn.Module):
    """p(z) = N(loc, diag(scale^2)) with learned ``loc`` and ``scale`` (initially N(0, I))."""

    option_bounds: dict = {}

    def __init__(self, z_dim: int):
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

    def __init__(self, z_dim: int, num_components: int = 10):
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

    The pseudo-inputs have the shape of one datum (``image_shape``: an image or a vector) and
    live where the data does: in [0, 1] (a sigmoid of free parameters) when the likelihood
    accepts binary or unit-interval data, unconstrained when it accepts any real value
    (``data_domain = "real"``, e.g. standardized measurements, where a sigmoid would keep them
    away from most of the data). The prior shares the guide's encoder, so it changes as the
    encoder learns.

    :param z_dim: the latent dimension (unused: the encoder's output sets it).
    :param encoder: the VAE's encoder; held, not registered, so the VAE owns it once.
    :param image_shape: the shape of one datum: ``(C, H, W)`` or ``(D,)``.
    :param data_domain: what the likelihood accepts: ``"binary"``, ``"unit_interval"`` or ``"real"``.
    :param num_components: the number K of pseudo-inputs.

    Reference: Tomczak & Welling (2018), VAE with a VampPrior.
    """

    option_bounds = {"num_components": (1, True)}

    def __init__(self, z_dim: int, encoder=None, image_shape=None, data_domain: str = "unit_interval",
                 num_components: int = 500):
        super().__init__()
        if encoder is None or image_shape is None:
            raise ValueError("the VampPrior needs the encoder and the image shape")
        if data_domain not in ("binary", "unit_interval", "real"):
            raise ValueError(f"data_domain = {data_domain!r}: choose one of 'binary', 'unit_interval', 'real'")
        # held in a list so the encoder stays registered once, as the VAE's own module
        self._encoder = [encoder]
        self.unconstrained = data_domain == "real"
        # near grey 0.5 (or near 0, the mean of standardized data) with small noise; Tomczak &
        # Welling initialize near the data mean
        self.raw_pseudo_inputs = nn.Parameter(0.1 * torch.randn(num_components, *image_shape))

    def pseudo_inputs(self) -> torch.Tensor:
        """The K pseudo-inputs, ``(K, *image_shape)``."""
        return self.raw_pseudo_inputs if self.unconstrained else torch.sigmoid(self.raw_pseudo_inputs)

    def forward(self):
        loc, scale = self._encoder[0](self.pseudo_inputs())
        components = dist.Normal(loc, scale).to_event(1)
        weights = torch.zeros(loc.shape[0], device=loc.device)
        return DiagonalGaussianMixture(dist.Categorical(logits=weights), components)


#: prior name -> class; add one with :func:`pyro_vae.register_prior`.
PRIORS = {
    "standard_normal": StandardNormal,
    "learned_gaussian": LearnedGaussian,
    "mixture": Mixture,
    "vamp": VampPrior,
}


def make_prior(name: str, z_dim: int, encoder=None, image_shape=None, data_domain: str = "unit_interval",
               **options) -> nn.Module:
    """The prior ``name`` over ``z_dim`` latents, with its ``options``.

    ``encoder``, ``image_shape`` (the shape of one datum) and ``data_domain`` (the likelihood's
    ``accepts``) go to the priors that take them, such as the VampPrior, defined through the guide.
    """
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of {sorted(PRIORS)}")
    cls = PRIORS[name]
    given = {"z_dim": z_dim, "encoder": encoder, "image_shape": None if image_shape is None else tuple(image_shape),
             "data_domain": data_domain}
    return cls(**{k: given[k] for k in model_arguments(cls, "prior")}, **options)
