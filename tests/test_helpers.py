"""The tests' own one-line helpers (tests/helpers.py) refuse what they exist to refuse."""

import subprocess

import pytest

from helpers import assert_one_line_error, one_line

USAGE = "usage: pyro-vae train [-h] [--config CONFIG]\n                      [--out OUT]\n"


def test_one_line_returns_the_message_and_checks_its_words():
    with pytest.raises(ValueError) as error:
        raise ValueError("model.z_dim = 0: must be >= 1")
    assert one_line(error, "model.z_dim", ">= 1") == "model.z_dim = 0: must be >= 1"
    assert one_line(ValueError("plain")) == "plain"


@pytest.mark.parametrize("message, words", [
    ("two\nlines", []),
    ("", []),
    ("Traceback (most recent call last): ...", []),
    ("model.z_dim = 0: must be >= 1", ["train.lr"]),
])
def test_one_line_refuses(message, words):
    with pytest.raises(AssertionError):
        one_line(ValueError(message), *words)


def test_a_refusal_of_the_command_line_in_each_form():
    err = "pyro-vae: error: model.z_dim = 0: must be >= 1\n"
    assert assert_one_line_error((2, "", err), "model.z_dim") == err.strip()
    done = subprocess.CompletedProcess([], 2, stdout="", stderr=err)
    assert assert_one_line_error(done, ">= 1") == err.strip()
    assert assert_one_line_error((4, "", "pyro-vae: error: training diverged\n"), "diverged", status=4)
    argparse_err = USAGE + "pyro-vae train: error: unrecognized arguments: --lr 0.1\n"
    assert assert_one_line_error((2, "", argparse_err), "--lr") == "pyro-vae train: error: unrecognized arguments: --lr 0.1"


@pytest.mark.parametrize("status, err, words", [
    (1, "pyro-vae: error: bad\n", []),  # another exit status
    (2, "", []),  # nothing said
    (2, "Traceback (most recent call last):\nValueError: bad\npyro-vae: error: bad\n", []),
    (2, "pyro-vae: error: one\npyro-vae: error: two\n", []),  # two errors
    (2, "note: something\npyro-vae: error: bad\n", []),  # another line beside the error
    (2, "bad\n", []),  # not the command line's error line
    (2, USAGE + "pyro-vae train: error: unrecognized arguments: --lr 0.1\n", ["--config"]),  # a word of the usage only
    (2, "pyro-vae: error: model.z_dim = 0\n", ["train.lr"]),
])
def test_a_refusal_of_the_command_line_refuses(status, err, words):
    with pytest.raises(AssertionError):
        assert_one_line_error((status, "", err), *words)
