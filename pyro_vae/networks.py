"""Encoder and decoder bodies: plain torch, no Pyro.

A datum is an image ``(C, H, W)`` or a vector ``(D,)``: ``image_shape`` is the shape of one
datum, whichever it is. An encoder maps data ``(B, *image_shape)`` to the parameters
``(z_loc, z_scale)`` of a diagonal Gaussian q(z|x), each ``(B, z_dim)``. A decoder maps ``z``
of shape ``(..., z_dim)`` to features ``(..., *image_shape)`` that a likelihood head turns into
p(x|z) (for the Bernoulli likelihood they are logits). Sizes come from the data, never from
literals. The MLP networks take either kind of datum; the conv networks take images of any
size (at least 4 x 4 pixels) and channel count. ``"gated_mlp"`` is the MLP with gated units,
``"mlp_bn"`` the MLP with batch normalization before each ReLU.

Networks of one's own are added with :func:`pyro_vae.register_networks`, which states the
contract they must meet.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .contract import ConfigError, model_arguments


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers)


class GatedDense(nn.Module):
    """A gated linear unit: ``h = (W1 x + b1) * sigmoid(W2 x + b2)``, the gate choosing, unit by
    unit, how much of the linear response passes.

    References: Dauphin, Fan, Auli & Grangier (2017), Language Modeling with Gated Convolutional
    Networks; Tomczak & Welling (2018), VAE with a VampPrior (``GatedDense``, their MLP units).
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.gate = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * torch.sigmoid(self.gate(x))


def _gated_mlp(sizes: list[int]) -> nn.Sequential:
    return nn.Sequential(*[GatedDense(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:])])


class FeatureBatchNorm(nn.BatchNorm1d):
    """Batch normalization of the last dimension of ``(..., features)``, every leading dimension
    (particles, batch) pooled: a decoder sees ``(K, B, z_dim)`` under vectorized particles and
    ``(B, z_dim)`` otherwise, where ``nn.BatchNorm1d`` would read the second dimension as the
    features. In training the statistics are the batch's; in eval mode the running ones, so a
    trained model scores each datum alone. A training batch of one item (the short last batch of
    an epoch, a process's share under torchrun) has no spread to normalize by: it takes the
    running statistics, and leaves them as they are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.training and flat.shape[0] < 2:
            out = F.batch_norm(flat, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        else:
            out = super().forward(flat)
        return out.reshape(x.shape)


def _batch_norm_mlp(sizes: list[int]) -> nn.Sequential:
    # no bias in the linear layer: the normalization's shift takes its place
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out, bias=False), FeatureBatchNorm(n_out), nn.ReLU()]
    return nn.Sequential(*layers)


def _positive(raw: torch.Tensor) -> torch.Tensor:
    # softplus rather than exp: a large pre-activation cannot overflow the scale, and a
    # small floor keeps log q(z|x) finite.
    return F.softplus(raw) + 1e-5


class MLPEncoder(nn.Module):
    """``num_layers`` dense layers of ``hidden_dim`` on the flattened datum.

    :param image_shape: the shape of one datum: ``(C, H, W)`` or ``(D,)``.
    """

    #: builds the hidden layers from their sizes: dense ReLU layers here
    layers = staticmethod(_mlp)

    def __init__(self, image_shape: tuple[int, ...], z_dim: int, hidden_dim: int, num_layers: int = 1):
        super().__init__()
        self.datum_dims = len(image_shape)
        self.body = self.layers([math.prod(image_shape)] + [hidden_dim] * num_layers)
        self.loc = nn.Linear(hidden_dim, z_dim)
        self.scale = nn.Linear(hidden_dim, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(x.flatten(-self.datum_dims))
        return self.loc(hidden), _positive(self.scale(hidden))


class MLPDecoder(nn.Module):
    """Mirror of :class:`MLPEncoder`.

    :param image_shape: the shape of one datum: ``(C, H, W)`` or ``(D,)``.
    """

    layers = staticmethod(_mlp)

    def __init__(self, image_shape: tuple[int, ...], z_dim: int, hidden_dim: int, num_layers: int = 1):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.body = self.layers([z_dim] + [hidden_dim] * num_layers)
        self.out = nn.Linear(hidden_dim, math.prod(image_shape))

    @property
    def output_bias(self) -> nn.Parameter:
        """The output layer's bias, one per feature ``(prod(image_shape),)``."""
        return self.out.bias

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(z)).unflatten(-1, self.image_shape)


class GatedMLPEncoder(MLPEncoder):
    """:class:`MLPEncoder` with gated units (:class:`GatedDense`) instead of ReLU layers, as in
    the VampPrior paper's MLPs (Tomczak & Welling 2018).

    :param image_shape: the shape of one datum: ``(C, H, W)`` or ``(D,)``.
    """

    layers = staticmethod(_gated_mlp)


class GatedMLPDecoder(MLPDecoder):
    """Mirror of :class:`GatedMLPEncoder`: gated hidden layers, then a linear output layer."""

    layers = staticmethod(_gated_mlp)


class BatchNormMLPEncoder(MLPEncoder):
    """:class:`MLPEncoder` with batch normalization before each ReLU (:class:`FeatureBatchNorm`),
    as in the ladder VAE's MLPs (Sønderby et al. 2016), where it sped up the training of
    several latent layers. Train mode normalizes by the batch, eval mode by running statistics
    (:func:`pyro_vae.fit` and :func:`pyro_vae.load_run` return models in eval mode).

    :param image_shape: the shape of one datum: ``(C, H, W)`` or ``(D,)``.
    """

    layers = staticmethod(_batch_norm_mlp)


class BatchNormMLPDecoder(MLPDecoder):
    """Mirror of :class:`BatchNormMLPEncoder`: normalized hidden layers, then a linear output layer."""

    layers = staticmethod(_batch_norm_mlp)


#: Two stride-2 convolutions (kernel 4, padding 1) need at least this many pixels a side.
CONV_MIN_SIZE = 4


def _check_images(image_shape) -> None:
    """The conv networks need images (C, H, W) of at least 4 x 4 pixels: one line otherwise."""
    shape = tuple(image_shape)
    if len(shape) != 3:
        raise ConfigError(f"model.arch = 'conv' needs images (C, H, W); this data is vectors of shape {shape}: "
                          "use model.arch = 'mlp'")
    if min(shape[1:]) < CONV_MIN_SIZE:
        raise ConfigError(f"model.arch = 'conv' needs images of at least {CONV_MIN_SIZE} x {CONV_MIN_SIZE} pixels; "
                          f"this data is {shape}: use model.arch = 'mlp' (or data.image_size)")


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions (32, 64 channels), then a dense layer of ``hidden_dim``.

    :param image_shape: ``(C, H, W)``, any channel count and size of at least 4 x 4; vector data
        is refused with :class:`~pyro_vae.config.ConfigError`.
    """

    def __init__(self, image_shape: tuple[int, ...], z_dim: int, hidden_dim: int):
        super().__init__()
        _check_images(image_shape)
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

    def __init__(self, image_shape: tuple[int, ...], z_dim: int, hidden_dim: int):
        super().__init__()
        _check_images(image_shape)
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

    @property
    def output_bias(self) -> nn.Parameter:
        """The last transposed convolution's bias, one per channel ``(C,)``."""
        return self.deconv[-1].bias

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch_shape = z.shape[:-1]
        h = self.dense(z.reshape(-1, z.shape[-1])).unflatten(-1, self.start)
        out = self.deconv(h)[..., : self.image_shape[1], : self.image_shape[2]]
        return out.reshape(*batch_shape, *self.image_shape)


#: architecture name -> (encoder class, decoder class); add one with :func:`pyro_vae.register_networks`.
ARCHITECTURES = {
    "mlp": (MLPEncoder, MLPDecoder),
    "gated_mlp": (GatedMLPEncoder, GatedMLPDecoder),
    "mlp_bn": (BatchNormMLPEncoder, BatchNormMLPDecoder),
    "conv": (ConvEncoder, ConvDecoder),
}


def make_networks(arch: str, image_shape, z_dim: int, hidden_dim: int, num_layers: int = 1):
    """Build ``(encoder, decoder)`` for the named architecture.

    Each constructor gets, by name, those of ``image_shape``, ``z_dim``, ``hidden_dim`` and
    ``num_layers`` that it takes (the conv networks have a fixed depth: no ``num_layers``).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    given = {"image_shape": tuple(image_shape), "z_dim": z_dim, "hidden_dim": hidden_dim, "num_layers": num_layers}
    return tuple(cls(**{k: given[k] for k in model_arguments(cls, "networks")}) for cls in ARCHITECTURES[arch])
