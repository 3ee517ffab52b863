"""A small conv network for ``benchmarks/large_data.py``, registered as ``model.arch = "tiny_conv"``.

One 8 x 8 convolution of stride 8 each way (16 channels) and a 32-dimensional code: a few
multiply-adds per value, so that an epoch over a large file measures how fast the data are
read, not the arithmetic. A plugin, as any network of one's own: ``--plugin benchmarks/tiny_conv.py``.
"""

import math

from torch import nn

from pyro_vae import register_networks

#: Each side of the image is divided by this: the kernel and the stride of the convolution.
PATCH = 8
CHANNELS = 16


class TinyConvEncoder(nn.Module):
    def __init__(self, image_shape, z_dim, hidden_dim=0):
        super().__init__()
        channels, height, width = image_shape
        self.conv = nn.Sequential(nn.Conv2d(channels, CHANNELS, PATCH, stride=PATCH), nn.ReLU(), nn.Flatten())
        flat = CHANNELS * (height // PATCH) * (width // PATCH)
        self.loc, self.scale = nn.Linear(flat, z_dim), nn.Linear(flat, z_dim)

    def forward(self, x):
        hidden = self.conv(x)
        return self.loc(hidden), nn.functional.softplus(self.scale(hidden)) + 1e-4


class TinyConvDecoder(nn.Module):
    def __init__(self, image_shape, z_dim, hidden_dim=0):
        super().__init__()
        channels, height, width = image_shape
        self.image_shape = tuple(image_shape)
        self.start = (CHANNELS, height // PATCH, width // PATCH)
        self.dense = nn.Sequential(nn.Linear(z_dim, math.prod(self.start)), nn.ReLU())
        self.deconv = nn.ConvTranspose2d(CHANNELS, channels, PATCH, stride=PATCH)

    def forward(self, z):
        batch_shape = z.shape[:-1]
        h = self.dense(z.reshape(-1, z.shape[-1])).unflatten(-1, self.start)
        return self.deconv(h).reshape(*batch_shape, *self.image_shape)


register_networks("tiny_conv", TinyConvEncoder, TinyConvDecoder)
