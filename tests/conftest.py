"""Shared fixtures: tiny synthetic image data, a small config, and the MNIST folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pyro_vae.config import load_config
from pyro_vae.data import ImageData, Splits

IMAGE_SHAPE = (1, 8, 8)


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
