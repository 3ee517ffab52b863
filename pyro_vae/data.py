"""Datasets as preloaded tensors: where they come from, their splits, binarization and batching.

:func:`load_data` reads ``data.dataset`` once, whatever it names: a torchvision dataset
(``mnist``, ``fashion_mnist``, ``kmnist``, ``cifar10``, ``cifar100``), a folder of image files
or an array file (the readers are in :mod:`pyro_vae.sources`). Each split becomes one
contiguous float tensor, ``(N, C, H, W)`` images or ``(N, D)`` vectors, and a batch is a
slice of a seeded permutation. A torchvision ``DataLoader`` with a per-image ``ToTensor``
transform made an MNIST epoch several times slower on a small CPU (the figure is in the
results log, docs/results.md), so it is not used in the training loop. :class:`Splits` records where the data came from and a fingerprint of it, so a
run can later be checked to be scored on the very data it trained on (:func:`check_source`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .contract import ACCEPTS, ConfigError
from .datasets import DATASETS, TorchvisionDataset, check_dataset_config, check_split_sizes
from .sources import DataError, RawData, read_path

__all__ = ["DataError", "DataNotFoundError", "ImageData", "Splits", "load_data", "load_splits", "from_tensors",
           "check_source", "check_likelihood_range", "binarize", "binarize_fast", "binarize_once",
           "prepare", "iterate_batches", "resolve_data_dir"]

#: Environment variable naming the folder that holds ``MNIST/raw/...`` and friends.
DATA_ENV = "PYRO_VAE_DATA"
DEFAULT_DATA_DIR = Path("data")
#: Held-out images are binarized once with this seed, so every run is scored on the same bits.
EVAL_BINARIZATION_SEED = 0
#: ``data.standardize``: a feature whose standard deviation on the training split is below this
#: is only centred, not scaled. Such a feature is constant in training (MNIST's border pixels);
#: dividing by a floor instead would blow a held-out image's small deviations up by 1 / floor.
MIN_STD = 1e-6


def _torchvision_datasets():
    # imported when a torchvision dataset is read, not with the package: it is slow to import,
    # and data of one's own (folders, arrays) never needs it
    import torchvision.datasets

    return torchvision.datasets


class DataNotFoundError(FileNotFoundError):
    """The dataset files are not in the data folder and could not be downloaded."""


def resolve_data_dir(flag: str | Path | None = None) -> tuple[Path, bool]:
    """The data root and whether downloading there is allowed.

    Order: the ``--data-dir`` flag, then ``$PYRO_VAE_DATA``, then ``./data``. Only the default
    folder may be downloaded into: a folder the user named is read as it is. Only torchvision
    datasets are read from it; a path in ``data.dataset`` is read where it points.
    """
    if flag is not None:
        return Path(flag), False
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]), False
    return DEFAULT_DATA_DIR, True


@dataclass(frozen=True)
class ImageData:
    """Data items with optional labels. ``images``: float ``(N, C, H, W)`` images or
    ``(N, D)`` vectors; ``labels``: ``int64`` ``(N,)`` class indices, or ``None``."""

    images: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one item: ``(C, H, W)`` or ``(D,)``."""
        return tuple(self.images.shape[1:])

    def head(self, n: int) -> "ImageData":
        return ImageData(self.images[:n], None if self.labels is None else self.labels[:n])

    def take(self, index: torch.Tensor) -> "ImageData":
        """The items at ``index`` (a 1-D integer tensor), in its order, as new contiguous tensors."""
        return ImageData(self.images[index], None if self.labels is None else self.labels[index])


@dataclass(frozen=True)
class Splits:
    """Train / validation / test data, and ``source``: what :func:`load_data` read (``None``
    for tensors built by hand). ``source`` holds ``dataset`` (the spec read), ``kind``
    (``"torchvision"``, ``"folder"`` or ``"array"``), ``path`` (absolute; ``None`` for
    torchvision), ``fingerprint`` (SHA-256 of the items and labels as read, before splitting),
    ``data_shape``, ``num_items`` (all splits), ``has_labels`` and ``classes`` (names or ``None``)."""

    train: ImageData
    val: ImageData
    test: ImageData
    source: dict | None = None


def _read(name: str, root: Path, train: bool, download: bool) -> RawData:
    """One official split of a torchvision dataset, ``uint8`` ``(N, C, H, W)``, as read."""
    spec = DATASETS[name]
    cls = getattr(_torchvision_datasets(), spec.class_name)
    try:
        dataset = cls(root=str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise _missing(root, spec) from None
        try:
            dataset = cls(root=str(root), train=train, download=True)
        except Exception:  # no network, a mirror down, a proxy: all mean the same here
            raise _missing(root, spec, tried_download=True) from None
    values = torch.as_tensor(np.asarray(dataset.data))
    # MNIST-like sets are (N, H, W) tensors; CIFAR keeps channels last, (N, H, W, C) arrays
    values = values.unsqueeze(1) if values.dim() == 3 else values.permute(0, 3, 1, 2)
    labels = torch.as_tensor(dataset.targets).to(torch.int64).clone()
    return RawData(values.contiguous(), labels, list(getattr(dataset, "classes", [])) or None)


def _missing(root: Path, spec: TorchvisionDataset, tried_download: bool = False) -> DataNotFoundError:
    where = root / spec.folder
    how = "could not be downloaded" if tried_download else "point --data-dir or $PYRO_VAE_DATA at a folder that has them"
    return DataNotFoundError(f"dataset files not found in {where}/ (expected {', '.join(spec.files)}); {how}")


def fingerprint(*parts: RawData) -> str:
    """SHA-256 (hex) of the values and labels of ``parts``, with their types and shapes:
    the same bytes read give the same string; one changed value, another shape or other labels
    give another. One pass over the bytes, cheap beside reading them (docs/results.md has the
    time for MNIST)."""
    digest = hashlib.sha256()
    for part in parts:
        for tensor in (part.values, part.labels):
            if tensor is None:
                digest.update(b"no labels;")
                continue
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)};".encode())
            digest.update(tensor.contiguous().numpy())  # the buffer itself: no copy
    return digest.hexdigest()


def _as_float(raw: RawData, where: str) -> ImageData:
    """``uint8`` as 0..255 -> [0, 1]; floats as they are. :class:`DataError` for NaN or inf."""
    values = raw.values
    if values.dtype == torch.uint8:
        return ImageData(values.to(torch.float32).div_(255.0), raw.labels)
    finite = torch.isfinite(values).flatten(1).all(1)
    if not finite.all():
        bad = (~finite).nonzero().flatten()
        raise DataError(f"{where}: {len(bad)} items hold NaN or infinite values (the first is item {bad[0].item()}); "
                        "remove or replace them")
    return ImageData(values.to(torch.float32), raw.labels)


def _split_by_fraction(data: ImageData, config: DataConfig, where: str) -> tuple[ImageData, ImageData, ImageData]:
    """Seeded random train / validation / test splits: ``round(N * fraction)`` items each
    (at least one) for validation and test, the rest for training; ``config.split_seed`` draws
    one ``torch.randperm`` whose first items are the test split, the next the validation split.
    Items keep the permutation's order, so ``train_limit`` takes a random subset, not the first
    class of a folder."""
    n = len(data)
    n_val, n_test = (max(1, round(n * f)) for f in (config.val_fraction, config.test_fraction))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"{where} holds {n} items: too few for {n_val} validation, {n_test} test and at least one "
                        "training item (data.val_fraction, data.test_fraction)")
    if not 0 <= config.train_limit <= n_train:
        raise ConfigError(f"data.train_limit = {config.train_limit}: must be between 0 (all) and {n_train}, the "
                          f"training items of {where} left after data.val_fraction and data.test_fraction")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.split_seed))
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return data.take(train), data.take(val), data.take(test)


def _standardize(train: ImageData, *others: ImageData) -> list[ImageData]:
    """Every split minus the training split's per-feature mean, over its per-feature standard
    deviation (features below :data:`MIN_STD` are only centred)."""
    mean = train.images.mean(0)
    std = train.images.std(0, correction=0)
    scale = torch.where(std < MIN_STD, torch.ones_like(std), std)
    return [ImageData(((d.images - mean) / scale).contiguous(), d.labels) for d in (train, *others)]


def load_data(data: DataConfig, data_dir: str | Path | None = None, dataset: str | None = None,
              cache_dir: str | Path | None = None) -> Splits:
    """Read ``data.dataset`` (or ``dataset``, e.g. where a file has moved) into :class:`Splits`.

    - A torchvision name: the official test split; validation is the last ``data.val_size``
      items of the official training set (the 50,000 / 10,000 split of Burda et al. 2015 for
      MNIST); read from :func:`resolve_data_dir` ``(data_dir)``.
    - A folder of images or an array file (:mod:`pyro_vae.sources`): seeded random splits by
      ``data.val_fraction`` and ``data.test_fraction`` (``data.split_seed``); ``data_dir`` is
      not used, relative paths are relative to the working folder.

    ``uint8`` values are divided by 255, floats are taken as they are. ``data.train_limit > 0``
    keeps the first ``train_limit`` training items; ``data.standardize`` centres and scales
    every split by the training split's statistics (:func:`_standardize`).

    :raises ConfigError: a name that is not a dataset, split sizes the data cannot give.
    :raises DataError: a missing path, unreadable or malformed files, NaN or inf values.
    :raises DataNotFoundError: a torchvision dataset whose files are not in the data root.
    """
    spec = data.dataset if dataset is None else dataset
    data = dataclasses.replace(data, dataset=spec)
    check_dataset_config(data)
    if spec in DATASETS:
        root, download = resolve_data_dir(data_dir)
        raw_train = _read(spec, root, train=True, download=download)
        raw_test = _read(spec, root, train=False, download=download)
        check_split_sizes(spec, len(raw_train), data.val_size, data.train_limit)  # the files agree with the table
        parts, kind, path = (raw_train, raw_test), "torchvision", None
        full_train, test = _as_float(raw_train, spec), _as_float(raw_test, spec)
        n_train = len(full_train) - data.val_size
        train, val = full_train.head(n_train), ImageData(full_train.images[n_train:], full_train.labels[n_train:])
    else:
        path = Path(os.path.abspath(Path(spec).expanduser()))
        raw = read_path(path, data.image_size, cache_dir)
        parts, kind = (raw,), "folder" if path.is_dir() else "array"
        train, val, test = _split_by_fraction(_as_float(raw, str(path)), data, str(path))
    if data.train_limit:
        train = train.head(data.train_limit)
    if data.standardize:
        train, val, test = _standardize(train, val, test)
    source = {
        "dataset": spec, "kind": kind, "path": None if path is None else str(path),
        "fingerprint": fingerprint(*parts), "data_shape": list(parts[0].values.shape[1:]),
        "num_items": sum(len(part) for part in parts), "has_labels": parts[0].labels is not None,
        "classes": parts[0].classes,
    }
    return Splits(train=train, val=val, test=test, source=source)


def from_tensors(images, labels=None, *, test_images=None, test_labels=None, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, split_seed: int = 0) -> Splits:
    """:class:`Splits` from plain tensors or NumPy arrays, for :func:`~pyro_vae.train.fit`.

    :param images: ``(N, C, H, W)`` or ``(N, H, W)`` images, or ``(N, D)`` vectors; ``uint8``
        means 0..255, floats are taken as they are.
    :param labels: ``(N,)`` integer labels, or ``None``.
    :param test_images: a test split of one's own (with ``test_labels``); without it, a seeded
        ``test_fraction`` of ``images`` is held out. ``val_fraction`` of the rest validates.
    :param split_seed: the seed of the random splits.

    The source is recorded as ``"tensors"`` with a fingerprint of the values: ``pyro-vae``
    commands cannot read such a run's data again, so they refuse it rather than score other data.
    """
    def raw(values, labels, where):
        values = torch.as_tensor(values)
        if values.dim() == 3:  # (N, H, W): one channel
            values = values.unsqueeze(1)
        if values.dim() not in (2, 4):
            raise DataError(f"{where}: expected (N, C, H, W) or (N, H, W) images or (N, D) vectors, got shape "
                            f"{tuple(values.shape)}")
        if not (values.dtype == torch.uint8 or values.is_floating_point()):
            values = values.to(torch.float32)
        labels = None if labels is None else torch.as_tensor(labels).to(torch.int64)
        if labels is not None and labels.shape != values.shape[:1]:
            raise DataError(f"{where}: {len(labels)} labels for {len(values)} items")
        return RawData(values.contiguous(), labels)

    given = raw(images, labels, "images")
    parts = (given,) if test_images is None else (given, raw(test_images, test_labels, "test_images"))
    config = DataConfig(dataset="tensors", val_fraction=val_fraction,
                        test_fraction=test_fraction if test_images is None else 0.0, split_seed=split_seed)
    data = _as_float(given, "images")
    if test_images is None:
        train, val, test = _split_by_fraction(data, config, "images")
    else:
        n_val = max(1, round(len(data) * val_fraction))
        if len(data) - n_val < 1:
            raise DataError(f"images holds {len(data)} items: too few for {n_val} validation and one training item")
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(split_seed))
        train, val, test = data.take(order[n_val:]), data.take(order[:n_val]), _as_float(parts[1], "test_images")
    source = {"dataset": None, "kind": "tensors", "path": None, "fingerprint": fingerprint(*parts),
              "data_shape": list(given.values.shape[1:]), "num_items": sum(len(p) for p in parts),
              "has_labels": given.labels is not None, "classes": None}
    return Splits(train=train, val=val, test=test, source=source)


def load_splits(
    name: str = "mnist",
    data_dir: str | Path | None = None,
    val_size: int = 10_000,
    train_limit: int = 0,
) -> Splits:
    """:func:`load_data` of ``name`` (a dataset or a path) with these split sizes and the
    other ``data.*`` settings at their defaults."""
    return load_data(DataConfig(dataset=name, val_size=val_size, train_limit=train_limit), data_dir)


def check_source(recorded: dict, splits: Splits) -> None:
    """Refuse (:class:`DataError`) data whose fingerprint is not the one ``recorded`` with a run
    (a ``Splits.source``); a record without a fingerprint (tensors handed to ``fit``) is not checked."""
    expected = recorded.get("fingerprint")
    if expected is None:
        return
    found = (splits.source or {}).get("fingerprint")
    if found != expected:
        where = recorded.get("path") or recorded.get("dataset")
        now = f"fingerprint {found[:12]}" if found else "no fingerprint"
        raise DataError(f"data {recorded.get('dataset')!r} changed since the run was trained ({now}, recorded "
                        f"{expected[:12]}): scoring or resuming on other data would be silently wrong; give the "
                        f"data it trained on ({where}), e.g. with --data")


def check_likelihood_range(images: torch.Tensor, accepts: str, binarize: str, likelihood: str) -> None:
    """Refuse (:class:`DataError`) data outside what ``likelihood`` is defined on.

    :param images: the data, any shape.
    :param accepts: the likelihood's ``accepts``, one of :data:`pyro_vae.contract.ACCEPTS`:
        ``"binary"`` (values in {0, 1}, or in [0, 1] when ``binarize`` is not ``"none"``),
        ``"unit_interval"`` ([0, 1]) or ``"real"`` (any finite value).
    :param binarize: ``data.binarize``; a Bernoulli draw needs values in [0, 1] whatever
        the likelihood.
    :param likelihood: its name, for the message.
    """
    if accepts not in ACCEPTS:  # a registered likelihood was checked; a hand-built one may say anything
        raise ValueError(f"accepts = {accepts!r}: expected one of {list(ACCEPTS)}")
    low, high = (v.item() for v in torch.aminmax(images.detach()))
    found = f"the data range is {low:.4g}..{high:.4g}"
    if not (math.isfinite(low) and math.isfinite(high)):
        raise DataError(f"{found}: the data hold NaN or infinite values; remove or replace them")
    in_unit = low >= 0 and high <= 1
    real = "choose a likelihood for real values such as 'gaussian' (data.standardize = true scales the data)"
    if binarize != "none" and not in_unit:
        raise DataError(f"data.binarize = {binarize!r} draws bits with the values as probabilities, but {found}, "
                        f"outside [0, 1]; set data.binarize = 'none' and {real}")
    if accepts == "binary" and binarize == "none" and not bool(((images == 0) | (images == 1)).all()):
        fix = ("set data.binarize = 'dynamic' or 'static', or choose a likelihood for values in [0, 1] such as "
               "'continuous_bernoulli'") if in_unit else real
        raise DataError(f"likelihood {likelihood!r} needs binary values (0 or 1), but {found} with values in "
                        f"between; {fix}")
    if accepts == "unit_interval" and not in_unit:
        raise DataError(f"likelihood {likelihood!r} needs values in [0, 1], but {found}; {real}, or rescale the "
                        "data to [0, 1]")


def binarize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per pixel, with the grey value as its probability (``torch.bernoulli``).

    Used for the fixed binarizations (:func:`binarize_once`): the held-out images every
    evaluation of this package has scored. Training's fresh draws use :func:`binarize_fast`.
    """
    return torch.bernoulli(images, generator=generator)


def binarize_fast(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The same distribution as :func:`binarize` (pixel = 1 with probability its grey value),
    drawn as ``uniform < grey``, which took half the time of ``torch.bernoulli`` on MNIST
    (measured for issue #12; docs/results.md), and it runs for every batch of a dynamically
    binarized run. The draws differ from :func:`binarize`'s for the same generator."""
    uniform = torch.rand(images.shape, generator=generator, dtype=images.dtype, device=images.device)
    return (uniform < images).to(images.dtype)


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
        yield step, binarize_fast(batch, generator) if dynamic else batch
