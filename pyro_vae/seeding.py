"""Seeded draws that leave the caller's random state as it was.

Pyro and ``torch.distributions`` sample from torch's global generators and take no generator
argument, so a library call that must draw reproducibly (evaluation, estimator comparison,
figures) seeds those generators inside :func:`seeded`, a ``torch.random.fork_rng`` block: the
draws depend only on the seed, and the caller's state is restored afterwards, as if the call
had drawn nothing. :func:`preserved` does the same for code that seeds the generators itself.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with torch's generators seeded with ``seed``; restore their states after.

    The CPU generator is forked and seeded, and so is ``device``'s own generator when it is an
    accelerator (``"cuda"``, ``"cuda:1"``, ...): the block draws what it would draw after
    ``torch.manual_seed(seed)``, and no other device's state is touched. Python's ``random``
    and NumPy's generators are neither used nor changed.

    :param seed: any integer ``torch.manual_seed`` accepts; the CPU generator keeps its low 32
        bits, so seeds that differ by a multiple of ``2**32`` draw alike.
    :param device: where the block samples; ``None`` or ``"cpu"``: the CPU only.
    """
    device = torch.device("cpu" if device is None else device)
    module, devices = None, []
    if device.type != "cpu":
        module = torch.get_device_module(device.type)
        devices = [device.index if device.index is not None else module.current_device()]
    # devices=[] forks the CPU generator alone; the type is named all the same, since some torch
    # versions (2.11) read device_type=None as torch.device(None) where a GPU is present.
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it reseeds every accelerator
        for index in devices:
            with module.device(index):
                module.manual_seed(seed)
        yield


@contextlib.contextmanager
def preserved() -> Iterator[None]:
    """Run the block, then restore the random states it may have changed by seeding its own.

    For code that calls ``pyro.set_rng_seed`` itself (:func:`~pyro_vae.train.fit`): that
    seeds torch, Python's ``random`` and NumPy, so all three are restored: the CPU generator
    and, where CUDA is initialized, every CUDA device's.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def probing(like: torch.Tensor | torch.device | None = None) -> Iterator[None]:
    """Run parts only to learn what they do (build a class, check shapes, derive a capability,
    score data on the side), leaving no trace: no autograd graph, and a private random stream,
    since building draws initial weights and running may sample, which must not move the
    caller's draws.

    :param like: the device the parts run on, or a tensor on it; where it is an accelerator,
        that device's generator is forked too. ``None``: the CPU only.
    """
    device = torch.device("cpu") if like is None else like if isinstance(like, torch.device) else like.device
    devices = [device] if device.type != "cpu" else []
    # the type is named even for the CPU alone: see seeded()
    with torch.random.fork_rng(devices=devices, device_type=device.type), torch.no_grad():
        yield
