"""The VAE: Pyro ``model`` p(z) p(x|z) and ``guide`` q(z|x). The only place with ``pyro.sample``.

The parts are values handed in (encoder, decoder, likelihood head, prior), not subclasses:
swapping one is a different argument, see :func:`build_vae`.

References:
    Kingma & Welling (2014), Auto-Encoding Variational Bayes.
    Higgins et al. (2017), beta-VAE (the KL weight).
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .likelihoods import make_likelihood
from .networks import make_networks
from .priors import make_prior

#: Names of the sample sites and the plate, for code that inspects traces.
LATENT = "z"
OBSERVED = "x"
PLATE = "data"


def site_weight(weight: float):
    """The effect that weights the log-densities of the sites inside it by ``weight``.

    ``poutine.scale`` refuses a zero factor, so ``weight = 0`` masks the sites instead.
    """
    if weight == 1:
        return contextlib.nullcontext()
    if weight == 0:
        return poutine.mask(mask=False)
    return poutine.scale(scale=weight)


def latent_weight(beta: float):
    """The effect that weights the latent site's log-densities by ``beta``.

    Used in both model and guide, so the KL term ``E_q[log q(z|x) - log p(z)]`` is scaled
    as a whole: ``Trace_ELBO`` reads each side's scale from its own trace, while
    ``TraceMeanField_ELBO`` takes the guide's for its closed-form KL, so a scale on one side
    only would make the two estimators optimize different objectives. ``beta = 0`` masks
    the site (reconstruction term only).
    """
    return site_weight(beta)


class VAE(nn.Module):
    """A variational autoencoder with an amortized diagonal Gaussian guide.

    :param encoder: module mapping ``x`` of shape ``(B, C, H, W)`` to ``(z_loc, z_scale)``,
        each ``(B, z_dim)``.
    :param decoder: module mapping ``z`` of shape ``(..., z_dim)`` to features ``(..., C, H, W)``.
    :param likelihood: module mapping decoder features to p(x|z), one event per image.
    :param prior: module whose ``forward()`` returns p(z) with event shape ``(z_dim,)``.

    ``model(x)`` and ``guide(x)`` register their parameters with ``pyro.module``, so they
    work with Pyro's ``SVI`` and ``pyro.optim`` as they are (call ``pyro.clear_param_store()``
    before training a second VAE that way: the store is keyed by name). :func:`pyro_vae.fit`
    uses ``model_body`` / ``guide_body``, the same programs without the registration, and
    optimizes ``self.parameters()`` with a torch optimizer.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: nn.Module, prior: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.prior_net = prior

    def prior(self) -> dist.TorchDistribution:
        """p(z): event shape ``(z_dim,)``."""
        return self.prior_net()

    def encode(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z|x): a diagonal Gaussian with batch shape ``(B,)`` and event shape ``(z_dim,)``."""
        z_loc, z_scale = self.encoder(x)
        return dist.Normal(z_loc, z_scale).to_event(1)

    def decode(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x|z) for ``z`` of shape ``(..., z_dim)``: batch shape ``(...)``, one image per event."""
        return self.likelihood(self.decoder(z))

    def model(self, x: torch.Tensor, beta: float = 1.0, reconstruction_weight: float = 1.0) -> torch.Tensor:
        """p(z) p(x|z) for a batch ``x`` of shape ``(B, C, H, W)``.

        ``beta`` weights the latent site (the KL term), ``reconstruction_weight`` the observed
        one (log p(x|z)); both are 1 for the ELBO itself.
        """
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        pyro.module("prior", self.prior_net)
        return self.model_body(x, beta, reconstruction_weight)

    def guide(self, x: torch.Tensor, beta: float = 1.0, reconstruction_weight: float = 1.0) -> torch.Tensor:
        """q(z|x) for a batch ``x`` of shape ``(B, C, H, W)``; the same arguments as the model."""
        pyro.module("encoder", self.encoder)
        return self.guide_body(x, beta)

    # The bodies without the pyro.module registration. fit() steps self.parameters() with a
    # torch optimizer, so it has no use for the global param store; skipping the registration
    # saved about 0.3-0.4 ms of a 7 ms step here and leaves the store as the user had it.
    def model_body(self, x: torch.Tensor, beta: float = 1.0, reconstruction_weight: float = 1.0) -> torch.Tensor:
        with pyro.plate(PLATE, x.shape[0]):
            with latent_weight(beta):
                z = pyro.sample(LATENT, self.prior())
            with site_weight(reconstruction_weight):
                pyro.sample(OBSERVED, self.decode(z), obs=x)
        return z

    # reconstruction_weight is the model's business; the guide takes it because SVI hands
    # both programs the same arguments.
    def guide_body(self, x: torch.Tensor, beta: float = 1.0, reconstruction_weight: float = 1.0) -> torch.Tensor:
        with pyro.plate(PLATE, x.shape[0]):
            with latent_weight(beta):
                return pyro.sample(LATENT, self.encode(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z) at ``z = z_loc(x)``, shape of ``x``."""
        return self.decode(self.encode(x).mean).mean

    @torch.no_grad()
    def sample_images(self, num_samples: int) -> torch.Tensor:
        """Means of p(x|z) for ``z`` drawn from the prior: ``(num_samples, C, H, W)``."""
        z = self.prior().sample((num_samples,))
        return self.decode(z).mean


def build_vae(model_config, image_shape) -> VAE:
    """A :class:`VAE` from a :class:`pyro_vae.config.ModelConfig` and the data's image shape."""
    encoder, decoder = make_networks(
        model_config.arch, image_shape, model_config.z_dim, model_config.hidden_dim, model_config.num_layers
    )
    likelihood = make_likelihood(model_config.likelihood, image_shape, **model_config.likelihood_options)
    prior = make_prior(model_config.prior, model_config.z_dim, encoder=encoder, image_shape=tuple(image_shape),
                       **model_config.prior_options)
    return VAE(encoder, decoder, likelihood, prior)
