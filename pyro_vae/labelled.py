"""Labelled VAEs: a class label ``y`` beside the latent ``z``.

Two model families, chosen by ``model.labels``:

- ``"conditional"``: ``y`` is observed for every item. p(z) p(y) p(x|z,y) and q(z|x,y); the
  model generates by class and scores log p(x|y).
- ``"semi_supervised"``: the M2 model of Kingma et al. (2014). ``y`` is observed where an
  item has a label and latent where it has none, with a classifier q(y|x) in the guide. A
  latent ``y`` is summed out exactly by Pyro's enumeration (``TraceEnum_ELBO``: one decoder
  pass per class, no variance from ``y``), or sampled: with the score function and a
  baseline (``TraceGraph_ELBO``), or as a relaxed one-hot draw (Gumbel-softmax, Jang et al.
  2017; Maddison et al. 2017) whose density both sides score at the same temperature. The
  classifier also learns from the labelled items directly: ``classifier_weight`` times
  ``-log q(y|x)``, as in the paper's objective (their eq. 9) and Pyro's tutorial.

``y`` is a one-hot vector at the sample site ``"y"`` (:data:`LABEL`), so enumeration,
sampling and relaxation share one model: the decoder reads ``[z, y]`` and
q(z|x,y) = the guide family at a label-conditioned refinement of the encoder's output
(:class:`LabelHead`). The encoder runs once per item and only the small head once per
class, so summing over the classes costs the decoder's passes, not the encoder's.

Every part is one that :mod:`pyro_vae.networks`, :mod:`~pyro_vae.likelihoods`,
:mod:`~pyro_vae.priors` and :mod:`~pyro_vae.guides` build (registered ones too): the decoder
is built for ``z_dim + num_classes`` inputs, and the classifier is an encoder built for
``num_classes`` outputs whose location is the logits.

References:
    Kingma, Rezende, Mohamed & Welling (2014), Semi-Supervised Learning with Deep Generative
    Models (M2; the classification term and its weight).
    Sohn, Lee & Yan (2015), Learning Structured Output Representation using Deep Conditional
    Generative Models (the conditional VAE).
    Jang, Gu & Poole (2017), Categorical Reparameterization with Gumbel-Softmax; Maddison, Mnih
    & Teh (2017), The Concrete Distribution.
    Pyro's tutorial "The Semi-Supervised VAE" (enumeration of y in the guide).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
from pyro.distributions.torch_distribution import TorchDistributionMixin
from torch.distributions import relaxed_categorical
import torch
from pyro.infer import TraceEnum_ELBO, TraceGraph_ELBO
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .config import LABEL_MODES, LABELS_BY
from .contract import ConfigError, DataError
from .distributed import ELBOLoss, shared_noise
from .elbo import make_elbo
from .guides import representative_code
from .hierarchical import HierarchicalVAE, build_hierarchical_vae, layer_betas
from .model import (LATENT, OBSERVED, PLATE, _build_guide, _default_name, build_vae, check_model_fits, latent_weight,
                    site_weight)
from .likelihoods import make_likelihood
from .networks import make_networks
from .priors import make_prior
from .seeding import probing, seeded
from .shapes import evaluation_mode

__all__ = ["LABEL", "LABEL_MODES", "LABELS_BY", "ClassPrior", "ExpRelaxedCategorical", "LabelHead",
           "LabelledLoss", "LabelledVAE", "ScoreFunctionELBO", "accuracy", "build_labelled_vae",
           "build_model", "check_labelled_shapes", "check_labels", "choose_labelled", "class_log_likelihoods",
           "evaluate_labelled", "labelled_epoch_items", "labelled_order", "make_label_elbo",
           "make_training_loss", "num_classes_of", "one_hot", "training_labels"]

#: The label's sample site.
LABEL = "y"


def _checked(labels_by: str) -> str:
    if labels_by not in LABELS_BY:
        raise ValueError(f"labels_by = {labels_by!r}: choose one of {list(LABELS_BY)}")
    return labels_by


def one_hot(y: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """Class indices ``(...)`` as one-hot vectors ``(..., num_classes)`` of ``like``'s type."""
    return F.one_hot(y, num_classes).to(like.dtype)


class LabelHead(nn.Module):
    """q(z|x,y)'s parameters from the encoder's ``(z_loc, z_scale)`` of x and the label ``y``.

    ``h = relu(W [z_loc, log z_scale, y] + b)``; ``loc = z_loc + A h``, ``scale = z_scale *
    exp(s)`` with ``s = S h`` bounded to ``(-MAX_LOG_STRETCH, MAX_LOG_STRETCH)``. ``A`` and ``S``
    start at zero, so q(z|x,y) starts as the encoder's q(z|x) and learns what the label
    changes. ``y`` is one-hot, or relaxed (a point of the simplex).
    """

    #: The label may stretch or shrink the encoder's scale by at most e^5 (about 150) either
    #: way: a bound, so that one step cannot send a scale to zero or to infinity.
    MAX_LOG_STRETCH = 5.0

    def __init__(self, z_dim: int, num_classes: int, hidden_dim: int):
        super().__init__()
        self.hidden = nn.Linear(2 * z_dim + num_classes, hidden_dim)
        self.shift = nn.Linear(hidden_dim, z_dim)
        self.log_stretch = nn.Linear(hidden_dim, z_dim)
        for layer in (self.shift, self.log_stretch):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z_loc: torch.Tensor, z_scale: torch.Tensor, y: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        z_loc, z_scale, y = _broadcast_rows(z_loc, z_scale, y)
        h = F.relu(self.hidden(torch.cat([z_loc, z_scale.log(), y], -1)))
        bound = self.MAX_LOG_STRETCH
        return z_loc + self.shift(h), z_scale * torch.exp(bound * torch.tanh(self.log_stretch(h) / bound))


class _Baseline(nn.Module):
    """A baseline of each item's downstream cost (log p - log q, about minus the loss of an
    item) from q(y|x)'s logits ``(B, C)``: ``(B,)``.

    ``offset`` (a buffer) follows the mean cost of the recent batches (:meth:`follow`), and the
    network, which TraceGraph_ELBO fits by squared error, learns each item's difference from
    it. Without the offset the network would start at 0 against costs of a hundred nats or
    more, and take many thousands of steps to reach them, all the while leaving the score
    function's learning signal its whole size.
    """

    #: the weight of the past in the offset's moving average, per step
    MOMENTUM = 0.9

    def __init__(self, num_classes: int, hidden_dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_classes, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1))
        self.register_buffer("offset", torch.zeros(()))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.net(logits.log_softmax(-1)).squeeze(-1) + self.offset

    @torch.no_grad()
    def follow(self, mean_cost: torch.Tensor) -> None:
        """Move the offset towards a batch's mean downstream cost (at once, the first time)."""
        weight = self.MOMENTUM if int(self.updates) > 0 else 0.0
        self.offset.mul_(weight).add_((1 - weight) * mean_cost.to(self.offset))
        self.updates += 1


class ClassPrior(nn.Module):
    """A learned p(z|y): one diagonal Gaussian per class, ``N(loc_y, diag(scale_y^2))``.

    ``forward(y)`` for ``y`` one-hot (or relaxed) ``(..., C)`` gives p(z|y) with batch shape
    ``(...)`` (the parameters are ``y``'s mixtures of the classes' own); ``forward()`` the
    marginal Σ_y p(y) p(z|y), p(y) uniform, for what draws z without a label (plots). Every
    class starts at the standard normal; the labels it is trained with pull them apart.
    """

    def __init__(self, z_dim: int, num_classes: int):
        super().__init__()
        self.locs = nn.Parameter(torch.zeros(num_classes, z_dim))
        # softplus(raw + softplus^-1(1)) = 1 at the start
        self.raw_scales = nn.Parameter(torch.zeros(num_classes, z_dim))

    def scales(self) -> torch.Tensor:
        return F.softplus(self.raw_scales + math.log(math.e - 1)) + 1e-5

    def forward(self, y: torch.Tensor | None = None) -> dist.TorchDistribution:
        if y is None:
            weights = dist.Categorical(logits=self.locs.new_zeros(len(self.locs)))
            return dist.MixtureSameFamily(weights, dist.Normal(self.locs, self.scales()).to_event(1))
        return dist.Normal(y @ self.locs, y @ self.scales()).to_event(1)


class ExpRelaxedCategorical(relaxed_categorical.ExpRelaxedCategorical, TorchDistributionMixin):
    """The Concrete distribution in log space (Maddison et al. 2017), as a Pyro distribution.

    Its sample is the logarithm of a relaxed one-hot vector. Scored there, the density stays
    finite: at a low temperature a relaxed draw can round to an exact one-hot vector, whose
    zeros the simplex density (``RelaxedOneHotCategorical``) scores as NaN. The two bounds are
    the same, the change of variables cancelling between q and p."""


def _broadcast_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Tensors ``(..., d_i)`` broadcast over their leading dimensions (enumeration adds one)."""
    batch = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return [t.expand(*batch, t.shape[-1]) for t in tensors]


class LabelledVAE(nn.Module):
    """A VAE with a class label beside z: conditional, or semi-supervised (M2).

    :param encoder: maps ``x`` ``(B, *image_shape)`` to ``(z_loc, z_scale)``, each ``(B, z_dim)``.
    :param decoder: maps ``[z, y]`` ``(..., z_dim + num_classes)`` to features ``(..., *image_shape)``.
    :param likelihood: decoder features to p(x|z,y) (as for :class:`~pyro_vae.model.VAE`).
    :param prior: ``forward()`` returns p(z), event shape ``(z_dim,)``.
    :param guide: the guide family, ``(z_loc, z_scale)`` to q(z|x,y) (as for the VAE).
    :param head: :class:`LabelHead`: the encoder's output and ``y`` to q(z|x,y)'s parameters.
    :param num_classes: the number of classes C; p(y) is uniform over them.
    :param classifier: maps ``x`` to ``(logits, _)`` of q(y|x), logits ``(B, C)`` (an encoder
        built with ``z_dim = C``); ``None`` for a conditional VAE.
    :param name: the prefix of the parts in Pyro's param store (see :class:`~pyro_vae.model.VAE`).

    ``model(x, y=None)`` and ``guide(x, y=None)`` take ``y`` as class indices ``(B,)``, or
    ``None`` (semi-supervised only) for items without labels. How a latent ``y`` is handled
    is the objective's choice, handed to both programs as ``beta`` is: ``labels_by`` (one of
    :data:`LABELS_BY`) and the relaxation's ``temperature``.
    """

    #: The latent sites that are drawn by reparameterization (a rank's shared noise); y is enumerated.
    latent_sites = (LATENT,)

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: nn.Module, prior: nn.Module,
                 guide: nn.Module, head: LabelHead, num_classes: int, classifier: nn.Module | None = None, *,
                 name: str = "vae"):
        super().__init__()
        self.encoder, self.decoder, self.likelihood, self.prior_net = encoder, decoder, likelihood, prior
        self.head = head
        self.classifier = classifier
        # the score function's baseline b(x), from the classifier's logits (a semi-supervised
        # VAE trained by enumeration or relaxation leaves it untouched)
        self.baseline = None if classifier is None else _Baseline(num_classes)
        self.guide_net = guide
        self.num_classes = num_classes
        self.name = name

    @property
    def semi_supervised(self) -> bool:
        return self.classifier is not None

    # -- the densities ------------------------------------------------------------------------
    def prior(self, y: torch.Tensor | None = None) -> dist.TorchDistribution:
        """p(z), event shape ``(z_dim,)``; with a :class:`ClassPrior`, p(z|y) for ``y`` one-hot
        ``(..., C)`` (batch shape ``(...)``), and without ``y`` the marginal over the classes."""
        if isinstance(self.prior_net, ClassPrior):
            return self.prior_net(y)
        return self.prior_net()

    def label_prior(self, like: torch.Tensor) -> dist.TorchDistribution:
        """p(y): uniform over the classes, one-hot, event shape ``(C,)``."""
        return dist.OneHotCategorical(logits=like.new_zeros(self.num_classes))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of q(y|x), ``(B, C)`` (semi-supervised runs)."""
        if self.classifier is None:
            raise ValueError("a conditional VAE has no classifier q(y|x); see predict()")
        return self.classifier(x)[0]

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.TorchDistribution:
        """q(z|x,y) for ``y`` one-hot ``(..., C)`` (broadcast against the batch), or class
        indices ``(B,)``, or ``None``: the most probable class (:meth:`predict`)."""
        z_loc, z_scale = self.encoder(x)
        y = self._one_hot(x, y)
        return self.guide_net(*self.head(z_loc, z_scale, y))

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> dist.TorchDistribution:
        """p(x|z,y) for ``z`` ``(..., z_dim)`` and ``y`` one-hot ``(..., C)`` or indices; ``None``:
        the classes in turn along the last batch dimension (for pictures of prior draws)."""
        if y is None:
            y = torch.arange(z.shape[-2] if z.dim() > 1 else 1, device=z.device) % self.num_classes
        if not y.is_floating_point():
            y = one_hot(y, self.num_classes, z)
        z, y = _broadcast_rows(z, y)
        return self.likelihood(self.decoder(torch.cat([z, y], -1)))

    def _one_hot(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            y = self.predict(x)
        return y if y.is_floating_point() else one_hot(y, self.num_classes, x)

    # -- the Pyro programs --------------------------------------------------------------------
    def model(self, x: torch.Tensor, y: torch.Tensor | None = None, beta: float = 1.0,
              reconstruction_weight: float = 1.0, labels_by: str = "enumerate", temperature: float = 0.5
              ) -> torch.Tensor:
        """p(z) p(y) p(x|z,y) for a batch ``x``, with ``y`` observed where given."""
        pyro.module(f"{self.name}.decoder", self.decoder)
        pyro.module(f"{self.name}.likelihood", self.likelihood)
        pyro.module(f"{self.name}.prior", self.prior_net)
        return self.model_body(x, y, beta, reconstruction_weight, labels_by, temperature)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None, beta: float = 1.0,
              reconstruction_weight: float = 1.0, labels_by: str = "enumerate", temperature: float = 0.5
              ) -> torch.Tensor:
        """q(y|x) (where ``y`` is latent) q(z|x,y); the same arguments as the model."""
        pyro.module(f"{self.name}.encoder", self.encoder)
        pyro.module(f"{self.name}.head", self.head)
        pyro.module(f"{self.name}.guide", self.guide_net)
        if self.classifier is not None:
            pyro.module(f"{self.name}.classifier", self.classifier)
            pyro.module(f"{self.name}.baseline", self.baseline)  # trained by TraceGraph_ELBO's baseline loss
        return self.guide_body(x, y, beta, reconstruction_weight, labels_by, temperature)

    def model_body(self, x: torch.Tensor, y: torch.Tensor | None = None, beta: float = 1.0,
                   reconstruction_weight: float = 1.0, labels_by: str = "enumerate", temperature: float = 0.5
                   ) -> torch.Tensor:
        with pyro.plate(PLATE, x.shape[0]):
            if y is not None:
                label = pyro.sample(LABEL, self.label_prior(x), obs=one_hot(y, self.num_classes, x))
            elif _checked(labels_by) == "gumbel_softmax":
                # the relaxed prior at the guide's temperature: the bound then holds the KL of
                # two Concrete densities (Maddison et al. 2017, appendix C.3)
                label = pyro.sample(LABEL, ExpRelaxedCategorical(x.new_tensor(temperature),
                                                                 logits=x.new_zeros(self.num_classes))).exp()
            else:
                label = pyro.sample(LABEL, self.label_prior(x))
            with latent_weight(beta):
                z = pyro.sample(LATENT, self.prior(label))
            with site_weight(reconstruction_weight):
                pyro.sample(OBSERVED, self.decode(z, label), obs=x)
        return z

    # reconstruction_weight is the model's business; the guide takes it because SVI hands both
    # programs the same arguments
    def guide_body(self, x: torch.Tensor, y: torch.Tensor | None = None, beta: float = 1.0,
                   reconstruction_weight: float = 1.0, labels_by: str = "enumerate", temperature: float = 0.5
                   ) -> torch.Tensor:
        with pyro.plate(PLATE, x.shape[0]):
            if y is None:
                label = self._sample_label(x, _checked(labels_by), temperature)
            else:
                label = one_hot(y, self.num_classes, x)
            with latent_weight(beta):
                return pyro.sample(LATENT, self.encode(x, label))

    def _sample_label(self, x: torch.Tensor, labels_by: str, temperature: float) -> torch.Tensor:
        if self.classifier is None:
            raise ValueError("a conditional VAE needs the label of every item (y)")
        logits = self.classify(x)
        if labels_by == "gumbel_softmax":
            return pyro.sample(LABEL, ExpRelaxedCategorical(x.new_tensor(temperature), logits=logits)).exp()
        if labels_by == "score_function":
            # a baseline b(x) of each item (Mnih & Gregor 2014), which TraceGraph_ELBO fits to
            # the downstream cost; Pyro's decaying average would be one value per position in
            # the batch, meaningless over shuffled batches
            return pyro.sample(LABEL, dist.OneHotCategorical(logits=logits), infer={"baseline": {
                "nn_baseline": self.baseline, "nn_baseline_input": logits.detach()}})
        return pyro.sample(LABEL, dist.OneHotCategorical(logits=logits), infer={"enumerate": "parallel"})

    # -- using a trained model ----------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class of each item ``(B,)``: argmax q(y|x) where there is a
        classifier, else argmax over y of a one-draw ELBO of log p(x|y) (a quick generative
        classifier: :func:`evaluate_labelled` importance-samples it)."""
        if self.classifier is not None:
            return self.classify(x).argmax(-1)
        return self.class_elbos(x).argmax(-1)

    @torch.no_grad()
    def class_elbos(self, x: torch.Tensor) -> torch.Tensor:
        """One-draw ELBOs of log p(x|y) for every class y, ``(B, C)``."""
        z_loc, z_scale = self.encoder(x)
        y = torch.eye(self.num_classes, dtype=x.dtype, device=x.device).unsqueeze(1)  # (C, 1, C)
        q = self.guide_net(*self.head(z_loc, z_scale, y))  # batch (C, B)
        z = q.sample()
        return (self.decode(z, y).log_prob(x) + self.prior(y).log_prob(z) - q.log_prob(z)).T

    @torch.no_grad()
    def elbo_per_image(self, x: torch.Tensor) -> torch.Tensor:
        """A one-draw bound on log p(x) of each item ``(B,)``: ``logsumexp_y [ELBO(x|y) +
        log p(y)]``, which holds for every q and is at least the M2 bound with q(y|x)."""
        return (self.class_elbos(x) - math.log(self.num_classes)).logsumexp(-1)

    @torch.no_grad()
    def code(self, x: torch.Tensor) -> torch.Tensor:
        """A deterministic code of each item ``(B, z_dim)``, at its most probable class."""
        return representative_code(self.encode(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z,y) at the code and the most probable class."""
        y = self.predict(x)
        return self.decode(representative_code(self.encode(x, y)), y).mean

    @torch.no_grad()
    def sample_images(self, num_samples: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Means of p(x|z,y) for z drawn from the prior, ``(num_samples, *image_shape)``; the
        classes ``labels`` ``(num_samples,)``, or the classes in turn."""
        if labels is None:  # the classes in turn
            labels = torch.arange(num_samples) % self.num_classes
        y = one_hot(labels.to(self._device()), self.num_classes, torch.zeros((), device=self._device()))
        z = self.prior(y).sample() if isinstance(self.prior_net, ClassPrior) else self.prior().sample((num_samples,))
        return self.decode(z, y).mean

    def _device(self) -> torch.device:
        return next(self.parameters()).device


# -- building ---------------------------------------------------------------------------------

def build_model(model_config, image_shape, num_classes: int = 0, name: str | None = None) -> nn.Module:
    """The model ``model_config`` describes: a :class:`~pyro_vae.model.VAE` for ``model.labels
    = "none"``, a :class:`~pyro_vae.hierarchical.HierarchicalVAE` where ``model.z_dims`` has
    two or more layers, else a :class:`LabelledVAE` over ``num_classes`` classes."""
    if model_config.z_dims:  # validation refuses layers with labels
        return build_hierarchical_vae(model_config, image_shape, name=name)
    if model_config.labels == "none":
        return build_vae(model_config, image_shape, name=name)
    return build_labelled_vae(model_config, image_shape, num_classes, name=name)


def build_labelled_vae(model_config, image_shape, num_classes: int, name: str | None = None) -> LabelledVAE:
    """A :class:`LabelledVAE` from a :class:`~pyro_vae.config.ModelConfig` whose ``labels`` is
    ``"conditional"`` or ``"semi_supervised"``.

    :raises ConfigError: fewer than two classes, or the parts do not fit the data (one line).
    """
    image_shape = tuple(image_shape)
    if num_classes < 2:
        raise ConfigError(f"model.labels = {model_config.labels!r} needs data with at least two classes; "
                          f"this data has {num_classes}")
    check_model_fits(model_config, image_shape)
    config = model_config
    encoder, _ = make_networks(config.arch, image_shape, config.z_dim, config.hidden_dim, config.num_layers)
    # the decoder reads [z, y]: built for z_dim + C inputs, any registered network can be it
    _, decoder = make_networks(config.arch, image_shape, config.z_dim + num_classes, config.hidden_dim,
                               config.num_layers)
    likelihood = make_likelihood(config.likelihood, image_shape, **config.likelihood_options)
    if config.class_prior:
        prior = ClassPrior(config.z_dim, num_classes)
    else:
        prior = make_prior(config.prior, config.z_dim, encoder=encoder, image_shape=image_shape,
                           data_domain=likelihood.accepts, **config.prior_options)
    head = LabelHead(config.z_dim, num_classes, config.hidden_dim)
    classifier = None
    if config.labels == "semi_supervised":
        # an encoder whose location is the logits: the VAE's family of networks, or another
        # (model.classifier_arch)
        classifier, _ = make_networks(config.classifier_arch or config.arch, image_shape, num_classes,
                                      config.hidden_dim, config.num_layers)
    guide = _build_guide(config)
    vae = LabelledVAE(encoder, decoder, likelihood, prior, guide, head, num_classes, classifier,
                      name=_default_name() if name is None else name)
    check_labelled_shapes(vae, image_shape, f"model.labels = {config.labels!r} with model.arch = {config.arch!r}")
    return vae


def check_labelled_shapes(vae: LabelledVAE, image_shape, what: str) -> None:
    """Run the model and guide once on two items of zeros, labelled and not: one line naming
    ``what`` where the parts do not fit together. Changes no weight, no batch statistic and no random state."""
    tensors = [t for t in vae.parameters() if t.is_floating_point()]
    like = tensors[0] if tensors else torch.zeros(())
    x = torch.zeros(2, *image_shape, dtype=like.dtype, device=like.device)
    try:
        with evaluation_mode(vae), probing(like), torch.no_grad():
            make_elbo("mc").loss(vae.model_body, vae.guide_body, x,
                                 y=torch.tensor([0, vae.num_classes - 1], device=x.device))
            if vae.semi_supervised:
                make_label_elbo("enumerate").loss(vae.model_body, vae.guide_body, x)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(f"{what}: the parts do not fit together ({' '.join(str(error).split())[:300]})") from None


# -- training ---------------------------------------------------------------------------------

class ScoreFunctionELBO(TraceGraph_ELBO):
    """Pyro's ``TraceGraph_ELBO`` (the score function of each non-reparameterized site times
    its downstream cost less the site's baseline, Rao-Blackwellized along the dependency
    graph) with a ``differentiable_loss``: its value is the negative ELBO, its gradient that
    of Pyro's surrogate loss (which also trains the baselines)."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        elbo, surrogate = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return surrogate + (-torch.as_tensor(elbo) - surrogate).detach()


def make_label_elbo(labels_by: str = "enumerate", num_particles: int = 1):
    """Pyro's estimator for a model with a latent label: ``TraceEnum_ELBO`` sums an enumerated
    ``y`` out (``"enumerate"``), :class:`ScoreFunctionELBO` (``TraceGraph_ELBO``) uses the
    baseline of a score-function ``y``, and ``Trace_ELBO`` differentiates through a relaxed
    one. ``z`` is sampled by all; ``num_particles`` are vectorized, except for the score
    function, whose baseline is one value per item."""
    options = dict(num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)
    if labels_by == "enumerate":
        return TraceEnum_ELBO(**options)
    if labels_by == "score_function":
        return ScoreFunctionELBO(**{**options, "vectorize_particles": False})
    if labels_by == "gumbel_softmax":
        return make_elbo("mc", num_particles)
    raise ValueError(f"labels_by = {labels_by!r}: choose one of {list(LABELS_BY)}")


class LabelledLoss(nn.Module):
    """The negative objective of a batch of items, labelled (``y >= 0``) or not (``y = -1``).

    ``sum over unlabelled items of -U(x) + sum over labelled items of [-L(x, y) +
    classifier_weight * -log q(y|x)]``: U is the bound with ``y`` latent (``estimator``), L
    with ``y`` observed (``labelled_estimator``, by default the same; Kingma et al. 2014,
    eq. 9). A conditional VAE's items are all labelled.
    """

    def __init__(self, vae: LabelledVAE, estimator, labelled_estimator=None, classifier_weight: float = 0.0,
                 labels_by: str = "enumerate", temperature: float = 0.5):
        super().__init__()
        self.vae = vae
        self.estimator = estimator
        self.labelled_estimator = estimator if labelled_estimator is None else labelled_estimator
        self.classifier_weight = classifier_weight
        self.labels_by = _checked(labels_by)
        self.temperature = temperature

    def forward(self, x: torch.Tensor, y: torch.Tensor, shard: tuple[int, int, int] | None = None, **kwargs
                ) -> torch.Tensor:
        """``x``: the items; ``y``: their labels, or with ``shard = (begin, end, total)`` the
        labels of the whole batch of which ``x`` is the items ``[begin, end)`` (a rank's part)."""
        kwargs.update(labels_by=self.labels_by, temperature=self.temperature)
        begin, end = (0, len(x)) if shard is None else shard[:2]
        loss = x.new_zeros(())
        for labelled in (False, True):  # the order of a single process's draws: unlabelled items first
            part = _Part(y >= 0 if labelled else y < 0, begin, end, shard is not None)
            if part.total == 0:
                continue
            x_part, y_part = x[part.rows], y[begin:end][part.rows] if labelled else None
            if part.empty:  # another rank's items: draw their noise all the same, score one item with weight 0
                x_part, y_part = x[:1], y[part.first_of_batch].expand(1) if labelled else None
            with shared_noise(self.vae.latent_sites, part.shard):
                if labelled:
                    part_loss = self._labelled(x_part, y_part, **kwargs)
                else:
                    part_loss = self.estimator.differentiable_loss(self.vae.model_body, self.vae.guide_body,
                                                                   x_part, None, **kwargs)
                    if self.labels_by == "score_function" and self.training:  # one process (see fit)
                        self.vae.baseline.follow(-part_loss.detach() / len(x_part))  # the cost is minus the loss
            loss = loss + (part_loss * 0 if part.empty else part_loss)
        return loss

    def _labelled(self, x: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """-L(x, y) summed over labelled items, and the classifier's weighted cross-entropy."""
        loss = self.labelled_estimator.differentiable_loss(self.vae.model_body, self.vae.guide_body, x, y, **kwargs)
        if self.vae.semi_supervised and self.classifier_weight > 0:
            loss = loss + self.classifier_weight * F.cross_entropy(self.vae.classify(x), y, reduction="sum")
        return loss


class _Part:
    """The labelled or the unlabelled items of a batch (``mask`` over the whole batch) that
    a rank's part ``[begin, end)`` holds: ``rows`` (of the rank's items), and ``shard``, their
    place among all the batch's items of that kind, for :class:`SharedNoise` (``None`` for one
    process). ``empty``: the batch has items of that kind, but none of them is this rank's."""

    def __init__(self, mask: torch.Tensor, begin: int, end: int, distributed: bool):
        self.rows = mask[begin:end]
        self.total = int(mask.sum())
        count = int(self.rows.sum())
        self.empty = distributed and count == 0 and self.total > 0
        self.first_of_batch = int(mask.nonzero()[0]) if self.empty else None
        before = int(mask[:begin].sum())
        self.shard = None if not distributed else (0, 1, self.total) if self.empty else (before, before + count,
                                                                                          self.total)


def make_training_loss(vae: nn.Module, objective) -> nn.Module:
    """The loss module :func:`pyro_vae.fit` steps: :class:`~pyro_vae.distributed.ELBOLoss` for
    a VAE (with each layer's KL weight, ``objective.betas``, for a hierarchical one),
    :class:`LabelledLoss` for a labelled one (``objective.labels_by``'s estimator for a
    semi-supervised one; a conditional one observes every label and takes ``objective.elbo``)."""
    estimator = make_elbo(objective.elbo, objective.num_particles)
    if isinstance(vae, HierarchicalVAE):
        return ELBOLoss(vae, estimator, layer_betas=layer_betas(objective, vae.num_layers))
    if not isinstance(vae, LabelledVAE):
        return ELBOLoss(vae, estimator)
    latent = make_label_elbo(objective.labels_by, objective.num_particles) if vae.semi_supervised else estimator
    return LabelledLoss(vae, latent, estimator, objective.classifier_weight, objective.labels_by,
                        objective.temperature)


def num_classes_of(splits) -> int:
    """The data's number of classes: its class names where it has them (a torchvision set, a
    folder), else one more than the largest label of any split."""
    names = (splits.source or {}).get("classes")
    if names:
        return len(names)
    found = [int(part.labels.max()) for part in (splits.train, splits.val, splits.test)
             if part.labels is not None and len(part.labels)]
    return max(found) + 1 if found else 0


def check_labels(config, splits) -> None:
    """Refuse (one line) labels a labelled run cannot train on: data without labels, labels
    outside ``0..C-1`` (a negative one would pass for "unlabelled", which ``data.labelled``
    decides), and a ``data.labelled`` above the training items or below one per class. Nothing
    for a run without labels. Cheap: the CLI calls it before anything is built.

    :raises DataError: the data has no labels, or labels outside the classes.
    :raises ConfigError: ``data.labelled`` does not fit the training items.
    """
    if config.model.labels == "none":
        return
    train = splits.train.head(config.data.train_limit) if config.data.train_limit else splits.train
    if train.labels is None:
        raise DataError(f"model.labels = {config.model.labels!r} needs labelled data; this data has none (an image "
                        "folder's class folders, or 'labels' / 'y' beside the images in an .npz, give them)")
    num_classes = num_classes_of(splits)
    for name, part in (("training", splits.train), ("validation", splits.val), ("test", splits.test)):
        if part.labels is not None and len(part.labels):
            low, high = int(part.labels.min()), int(part.labels.max())
            if low < 0 or high >= num_classes:
                raise DataError(f"the {name} labels run from {low} to {high}: class indices must lie in 0.."
                                f"{num_classes - 1}; to leave items unlabelled, set data.labelled instead")
    labelled = config.data.labelled
    if labelled > len(train.labels):
        raise ConfigError(f"data.labelled = {labelled}: more than the {len(train.labels)} training items")
    if 0 < labelled < num_classes:
        raise ConfigError(f"data.labelled = {labelled}: fewer than one per class ({num_classes} classes); give at "
                          f"least {num_classes}, or 0 to keep every label")


def training_labels(config, splits) -> tuple[torch.Tensor | None, int]:
    """A labelled run's training labels and number of classes: the labels of the training
    items that ``config.data.labelled`` keeps (:func:`choose_labelled`), ``-1`` for the others;
    ``(None, 0)`` for a run without labels.

    :raises DataError: as :func:`check_labels`, which this calls first.
    :raises ConfigError: as :func:`check_labels`, or a class has fewer items than its share.
    """
    if config.model.labels == "none":
        return None, 0
    check_labels(config, splits)
    train = splits.train.head(config.data.train_limit) if config.data.train_limit else splits.train
    num_classes = num_classes_of(splits)
    labels = train.labels.clone()
    if config.data.labelled:
        kept = choose_labelled(labels, config.data.labelled, num_classes, config.data.split_seed)
        hidden = torch.ones(len(labels), dtype=torch.bool)
        hidden[kept] = False
        labels[hidden] = -1
    return labels, num_classes


def choose_labelled(labels: torch.Tensor, count: int, num_classes: int, seed: int) -> torch.Tensor:
    """Positions of ``count`` items to keep the labels of, balanced across the classes: each
    class gets ``count // num_classes`` (the first ``count % num_classes`` classes in a seeded
    order one more), drawn at random by ``seed``. Sorted.

    :raises ConfigError: a class has fewer items than its share.
    """
    generator = torch.Generator().manual_seed(seed)
    base, extra = divmod(count, num_classes)
    bonus = torch.randperm(num_classes, generator=generator)[:extra].tolist()
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        share = base + (c in bonus)
        if len(members) < share:
            raise ConfigError(f"data.labelled = {count}: class {c} has {len(members)} training items, fewer than "
                              f"its share of {share}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:share]])
    return torch.cat(chosen).sort().values


def _batches_of(labels: torch.Tensor, batch_size: int, per_batch: int) -> tuple[int, int] | None:
    """``(labelled items per batch, batches)`` of a semi-supervised epoch; ``None`` where it is a
    plain permutation (no unlabelled items, no labelled ones, or batches of one item)."""
    known = int((labels >= 0).sum())
    unknown = len(labels) - known
    per_batch = min(per_batch, batch_size - 1)
    if known == 0 or unknown == 0 or per_batch <= 0:
        return None
    return per_batch, math.ceil(unknown / (batch_size - per_batch))


def labelled_epoch_items(labels: torch.Tensor, batch_size: int, per_batch: int) -> int:
    """The length of :func:`labelled_order`'s epoch, without drawing it."""
    batches = _batches_of(labels, batch_size, per_batch)
    if batches is None:
        return len(labels)
    per_batch, num_batches = batches
    return int((labels < 0).sum()) + num_batches * per_batch


def labelled_order(labels: torch.Tensor, batch_size: int, per_batch: int, generator: torch.Generator
                   ) -> torch.Tensor:
    """An epoch's order of training items for a semi-supervised run: each batch holds
    ``batch_size - per_batch`` unlabelled items (``labels == -1``; every one once an epoch) and
    ``per_batch`` labelled ones, drawn in passes of seeded permutations over the few labelled
    items, so they are seen in every step rather than once an epoch. Without unlabelled items
    (or without labelled ones) it is a plain permutation.
    """
    batches = _batches_of(labels, batch_size, per_batch)
    if batches is None:
        return torch.randperm(len(labels), generator=generator)
    per_batch, num_batches = batches
    known = (labels >= 0).nonzero().flatten()
    unknown = (labels < 0).nonzero().flatten()
    unknown = unknown[torch.randperm(len(unknown), generator=generator)]
    step = batch_size - per_batch
    passes = math.ceil(num_batches * per_batch / len(known))
    repeated = torch.cat([known[torch.randperm(len(known), generator=generator)] for _ in range(passes)])
    pieces = []
    for b in range(num_batches):
        pieces += [unknown[b * step : (b + 1) * step], repeated[b * per_batch : (b + 1) * per_batch]]
    return torch.cat(pieces)


# -- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def class_log_likelihoods(vae: LabelledVAE, x: torch.Tensor, num_samples: int, chunk: int = 100) -> torch.Tensor:
    """Importance-sampled log p(x|y) of each item for every class, ``(B, C)``: ``num_samples``
    draws of z from q(z|x,y) for each class, in chunks of ``chunk`` draws."""
    z_loc, z_scale = vae.encoder(x)
    y = torch.eye(vae.num_classes, dtype=x.dtype, device=x.device).unsqueeze(1)  # (C, 1, C)
    q = vae.guide_net(*vae.head(z_loc, z_scale, y))  # batch (C, B)
    prior = vae.prior(y)
    total = torch.full((vae.num_classes, len(x)), -math.inf, dtype=x.dtype, device=x.device)
    for start in range(0, num_samples, chunk):
        z = q.sample((min(chunk, num_samples - start),))  # (k, C, B, z_dim)
        log_w = vae.decode(z, y).log_prob(x) + prior.log_prob(z) - q.log_prob(z)
        total = torch.logaddexp(total, log_w.logsumexp(0))
    return (total - math.log(num_samples)).T


@torch.no_grad()
def evaluate_labelled(vae: LabelledVAE, images, labels: torch.Tensor, num_samples: int = 100,
                      batch_size: int = 100, progress: bool = False, seed: int = 0) -> dict:
    """Test accuracy and log-likelihood of a labelled VAE, in nats per item.

    ``test_log_likelihood``: log p(x) = logsumexp over y of [log p(x|y) + log p(y)], each
    log p(x|y) importance-sampled with ``num_samples`` draws of q(z|x,y) per class.
    ``test_accuracy``: argmax q(y|x) for a semi-supervised VAE; for a conditional one the
    generative classifier, argmax over y of log p(x|y) + log p(y) (``generative_accuracy``,
    reported for both). Seeded as :func:`pyro_vae.elbo.evaluate`.

    :param images: ``(N, *image_shape)`` as the model sees them (a tensor or an ``ImageData``).
    :param labels: the items' classes ``(N,)``.
    """
    device = next(vae.parameters()).device
    log_p, generative_hits, hits = [], 0, 0
    bar = tqdm(total=len(images), desc=f"evaluate K={num_samples} per class", unit="img", disable=not progress)
    with seeded(seed, device):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            joint = class_log_likelihoods(vae, x, num_samples) - math.log(vae.num_classes)  # (B, C)
            log_p.append(joint.logsumexp(-1))
            generative_hits += int((joint.argmax(-1) == y).sum())
            if vae.semi_supervised:
                hits += int((vae.classify(x).argmax(-1) == y).sum())
            bar.update(len(x))
    bar.close()
    count = len(images)
    generative = generative_hits / count
    return {
        "test_log_likelihood": torch.cat(log_p).mean().item(),
        "test_accuracy": hits / count if vae.semi_supervised else generative,
        "generative_accuracy": generative,
        "accuracy_by": "classifier q(y|x)" if vae.semi_supervised else "argmax_y log p(x|y) + log p(y)",
        "num_samples": num_samples,
        "num_images": count,
    }


@torch.no_grad()
def accuracy(vae: LabelledVAE, images, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """The fraction of ``images`` whose :meth:`LabelledVAE.predict` is their label (for a
    conditional VAE a one-draw generative classifier: :func:`evaluate_labelled` is exact)."""
    device = next(vae.parameters()).device
    hits = sum(int((vae.predict(images[s : s + batch_size].to(device)) == labels[s : s + batch_size].to(device))
                   .sum()) for s in range(0, len(images), batch_size))
    return hits / max(1, len(images))

