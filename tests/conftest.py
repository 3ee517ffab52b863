"""Shared fixtures: tiny synthetic image data, a small config, the MNIST folder, and the seed
of the statistical tests.

A test whose outcome depends on random draws is marked ``statistical``, takes its draws from
the ``seed`` fixture, and states its false-failure rate per run: the probability, over seeds,
that it fails although the code is right. ``pytest --seed 7`` (or ``PYRO_VAE_TEST_SEED=7``)
runs them at another seed; ``--seed 1-20`` (or ``1,5,9``) runs each once per seed, with the
seed in the test id (``make test-seeds``).

Beside this file: ``helpers.py``, the one way to assert a one-line refusal (an exception's
message, or the command line's exit status and error line), and ``parts.py``, the small
hand-made parts (encoder, decoder, likelihood, priors, a config-built VAE, a binary batch).
Test files import them by name (``from helpers import one_line``): pytest's default "prepend"
import mode puts ``tests/`` (no ``__init__.py``) on ``sys.path``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pyro_vae.config import load_config
from pyro_vae.data import ImageData, Splits

IMAGE_SHAPE = (1, 8, 8)

#: The statistical tests' seed when neither --seed nor PYRO_VAE_TEST_SEED is given.
DEFAULT_SEED = 0


def _parse_seeds(text: str) -> list[int]:
    """``"7"`` -> ``[7]``; ``"1-20"`` -> ``[1, ..., 20]``; ``"1,5,9"`` -> ``[1, 5, 9]``."""
    seeds = []
    try:
        for part in text.split(","):
            first, dash, last = part.strip().partition("-")
            seeds += range(int(first), int(last) + 1) if dash else [int(first)]
    except ValueError:
        raise pytest.UsageError(f"seeds {text!r}: expected N, A-B or N,M,... (non-negative integers)") from None
    if not seeds:
        raise pytest.UsageError(f"seeds {text!r}: an empty range")
    return seeds


def _seeds(config) -> list[int]:
    return _parse_seeds(config.getoption("--seed") or os.environ.get("PYRO_VAE_TEST_SEED") or str(DEFAULT_SEED))


def pytest_addoption(parser):
    parser.addoption("--seed", metavar="SEEDS", default=None,
                     help="seed(s) of the statistical tests: N, A-B or N,M,...; several run each of them once "
                          f"per seed (default: $PYRO_VAE_TEST_SEED, else {DEFAULT_SEED})")


def pytest_report_header(config):
    seeds = _seeds(config)
    shown = f"{seeds[0]}..{seeds[-1]} ({len(seeds)} seeds)" if len(seeds) > 3 else ", ".join(map(str, seeds))
    return f"seed of the statistical tests: {shown}"


def pytest_generate_tests(metafunc):
    seeds = _seeds(metafunc.config)
    if "seed" in metafunc.fixturenames and len(seeds) > 1:  # overrides the fixture below
        metafunc.parametrize("seed", seeds, ids=[f"seed={s}" for s in seeds])


def pytest_collection_modifyitems(config, items):
    # a statistical test that ignored the seed would pass every seed of the sweep trivially
    for item in items:
        if item.get_closest_marker("statistical") and "seed" not in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid} is marked statistical but does not take the seed fixture")


@pytest.fixture
def seed(request) -> int:
    """The seed of a statistical test's random draws: --seed, else $PYRO_VAE_TEST_SEED, else 0."""
    return _seeds(request.config)[0]


def _images(n: int, seed: int) -> ImageData:
    """Grey images with structure (a bright square at a random place) and labels 0..3."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, *IMAGE_SHAPE), 0.05)
    labels = torch.randint(0, 4, (n,), generator=g)
    for i, label in enumerate(labels.tolist()):
        r, c = divmod(label, 2)
        images[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 0.95
    images += 0.04 * torch.rand(images.shape, generator=g)
    return ImageData(images.clamp(0, 1), labels)


@pytest.fixture
def splits() -> Splits:
    return Splits(train=_images(256, 0), val=_images(64, 1), test=_images(64, 2))


@pytest.fixture
def tiny_config():
    return load_config(None, {
        "model.z_dim": 3, "model.hidden_dim": 32, "train.epochs": 2, "train.batch_size": 32,
        "train.lr": 3e-3, "data.val_size": 64,
    })


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder holding MNIST/raw; under CI=true its absence fails the test, never skips it."""
    root = os.environ.get("PYRO_VAE_DATA")
    if root and (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return Path(root)
    message = f"MNIST not found: set PYRO_VAE_DATA to a folder holding MNIST/raw (got {root!r})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    from pyro_vae.data import load_splits

    return load_splits("mnist", mnist_dir)


#: Module names under which plugins (and the tests' own parts modules) are imported.
PLUGIN_PREFIXES = ("pyro_vae_plugin_", "pyro_vae_test_parts")


@pytest.fixture
def restore_registries():
    """Whatever a test registers, or imports as a plugin, is gone after it."""
    import sys

    from pyro_vae.guides import GUIDES
    from pyro_vae.likelihoods import LIKELIHOODS
    from pyro_vae.networks import ARCHITECTURES
    from pyro_vae.priors import PRIORS

    saved = [(registry, dict(registry)) for registry in (LIKELIHOODS, PRIORS, ARCHITECTURES, GUIDES)]
    yield
    for registry, entries in saved:
        registry.clear()
        registry.update(entries)
    for name in [m for m in sys.modules if m.startswith(PLUGIN_PREFIXES)]:
        del sys.modules[name]


@pytest.fixture
def assert_shards_add_up():
    """What DDP relies on, as a check: ``check(vae, x, estimator, particles, grad_atol, **options)``
    splits the batch ``x`` into 3 shards whose latent draws (of every latent site the VAE names)
    come from ``SharedNoise`` (as the ranks' would), ``options`` passed to both programs, and
    asserts that their losses and gradients add up to the whole batch's."""
    import pyro
    import torch

    from pyro_vae.distributed import ELBOLoss, SharedNoise, shard_bounds
    from pyro_vae.elbo import make_elbo
    from pyro_vae.model import LATENT

    def check(vae, x, estimator: str, particles: int, grad_atol: float = 1e-5, **options) -> None:
        loss = ELBOLoss(vae, make_elbo(estimator, particles), **options)
        params = list(vae.parameters())
        pyro.set_rng_seed(5)
        full = loss(x, beta=0.7)
        full_grads = torch.autograd.grad(full, params)
        total, total_grads = 0.0, [torch.zeros_like(p) for p in params]
        for rank in range(3):
            begin, end = shard_bounds(len(x), rank, 3)
            pyro.set_rng_seed(5)
            with SharedNoise(getattr(vae, "latent_sites", LATENT), begin, end, len(x)):
                part = loss(x[begin:end], beta=0.7)
            total = total + part
            for acc, g in zip(total_grads, torch.autograd.grad(part, params)):
                acc += g
        torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-4)
        for a, b in zip(total_grads, full_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=grad_atol)

    return check


@pytest.fixture
def assert_resumes_exactly(tmp_path):
    """``check(config, splits)``: a run of ``config`` stopped after its first epoch and resumed
    from its checkpoint ends with the weights and losses of the run made in one go, bit for bit
    (the same computations, repeated). Returns the run made in one go."""
    from pyro_vae.checkpoint import load_checkpoint
    from pyro_vae.train import fit

    def check(config, splits):
        whole = fit(config, splits, tmp_path / "whole", progress=False)
        fit(config.replace(**{"train.epochs": 1}), splits, tmp_path / "part", progress=False)
        resumed = fit(config, splits, tmp_path / "part", checkpoint=load_checkpoint(tmp_path / "part"),
                      progress=False)
        for key, value in whole.vae.state_dict().items():
            assert torch.equal(value, resumed.vae.state_dict()[key]), key
        assert [r["train_loss"] for r in whole.history] == [r["train_loss"] for r in resumed.history]
        return whole

    return check


@pytest.fixture
def run_cli(capsys):
    """``pyro-vae`` in this process: ``run_cli(*argv)`` gives (exit status, stdout, stderr)."""
    from pyro_vae import cli

    def run(*argv) -> tuple[int, str, str]:
        try:
            status = cli.main(list(argv))
        except SystemExit as exit:
            status = exit.code
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run
