"""The torchvision datasets known by name, and the checks of a data config that need no data.

:data:`DATASETS` records what is known of each before anything is read (its files, the size
of its official training set), so that :mod:`pyro_vae.config` can refuse split sizes that a
dataset cannot give without reading it, and without importing the readers in
:mod:`pyro_vae.data`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .contract import ConfigError
from .sources import is_path_like

__all__ = ["DATASETS", "TorchvisionDataset", "check_dataset_config", "check_split_sizes"]


@dataclass(frozen=True)
class TorchvisionDataset:
    """A torchvision dataset with an official train / test split (``train=True|False``)."""

    class_name: str
    #: Where torchvision keeps its files, under the data root; named when they are missing.
    folder: str
    files: tuple[str, ...]
    #: Items of the official training set (train + validation), known before loading, so that
    #: a config asking for more is refused before anything is read.
    num_train: int


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
DATASETS = {
    "mnist": TorchvisionDataset("MNIST", "MNIST/raw", _MNIST_FILES, 60_000),
    "fashion_mnist": TorchvisionDataset("FashionMNIST", "FashionMNIST/raw", _MNIST_FILES, 60_000),
    "kmnist": TorchvisionDataset("KMNIST", "KMNIST/raw", _MNIST_FILES, 60_000),
    "cifar10": TorchvisionDataset("CIFAR10", "cifar-10-batches-py",
                                  tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",), 50_000),
    "cifar100": TorchvisionDataset("CIFAR100", "cifar-100-python", ("train", "test", "meta"), 50_000),
}


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


def check_dataset_config(data) -> None:
    """Check ``data`` (a :class:`~pyro_vae.config.DataConfig`, which config hands down) before
    anything is read; :class:`~pyro_vae.config.ConfigError` if not.

    ``data.dataset`` must be a torchvision name of :data:`DATASETS` (whose split sizes are
    then checked against its known size), or look like a path (:func:`~pyro_vae.sources.is_path_like`;
    whether it exists is checked when it is read). Data read from a path has no official test
    split: its ``val_fraction`` and ``test_fraction`` must each be above 0 (training reports a
    validation ELBO, ``evaluate`` needs test items), and together below 1 whatever the dataset.
    Standardized values leave [0, 1], where a Bernoulli draw (``data.binarize``) is undefined.
    """
    if data.dataset in DATASETS:
        check_split_sizes(data.dataset, DATASETS[data.dataset].num_train, data.val_size, data.train_limit)
    elif is_path_like(data.dataset):
        for key, split in (("val_fraction", "validation"), ("test_fraction", "test")):
            if getattr(data, key) <= 0:
                raise ConfigError(f"data.{key} = {getattr(data, key)!r}: data read from a path ({data.dataset}) has no "
                                  f"official splits and needs a {split} split; give a fraction in (0, 1)")
    else:
        raise ConfigError(f"data.dataset = {data.dataset!r}: choose one of {sorted(DATASETS)} "
                          "or give a folder of images or a .npy/.npz/.pt file")
    if data.val_fraction + data.test_fraction >= 1:
        raise ConfigError(f"data.val_fraction + data.test_fraction = {data.val_fraction} + {data.test_fraction}: "
                          "must be < 1, to leave items for training")
    if data.standardize and data.binarize != "none":
        raise ConfigError(f"data.standardize = true gives values outside [0, 1], which data.binarize = "
                          f"{data.binarize!r} cannot draw bits from; set data.binarize = 'none'")
