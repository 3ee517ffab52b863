"""Parts of one's own: register a likelihood, a prior, a guide family or networks by name; load plugins.

A registered name is valid wherever a built-in one is: in a config (``model.likelihood``,
``model.prior``, ``model.guide``, ``model.arch``), on the command line, and in
:func:`pyro_vae.load_run`.
The contract a part must meet is written once, in the docstring of its register function,
and its vocabulary lives in :mod:`pyro_vae.contract`; what can be checked without data is
checked when the part is registered, and a part that breaks it is refused with one line
(:class:`ComponentError`), not with an ``AttributeError`` later. Shapes need data:
:func:`pyro_vae.build_vae` checks them once, on a datum of zeros (:mod:`pyro_vae.shapes`).
Config validation reads each part's :class:`Record` (its options, bounds, accepted data,
closed-form KL, link) instead of building it.

Every part is an ``nn.Module`` class. Its constructor's arguments are of two kinds:

- **model arguments**, filled in by the model by name: ``image_shape`` (the shape of one
  datum: ``(C, H, W)`` for images or ``(D,)`` for vectors), ``z_dim``, and for some parts
  ``encoder``, ``data_domain``, ``hidden_dim``, ``num_layers`` (see each function);
- **options**, every other argument: each has a default of type ``int``, ``float``, ``bool``
  or ``str``, and that type is the option's type. A config sets them by name
  (``model.likelihood_options``, ``model.prior_options``, ``model.guide_options``) and they
  are type-checked against
  the default before anything trains. An optional class attribute ``option_bounds`` maps a
  numeric option to ``(lower bound, whether the bound itself is allowed)``.

A plugin is a module or a ``.py`` file whose import registers parts; :func:`load_plugins`
imports them (the CLI's ``--plugin MODULE_OR_FILE``).

Example (a Poisson likelihood for counts)::

    import pyro.distributions as dist
    from torch import nn
    import pyro_vae

    @pyro_vae.register_likelihood("poisson")
    class Poisson(nn.Module):
        accepts = "real"                       # counts are real values >= 0

        def __init__(self, image_shape, min_rate: float = 1e-3):
            super().__init__()
            self.event_dim, self.min_rate = len(image_shape), min_rate

        def forward(self, features):
            rate = nn.functional.softplus(features) + self.min_rate
            return dist.Poisson(rate).to_event(self.event_dim)

    config = pyro_vae.load_config(None, {"model.likelihood": "poisson"})

References: torch's ``torch.distributions.kl.register_kl`` (registration by decorator into a
lookup table; capabilities derived from the table rather than declared).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from torch import nn

# ComponentError and load_plugins are imported from here too (the package's top level, the CLI)
from .contract import ComponentError, check_name, check_part, model_arguments, option_bounds, options_of, refuse
from .guides import GUIDES, DiagonalGaussian
from .likelihoods import LIKELIHOODS, likelihood_link
from .networks import ARCHITECTURES, MLPEncoder
from .plugins import load_plugins
from .priors import PRIORS
from .seeding import probing

__all__ = ["REGISTRIES", "Record", "record", "register_likelihood", "register_prior", "register_guide",
           "register_networks", "has_closed_form_kl"]

#: Each kind of part's registry: name -> class (``"networks"``: name -> (encoder, decoder)).
REGISTRIES = {"likelihood": LIKELIHOODS, "prior": PRIORS, "guide": GUIDES, "networks": ARCHITECTURES}


# -- registering: the contract is checked once, here ------------------------------------------

def _check_module_class(kind: str, name: str, cls, role: str = "") -> str:
    label = f"{role}{getattr(cls, '__qualname__', repr(cls))}"
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        refuse(kind, name, f"{label} is not a torch.nn.Module subclass")
    if cls.forward is nn.Module.forward:
        refuse(kind, name, f"{label} defines no forward")
    return label


def _same_part(a, b) -> bool:
    """The same class, or the same class defined again (a module imported twice, a notebook
    cell run again): the same module and qualified name."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same_part(x, y) for x, y in zip(a, b))
    return a is b or (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == (
        getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def _describe(part) -> str:
    parts = part if isinstance(part, tuple) else (part,)
    return ", ".join(f"{p.__module__}.{p.__qualname__}" for p in parts)


def _add(kind: str, name: str, part, replace: bool) -> None:
    registry = REGISTRIES[kind]
    existing = registry.get(name)
    if existing is not None and not replace and not _same_part(existing, part):
        refuse(kind, name, f"the name is taken by {_describe(existing)}; choose another name, or pass replace=True")
    registry[name] = part


def _register_one(kind: str, name: str, cls, replace: bool):
    """Register a likelihood, a prior or a guide family: one class, checked against its kind's contract."""
    check_name(kind, name)

    def register(cls):
        check_part(kind, name, cls, _check_module_class(kind, name, cls))
        _add(kind, name, cls, replace)
        return cls

    return register if cls is None else register(cls)


# -- the public register functions ---------------------------------------------------------

def register_likelihood(name: str, cls: type | None = None, *, replace: bool = False):
    """Register a likelihood head p(x|z) under ``name``, as a decorator or a call::

        @register_likelihood("poisson")
        class Poisson(nn.Module): ...

        register_likelihood("poisson", Poisson)

    The contract of the class:

    - an ``nn.Module`` subclass;
    - ``accepts``, a class attribute: the data it is defined on, ``"binary"`` (values in
      {0, 1}), ``"unit_interval"`` (values in [0, 1]) or ``"real"`` (any real value). The
      training data's range is checked against it, and the VampPrior keeps its pseudo-inputs
      in [0, 1] unless it is ``"real"``;
    - constructor ``__init__(self, image_shape, **options)``: ``image_shape`` is the shape of
      one datum, ``(C, H, W)`` or ``(D,)``; every other argument is an option with an ``int``,
      ``float``, ``bool`` or ``str`` default (``model.likelihood_options``); optional
      ``option_bounds = {option: (lower bound, inclusive)}``;
    - ``forward(features)``: ``features`` is the decoder's output ``(..., *image_shape)``; it
      returns a ``pyro.distributions`` distribution with ``event_shape == image_shape`` (use
      ``.to_event(len(image_shape))``) and ``batch_shape == features.shape[:-len(image_shape)]``,
      whose ``log_prob`` includes every normalizing constant (so numbers compare across
      likelihoods). Its ``mean`` is what reconstructions and samples show;
    - optionally, ``link = "logit"`` or ``"identity"``: how its mean follows from the features
      (what ``model.init_output_bias`` needs); left out, it is derived once, with the default
      options (:func:`pyro_vae.likelihoods.likelihood_link`).

    :param name: a plain identifier; valid in configs (``model.likelihood``) once registered.
    :param cls: the class; omitted, the function returns a decorator.
    :param replace: allow replacing a different part already registered under ``name``
        (registering the same class again is always allowed).
    :returns: ``cls`` (or the decorator).
    :raises ComponentError: the class breaks the contract, or the name is taken.
    """
    return _register_one("likelihood", name, cls, replace)


def register_prior(name: str, cls: type | None = None, *, replace: bool = False):
    """Register a prior p(z) under ``name``, as a decorator or a call::

        @register_prior("laplace")
        class LaplacePrior(nn.Module): ...

        register_prior("laplace", LaplacePrior)

    The contract of the class:

    - an ``nn.Module`` subclass;
    - constructor ``__init__(self, z_dim, **options)``; it may also take the model arguments
      ``encoder`` (the VAE's encoder, for priors defined through the guide such as the
      VampPrior: hold it without registering it as a submodule, e.g. in a list, or Pyro's SVI
      would step its parameters twice), ``image_shape`` (the shape of one datum, ``(C, H, W)``
      or ``(D,)``) and ``data_domain`` (the likelihood's ``accepts``); every other argument is
      an option with an ``int``, ``float``, ``bool`` or ``str`` default
      (``model.prior_options``); optional ``option_bounds``;
    - ``forward()``, no arguments: a ``pyro.distributions`` distribution with
      ``event_shape == (z_dim,)`` and ``batch_shape == ()`` (``pyro.plate`` broadcasts it).

    Whether its KL from the guide's diagonal Gaussian has a closed form (which
    ``objective.elbo = "analytic"`` needs) is derived from torch's KL registry by
    :func:`has_closed_form_kl`: a prior returning ``Normal(loc, scale).to_event(1)`` has one; a
    mixture has none. To skip the derivation, set the class attribute
    ``has_closed_form_kl = True`` or ``False``.

    :param name: a plain identifier; valid in configs (``model.prior``) once registered.
    :param cls: the class; omitted, the function returns a decorator.
    :param replace: allow replacing a different part already registered under ``name``.
    :returns: ``cls`` (or the decorator).
    :raises ComponentError: the class breaks the contract, or the name is taken.
    """
    return _register_one("prior", name, cls, replace)


def register_networks(name: str, encoder: type, decoder: type, *, replace: bool = False) -> tuple[type, type]:
    """Register an encoder class and a decoder class under ``name`` (``model.arch``), in one call::

        register_networks("tiny", TinyEncoder, TinyDecoder)

    The contract of the classes:

    - ``nn.Module`` subclasses;
    - constructors ``__init__(self, image_shape, z_dim, ...)``: ``image_shape`` is the shape of
      one datum, ``(C, H, W)`` or ``(D,)``; they may also take ``hidden_dim`` and ``num_layers``
      (from ``model.hidden_dim``, ``model.num_layers``; a config with ``num_layers != 1`` is
      refused for networks that take no ``num_layers``); any other argument needs a default
      (networks have no config options);
    - encoder ``forward(x)``: ``x`` of shape ``(B, *image_shape)`` -> ``(z_loc, z_scale)``, each
      ``(B, z_dim)``, ``z_scale > 0`` (the guide family, ``model.guide``, turns them into q(z|x);
      the default is ``Normal(z_loc, z_scale).to_event(1)``);
    - decoder ``forward(z)``: ``z`` of shape ``(..., z_dim)`` (any leading dimensions:
      importance sampling adds one) -> features ``(..., *image_shape)`` for the likelihood;
    - optionally, a decoder property ``output_bias``: the parameter added last to the features,
      of shape ``(prod(image_shape),)`` or ``(C,)`` (one per channel), which
      ``model.init_output_bias`` sets from the training data (see
      :func:`pyro_vae.model.init_output_bias`); a config asking for it is refused without it.

    Networks that work only for images or only for vectors should refuse the other kind in
    their constructor by raising :class:`pyro_vae.config.ConfigError` with one line.

    :param name: a plain identifier; valid in configs (``model.arch``) once registered.
    :param replace: allow replacing different networks already registered under ``name``.
    :returns: ``(encoder, decoder)``.
    :raises ComponentError: a class breaks the contract, or the name is taken.
    """
    check_name("networks", name)
    for role, cls in (("encoder ", encoder), ("decoder ", decoder)):
        check_part("networks", name, cls, _check_module_class("networks", name, cls, role))
    _add("networks", name, (encoder, decoder), replace)
    return encoder, decoder


def register_guide(name: str, cls: type | None = None, *, replace: bool = False):
    """Register a guide family q(z|x) under ``name`` (``model.guide``), as a decorator or a call::

        @register_guide("planar")
        class PlanarFlowGuide(nn.Module): ...

        register_guide("planar", PlanarFlowGuide)

    The encoder gives ``(z_loc, z_scale)``; the family turns them into q(z|x). The contract of
    the class:

    - an ``nn.Module`` subclass (its parameters train with the encoder's);
    - constructor ``__init__(self, z_dim, **options)``; every other argument is an option with
      an ``int``, ``float``, ``bool`` or ``str`` default (``model.guide_options``); optional
      ``option_bounds``;
    - ``forward(z_loc, z_scale)``, each ``(B, z_dim)``, ``z_scale > 0``: a
      ``pyro.distributions`` distribution with ``batch_shape == (B,)`` and
      ``event_shape == (z_dim,)``, which

      * draws reparameterized samples (``has_rsample``: training differentiates through them),
      * gives the exact ``log_prob`` of its own samples (the importance weights of evaluation)
        and of any other ``z`` (estimators that score a detached copy of the sample, such as
        STL and DReG: a flow must invert, as Pyro's autoregressive transforms do),
      * has a ``mean``, or is a ``TransformedDistribution`` of a distribution with one: that
        gives the deterministic code of reconstructions and plots (:meth:`pyro_vae.VAE.code`).

    Whether ``objective.elbo = "analytic"`` works with it is derived, per prior, from torch's
    KL registry (:func:`has_closed_form_kl`): a flow has no closed-form KL, so the config is
    refused. To skip the derivation, set the class attribute ``has_closed_form_kl = True`` or
    ``False``. Options that fit their bounds but not the latent size are refused before any
    data is read by an optional classmethod ``check_options(z_dim, **options)`` that raises
    :class:`~pyro_vae.contract.ConfigError` with one line (the IAF's does, for networks
    narrower than ``z_dim``); anything else its constructor raises is one line when the VAE is
    built. :func:`pyro_vae.build_vae` checks shapes, sampling, scoring and the code once, on a
    datum of zeros.

    :param name: a plain identifier; valid in configs (``model.guide``) once registered.
    :param cls: the class; omitted, the function returns a decorator.
    :param replace: allow replacing a different family already registered under ``name``.
    :returns: ``cls`` (or the decorator).
    :raises ComponentError: the class breaks the contract, or the name is taken.
    """
    return _register_one("guide", name, cls, replace)


# -- capabilities derived, not declared ------------------------------------------------------

#: The datum shape and latent size at which a prior class is built to derive its capabilities.
_PROBE_IMAGE_SHAPE, _PROBE_Z_DIM = (1, 4, 4), 2


@functools.lru_cache(maxsize=None)
def _class_has_closed_form_kl(cls, guide=DiagonalGaussian) -> bool:
    given = {"z_dim": _PROBE_Z_DIM, "image_shape": _PROBE_IMAGE_SHAPE, "data_domain": "unit_interval"}
    with probing():
        q = _probe_guide(guide)
        try:
            given["encoder"] = MLPEncoder(_PROBE_IMAGE_SHAPE, _PROBE_Z_DIM, 8)
            prior = cls(**{k: given[k] for k in model_arguments(cls, "prior")})
            prior_distribution = prior()
        except Exception as error:  # a user's prior may raise anything; say which and how to skip it
            raise ComponentError(
                f"prior {cls.__qualname__}: building it (z_dim = {_PROBE_Z_DIM}) to derive whether its KL has a "
                f"closed form raised {type(error).__name__}: {' '.join(str(error).split())}; set the class "
                "attribute has_closed_form_kl = True or False to skip this") from None
        return _kl_is_registered(prior_distribution, q=q)


def _probe_guide(cls):
    """The distribution a guide family class gives at z_dim = 2, z_loc = 0, z_scale = 1."""
    try:
        guide = cls(z_dim=_PROBE_Z_DIM)
        return guide(torch.zeros(1, _PROBE_Z_DIM), torch.ones(1, _PROBE_Z_DIM))
    except Exception as error:
        raise ComponentError(
            f"guide {cls.__qualname__}: building it (z_dim = {_PROBE_Z_DIM}) to derive whether its KL has a closed "
            f"form raised {type(error).__name__}: {' '.join(str(error).split())}; set the class attribute "
            "has_closed_form_kl = True or False to skip this") from None


def _kl_is_registered(prior_distribution, like: torch.Tensor | None = None, q=None) -> bool:
    """Whether torch's KL registry has a rule for KL(``q`` || ``prior_distribution``).

    ``q`` defaults to the diagonal Gaussian guide, ``Normal(z_loc, z_scale).to_event(1)``, on
    the device and with the dtype of ``like`` (a parameter of the prior; CPU float32 without one).
    """
    if q is None:
        z_dim = prior_distribution.event_shape[-1] if prior_distribution.event_shape else 1
        like = torch.zeros(()) if like is None else like
        loc = torch.zeros(z_dim, dtype=like.dtype, device=like.device)
        q = dist.Normal(loc, torch.ones_like(loc)).to_event(1)
    try:
        torch.distributions.kl_divergence(q, prior_distribution)
    except NotImplementedError:  # what kl_divergence raises for a pair without a rule
        return False
    return True


def has_closed_form_kl(prior, guide=None) -> bool:
    """Whether KL(q(z|x) || p(z)) has a closed form: whether torch's KL registry
    (``torch.distributions.kl.register_kl``) has a rule for the guide family's distribution
    against the distribution the prior returns. ``objective.elbo = "analytic"`` needs one.

    :param prior: a prior class (built once, at z_dim = 2, with a private random stream; the
        answer is cached) or a prior module (its ``forward()`` is evaluated).
    :param guide: a guide family class (built likewise, at ``z_loc = 0``, ``z_scale = 1``) or
        module (evaluated there); ``None``: the diagonal Gaussian.
    :returns: the class attribute ``has_closed_form_kl`` where the guide family declares one,
        else where a prior declares one (about the diagonal Gaussian, or ``False``), else the
        answer derived from the registry.
    :raises ComponentError: a prior or guide class cannot be built with its default options.

    >>> from pyro_vae.guides import InverseAutoregressiveFlow
    >>> from pyro_vae.priors import Mixture, StandardNormal
    >>> has_closed_form_kl(StandardNormal), has_closed_form_kl(Mixture)
    (True, False)
    >>> has_closed_form_kl(StandardNormal, InverseAutoregressiveFlow)
    False
    """
    declared = getattr(guide, "has_closed_form_kl", None)
    if isinstance(declared, bool):
        return declared
    gaussian = guide is None or guide is DiagonalGaussian or isinstance(guide, DiagonalGaussian)
    declared = getattr(prior, "has_closed_form_kl", None)
    if isinstance(declared, bool) and (gaussian or not declared):
        return declared
    if isinstance(prior, nn.Module):
        tensors = [t for t in (*prior.parameters(), *prior.buffers()) if t.is_floating_point()]
        with probing(tensors[0] if tensors else None):
            prior_distribution = prior()
            q = None
            if not gaussian:
                z_dim = prior_distribution.event_shape[-1]
                like = tensors[0] if tensors else torch.zeros(())
                guide_module = guide if isinstance(guide, nn.Module) else guide(z_dim=z_dim)
                loc = torch.zeros(1, z_dim, dtype=like.dtype, device=like.device)
                q = guide_module(loc, torch.ones_like(loc))
            return _kl_is_registered(prior_distribution, tensors[0] if tensors else None, q=q)
    if isinstance(guide, nn.Module):
        guide = type(guide)
    return _class_has_closed_form_kl(prior, DiagonalGaussian if gaussian else guide)


# -- what a registered part can do: read by config validation instead of building parts -------

@dataclass(frozen=True)
class Record:
    """What the part registered as ``name`` declares, or what is derived once of its class:
    :mod:`pyro_vae.config` validates a config by reading these, without building the part for
    every config. Get one with :func:`record`.

    :param kind: ``"likelihood"``, ``"prior"``, ``"guide"`` or ``"networks"``.
    :param name: the registered name.
    :param part: the class; for ``"networks"``, the pair ``(encoder, decoder)``.
    """

    kind: str
    name: str
    part: object

    @property
    def classes(self) -> tuple:
        return self.part if isinstance(self.part, tuple) else (self.part,)

    @property
    def options(self) -> dict:
        """``{option: default}``; networks have none (their arguments come from ``model.*`` keys)."""
        return {} if self.kind == "networks" else options_of(self.part, self.kind)

    @property
    def bounds(self) -> dict:
        """``{option: (lower bound, inclusive)}``."""
        return {} if self.kind == "networks" else option_bounds(self.part)

    @property
    def accepts(self) -> str | None:
        """A likelihood's ``accepts``: the data it is defined on (:data:`~pyro_vae.contract.ACCEPTS`)."""
        return getattr(self.part, "accepts", None) if self.kind == "likelihood" else None

    def takes(self, argument: str) -> bool:
        """Whether a constructor of the part takes the model argument ``argument`` (e.g. ``"num_layers"``)."""
        return any(argument in model_arguments(cls, self.kind) for cls in self.classes)

    @property
    def has_output_bias(self) -> bool:
        """Networks whose decoder has an ``output_bias`` (what ``model.init_output_bias`` sets)."""
        return self.kind == "networks" and hasattr(self.part[1], "output_bias")

    @property
    def link(self) -> str | None:
        """A likelihood's link: ``"logit"``, ``"identity"`` or ``None`` (see
        :func:`~pyro_vae.likelihoods.likelihood_link`); declared by a class attribute ``link``,
        else derived once, with the default options."""
        declared = getattr(self.part, "link", None)
        return declared if declared in ("logit", "identity") else _class_link(self.part)

    def closed_form_kl(self, guide: type | None = None) -> bool:
        """A prior's closed-form KL from ``guide`` (a guide family class; ``None``: the diagonal
        Gaussian): see :func:`has_closed_form_kl`. Derived once per pair."""
        return has_closed_form_kl(self.part, guide)

    def check_options(self, z_dim: int, options: dict) -> None:
        """Call the part's optional classmethod ``check_options(z_dim, **options)``, which refuses
        (:class:`~pyro_vae.contract.ConfigError`, one line) options that fit their bounds but not
        the latent size, without building the part."""
        check = getattr(self.part, "check_options", None)
        if check is not None:
            check(z_dim, **options)


def record(kind: str, name: str) -> Record:
    """The :class:`Record` of the part of ``kind`` registered as ``name``.

    :raises KeyError: no such part (config validation checks the name against the registry first).
    """
    return Record(kind, name, REGISTRIES[kind][name])


@functools.lru_cache(maxsize=None)
def _class_link(cls) -> str | None:
    try:
        with probing():
            likelihood = cls(image_shape=_PROBE_IMAGE_SHAPE)
    except Exception:  # a likelihood of one's own that cannot be built with its defaults: its link is unknown
        return None
    return likelihood_link(likelihood, _PROBE_IMAGE_SHAPE)
