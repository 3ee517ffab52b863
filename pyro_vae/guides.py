"""Guide families q(z|x): the encoder's output in, a Pyro distribution over one latent vector out.

The encoder maps a datum to ``(z_loc, z_scale)``; a guide family turns them into q(z|x). The
diagonal Gaussian ``Normal(z_loc, z_scale).to_event(1)`` is the default (``model.guide =
"gaussian"``); ``"iaf"`` pushes that Gaussian through inverse autoregressive flows conditioned
on the encoder (Kingma et al. 2016). A family is an ``nn.Module`` built with ``z_dim`` and its
options (``model.guide_options``), whose ``forward(z_loc, z_scale)`` returns a distribution
with batch shape ``(B,)`` and event shape ``(z_dim,)``; a family of one's own is added with
:func:`pyro_vae.register_guide`, whose docstring is the contract.

Whether ``objective.elbo = "analytic"`` can be used is derived, for a family and a prior, from
torch's KL registry (:func:`pyro_vae.components.has_closed_form_kl`): the Gaussian has a
closed-form KL against a Gaussian prior, a flow has none.

References:
    Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling (2016), Improving Variational
    Inference with Inverse Autoregressive Flow.
    Germain, Gregor, Murray & Larochelle (2015), MADE: Masked Autoencoder for Distribution
    Estimation (the autoregressive networks).
"""

from __future__ import annotations

import warnings

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

from .contract import ConfigError


class DiagonalGaussian(nn.Module):
    """q(z|x) = N(z_loc, diag(z_scale^2)): the amortized Gaussian of Kingma & Welling (2014).

    Its ``mean`` is ``z_loc``; its KL from a Gaussian prior has a closed form.
    """

    option_bounds: dict = {}

    def __init__(self, z_dim: int | None = None):
        super().__init__()  # nothing to learn: the encoder gives both parameters

    def forward(self, z_loc: torch.Tensor, z_scale: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(z_loc, z_scale).to_event(1)


class InverseAutoregressiveFlow(nn.Module):
    """The amortized Gaussian followed by ``num_flows`` inverse autoregressive flows.

    ``z_0 ~ N(z_loc, diag(z_scale^2))``, then ``z_t = mu_t + sigma_t * z_{t-1}`` (or, with
    ``stable``, ``sigma_t * z_{t-1} + (1 - sigma_t) * mu_t`` with ``sigma_t`` in (0, 1): eq. 14
    of Kingma et al. 2016), where ``mu_t, sigma_t`` come from a MADE network of ``z_{t-1}`` and
    of a context ``c(x)``, each output dimension seeing only the dimensions before it in the
    flow's order. Successive flows run through the dimensions in opposite orders (the
    permutation between flows), so every dimension can depend on every other after two flows.

    Sampling and scoring a sample just drawn take one pass per flow (Pyro's transforms cache
    the last sample's inverse); ``log_prob`` at any other ``z`` inverts each flow one
    dimension at a time, ``z_dim`` passes per flow: exact, but slow for large ``z_dim``.

    :param z_dim: the latent size.
    :param num_flows: flows after the Gaussian.
    :param hidden_dim: width of each flow's MADE network (its hidden layers); 0: ``10 * z_dim``,
        the default of Pyro's ``conditional_affine_autoregressive``. At least ``z_dim``.
    :param hidden_layers: hidden layers of each MADE network.
    :param stable: the gated update of Kingma et al. (2016, eq. 14) instead of the affine one.

    The context is ``c(x) = (z_loc, log z_scale)``, the encoder's own output, rather than a
    separate feature vector ``h`` of the encoder as in Kingma et al.: every encoder (built in
    or registered, whose contract is to return ``(z_loc, z_scale)``) then works with every
    guide family unchanged, the default Gaussian's networks and weights are untouched, and the
    flows still depend on ``x`` (through 2 z_dim numbers the encoder is trained to shape, since
    the gradient reaches it through the context too). The price: the context carries no more
    than the base Gaussian's parameters.

    Reference: Kingma et al. (2016), Improving Variational Inference with Inverse Autoregressive Flow.
    """

    option_bounds = {"num_flows": (1, True), "hidden_dim": (0, True), "hidden_layers": (1, True)}

    def __init__(self, z_dim: int, num_flows: int = 2, hidden_dim: int = 0, hidden_layers: int = 1,
                 stable: bool = False):
        super().__init__()
        self.check_options(z_dim, hidden_dim=hidden_dim)
        width = hidden_dim or 10 * z_dim
        forward_order, reverse_order = torch.arange(z_dim), torch.arange(z_dim).flip(0)
        with warnings.catch_warnings():
            # Pyro warns that in one dimension an affine map would do: that is what these flows
            # then are (conditioned on the context), so z_dim = 1 is allowed without the noise
            warnings.filterwarnings("ignore", message="ConditionalAutoRegressiveNN input_dim = 1")
            # a fixed order per flow (a buffer, so it moves with .to(device)), not Pyro's random
            # default: alternating orders are the permutation between flows, and building draws
            # nothing but the weights
            self.flows = nn.ModuleList(
                ConditionalAffineAutoregressive(
                    ConditionalAutoRegressiveNN(z_dim, 2 * z_dim, [width] * hidden_layers,
                                                permutation=reverse_order if t % 2 else forward_order),
                    stable=stable)
                for t in range(num_flows))

    @classmethod
    def check_options(cls, z_dim: int, hidden_dim: int = 0, **options) -> None:
        """Refuse options that fit their bounds but not ``z_dim``, without building the flows
        (config validation calls this before any data is read).

        :raises ConfigError: a MADE network narrower than ``z_dim``: it connects every output to
            the inputs before it through the hidden units, so it needs at least ``z_dim`` of them.
        """
        if (hidden_dim or 10 * z_dim) < z_dim:
            raise ConfigError(f"model.guide_options.hidden_dim = {hidden_dim}: the 'iaf' guide's networks need at "
                              f"least z_dim = {z_dim} hidden units (0: 10 * z_dim)")

    def forward(self, z_loc: torch.Tensor, z_scale: torch.Tensor) -> dist.TorchDistribution:
        context = torch.cat([z_loc, z_scale.log()], -1)
        base = dist.Normal(z_loc, z_scale).to_event(1)
        return dist.TransformedDistribution(base, [flow.condition(context) for flow in self.flows])


#: guide family name -> class; add one with :func:`pyro_vae.register_guide`.
GUIDES = {
    "gaussian": DiagonalGaussian,
    "iaf": InverseAutoregressiveFlow,
}


def make_guide(name: str, z_dim: int, **options) -> nn.Module:
    """The guide family ``name`` over ``z_dim`` latents, with its ``options``."""
    if name not in GUIDES:
        raise ValueError(f"unknown guide {name!r}; choose one of {sorted(GUIDES)}")
    return GUIDES[name](z_dim=z_dim, **options)


def representative_code(q: torch.distributions.Distribution) -> torch.Tensor:
    """A deterministic ``z`` standing for ``q(z|x)``, for plots and reconstructions: shape
    ``batch_shape + event_shape``.

    ``q.mean`` where the family has one (``z_loc`` for the Gaussian); for a transformed
    distribution, which has none, its base's code pushed through the transforms (for a flow
    that is the image of the base Gaussian's mean: not the mean of q, but a point of high
    density, deterministic and cheap). Applying the transforms replaces their cached last
    sample, so a sample drawn from ``q`` before this call is scored afterwards by inversion.
    """
    if isinstance(q, torch.distributions.TransformedDistribution):
        z = representative_code(q.base_dist)
        for transform in q.transforms:
            z = transform(z)
        return z
    return q.mean
