"""Encoder and decoder bodies: plain torch, no Pyro.

An encoder maps images ``(B, C, H, W)`` to the parameters ``(z_loc, z_scale)`` of a diagonal
Gaussian q(z|x), each ``(B, z_dim)``. A decoder maps ``z`` of shape ``(..., z_dim)`` to
per-pixel features ``(..., C, H, W)`` that a likelihood head turns into p(x|z) (for the
Bernoulli likelihood they are logits). Image sizes come from the data, never from literals.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers)


def _positive(raw: torch.Tensor) -> torch.Tensor:
    # softplus rather than exp: a large pre-activation cannot overflow the scale, and a
    # small floor keeps log q(z|x) finite.
    return F.softplus(raw) + 1e-5


class MLPEncoder(nn.Module):
    def __init__(self, image_shape: tuple[int, ...], z_dim: int, hidden_dim: int, num_layers: int = 1):
        super().__init__()
        x_dim = math.prod(image_shape)
        self.body = _mlp([x_dim] + [hidden_dim] * num_layers)
        self.loc = nn.Linear(hidden_dim, z_dim)
        self.scale = nn.Linear(hidden_dim, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(x.flatten(-3))
        return self.loc(hidden), _positive(self.scale(hidden))


class MLPDecoder(nn.Module):
    def __init__(self, image_shape: tuple[int, ...], z_dim: int, hidden_dim: int, num_layers: int = 1):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.body = _mlp([z_dim] + [hidden_dim] * num_layers)
        self.out = nn.Linear(hidden_dim, math.prod(image_shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(z)).unflatten(-1, self.image_shape)


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions (32, 64 channels), then a dense layer of ``hidden_dim``."""

    def __init__(self, image_shape: tuple[int, ...], z_dim: int, hidden_dim: int, num_layers: int = 1):
        super().__init__()
        channels = image_shape[0]
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():  # the flattened size follows from the image size
            flat = self.conv(torch.zeros(1, *image_shape)).shape[-1]
        self.dense = nn.Sequential(nn.Linear(flat, hidden_dim), nn.ReLU())
        self.loc = nn.Linear(hidden_dim, z_dim)
        self.scale = nn.Linear(hidden_dim, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.dense(self.conv(x))
        return self.loc(hidden), _positive(self.scale(hidden))


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: dense, then two stride-2 transposed convolutions."""

    def __init__(self, image_shape: tuple[int, ...], z_dim: int, hidden_dim: int, num_layers: int = 1):
        super().__init__()
        channels, height, width = image_shape
        # Each transposed convolution doubles the size; start at ceil(size / 4), crop at the end.
        self.start = (64, -(-height // 4), -(-width // 4))
        self.image_shape = tuple(image_shape)
        self.dense = nn.Sequential(
            nn.Linear(z_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, math.prod(self.start)), nn.ReLU(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, channels, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch_shape = z.shape[:-1]
        h = self.dense(z.reshape(-1, z.shape[-1])).unflatten(-1, self.start)
        out = self.deconv(h)[..., : self.image_shape[1], : self.image_shape[2]]
        return out.reshape(*batch_shape, *self.image_shape)


#: architecture name -> (encoder class, decoder class)
ARCHITECTURES = {
    "mlp": (MLPEncoder, MLPDecoder),
    "conv": (ConvEncoder, ConvDecoder),
}


def make_networks(arch: str, image_shape, z_dim: int, hidden_dim: int, num_layers: int = 1):
    """Build ``(encoder, decoder)`` for the named architecture."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    encoder_cls, decoder_cls = ARCHITECTURES[arch]
    args = (tuple(image_shape), z_dim, hidden_dim, num_layers)
    return encoder_cls(*args), decoder_cls(*args)
