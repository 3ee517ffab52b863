"""The package's shared vocabulary: its errors and the contract a part (a likelihood, a prior,
a guide family, networks) meets. Standard library only, and nothing of the package.

This is the bottom layer: every other module may import it, and it imports none of them, so
the error types and the contract have one home and no module has to import another "upward"
to raise a :class:`ConfigError`.

What a part's constructor says is read here, without building it:

- **model arguments**, filled in by the model by name (:data:`MODEL_ARGUMENTS`);
- **options**, every other argument, each with a default whose type (:data:`OPTION_TYPES`) is
  the option's type; an optional class attribute ``option_bounds`` gives their lower bounds.

:func:`check_part` refuses, with one line, a class that breaks this contract; it is what
:mod:`pyro_vae.components` runs when a part is registered.
"""

from __future__ import annotations

import inspect

__all__ = ["ACCEPTS", "OPTION_TYPES", "MODEL_ARGUMENTS", "ConfigError", "ComponentError", "DataError",
           "model_arguments", "options_of", "option_bounds", "check_part", "refuse"]


class ConfigError(ValueError):
    """A config key is unknown, or its value has the wrong type or is out of range; also a part
    that does not fit the data or the other parts. The message is one line naming the key."""


class ComponentError(TypeError):
    """A part breaks the contract of its kind; raised, with one line, when it is registered."""


class DataError(ValueError):
    """Data that cannot be used as it is: one line naming the file or dataset and what to change.
    (Here, not in :mod:`pyro_vae.sources`, so that the image readers and their cache below it
    raise it without importing upward.)"""


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

#: Per kind of part: the arguments its ``forward`` takes, and how a message names them.
FORWARD_ARGUMENTS = {"likelihood": 1, "prior": 0, "guide": 2, "networks": 1}
_FORWARD_WORDS = {0: "no arguments", 1: "one argument", 2: "two arguments (z_loc, z_scale)"}


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


# -- the contract, checked once, when a part is registered -----------------------------------

def refuse(kind: str, name, message: str):
    """Raise the one-line :class:`ComponentError` that refuses registering ``name``."""
    raise ComponentError(f"cannot register {kind} {name!r}: {message}")


def check_name(kind: str, name) -> None:
    """A registered name is a plain identifier, so that it reads the same in TOML and on a command line."""
    if not (isinstance(name, str) and name.isascii() and name.isidentifier()):
        refuse(kind, name, "a name is a plain identifier such as 'my_part' (letters, digits, underscores)")


def check_part(kind: str, name: str, cls, label: str) -> None:
    """Check what can be checked of ``cls`` without building it or importing torch (that it is
    an ``nn.Module`` with a ``forward`` of its own is checked by the caller): its constructor (model
    arguments by name, an ``int``/``float``/``bool``/``str`` default for every option), its
    ``option_bounds``, its ``forward``'s arguments, and the declarations of its kind
    (``accepts`` of a likelihood; ``has_closed_form_kl`` of a prior or guide family).

    :param kind: ``"likelihood"``, ``"prior"``, ``"guide"`` or ``"networks"``.
    :param label: how the message names the class (e.g. ``"encoder TinyEncoder"``).
    :raises ComponentError: one line naming the part and what it breaks.
    """
    if kind == "likelihood":
        accepts = getattr(cls, "accepts", None)
        if accepts not in ACCEPTS:
            refuse(kind, name, f"{label}.accepts is {accepts!r}; set the class attribute accepts to one of "
                               f"{list(ACCEPTS)}, the data it is defined on")
    if kind in ("prior", "guide"):
        declared = getattr(cls, "has_closed_form_kl", None)
        if declared is not None and not isinstance(declared, bool):
            refuse(kind, name, f"{label}.has_closed_form_kl is {declared!r}; leave it out (it is derived) "
                               "or set True or False")
    _check_constructor(kind, name, cls, label)
    _check_forward(kind, name, cls, label)


def _check_constructor(kind: str, name: str, cls, label: str) -> None:
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError) as error:
        refuse(kind, name, f"{label}'s constructor cannot be read ({error})")
    required, optional = MODEL_ARGUMENTS[kind]
    for p in parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            refuse(kind, name, f"{label}.__init__ takes {'*' if p.kind == p.VAR_POSITIONAL else '**'}{p.name}; "
                               "name every argument, with a default for each option")
        if p.kind == p.POSITIONAL_ONLY:
            refuse(kind, name, f"{label}.__init__ takes {p.name} positionally only; the model passes arguments by name")
    missing = [a for a in required if a not in parameters]
    if missing:
        refuse(kind, name, f"{label}.__init__ must take the model's argument(s) {', '.join(missing)} "
                           f"(a {kind} is built as {label}({', '.join(a + '=...' for a in required)}, **options))")
    for option, default in options_of(cls, kind).items():
        if default is inspect.Parameter.empty:
            refuse(kind, name, f"{label}.__init__ argument {option!r} has no default; it is not a model argument "
                               f"({', '.join(required + optional)}), so it is an option and needs a default "
                               "(int, float, bool or str)")
        if type(default) not in OPTION_TYPES:
            refuse(kind, name, f"option {option!r} of {label} defaults to {default!r} ({type(default).__name__}); "
                               "an option's default is an int, float, bool or str, and gives the option its type")
    _check_bounds(kind, name, cls, label)


def _check_bounds(kind: str, name: str, cls, label: str) -> None:
    bounds = getattr(cls, "option_bounds", None)
    if bounds is None:
        return
    if not isinstance(bounds, dict):
        refuse(kind, name, f"{label}.option_bounds is {bounds!r}; expected a dict "
                           "{option: (lower bound, whether the bound is allowed)}")
    options = options_of(cls, kind)
    for option, bound in bounds.items():
        if option not in options:
            refuse(kind, name, f"{label}.option_bounds names {option!r}, which is not one of its options "
                               f"{sorted(options) or 'none'}")
        if isinstance(options[option], bool) or not isinstance(options[option], (int, float)):
            refuse(kind, name, f"{label}.option_bounds bounds {option!r}, whose default {options[option]!r} "
                               "is not a number")
        if not (isinstance(bound, tuple) and len(bound) == 2 and isinstance(bound[1], bool)
                and isinstance(bound[0], (int, float)) and not isinstance(bound[0], bool)):
            refuse(kind, name, f"{label}.option_bounds[{option!r}] is {bound!r}; expected (lower bound, "
                               "inclusive), e.g. (0.0, False) for > 0")


def _check_forward(kind: str, name: str, cls, label: str) -> None:
    forward = cls.forward  # that it is the class's own, not nn.Module's stub, is checked by the caller
    arguments = FORWARD_ARGUMENTS[kind]
    try:
        inspect.signature(forward).bind(None, *[None] * arguments)
    except TypeError:
        refuse(kind, name, f"{label}.forward must take {_FORWARD_WORDS[arguments]}; its signature is "
                           f"{inspect.signature(forward)}")
