"""Priors p(z): modules whose ``forward()`` returns the distribution of one latent vector.

The returned distribution has ``event_shape == (z_dim,)`` and no batch shape;
``pyro.plate("data", ...)`` broadcasts it over the images of a batch.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


class StandardNormal(nn.Module):
    """p(z) = N(0, I). Loc and scale are buffers, so ``.to(device)`` moves them."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self):
        return dist.Normal(self.loc, self.scale).to_event(1)


PRIORS = {"standard_normal": StandardNormal}


def make_prior(name: str, z_dim: int, **options) -> nn.Module:
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of {sorted(PRIORS)}")
    return PRIORS[name](z_dim, **options)
