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

:func:`two_layer_linear_gaussian` is the same for a :class:`~pyro_vae.hierarchical.HierarchicalVAE`
of two layers, ``z2 ~ N(0, I)``, ``z1 ~ N(A z2 + a, diag(t^2))``, ``x ~ N(W z1 + b, s^2 I)``,
whose exact posterior both guides (ladder and bottom-up) can express.

References:
    Tipping & Bishop (1999), Probabilistic Principal Component Analysis.
    Bishop (2006), Pattern Recognition and Machine Learning, chapter 12.2.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from .guides import DiagonalGaussian
from .hierarchical import HierarchicalVAE
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


#: The two-layer problem's p(z1|z2) = N(diag(A) z2 + a, diag(t^2)), on top of the default W, b, s.
LAYER_GAIN, LAYER_SHIFT, LAYER_NOISE = (1.5, 0.7), (0.3, -0.5), (0.6, 0.8)


class LinearLayer(nn.Module):
    """``(loc, scale)`` of p(z1|z2): ``gain * z2 + shift`` and a fixed ``noise`` (diagonal ``A``)."""

    def __init__(self, gain: torch.Tensor, shift: torch.Tensor, noise: torch.Tensor):
        super().__init__()
        self.gain, self.shift, self.noise = gain, shift, noise

    def forward(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gain * z2 + self.shift, self.noise.expand_as(z2)


class _Affine(nn.Module):
    """``(loc, scale)`` as ``weight * (h[..., :d] - offset) + loc_shift`` and a fixed scale: the
    exact guides' maps, whose inputs are ``z1`` or ``[m1, log s1]`` (only ``m1`` is read)."""

    def __init__(self, weight, offset, loc_shift, scale):
        super().__init__()
        self.weight, self.offset, self.loc_shift, self.scale = weight, offset, loc_shift, scale

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self.weight * (h[..., : len(self.weight)] - self.offset) + self.loc_shift
        return loc, self.scale.expand_as(loc)


class _PixelsToLayer(nn.Module):
    """x to ``(weight * (W^T (x - b)) + loc_shift, scale)``: the encoders of the exact guides."""

    def __init__(self, W, b, weight, loc_shift, scale):
        super().__init__()
        self.W, self.b, self.weight, self.loc_shift, self.scale = W, b, weight, loc_shift, scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self.weight * ((x.flatten(1) - self.b) @ self.W) + self.loc_shift
        return loc, self.scale.expand_as(loc)


def two_layer_linear_gaussian(inference: str = "ladder", num_images: int = 50, shift: float = 0.0,
                              inflate: float = 1.0) -> tuple[HierarchicalVAE, torch.Tensor, torch.Tensor]:
    """A two-layer linear-Gaussian :class:`~pyro_vae.hierarchical.HierarchicalVAE`, data drawn
    from it, and the exact log-likelihood of each image (module docstring).

    ``W`` has orthogonal columns (``W^T W = D = diag(4, 1)``) and ``A``, ``t`` are diagonal, so
    every posterior is diagonal and the guide (``"ladder"`` or ``"bottom_up"``) is exact:
    bottom-up, q(z1|x) = p(z1|x) and q(z2|z1) = p(z2|z1) (x is independent of z2 given z1);
    the ladder's estimate of z1 from x is the likelihood's ``N(D^-1 W^T (x - b), s^2 D^-1)``,
    q(z2|x) = p(z2|x), and its precision-weighted q(z1|z2,x) is p(z1|z2,x). ``shift`` moves the
    first layer the guide draws (z1 bottom-up, z2 for the ladder) and ``inflate`` multiplies
    its scale: a lower bound with a gap. Seeded; the global random state is left as it was.

    :returns: ``(vae, x, log_px)``, ``x`` ``(num_images, 1, 2, 3)``, ``log_px`` ``(num_images,)``.
    """
    g = torch.Generator().manual_seed(0)
    W = torch.linalg.qr(torch.randn(X_DIM, Z_DIM, generator=g)).Q * torch.tensor([2.0, 1.0])
    b = torch.randn(X_DIM, generator=g)
    gain, offset, noise = (torch.tensor(v) for v in (LAYER_GAIN, LAYER_SHIFT, LAYER_NOISE))
    precision = (W * W).sum(0)  # diag(D)
    if inference == "bottom_up":
        # p(z1|x): prior N(a, diag(gain^2 + noise^2)) times the likelihood
        prior_var = gain**2 + noise**2
        var1 = 1 / (1 / prior_var + precision / NOISE**2)
        encoder = _PixelsToLayer(W, b, var1 / NOISE**2, var1 * offset / prior_var + shift, var1.sqrt() * inflate)
        # p(z2|z1): precision 1 + gain^2 / noise^2, mean gain (z1 - a) / noise^2 / precision
        var2 = 1 / (1 + gain**2 / noise**2)
        up = _Affine(var2 * gain / noise**2, offset, torch.zeros(2), var2.sqrt())
    else:
        # the estimate of z1 from x alone: the likelihood as a Gaussian in z1
        encoder = _PixelsToLayer(W, b, 1 / precision, torch.zeros(2), NOISE / precision.sqrt())
        # p(z2|x) through m1 | z2 ~ N(gain z2 + a, noise^2 + s^2 / D)
        spread = noise**2 + NOISE**2 / precision
        var2 = 1 / (1 + gain**2 / spread)
        up = _Affine(var2 * gain / spread, offset, torch.full((2,), shift), var2.sqrt() * inflate)
    vae = HierarchicalVAE(encoder, LinearDecoder(W, b, SHAPE), GaussianPixels(NOISE), StandardNormal(Z_DIM),
                          [LinearLayer(gain, offset, noise)], [up], [DiagonalGaussian(), DiagonalGaussian()],
                          z_dims=[Z_DIM, Z_DIM], inference=inference)
    covariance = W @ torch.diag(gain**2 + noise**2) @ W.T + NOISE**2 * torch.eye(X_DIM)
    marginal = dist.MultivariateNormal(W @ offset + b, covariance)
    with seeded(1):
        x = marginal.sample((num_images,)).reshape(num_images, *SHAPE)
    return vae, x, marginal.log_prob(x.flatten(1))
