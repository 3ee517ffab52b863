"""Parts of one's own: register a likelihood, a prior, a guide family or networks by name; load plugins.

A registered name is valid wherever a built-in one is: in a config (``model.likelihood``,
``model.prior``, ``model.guide``, ``model.arch``), on the command line, and in
:func:`pyro_vae.load_run`.
The contract a part must meet is written once, in the docstring of its register function;
what can be checked without data is checked there, and a part that breaks it is refused with
one line (:class:`ComponentError`) when it is registered, not with an ``AttributeError`` later.
Shapes need data: :func:`pyro_vae.build_vae` checks them once, on a datum of zeros.

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
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import pyro.distributions as dist
import torch
from torch import nn

from .config import ConfigError
from .guides import GUIDES, DiagonalGaussian
from .likelihoods import LIKELIHOODS
from .networks import ARCHITECTURES
from .priors import PRIORS

#: What a likelihood's ``accepts`` may say: the data it is defined on.
ACCEPTS = ("binary", "unit_interval", "real")

#: The types an option's default may have (the option's type).
OPTION_TYPES = (bool, int, float, str)

#: Per kind of part: the model arguments its constructor must take, and those it may take.
MODEL_ARGUMENTS = {
    "likelihood": (("image_shape",), ()),
    "prior": (("z_dim",), ("encoder", "image_shape", "data_domain")),
    "guide": (("z_dim",), ()),
    "networks": (("image_shape", "z_dim"), ("hidden_dim", "num_layers")),
}


class ComponentError(TypeError):
    """A part breaks the contract of its kind; raised, with one line, when it is registered."""


# -- reading a part's constructor -----------------------------------------------------------

def model_arguments(cls, kind: str) -> list[str]:
    """The model arguments (see :data:`MODEL_ARGUMENTS`) that ``cls``'s constructor takes."""
    required, optional = MODEL_ARGUMENTS[kind]
    return [name for name in inspect.signature(cls).parameters if name in required + optional]


def options_of(cls, kind: str) -> dict[str, object]:
    """``{option: default}`` for ``cls``: its constructor's arguments that are not model arguments."""
    required, optional = MODEL_ARGUMENTS[kind]
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if name not in required + optional}


def option_bounds(cls) -> dict:
    """``cls.option_bounds``, or no bounds when it declares none."""
    return getattr(cls, "option_bounds", None) or {}


# -- the contract, checked at registration -------------------------------------------------

def _refuse(kind: str, name, message: str):
    raise ComponentError(f"cannot register {kind} {name!r}: {message}")


def _check_name(kind: str, name) -> None:
    if not (isinstance(name, str) and name.isascii() and name.isidentifier()):
        _refuse(kind, name, "a name is a plain identifier such as 'my_part' (letters, digits, underscores)")


def _check_module_class(kind: str, name: str, cls, role: str = "") -> str:
    label = getattr(cls, "__qualname__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        _refuse(kind, name, f"{role}{label} is not a torch.nn.Module subclass")
    return f"{role}{label}"


def _check_constructor(kind: str, name: str, cls, label: str) -> None:
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError) as error:
        _refuse(kind, name, f"{label}'s constructor cannot be read ({error})")
    required, optional = MODEL_ARGUMENTS[kind]
    for p in parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            _refuse(kind, name, f"{label}.__init__ takes {'*' if p.kind == p.VAR_POSITIONAL else '**'}{p.name}; "
                                "name every argument, with a default for each option")
        if p.kind == p.POSITIONAL_ONLY:
            _refuse(kind, name, f"{label}.__init__ takes {p.name} positionally only; the model passes arguments by name")
    missing = [a for a in required if a not in parameters]
    if missing:
        _refuse(kind, name, f"{label}.__init__ must take the model's argument(s) {', '.join(missing)} "
                            f"(a {kind} is built as {label}({', '.join(a + '=...' for a in required)}, **options))")
    for option, default in options_of(cls, kind).items():
        if default is inspect.Parameter.empty:
            _refuse(kind, name, f"{label}.__init__ argument {option!r} has no default; it is not a model argument "
                                f"({', '.join(required + optional)}), so it is an option and needs a default "
                                "(int, float, bool or str)")
        if type(default) not in OPTION_TYPES:
            _refuse(kind, name, f"option {option!r} of {label} defaults to {default!r} ({type(default).__name__}); "
                                "an option's default is an int, float, bool or str, and gives the option its type")
    _check_bounds(kind, name, cls, label)


def _check_bounds(kind: str, name: str, cls, label: str) -> None:
    bounds = getattr(cls, "option_bounds", None)
    if bounds is None:
        return
    if not isinstance(bounds, dict):
        _refuse(kind, name, f"{label}.option_bounds is {bounds!r}; expected a dict "
                            "{option: (lower bound, whether the bound is allowed)}")
    options = options_of(cls, kind)
    for option, bound in bounds.items():
        if option not in options:
            _refuse(kind, name, f"{label}.option_bounds names {option!r}, which is not one of its options "
                                f"{sorted(options) or 'none'}")
        if isinstance(options[option], bool) or not isinstance(options[option], (int, float)):
            _refuse(kind, name, f"{label}.option_bounds bounds {option!r}, whose default {options[option]!r} "
                                "is not a number")
        if not (isinstance(bound, tuple) and len(bound) == 2 and isinstance(bound[1], bool)
                and isinstance(bound[0], (int, float)) and not isinstance(bound[0], bool)):
            _refuse(kind, name, f"{label}.option_bounds[{option!r}] is {bound!r}; expected (lower bound, "
                                "inclusive), e.g. (0.0, False) for > 0")


def _check_forward(kind: str, name: str, cls, label: str, arguments: int) -> None:
    if cls.forward is nn.Module.forward:
        _refuse(kind, name, f"{label} defines no forward")
    try:
        inspect.signature(cls.forward).bind(None, *[None] * arguments)
    except TypeError:
        wanted = {0: "no arguments", 1: "one argument", 2: "two arguments (z_loc, z_scale)"}[arguments]
        _refuse(kind, name, f"{label}.forward must take {wanted}; its signature is "
                            f"{inspect.signature(cls.forward)}")


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


def _add(kind: str, registry: dict, name: str, part, replace: bool) -> None:
    existing = registry.get(name)
    if existing is not None and not replace and not _same_part(existing, part):
        _refuse(kind, name, f"the name is taken by {_describe(existing)}; choose another name, or pass replace=True")
    registry[name] = part


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
      likelihoods). Its ``mean`` is what reconstructions and samples show.

    :param name: a plain identifier; valid in configs (``model.likelihood``) once registered.
    :param cls: the class; omitted, the function returns a decorator.
    :param replace: allow replacing a different part already registered under ``name``
        (registering the same class again is always allowed).
    :returns: ``cls`` (or the decorator).
    :raises ComponentError: the class breaks the contract, or the name is taken.
    """
    _check_name("likelihood", name)

    def register(cls):
        label = _check_module_class("likelihood", name, cls)
        accepts = getattr(cls, "accepts", None)
        if accepts not in ACCEPTS:
            _refuse("likelihood", name, f"{label}.accepts is {accepts!r}; set the class attribute accepts to one of "
                                        f"{list(ACCEPTS)}, the data it is defined on")
        _check_constructor("likelihood", name, cls, label)
        _check_forward("likelihood", name, cls, label, 1)
        _add("likelihood", LIKELIHOODS, name, cls, replace)
        return cls

    return register if cls is None else register(cls)


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
    return _register_kl_part("prior", PRIORS, 0, name, cls, replace)


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
    _check_name("networks", name)
    for role, cls in (("encoder ", encoder), ("decoder ", decoder)):
        label = _check_module_class("networks", name, cls, role)
        _check_constructor("networks", name, cls, label)
        _check_forward("networks", name, cls, label, 1)
    _add("networks", ARCHITECTURES, name, (encoder, decoder), replace)
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
    ``False``. :func:`pyro_vae.build_vae` checks shapes, sampling, scoring and the code once,
    on a datum of zeros.

    :param name: a plain identifier; valid in configs (``model.guide``) once registered.
    :param cls: the class; omitted, the function returns a decorator.
    :param replace: allow replacing a different family already registered under ``name``.
    :returns: ``cls`` (or the decorator).
    :raises ComponentError: the class breaks the contract, or the name is taken.
    """
    return _register_kl_part("guide", GUIDES, 2, name, cls, replace)


def _register_kl_part(kind: str, registry: dict, forward_args: int, name: str, cls, replace: bool):
    """Register a prior or a guide family (the two sides of the KL): the checks they share,
    including the optional ``has_closed_form_kl`` declaration. ``forward_args``: the
    arguments of its ``forward``."""
    _check_name(kind, name)

    def register(cls):
        label = _check_module_class(kind, name, cls)
        declared = getattr(cls, "has_closed_form_kl", None)
        if declared is not None and not isinstance(declared, bool):
            _refuse(kind, name, f"{label}.has_closed_form_kl is {declared!r}; leave it out (it is derived) "
                                "or set True or False")
        _check_constructor(kind, name, cls, label)
        _check_forward(kind, name, cls, label, forward_args)
        _add(kind, registry, name, cls, replace)
        return cls

    return register if cls is None else register(cls)


# -- capabilities derived, not declared ------------------------------------------------------

#: The datum shape and latent size at which a prior class is built to derive its capabilities.
_PROBE_IMAGE_SHAPE, _PROBE_Z_DIM = (1, 4, 4), 2


@functools.lru_cache(maxsize=None)
def _class_has_closed_form_kl(cls, guide=DiagonalGaussian) -> bool:
    from .networks import MLPEncoder

    given = {"z_dim": _PROBE_Z_DIM, "image_shape": _PROBE_IMAGE_SHAPE, "data_domain": "unit_interval"}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        # a private random stream: building draws initial values, which must not move the caller's
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
        # a private random stream: building a guide family draws its initial weights
        with torch.random.fork_rng(devices=[]), torch.no_grad():
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


# -- plugins ---------------------------------------------------------------------------------

def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or "/" in spec


def _import_file(spec: str) -> str:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"plugin {spec}: no such file" if not path.exists() else f"plugin {spec}: not a file")
    path = path.resolve()
    # one module per file, named after its absolute path: a second load finds it imported
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"pyro_vae_plugin_{''.join(c if c.isalnum() else '_' for c in path.stem)}_{digest}"
    if module_name not in sys.modules:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"plugin {spec}: cannot be imported as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # before running it, as import does (dataclasses look it up)
        try:
            module_spec.loader.exec_module(module)
        except BaseException as error:
            del sys.modules[module_name]
            if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: not ours to turn into a line
                raise
            raise ConfigError(f"plugin {spec}: {_one_line(error)}") from None
    return str(path)


def _import_module(spec: str) -> str:
    if not all(part.isidentifier() for part in spec.split(".")):
        raise ConfigError(f"plugin {spec!r}: neither a module name (such as my_pkg.vae_parts) nor a .py file")
    # like `python -m`, the current folder is searched too (a console script's sys.path lacks it);
    # only during this import, so the search path is left as it was
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as error:
        if error.name is not None and (spec == error.name or spec.startswith(error.name + ".")):
            raise ConfigError(f"plugin {spec!r}: no module named {error.name!r}") from None
        raise ConfigError(f"plugin {spec!r}: {_one_line(error)}") from None
    except Exception as error:
        raise ConfigError(f"plugin {spec!r}: {_one_line(error)}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    return spec


def load_plugins(specs) -> list[str]:
    """Import the plugins ``specs``, so that the parts they register become valid names.

    :param specs: each an importable module name (``my_pkg.vae_parts``, searched on
        ``sys.path`` and in the current folder) or a path to a ``.py`` file (a spec ending in
        ``.py`` or holding a ``/``). Loading a plugin again is harmless: a module is imported
        once, and registering the same class again under its name is not a conflict.
    :returns: the specs as they should be recorded with a run: module names as given, files
        as absolute paths.
    :raises ConfigError: one line, for a missing module or file, or one whose import raises
        (a part it registers that breaks its contract included).
    """
    loaded = []
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"plugin {spec!r}: expected a module name or a path to a .py file")
        loaded.append(_import_file(spec) if _is_file_spec(spec) else _import_module(spec))
    return loaded
