"""A VAE whose log p(x) is known in closed form, for checking estimators against the truth.

The linear-Gaussian model (probabilistic PCA): ``z ~ N(0, I)`` and ``x ~ N(W z + b, s^2 I)``.
Its marginal is ``log p(x) = log N(x; b, W W^T + s^2 I)`` and its posterior is Gaussian,
``Cov = (I + W^T W / s^2)^-1``, ``mean = Cov W^T (x - b) / s^2`` (Bishop 2006, sec. 12.2).
With the exact posterior as guide every importance weight ``p(x, z) / q(z|x)`` equals
``p(x)``: the ELBO, every IWAE bound and the importance-sampled estimate are exact, with zero
variance. A distorted guide (shifted mean, inflated scale, or a diagonal guide for a
non-diagonal posterior) makes them lower bounds whose gaps are known.

The parts are the same kinds of modules :class:`~pyro_vae.model.VAE` takes from the registries
(encoder, decoder, likelihood head, prior), so estimators and evaluation run on it unchanged::

    >>> from pyro_vae.elbo import importance_sampled
    >>> vae, x, exact = linear_gaussian()
    >>> estimates = importance_sampled(vae, x, num_samples=7)
    >>> bool(torch.allclose(estimates.log_likelihood, exact, atol=1e-4))
    True

References:
    Tipping & Bishop (1999), Probabilistic Principal Component Analysis.
    Bishop (2006), Pattern Recognition and Machine Learning, chapter 12.2.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from .likelihoods import IMAGE_EVENT_DIM
from .model import VAE
from .priors import StandardNormal
from .seeding import seeded

#: The default problem: images of shape (1, 2, 3), so x_dim = 6, with z_dim = 2 and s = 0.5.
SHAPE = (1, 2, 3)
X_DIM, Z_DIM, NOISE = 6, 2, 0.5


class LinearDecoder(nn.Module):
    """``z`` of shape ``(..., z_dim)`` -> the mean ``W z + b`` as images ``(..., *image_shape)``.

    :param W: ``(x_dim, z_dim)``, with ``x_dim`` the number of pixels of ``image_shape``.
    :param b: ``(x_dim,)``.
    """

    def __init__(self, W: torch.Tensor, b: torch.Tensor, image_shape=SHAPE):
        super().__init__()
        self.W, self.b, self.image_shape = W, b, tuple(image_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.W.T + self.b).unflatten(-1, self.image_shape)


class GaussianPixels(nn.Module):
    """p(x|z): independent Gaussian pixels of fixed scale ``noise`` around the decoded mean."""

    def __init__(self, noise: float = NOISE):
        super().__init__()
        self.noise = noise

    def forward(self, loc: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(loc, self.noise).to_event(IMAGE_EVENT_DIM)


class PosteriorEncoder(nn.Module):
    """q(z|x): the exact posterior's mean and marginal scales, optionally distorted.

    ``x`` of shape ``(B, *image_shape)`` -> ``(z_loc, z_scale)``, each ``(B, z_dim)``. The guide
    is diagonal, so it is exact only when the posterior covariance is (``W`` with orthogonal
    columns). ``shift`` is added to the mean, ``inflate`` multiplies the scales.
    """

    def __init__(self, W: torch.Tensor, b: torch.Tensor, noise: float = NOISE, shift: float = 0.0, inflate: float = 1.0):
        super().__init__()
        self.W, self.b, self.noise, self.shift, self.inflate = W, b, noise, shift, inflate
        self.cov = torch.linalg.inv(torch.eye(W.shape[1]) + W.T @ W / noise**2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = (x.flatten(1) - self.b) @ self.W @ self.cov.T / self.noise**2
        scale = self.cov.diagonal().sqrt().expand_as(loc)
        return loc + self.shift, scale * self.inflate


def linear_gaussian(diagonal_posterior: bool = True, num_images: int = 50, shift: float = 0.0,
                    inflate: float = 1.0) -> tuple[VAE, torch.Tensor, torch.Tensor]:
    """A linear-Gaussian VAE, data drawn from it, and the exact log-likelihood of each image.

    ``W`` (``(6, 2)``) and ``b`` are fixed standard normal draws; with ``diagonal_posterior``
    the columns of ``W`` are made orthogonal (norms 2 and 1), so ``W^T W`` and the posterior
    covariance are diagonal and the guide can be exact. ``shift`` and ``inflate`` distort the
    guide (:class:`PosteriorEncoder`). The draws are seeded; the global random state is left
    as it was.

    :returns: ``(vae, x, log_px)`` with ``x`` of shape ``(num_images, 1, 2, 3)`` and
        ``log_px`` of shape ``(num_images,)``.
    """
    g = torch.Generator().manual_seed(0)
    W = torch.randn(X_DIM, Z_DIM, generator=g)
    if diagonal_posterior:  # orthogonal columns make W^T W, hence the posterior, diagonal
        W = torch.linalg.qr(W).Q * torch.tensor([2.0, 1.0])
    b = torch.randn(X_DIM, generator=g)
    encoder = PosteriorEncoder(W, b, NOISE, shift=shift, inflate=inflate)
    vae = VAE(encoder, LinearDecoder(W, b, SHAPE), GaussianPixels(NOISE), StandardNormal(Z_DIM))
    marginal = dist.MultivariateNormal(b, W @ W.T + NOISE**2 * torch.eye(X_DIM))
    with seeded(1):
        x = marginal.sample((num_images,)).reshape(num_images, *SHAPE)
    return vae, x, marginal.log_prob(x.flatten(1))
