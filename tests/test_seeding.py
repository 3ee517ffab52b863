"""Seeded blocks draw what torch.manual_seed would and leave the caller's random state as it was."""

import random

import numpy as np
import pyro
import pytest
import torch

from pyro_vae.seeding import preserved, seeded


def states(device=None):
    cuda = torch.cuda.get_rng_state(device) if device is not None else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()[1].copy()


def assert_same(before, after):
    assert torch.equal(before[0], after[0])
    assert before[1] is None or torch.equal(before[1], after[1])
    assert before[2] == after[2] and np.array_equal(before[3], after[3])


def test_seeded_draws_as_manual_seed_and_restores_the_state():
    torch.manual_seed(5)
    expected = torch.randn(3)
    before, following = states(), torch.randn(3)
    torch.set_rng_state(before[0])
    with seeded(5):
        drawn = torch.randn(3)
    assert torch.equal(drawn, expected)
    assert_same(before, states())
    assert torch.equal(torch.randn(3), following)  # the caller's stream goes on as if nothing was drawn


def test_preserved_undoes_pyro_set_rng_seed():
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    before = states()
    with preserved():
        pyro.set_rng_seed(0)  # seeds torch, Python's random and NumPy, as fit does
        torch.randn(3), random.random(), np.random.rand()
    assert_same(before, states())


def test_seeded_names_the_device_type_it_forks(monkeypatch):
    # torch 2.11 with a GPU present reads device_type=None as torch.device(None) and fails:
    # evaluate --device cpu of a run on a CUDA machine did. Every call must name a type.
    calls, fork = [], torch.random.fork_rng

    def recording(*args, **kwargs):
        calls.append(kwargs.get("device_type"))
        return fork(*args, **kwargs)

    monkeypatch.setattr(torch.random, "fork_rng", recording)
    for device in (None, "cpu", torch.device("cpu")):
        with seeded(1, device):
            torch.randn(1)
    assert calls == ["cpu"] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_on_cuda_draws_as_manual_seed_and_restores_both_states():
    device = torch.device("cuda", 0)
    torch.manual_seed(5)
    expected = torch.randn(3, device=device), torch.randn(3)
    torch.manual_seed(11)
    before = states(device)
    with seeded(5, device):
        drawn = torch.randn(3, device=device), torch.randn(3)
    assert torch.equal(drawn[0], expected[0]) and torch.equal(drawn[1], expected[1])
    assert_same(before, states(device))


def test_fit_leaves_the_callers_random_state_as_it_was(splits, tiny_config):
    from pyro_vae.train import fit

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    before = states()
    history = fit(tiny_config, splits, progress=False).history
    assert_same(before, states())
    torch.manual_seed(99)  # and the caller's state does not change what fit draws
    assert [r["train_loss"] for r in fit(tiny_config, splits, progress=False).history] == \
        [r["train_loss"] for r in history]
