"""The tests' one way to assert that something was refused with one line.

Two kinds of refusal, one helper each:

* an exception raised by the library (``ConfigError``, ``ComponentError``, ``DataError``, ...):
  :func:`one_line` - its message is one line, without a traceback;
* the command line (``pyro-vae ...`` as a subprocess, or ``run_cli`` in this process):
  :func:`assert_one_line_error` - the exit status (2: bad input, unless told), no traceback,
  and on stderr one ``pyro-vae: error: ...`` line, or argparse's usage followed by its one
  ``pyro-vae COMMAND: error: ...`` line.

Both return the line, and every word they are given must be in it (not merely somewhere in the
output: a usage text names every flag). Test files import them as ``from helpers import ...``:
pytest puts ``tests/`` (no ``__init__.py``: rootdir-relative "prepend" imports) on ``sys.path``.
"""

from __future__ import annotations

import subprocess

#: Every error line of the command line starts so (pyro_vae/cli.py prints it).
ERROR_PREFIX = "pyro-vae: error: "


def _assert_words(line: str, words) -> None:
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"


def one_line(error, *words: str) -> str:
    """The message of ``error`` (an exception, or pytest's ``ExceptionInfo`` from
    ``pytest.raises``), asserted to be one non-empty line without a traceback and to hold each
    of ``words``."""
    message = str(getattr(error, "value", error))
    assert message.strip(), "an empty message"
    assert "\n" not in message and "Traceback" not in message, message
    _assert_words(message, words)
    return message


def assert_one_line_error(outcome, *words: str, status: int = 2) -> str:
    """The command line's refusal, asserted: exit ``status`` and one error line holding ``words``.

    :param outcome: a finished ``subprocess.CompletedProcess`` of ``python -m pyro_vae ...``,
        or the ``(status, stdout, stderr)`` of the ``run_cli`` fixture.
    :returns: the error line.
    """
    if isinstance(outcome, subprocess.CompletedProcess):
        code, err = outcome.returncode, outcome.stderr
    else:
        code, _, err = outcome
    assert code == status, f"exit status {code}, expected {status}; stderr: {err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, err
    (line,) = errors
    if lines[0].startswith("usage:"):  # argparse: the usage (some lines), then its one error line last
        assert line == lines[-1] and line.startswith("pyro-vae"), err
    else:
        assert lines == [line] and line.startswith(ERROR_PREFIX), err
    _assert_words(line, words)
    return line
