"""Small hand-made parts the tests share: parts of one's own as a user writes them (an encoder,
a decoder, a likelihood, priors), a config-built VAE of fixed weights, and a binary batch.

Each meets the contract of its kind (:func:`pyro_vae.register_networks`,
:func:`~pyro_vae.register_likelihood`, :func:`~pyro_vae.register_prior`) without pyro_vae's own
networks. Test files import them as ``from parts import ...`` (``tests/`` is on ``sys.path``
under pytest; see tests/helpers.py).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyro_vae.config import load_config
from pyro_vae.model import build_vae
from pyro_vae.seeding import seeded

#: The shape of :func:`binary_batch`'s and :func:`small_vae`'s data: small, not square.
SMALL_SHAPE = (1, 6, 5)


class TinyEncoder(nn.Module):
    """One linear map: ``x`` of shape ``(B, *image_shape)`` -> ``(z_loc, z_scale)``, each ``(B, z_dim)``.

    ``hidden_dim`` is accepted and unused (pyro_vae builds registered networks with it)."""

    def __init__(self, image_shape, z_dim, hidden_dim: int = 8):
        super().__init__()
        self.datum_dims = len(image_shape)
        self.net = nn.Linear(math.prod(image_shape), 2 * z_dim)

    def forward(self, x):
        loc, raw = self.net(x.flatten(-self.datum_dims)).chunk(2, -1)
        return loc, F.softplus(raw) + 1e-4


class TinyDecoder(nn.Module):
    """One linear map: ``z`` of shape ``(..., z_dim)`` -> features ``(..., *image_shape)``."""

    def __init__(self, image_shape, z_dim):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.net = nn.Linear(z_dim, math.prod(image_shape))

    def forward(self, z):
        return self.net(z).unflatten(-1, self.image_shape)


class StudentT(nn.Module):
    """Student-t values around the decoder's output: heavy tails, any real value."""

    accepts = "real"
    option_bounds = {"df": (0.0, False), "scale": (0.0, False)}

    def __init__(self, image_shape, df: float = 4.0, scale: float = 0.1):
        super().__init__()
        self.event_dim, self.df, self.scale = len(image_shape), df, scale

    def forward(self, loc):
        return dist.StudentT(self.df, loc, self.scale).to_event(self.event_dim)


class ShiftedNormal(nn.Module):
    """p(z) = N(shift, I): a Normal, so its KL has a closed form (derived, not declared)."""

    def __init__(self, z_dim: int, shift: float = 0.0):
        super().__init__()
        self.register_buffer("loc", torch.full((z_dim,), shift))

    def forward(self):
        return dist.Normal(self.loc, torch.ones_like(self.loc)).to_event(1)


class TwoBumps(nn.Module):
    """A mixture of two Gaussians at +-1: no closed-form KL."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.register_buffer("locs", torch.stack([torch.ones(z_dim), -torch.ones(z_dim)]))

    def forward(self):
        components = dist.Normal(self.locs, torch.ones_like(self.locs)).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(2, device=self.locs.device)), components)


def binary_batch(n: int = 7, image_shape=SMALL_SHAPE, p: float = 0.4, seed: int = 0) -> torch.Tensor:
    """``n`` binary images: each pixel 1 with probability ``p``, drawn from a generator seeded ``seed``."""
    return torch.bernoulli(torch.full((n, *image_shape), p), generator=torch.Generator().manual_seed(seed))


def small_vae(image_shape=SMALL_SHAPE, z_dim: int = 3, seed: int = 0, **settings):
    """A config-built MLP VAE (hidden_dim 16), its weights drawn with ``seed``; ``settings``:
    other ``model.*`` keys by their short name (``prior="vamp"``, ``guide="iaf"``)."""
    config = load_config(None, {"model.z_dim": z_dim, "model.hidden_dim": 16,
                                **{f"model.{key}": value for key, value in settings.items()}})
    with seeded(seed):
        return build_vae(config.model, image_shape)
