"""MNIST-like image datasets as preloaded tensors, with explicit binarization and batching.

The whole dataset is read once into one contiguous float tensor in [0, 1] of shape
``(N, C, H, W)``; a batch is a slice of a seeded permutation. A torchvision ``DataLoader``
with a per-image ``ToTensor`` transform makes an MNIST epoch about 2.5x slower on a small
CPU, so it is not used in the training loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError

#: Environment variable naming the folder that holds ``MNIST/raw/...`` and friends.
DATA_ENV = "PYRO_VAE_DATA"
DEFAULT_DATA_DIR = Path("data")
#: Held-out images are binarized once with this seed, so every run is scored on the same bits.
EVAL_BINARIZATION_SEED = 0


def _torchvision_datasets():
    import torchvision.datasets

    return torchvision.datasets


# dataset name -> (torchvision class name, folder under the data root)
DATASETS = {
    "mnist": ("MNIST", "MNIST"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST"),
}
#: Images in each dataset's official training set (train + validation), known before loading,
#: so that a config asking for more is refused before anything is read.
NUM_TRAIN_IMAGES = {"mnist": 60_000, "fashion_mnist": 60_000}
_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DataNotFoundError(FileNotFoundError):
    """The dataset files are not in the data folder and could not be downloaded."""


def resolve_data_dir(flag: str | Path | None = None) -> tuple[Path, bool]:
    """The data root and whether downloading there is allowed.

    Order: the ``--data-dir`` flag, then ``$PYRO_VAE_DATA``, then ``./data``. Only the default
    folder may be downloaded into: a folder the user named is read as it is.
    """
    if flag is not None:
        return Path(flag), False
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]), False
    return DEFAULT_DATA_DIR, True


@dataclass(frozen=True)
class ImageData:
    """Images in [0, 1] with labels. ``images``: ``(N, C, H, W)`` float; ``labels``: ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def head(self, n: int) -> "ImageData":
        return ImageData(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Splits:
    train: ImageData
    val: ImageData
    test: ImageData


def _read(name: str, root: Path, train: bool, download: bool) -> ImageData:
    class_name, folder = DATASETS[name]
    cls = getattr(_torchvision_datasets(), class_name)
    try:
        dataset = cls(root=str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise _missing(root, folder) from None
        try:
            dataset = cls(root=str(root), train=train, download=True)
        except Exception:  # no network, a mirror down, a proxy: all mean the same here
            raise _missing(root, folder, tried_download=True) from None
    # uint8 (N, H, W) -> float (N, 1, H, W) in [0, 1], contiguous, read once.
    images = dataset.data.unsqueeze(1).to(torch.float32).div_(255.0).contiguous()
    return ImageData(images, dataset.targets.clone())


def _missing(root: Path, folder: str, tried_download: bool = False) -> DataNotFoundError:
    where = root / folder / "raw"
    how = "could not be downloaded" if tried_download else "point --data-dir or $PYRO_VAE_DATA at a folder that has them"
    return DataNotFoundError(
        f"dataset files not found in {where}/ (expected {', '.join(_RAW_FILES)}); {how}"
    )


def check_split_sizes(name: str, num_images: int, val_size: int, train_limit: int) -> None:
    """Refuse (:class:`~pyro_vae.config.ConfigError`) splits that ``num_images`` cannot give.

    ``val_size`` must leave at least one training image; ``train_limit`` may not ask for more
    training images than remain (a larger limit is refused, not clipped: the config saved
    with the run must say what it trained on).
    """
    if not 1 <= val_size < num_images:
        raise ConfigError(
            f"data.val_size = {val_size}: must be between 1 and {num_images - 1} "
            f"({name} has {num_images} training images, and at least one must remain for training)"
        )
    if not 0 <= train_limit <= num_images - val_size:
        raise ConfigError(
            f"data.train_limit = {train_limit}: must be between 0 (all) and {num_images - val_size}, "
            f"the training images of {name} left after data.val_size = {val_size}"
        )


def load_splits(
    name: str = "mnist",
    data_dir: str | Path | None = None,
    val_size: int = 10_000,
    train_limit: int = 0,
) -> Splits:
    """Load train / validation / test splits of an MNIST-like dataset.

    The validation split is the last ``val_size`` images of the official training set
    (the 50,000 / 10,000 split of Burda et al. 2015 for MNIST); ``train_limit > 0`` keeps only
    the first ``train_limit`` training images. Test images are only for evaluation.
    Sizes that the dataset cannot give raise :class:`~pyro_vae.config.ConfigError` (a
    ``ValueError``), before anything is read where the dataset's size is known.
    """
    if name not in DATASETS:
        raise ConfigError(f"data.dataset = {name!r}: choose one of {sorted(DATASETS)}")
    check_split_sizes(name, NUM_TRAIN_IMAGES[name], val_size, train_limit)
    root, download = resolve_data_dir(data_dir)
    full_train = _read(name, root, train=True, download=download)
    test = _read(name, root, train=False, download=download)
    check_split_sizes(name, len(full_train), val_size, train_limit)  # the files agree with the table
    n_train = len(full_train) - val_size
    train = ImageData(full_train.images[:n_train], full_train.labels[:n_train])
    val = ImageData(full_train.images[n_train:], full_train.labels[n_train:])
    if train_limit:
        train = train.head(train_limit)
    return Splits(train=train, val=val, test=test)


def binarize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per pixel, with the grey value as its probability."""
    return torch.bernoulli(images, generator=generator)


def binarize_once(data: ImageData, seed: int = EVAL_BINARIZATION_SEED) -> ImageData:
    """A seeded, fixed binarization (static binarization; held-out data of binarized runs)."""
    generator = torch.Generator().manual_seed(seed)
    return ImageData(binarize(data.images, generator), data.labels)


def prepare(data: ImageData, binarization: str, seed: int = EVAL_BINARIZATION_SEED) -> ImageData:
    """Held-out (or static training) images as a model of this binarization sees them."""
    return data if binarization == "none" else binarize_once(data, seed)


def iterate_batches(
    images: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    dynamic: bool,
    order: torch.Tensor,
    start: int = 0,
):
    """Yield ``(step, batch)`` over one epoch: slices of a seeded permutation.

    ``order`` is the epoch's permutation of the images (``torch.randperm``); with
    ``dynamic=True`` every batch is freshly binarized from ``generator``. ``start`` lets an
    interrupted epoch continue at the step where it stopped.
    """
    for step, begin in enumerate(range(start * batch_size, images.shape[0], batch_size), start):
        batch = images[order[begin : begin + batch_size]]
        yield step, binarize(batch, generator) if dynamic else batch
