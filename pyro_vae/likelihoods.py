"""Likelihood heads p(x|z): decoder features in, a Pyro distribution over one image out.

Each head is an ``nn.Module`` whose ``forward(features)`` takes the decoder's output of shape
``(..., C, H, W)`` and returns a distribution whose event is the whole image, so
``log_prob`` gives one number per image. ``accepts`` names the data the head is defined on
("binary": pixels in {0, 1}); configs are checked against it before anything trains.
"""

from __future__ import annotations

import pyro.distributions as dist
from torch import nn

#: The image (C, H, W) is one event.
IMAGE_EVENT_DIM = 3


class Bernoulli(nn.Module):
    """Independent Bernoulli pixels parametrized by logits (stable for saturated pixels)."""

    accepts = "binary"

    def forward(self, logits):
        return dist.Bernoulli(logits=logits).to_event(IMAGE_EVENT_DIM)


LIKELIHOODS = {"bernoulli": Bernoulli}


def make_likelihood(name: str, **options) -> nn.Module:
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[name](**options)
