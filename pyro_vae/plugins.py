"""Plugins: modules or ``.py`` files whose import registers parts (the CLI's ``--plugin``).

A plugin is imported once; loading it again is harmless. A missing module or file, or one
whose import raises (a part it registers that breaks its contract included), is refused with
one line (:class:`~pyro_vae.contract.ConfigError`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .contract import ConfigError

__all__ = ["load_plugins"]

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
