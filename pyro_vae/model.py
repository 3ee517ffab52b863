"""The VAE: Pyro ``model`` p(z) p(x|z) and ``guide`` q(z|x). The only place with ``pyro.sample``.

The parts are values handed in (encoder, decoder, likelihood head, prior, guide family), not
subclasses: swapping one is a different argument, see :func:`build_vae`.

References:
    Kingma & Welling (2014), Auto-Encoding Variational Bayes.
    Higgins et al. (2017), beta-VAE (the KL weight).
    Burda, Grosse & Salakhutdinov (2015), Importance Weighted Autoencoders (the output bias
    initialized to the logit of the mean training pixel, :func:`init_output_bias`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import re

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .contract import ConfigError
from .guides import DiagonalGaussian, make_guide, representative_code
from .likelihoods import likelihood_link, make_likelihood
from .networks import make_networks
from .priors import make_prior
from .seeding import probing
from .shapes import check_shapes

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


#: Numbers the default names of VAEs, in creation order: "vae", "vae_1", "vae_2", ...
_instances = itertools.count()


def _default_name() -> str:
    number = next(_instances)
    return "vae" if number == 0 else f"vae_{number}"


class VAE(nn.Module):
    """A variational autoencoder with an amortized guide (a diagonal Gaussian by default).

    A datum is an image ``(C, H, W)`` or a vector ``(D,)``: ``image_shape`` below. The
    parts are any modules meeting these contracts (those of
    :func:`pyro_vae.register_networks`, :func:`~pyro_vae.register_likelihood`,
    :func:`~pyro_vae.register_prior` and :func:`~pyro_vae.register_guide`; they need not be
    registered to be used here):

    :param encoder: maps ``x`` of shape ``(B, *image_shape)`` to ``(z_loc, z_scale)``, each
        ``(B, z_dim)``, ``z_scale > 0``.
    :param decoder: maps ``z`` of shape ``(..., z_dim)`` to features ``(..., *image_shape)``.
    :param likelihood: maps decoder features to p(x|z), a distribution whose event is one datum.
        A class attribute ``accepts`` (``"binary"``, ``"unit_interval"``, ``"real"``) lets
        :func:`pyro_vae.fit` check the data's range; without it the data is taken as it is.
    :param prior: ``forward()`` returns p(z), event shape ``(z_dim,)``, no batch shape. A
        VampPrior is built from the encoder: ``VampPrior(z_dim, encoder=encoder,
        image_shape=image_shape, data_domain=likelihood.accepts)``.
    :param guide: the guide family: maps the encoder's ``(z_loc, z_scale)`` to q(z|x), batch
        shape ``(B,)``, event shape ``(z_dim,)``, reparameterized. Default: the diagonal
        Gaussian ``Normal(z_loc, z_scale).to_event(1)``.
    :param name: prefix of the names under which ``model`` and ``guide`` register the parts in
        Pyro's param store (``"{name}.encoder"``, ...), so that VAEs of different names share
        one store without sharing parameters. Default: ``"vae"``, then ``"vae_1"``,
        ``"vae_2"``, ... in creation order (two VAEs given the same name share parameters).

    ``model(x)`` and ``guide(x)`` register their parameters with ``pyro.module``, so they
    work with Pyro's ``SVI`` and ``pyro.optim`` as they are, on any tensor of data of shape
    ``(B, *image_shape)``. :func:`pyro_vae.fit` uses ``model_body`` / ``guide_body``, the same
    programs without the registration, and optimizes ``self.parameters()`` with a torch
    optimizer. :meth:`check_shapes` checks the parts against each other on a datum of zeros.
    """

    #: The latent sites, for code that draws or inspects them (a rank's shared noise).
    latent_sites = (LATENT,)

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: nn.Module, prior: nn.Module, *,
                 guide: nn.Module | None = None, name: str | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.prior_net = prior
        # registered last: a family without parameters (the Gaussian) leaves the parameters,
        # their order and the state_dict of a VAE without it unchanged
        self.guide_net = DiagonalGaussian() if guide is None else guide
        self.name = _default_name() if name is None else name

    def prior(self) -> dist.TorchDistribution:
        """p(z): event shape ``(z_dim,)``."""
        return self.prior_net()

    def encode(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z|x): the guide family at the encoder's output, batch shape ``(B,)``, event shape
        ``(z_dim,)`` (a diagonal Gaussian by default)."""
        z_loc, z_scale = self.encoder(x)
        return self.guide_net(z_loc, z_scale)

    def code(self, x: torch.Tensor) -> torch.Tensor:
        """A deterministic latent code of each datum, ``(B, z_dim)``, for reconstructions and
        plots: ``E[z|x] = z_loc`` for the Gaussian; for a flow, the image of the base mean
        (:func:`pyro_vae.guides.representative_code`)."""
        return representative_code(self.encode(x))

    def decode(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x|z) for ``z`` of shape ``(..., z_dim)``: batch shape ``(...)``, one datum per event."""
        return self.likelihood(self.decoder(z))

    def model(self, x: torch.Tensor, beta: float = 1.0, reconstruction_weight: float = 1.0) -> torch.Tensor:
        """p(z) p(x|z) for a batch ``x`` of shape ``(B, *image_shape)``.

        ``beta`` weights the latent site (the KL term), ``reconstruction_weight`` the observed
        one (log p(x|z)); both are 1 for the ELBO itself.
        """
        pyro.module(f"{self.name}.decoder", self.decoder)
        pyro.module(f"{self.name}.likelihood", self.likelihood)
        pyro.module(f"{self.name}.prior", self.prior_net)
        return self.model_body(x, beta, reconstruction_weight)

    def guide(self, x: torch.Tensor, beta: float = 1.0, reconstruction_weight: float = 1.0) -> torch.Tensor:
        """q(z|x) for a batch ``x`` of shape ``(B, *image_shape)``; the same arguments as the model."""
        pyro.module(f"{self.name}.encoder", self.encoder)
        pyro.module(f"{self.name}.guide", self.guide_net)
        return self.guide_body(x, beta)

    # The bodies without the pyro.module registration. fit() steps self.parameters() with a
    # torch optimizer, so it has no use for the global param store; skipping the registration
    # saves a few percent of a step (docs/results.md) and leaves the store as the user had it.
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
        """The mean of p(x|z) at ``z = code(x)`` (``z_loc`` for the Gaussian), shape of ``x``."""
        return self.decode(self.code(x)).mean

    @torch.no_grad()
    def sample_images(self, num_samples: int) -> torch.Tensor:
        """Means of p(x|z) for ``z`` drawn from the prior: ``(num_samples, *image_shape)``."""
        z = self.prior().sample((num_samples,))
        return self.decode(z).mean

    def check_shapes(self, image_shape, z_dim: int | None = None, labels: dict[str, str] | None = None) -> None:
        """Check the parts against their contracts on a batch of two data of zeros: see
        :func:`pyro_vae.shapes.check_shapes`, which this calls with ``self``."""
        check_shapes(self, image_shape, z_dim, labels)


def build_vae(model_config, image_shape, name: str | None = None) -> VAE:
    """A :class:`VAE` from a :class:`pyro_vae.config.ModelConfig` and the shape of one datum.

    :param model_config: names the parts (built-in or registered) and their options.
    :param image_shape: the shape of one datum: ``(C, H, W)`` or ``(D,)``.
    :param name: the VAE's name in Pyro's param store (see :class:`VAE`).
    :raises ConfigError: the parts do not fit the data or each other (one line; checked once
        on a datum of zeros, see :meth:`VAE.check_shapes`).
    """
    image_shape = tuple(image_shape)
    check_model_fits(model_config, image_shape)
    try:
        encoder, decoder, likelihood, prior, guide = _parts(model_config, image_shape)
    except RuntimeError as error:  # the allocator's refusal, where no estimate foresaw it
        asked = re.search(r"allocate (\d+) bytes", str(error))
        if asked is None:
            raise
        raise _too_large(model_config, image_shape, int(asked.group(1)), least_of_all=True) from None
    vae = VAE(encoder, decoder, likelihood, prior, guide=guide, name=name)
    vae.check_shapes(image_shape, model_config.z_dim, labels={
        "encoder": f"model.arch = {model_config.arch!r}", "decoder": f"model.arch = {model_config.arch!r}",
        "likelihood": f"model.likelihood = {model_config.likelihood!r}", "prior": f"model.prior = {model_config.prior!r}",
        "guide": f"model.guide = {model_config.guide!r}",
    })
    return vae


def _parts(model_config, image_shape: tuple) -> tuple:
    """The encoder, decoder, likelihood, prior and guide that ``model_config`` names."""
    encoder, decoder = make_networks(
        model_config.arch, image_shape, model_config.z_dim, model_config.hidden_dim, model_config.num_layers
    )
    likelihood = make_likelihood(model_config.likelihood, image_shape, **model_config.likelihood_options)
    prior = make_prior(model_config.prior, model_config.z_dim, encoder=encoder, image_shape=image_shape,
                       data_domain=likelihood.accepts, **model_config.prior_options)
    # built last, so its initial draws leave those of the other parts as they were
    guide = _build_guide(model_config)
    return encoder, decoder, likelihood, prior, guide


# -- sizes that cannot be allocated -----------------------------------------------------------

def physical_memory() -> int:
    """This machine's memory in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return 0


def _weight_bytes(model_config, image_shape: tuple) -> int | None:
    """The bytes of the weights ``model_config`` would build, from a build on the ``meta``
    device, which allocates nothing; ``None`` where a part cannot be built there (one that
    computes with values while it is built)."""
    try:
        with probing(), torch.device("meta"):
            parts = _parts(model_config, image_shape)
    except Exception:  # noqa: BLE001 - no estimate; the real build reports its own errors
        return None
    tensors = [t for part in parts for t in itertools.chain(part.parameters(), part.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_model_fits(model_config, image_shape: tuple) -> None:
    """Refuse (one line naming the key) a model whose weights alone exceed the machine's memory,
    before any is allocated: the allocator's own refusal is a traceback, and a size just under
    what it refuses is the kernel's out-of-memory kill, with no message at all."""
    memory = physical_memory()
    needed = _weight_bytes(model_config, image_shape) if memory else None
    if needed is not None and needed > memory:
        raise _too_large(model_config, image_shape, needed)


def _size_keys(model_config) -> list[tuple[str, object]]:
    """The model's integer sizes: ``(key, config with that size set to 1)`` for each."""
    found = [(f"model.{name}", dataclasses.replace(model_config, **{name: 1}))
             for name in ("z_dim", "hidden_dim", "num_layers")]
    for section in ("likelihood_options", "prior_options", "guide_options"):
        for option, value in getattr(model_config, section).items():
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                smaller = {**getattr(model_config, section), option: 1}
                found.append((f"model.{section}.{option}", dataclasses.replace(model_config, **{section: smaller})))
    return found


def _too_large(model_config, image_shape: tuple, needed: int, least_of_all: bool = False) -> ConfigError:
    """The one line for a model too large to allocate: the key whose size costs the most (the
    one that, set to 1, shrinks the weights the most; where the weights cannot be estimated,
    the largest size) and the memory they would need (``least_of_all``: the one tensor the
    allocator refused, a lower bound)."""
    shrunk = [(_weight_bytes(smaller, image_shape), key) for key, smaller in _size_keys(model_config)]
    known = [(size, key) for size, key in shrunk if size is not None]
    if known:
        culprit = min(known)[1]
    else:
        culprit = max(_size_keys(model_config), key=lambda found: _value_of(model_config, found[0]))[0]
    memory = physical_memory()
    here = f", more than this machine's {_gigabytes(memory)} GB" if memory else ""
    need = f"at least {_gigabytes(needed)} GB" if least_of_all else f"about {_gigabytes(needed)} GB"
    return ConfigError(f"{culprit} = {_value_of(model_config, culprit)}: the model's weights alone would need "
                       f"{need}{here} (training holds about four times as much: gradients and Adam's two moments); "
                       f"choose a smaller {culprit}")


def _value_of(model_config, key: str):
    path = key.split(".")[1:]
    value = getattr(model_config, path[0])
    return value[path[1]] if len(path) > 1 else value


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:,.1f}"


def _build_guide(model_config) -> nn.Module:
    """The guide family: a family of one's own may raise anything when built with options that
    its bounds and ``check_options`` let through, so that is one line naming the key."""
    try:
        return make_guide(model_config.guide, model_config.z_dim, **model_config.guide_options)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"model.guide = {model_config.guide!r} with model.guide_options = "
                          f"{model_config.guide_options}: building it raised {type(error).__name__}: "
                          f"{' '.join(str(error).split())}") from None


# -- the decoder's output bias from the training data (Burda et al. 2015) ----------------------

#: Mean pixels are clipped to [c, 1 - c] before their logit, so that a pixel that is never (or
#: always) on in the training data starts at a logit of -6.9 (6.9), not at minus (plus) infinity.
OUTPUT_BIAS_CLIP = 1e-3
#: Values converted to float64 at once while the mean training datum is summed (128 MB).
MEAN_PIECE_VALUES = 2**24


@torch.no_grad()
def init_output_bias(vae: VAE, images: torch.Tensor) -> torch.Tensor:
    """Set the decoder's output bias so that p(x|z) starts at the mean training datum.

    Burda et al. (2015) initialize the output biases of their Bernoulli decoders to the logit
    of the mean training pixel: the untrained decoder then models each pixel's marginal
    frequency instead of 0.5 everywhere, and the first steps are not spent learning the
    background. Here the bias is the likelihood's link applied to the mean
    (:func:`likelihood_link`): ``logit(m)``, ``m`` clipped to ``[OUTPUT_BIAS_CLIP, 1 -
    OUTPUT_BIAS_CLIP]``, where the features are logits; ``m`` itself where they are the mean.
    A bias of one value per pixel (the MLP decoders) gets each pixel's mean; one per channel
    (the conv decoder) the channel's mean over its pixels.

    Called by :func:`pyro_vae.fit` right after :func:`build_vae` when
    ``model.init_output_bias`` is set; it draws no random numbers.

    :param vae: a VAE whose decoder has an ``output_bias`` property (the parameter to set).
    :param images: the training data as the model sees it, ``(N, *image_shape)`` (grey values
        for dynamic binarization: their mean is the binary pixels' expected mean): a tensor,
        or anything of that shape whose slices are tensors, such as an ``ImageData``.
    :returns: the bias set.
    :raises ConfigError: the decoder has no output bias, or the likelihood's link is neither
        of the two above (:func:`pyro_vae.config.validate` refuses such configs first).
    """
    bias = getattr(vae.decoder, "output_bias", None)
    if not isinstance(bias, torch.Tensor):
        raise ConfigError(f"model.init_output_bias: the decoder {type(vae.decoder).__qualname__} has no output_bias "
                          "(the parameter to initialize)")
    image_shape = tuple(images.shape[1:])
    link = likelihood_link(vae.likelihood, image_shape)
    if link is None:
        raise ConfigError(f"model.init_output_bias: the mean of likelihood {type(vae.likelihood).__qualname__} is "
                          "neither sigmoid(features) nor the features themselves")
    # summed in float64 a piece at a time: ``images`` may be a split read batch by batch
    # (:class:`~pyro_vae.data.ImageData`), which is never converted whole
    rows = max(1, MEAN_PIECE_VALUES // max(1, math.prod(image_shape)))
    mean = sum(images[b : b + rows].to(torch.float64).sum(0) for b in range(0, len(images), rows)) / len(images)
    if bias.numel() == mean.numel():
        target = mean.reshape(bias.shape)
    elif len(image_shape) == 3 and tuple(bias.shape) == image_shape[:1]:  # one bias per channel
        target = mean.mean((1, 2))
    else:
        raise ConfigError(f"model.init_output_bias: the decoder's output_bias of shape {tuple(bias.shape)} fits "
                          f"neither one value per feature nor one per channel of data of shape {image_shape}")
    if link == "logit":
        target = torch.logit(target.clamp(OUTPUT_BIAS_CLIP, 1 - OUTPUT_BIAS_CLIP))
    bias.copy_(target.to(bias))
    return bias
