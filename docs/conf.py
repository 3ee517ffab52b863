"""Sphinx configuration of the pyro-vae documentation (``make docs``; CI builds it with -W).

Pages are Markdown (MyST); the API reference is autodoc over the package's reST docstrings.
Three things are generated from the code at each build, into ``docs/_generated/`` (ignored by
git), so that they cannot go stale: the command line's ``--help`` (from
:func:`pyro_vae.cli.build_parser`), the table of config keys with their types and defaults (from
the dataclasses of :mod:`pyro_vae.config`), and the list of the public names (``pyro_vae.__all__``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pkgutil
import re
import sys
import typing
from pathlib import Path

from sphinx.util import logging

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # autodoc imports this tree's pyro_vae, installed or not

logger = logging.getLogger("pyro_vae.docs")

project = "pyro-vae"
author = "the pyro-vae authors"
copyright = "the pyro-vae authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_heading_anchors = 3  # `[text](page.md#a-heading)` links resolve to headings down to ###
exclude_patterns = ["_build", "_generated"]
html_theme = "alabaster"
html_title = "pyro-vae"
html_static_path: list[str] = []

# The docstrings are reST with :param: lines (no napoleon needed). Members in source order;
# public names without a docstring are listed too (their signature is still the contract).
autodoc_default_options = {"members": True, "undoc-members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"
autoclass_content = "both"
# A method without a docstring of its own stays without one: inheriting would copy torch's
# docstrings (nn.Module.forward, Distribution.expand) into this reference, and one of them
# (Distribution.expand) is not valid reST, an error under -W.
autodoc_inherit_docstrings = False

# Intersphinx: links from type hints and :class:`torch.Tensor` to torch's and Pyro's docs.
# The build must pass with -W on a machine without network (CI here has none), and intersphinx
# warns for every inventory it cannot download; no local copy of those inventories ships with
# torch or pyro. So the mapping is switched on only when asked for:
#     PYRO_VAE_INTERSPHINX=1 make docs
# Without it, references to torch and Pyro stay plain text (Sphinx warns about unresolved
# references only in nitpicky mode, which `make docs` does not use). A folder of downloaded
# inventories can stand in for the network: PYRO_VAE_INTERSPHINX=/path/with/torch.inv,pyro.inv.
intersphinx_mapping: dict = {}
intersphinx_timeout = 10  # seconds per inventory: fail fast where there is no network
_intersphinx = os.environ.get("PYRO_VAE_INTERSPHINX", "")
if _intersphinx:
    _local = Path(_intersphinx) if _intersphinx not in ("1", "true", "yes") else None

    def _inventory(name: str):
        return str(_local / f"{name}.inv") if _local else None

    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", _inventory("python")),
        "torch": ("https://docs.pytorch.org/docs/stable", _inventory("torch")),
        "pyro": ("https://docs.pyro.ai/en/stable", _inventory("pyro")),
    }


# -- pages generated from the code -----------------------------------------------------------

GENERATED = HERE / "_generated"
API = HERE / "api"


def _write(name: str, text: str) -> None:
    GENERATED.mkdir(exist_ok=True)
    path = GENERATED / name
    if not path.exists() or path.read_text() != text:  # unchanged files keep Sphinx's cache valid
        path.write_text(text)


def _cli_help() -> str:
    """Every command's ``--help``, as the parser prints it (a new or split command appears here)."""
    from pyro_vae.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width
    parser = build_parser()
    blocks = [f"```text\n$ pyro-vae --help\n{parser.format_help()}```\n"]
    for action in parser._actions:  # argparse offers no public way to walk the sub-commands
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                blocks.append(f"### `pyro-vae {name}`\n\n```text\n$ pyro-vae {name} --help\n{sub.format_help()}```\n")
    return "\n".join(blocks)


def _literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{}" if not value else repr(value)
    return repr(value)


def _config_keys() -> str:
    """key | type | default, from the dataclasses, and the `#:` comment above the field where it has one."""
    from sphinx.pycode import ModuleAnalyzer

    from pyro_vae import config

    comments = ModuleAnalyzer.for_module("pyro_vae.config").find_attr_docs()
    rows = ["| key | type | default | from the code's comment |", "| --- | --- | --- | --- |"]
    for section in dataclasses.fields(config.Config):
        cls = typing.get_type_hints(config.Config)[section.name]
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for field in dataclasses.fields(cls):
            note = " ".join(" ".join(comments.get((cls.__name__, field.name), [])).split())
            note = re.sub(r":(\w+):`", r"{\1}`", note).replace("|", "\\|")  # reST roles -> MyST
            rows.append(f"| `{section.name}.{field.name}` | {hints[field.name].__name__} | "
                        f"`{_literal(getattr(defaults, field.name))}` | {note} |")
    return "\n".join(rows) + "\n"


def _components() -> str:
    """The built-in parts by kind, read from the registries: name, class, options with their
    defaults (the constructor's keyword arguments), what the part declares."""
    from pyro_vae.components import has_closed_form_kl, options_of
    from pyro_vae.elbo import ELBOS
    from pyro_vae.guides import GUIDES
    from pyro_vae.likelihoods import LIKELIHOODS
    from pyro_vae.networks import ARCHITECTURES
    from pyro_vae.priors import PRIORS

    def name_of(cls) -> str:
        return f"{{py:class}}`{cls.__name__} <{cls.__module__}.{cls.__qualname__}>`"

    def options(cls, kind: str) -> str:
        found = options_of(cls, kind)
        return ", ".join(f"`{key}` = `{_literal(value)}`" for key, value in found.items()) or "—"

    out = ["### Likelihoods (`model.likelihood`, `model.likelihood_options`)", "",
           "| name | class | `accepts` (the data it is defined on) | options and defaults |", "| --- | --- | --- | --- |"]
    out += [f"| `{name}` | {name_of(cls)} | `{cls.accepts}` | {options(cls, 'likelihood')} |" for name, cls in LIKELIHOODS.items()]
    out += ["", "### Priors (`model.prior`, `model.prior_options`)", "",
            "| name | class | options and defaults | closed-form KL with the Gaussian guide (`objective.elbo = \"analytic\"`) |",
            "| --- | --- | --- | --- |"]
    out += [f"| `{name}` | {name_of(cls)} | {options(cls, 'prior')} | {'yes' if has_closed_form_kl(cls) else 'no: use `mc`'} |"
            for name, cls in PRIORS.items()]
    out += ["", "### Guide families (`model.guide`, `model.guide_options`)", "",
            "| name | class | options and defaults |", "| --- | --- | --- |"]
    out += [f"| `{name}` | {name_of(cls)} | {options(cls, 'guide')} |" for name, cls in GUIDES.items()]
    out += ["", "### Networks (`model.arch`)", "", "| name | encoder | decoder |", "| --- | --- | --- |"]
    out += [f"| `{name}` | {name_of(encoder)} | {name_of(decoder)} |" for name, (encoder, decoder) in ARCHITECTURES.items()]
    out += ["", "### Estimators (`objective.elbo`)", "", "| name | class |", "| --- | --- |"]
    out += [f"| `{name}` | {name_of(cls)} |" for name, cls in ELBOS.items()]
    return "\n".join(out) + "\n"


def _home(name: str) -> str:
    """The module that defines the public name ``pyro_vae.NAME``."""
    import pyro_vae

    obj = getattr(pyro_vae, name)
    home = getattr(obj, "__module__", None) if callable(obj) else None
    if home is None:  # a constant: the module that defines it at top level
        modules = [importlib.import_module(f"pyro_vae.{m.name}") for m in pkgutil.iter_modules(pyro_vae.__path__)
                   if not m.name.startswith("_")]
        home = next((m.__name__ for m in modules if m.__dict__.get(name) is obj), "pyro_vae")
    return home


def _public_names() -> str:
    """``pyro_vae.__all__``, each linked to where it is documented (its defining module)."""
    import pyro_vae

    rows = [".. list-table::", "   :header-rows: 1", "", "   * - name", "     - documented in"]
    for name in pyro_vae.__all__:
        obj, home = getattr(pyro_vae, name), _home(name)
        role = "class" if isinstance(obj, type) else ("func" if callable(obj) else "data")
        rows += [f"   * - :py:{role}:`{name} <{home}.{name}>`", f"     - :mod:`{home}`"]
    return "\n".join(rows) + "\n"


def _resolve_public_name(app, env, node, contnode):
    """Docstrings may write ``:func:`pyro_vae.fit```: a public name resolves to where it is
    defined (``pyro_vae.train.fit``), which is where autodoc documents it. Done here rather than
    by documenting every name twice, which would make short references (``ConfigError``)
    ambiguous."""
    import pyro_vae

    target = node.get("reftarget", "")
    parts = target.split(".")
    if node.get("refdomain") != "py" or len(parts) < 2 or parts[0] != "pyro_vae" or parts[1] not in pyro_vae.__all__:
        return None
    defined = f"{_home(parts[1])}.{'.'.join(parts[1:])}"
    return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, node["reftype"], defined, node,
                                             contnode)


def _check_api_pages(app) -> None:
    """Every public module of pyro_vae has its page in docs/api/; a new module (after a merge)
    without one fails the build, which runs with -W."""
    import pyro_vae

    modules = sorted(m.name for m in pkgutil.iter_modules(pyro_vae.__path__) if not m.name.startswith("_"))
    pages = {p.stem for p in API.iterdir() if p.suffix in (".md", ".rst")}
    for name in modules:
        if name not in pages:
            logger.warning(f"pyro_vae.{name} has no API page: add docs/api/{name}.rst (an automodule, like the "
                           "others) and list it in docs/api/index.rst")
    for name in sorted(pages - set(modules) - {"index", "pyro_vae"}):
        logger.warning(f"docs/api/{name} documents pyro_vae.{name}, which does not exist")


def _generate(app) -> None:
    _write("cli_help.md", _cli_help())
    _write("config_keys.md", _config_keys())
    _write("public_names.rst", _public_names())
    _write("components.md", _components())
    _check_api_pages(app)


def setup(app):
    app.connect("builder-inited", _generate)
    app.connect("missing-reference", _resolve_public_name)
    return {"parallel_read_safe": True}
