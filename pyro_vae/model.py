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
import itertools
import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .config import ConfigError
from .guides import DiagonalGaussian, make_guide, representative_code
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
        """The mean of p(x|z) at ``z = code(x)`` (``z_loc`` for the Gaussian), shape of ``x``."""
        return self.decode(self.code(x)).mean

    @torch.no_grad()
    def sample_images(self, num_samples: int) -> torch.Tensor:
        """Means of p(x|z) for ``z`` drawn from the prior: ``(num_samples, *image_shape)``."""
        z = self.prior().sample((num_samples,))
        return self.decode(z).mean

    @torch.no_grad()
    def check_shapes(self, image_shape, z_dim: int | None = None, labels: dict[str, str] | None = None) -> None:
        """Check the parts against their contracts on a batch of two data of zeros.

        The encoder must return ``(z_loc, z_scale)``, each ``(B, z_dim)``, ``z_scale > 0``; the
        guide family a reparameterized distribution with batch shape ``(B,)`` and event shape
        ``(z_dim,)`` whose samples it scores and which gives a code ``(B, z_dim)``; the
        decoder features ``(..., *image_shape)`` for ``z`` of shape ``(..., z_dim)``; the
        likelihood a distribution with event shape ``image_shape`` and batch shape ``(...)``;
        the prior one with event shape ``(z_dim,)`` and no batch shape. Modules run in eval
        mode (restored after) and with a private random stream, so the check changes nothing.

        :param image_shape: the shape of one datum: ``(C, H, W)`` or ``(D,)``.
        :param z_dim: the expected latent size; ``None``: the encoder's output gives it.
        :param labels: how to name a part in the message, e.g. ``{"encoder": "model.arch = 'mlp'"}``.
        :raises ConfigError: one line naming the part and the shapes expected and got.
        """
        image_shape, labels = tuple(image_shape), labels or {}

        def fail(part: str, message: str):
            module = getattr(self, {"prior": "prior_net", "guide": "guide_net"}.get(part, part))
            label = f" ({labels[part]})" if part in labels else ""
            raise ConfigError(f"{part} {type(module).__qualname__}{label}: {message}")

        tensors = [t for t in (*self.parameters(), *self.buffers()) if t.is_floating_point()]
        like = tensors[0] if tensors else torch.zeros(())
        modes = [(m, m.training) for m in self.modules()]
        self.eval()  # dropout or batch norm would draw noise or update statistics
        try:
            with torch.random.fork_rng(devices=[like.device] if like.is_cuda else []):
                x = torch.zeros(2, *image_shape, dtype=like.dtype, device=like.device)
                out = self.encoder(x)
                if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(torch.is_tensor(t) for t in out)):
                    fail("encoder", f"for x of shape {tuple(x.shape)} it returned {type(out).__name__}; "
                                    "expected a pair of tensors (z_loc, z_scale)")
                z_loc, z_scale = out
                z_dim = z_loc.shape[-1] if z_dim is None and z_loc.dim() == 2 else z_dim
                for tensor, what in ((z_loc, "z_loc"), (z_scale, "z_scale")):
                    if z_dim is None or tuple(tensor.shape) != (2, z_dim):
                        fail("encoder", f"for x of shape {tuple(x.shape)} it returned {what} of shape "
                                        f"{tuple(tensor.shape)}; expected (2, z_dim = {z_dim if z_dim else 'z_dim'})")
                if not bool((z_scale > 0).all()):
                    fail("encoder", "returned a z_scale that is not > 0 (a standard deviation, not its logarithm)")
                self._check_guide(z_loc, z_scale, fail)
                z = z_loc.expand(3, 2, z_dim)  # a leading sample dimension, as importance sampling adds
                features = self.decoder(z)
                if not torch.is_tensor(features) or tuple(features.shape) != (3, 2, *image_shape):
                    got = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
                    fail("decoder", f"for z of shape (3, 2, {z_dim}) it returned {got}; "
                                    f"expected (3, 2, *image_shape) = {(3, 2, *image_shape)}")
                p_x = self.likelihood(features)
                if not isinstance(p_x, torch.distributions.Distribution):
                    fail("likelihood", f"returned {type(p_x).__name__}; expected a pyro.distributions distribution")
                if tuple(p_x.event_shape) != image_shape or tuple(p_x.batch_shape) != (3, 2):
                    fail("likelihood", f"for features of shape {(3, 2, *image_shape)} it returned a distribution with "
                                       f"batch shape {tuple(p_x.batch_shape)} and event shape {tuple(p_x.event_shape)}; "
                                       f"expected (3, 2) and image_shape = {image_shape} "
                                       f"(.to_event({len(image_shape)}))")
                p_z = self.prior()
                if not isinstance(p_z, torch.distributions.Distribution):
                    fail("prior", f"returned {type(p_z).__name__}; expected a pyro.distributions distribution")
                if tuple(p_z.event_shape) != (z_dim,) or tuple(p_z.batch_shape) != ():
                    fail("prior", f"returned a distribution with batch shape {tuple(p_z.batch_shape)} and event shape "
                                  f"{tuple(p_z.event_shape)}; expected () and (z_dim,) = ({z_dim},)")
        finally:
            for module, training in modes:
                module.training = training

    def _check_guide(self, z_loc: torch.Tensor, z_scale: torch.Tensor, fail) -> None:
        q = self.guide_net(z_loc, z_scale)
        if not isinstance(q, torch.distributions.Distribution):
            fail("guide", f"returned {type(q).__name__}; expected a pyro.distributions distribution")
        expected = (tuple(z_loc.shape[:1]), tuple(z_loc.shape[1:]))
        if (tuple(q.batch_shape), tuple(q.event_shape)) != expected:
            fail("guide", f"for z_loc of shape {tuple(z_loc.shape)} it returned a distribution with batch shape "
                          f"{tuple(q.batch_shape)} and event shape {tuple(q.event_shape)}; expected {expected[0]} "
                          f"and (z_dim,) = {expected[1]}")
        if not q.has_rsample:
            fail("guide", f"returned {type(q).__name__}, which has no reparameterized sampler (rsample); "
                          "training differentiates through the draws")
        log_q = q.log_prob(q.rsample())
        if tuple(log_q.shape) != expected[0]:
            fail("guide", f"log_prob of its own sample has shape {tuple(log_q.shape)}; expected {expected[0]}")
        try:
            code = representative_code(q)
        except NotImplementedError:
            code = None
        if not torch.is_tensor(code) or tuple(code.shape) != tuple(z_loc.shape):
            fail("guide", f"returned {type(q).__name__}, which gives no code of shape {tuple(z_loc.shape)}: "
                          "it needs a mean, or to be a TransformedDistribution of a distribution with one")


def build_vae(model_config, image_shape, name: str | None = None) -> VAE:
    """A :class:`VAE` from a :class:`pyro_vae.config.ModelConfig` and the shape of one datum.

    :param model_config: names the parts (built-in or registered) and their options.
    :param image_shape: the shape of one datum: ``(C, H, W)`` or ``(D,)``.
    :param name: the VAE's name in Pyro's param store (see :class:`VAE`).
    :raises ConfigError: the parts do not fit the data or each other (one line; checked once
        on a datum of zeros, see :meth:`VAE.check_shapes`).
    """
    image_shape = tuple(image_shape)
    encoder, decoder = make_networks(
        model_config.arch, image_shape, model_config.z_dim, model_config.hidden_dim, model_config.num_layers
    )
    likelihood = make_likelihood(model_config.likelihood, image_shape, **model_config.likelihood_options)
    prior = make_prior(model_config.prior, model_config.z_dim, encoder=encoder, image_shape=image_shape,
                       data_domain=likelihood.accepts, **model_config.prior_options)
    # built last, so its initial draws leave those of the other parts as they were
    guide = make_guide(model_config.guide, model_config.z_dim, **model_config.guide_options)
    vae = VAE(encoder, decoder, likelihood, prior, guide=guide, name=name)
    vae.check_shapes(image_shape, model_config.z_dim, labels={
        "encoder": f"model.arch = {model_config.arch!r}", "decoder": f"model.arch = {model_config.arch!r}",
        "likelihood": f"model.likelihood = {model_config.likelihood!r}", "prior": f"model.prior = {model_config.prior!r}",
        "guide": f"model.guide = {model_config.guide!r}",
    })
    return vae


# -- the decoder's output bias from the training data (Burda et al. 2015) ----------------------

#: Mean pixels are clipped to [c, 1 - c] before their logit, so that a pixel that is never (or
#: always) on in the training data starts at a logit of -6.9 (6.9), not at minus (plus) infinity.
OUTPUT_BIAS_CLIP = 1e-3


@torch.no_grad()
def likelihood_link(likelihood: nn.Module, image_shape) -> str | None:
    """How a likelihood's mean follows from the decoder's features, derived on a grid of
    features rather than declared: ``"logit"`` where the mean is ``sigmoid(features)``
    (Bernoulli: the features are logits), ``"identity"`` where it is the features themselves
    (Gaussian, Laplace), else ``None`` (e.g. the continuous Bernoulli, whose mean is not the
    sigmoid of its logits).

    :param likelihood: a likelihood module built for data of ``image_shape``.
    :param image_shape: the shape of one datum: ``(C, H, W)`` or ``(D,)``.

    >>> from pyro_vae.likelihoods import Bernoulli, ContinuousBernoulli, Gaussian
    >>> [likelihood_link(cls((1, 2, 2)), (1, 2, 2)) for cls in (Bernoulli, Gaussian, ContinuousBernoulli)]
    ['logit', 'identity', None]
    """
    image_shape = tuple(image_shape)
    features = torch.linspace(-4.0, 4.0, 9 * math.prod(image_shape)).reshape(9, *image_shape)
    tensors = [t for t in (*likelihood.parameters(), *likelihood.buffers()) if t.is_floating_point()]
    if tensors:
        features = features.to(tensors[0])
    try:
        with torch.random.fork_rng(devices=[]):
            mean = likelihood(features).mean
    except Exception:  # a part of one's own may raise anything; its link is then unknown
        return None
    if not torch.is_tensor(mean) or mean.shape != features.shape:
        return None
    if torch.allclose(mean, torch.sigmoid(features), atol=1e-5):
        return "logit"
    if torch.allclose(mean, features, atol=1e-5):
        return "identity"
    return None


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
        for dynamic binarization: their mean is the binary pixels' expected mean).
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
    mean = images.to(torch.float64).mean(0)
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
