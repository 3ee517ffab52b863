"""Datasets: where they come from, their splits, binarization and batching.

:func:`load_data` reads ``data.dataset`` once, whatever it names: a torchvision dataset
(``mnist``, ``fashion_mnist``, ``kmnist``, ``cifar10``, ``cifar100``), a folder of image files
or an array file (the readers are in :mod:`pyro_vae.sources`). Nothing is converted or copied
whole: a split (:class:`ImageData`) is the values as stored (``uint8`` stays ``uint8``, array
files and decoded folders are memory-mapped) and the positions of its items, and a batch, the
items at a slice of a seeded permutation, is read and converted to float then. A torchvision
``DataLoader`` with a per-image ``ToTensor`` transform made an MNIST epoch several times slower
on a small CPU (the figure is in the results log, docs/results.md), so it is not used in the
training loop. :class:`Splits` records where the data came from and a fingerprint of it, so a
run can later be checked to be scored on the very data it trained on (:func:`check_source`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .contract import ACCEPTS, ConfigError
from .datasets import DATASETS, TorchvisionDataset, check_dataset_config, check_split_sizes
from .mapping import reading_in_order
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


#: Values converted to float at once when a whole split is read, scanned or binarized in
#: pieces: 16 Mi values, 64 MB as float32, whatever the size of the data.
CHUNK_VALUES = 2**24


@dataclass(frozen=True)
class ImageData:
    """Items of one split, with optional labels, held as the data stores them.

    ``values`` holds the items of the source, ``(M, C, H, W)`` images or ``(M, D)`` vectors,
    in the type they were read in (``uint8`` stays ``uint8``: a quarter of float32's bytes)
    and often memory-mapped from a file, so that no split is a copy. ``rows`` says which of
    them this split is, in its order (``None``: all; a ``slice``; or an index tensor).
    Indexing (``data[i:j]``, ``data[index_tensor]``) reads just those items as float32, the
    form a model sees: ``uint8`` divided by ``max_value`` (255 by default: grey values in
    [0, 1]), then standardized where ``standardized`` holds a ``(mean, scale)`` pair.

    :attr:`images` reads the whole split as one float tensor, for small data and interactive
    use; the training loop, :func:`~pyro_vae.elbo.evaluate` and the commands index batches.
    ``labels`` are ``int64`` ``(N,)`` class indices of this split's items, or ``None``.
    """

    values: torch.Tensor
    labels: torch.Tensor | None = None
    rows: torch.Tensor | slice | None = None
    #: the stored value that means 1.0 (``None``: 255 for ``uint8``, else 1)
    max_value: float | None = None
    standardized: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        if self.rows is None:
            return self.values.shape[0]
        if isinstance(self.rows, slice):
            return self.rows.stop - self.rows.start
        return len(self.rows)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one item: ``(C, H, W)`` or ``(D,)``."""
        return tuple(self.values.shape[1:])

    @property
    def shape(self) -> tuple[int, ...]:
        """``(N, *image_shape)``, the shape of :attr:`images` (without reading them)."""
        return (len(self), *self.image_shape)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def images(self) -> torch.Tensor:
        """The whole split as one float32 tensor (read now: 4 bytes a value)."""
        return self[0 : len(self)]

    def __getitem__(self, key: slice | torch.Tensor) -> torch.Tensor:
        """The items at ``key`` (a slice of step 1, or a 1-D integer tensor of positions in
        this split) as float32, as the model sees them."""
        return self._as_float(self._stored(key))

    def chunks(self, max_values: int | None = None):
        """``(begin, end)`` bounds of consecutive pieces of about ``max_values`` values each
        (default :data:`CHUNK_VALUES`, read when called)."""
        per_item = max(1, math.prod(self.image_shape))
        step = max(1, (max_values or CHUNK_VALUES) // per_item)
        return [(begin, min(begin + step, len(self))) for begin in range(0, len(self), step)]

    def head(self, n: int) -> "ImageData":
        """The first ``n`` items (no copy)."""
        return self.part(0, min(n, len(self)))

    def part(self, begin: int, end: int) -> "ImageData":
        """Items ``begin`` to ``end`` (no copy)."""
        return self.take(slice(begin, end))

    def take(self, index: torch.Tensor | slice) -> "ImageData":
        """The items at ``index`` (positions in this split: a 1-D integer tensor, or a slice of
        step 1), in its order. Copies no values, only the index and the labels."""
        index = self._plain(index)
        labels = None if self.labels is None else self.labels[index]
        return dataclasses.replace(self, rows=self._rows_at(index), labels=labels)

    def _plain(self, key: torch.Tensor | slice) -> torch.Tensor | slice:
        """``key`` with a slice's bounds made explicit and inside this split (step 1 only)."""
        if not isinstance(key, slice):
            return key
        begin, end, step = key.indices(len(self))
        if step != 1:
            raise ValueError(f"ImageData: slices of step 1 only, not {step}")
        return slice(begin, max(begin, end))

    def _rows_at(self, index: torch.Tensor | slice) -> torch.Tensor | slice:
        """Rows of ``values`` at positions ``index`` of this split."""
        if self.rows is None:
            return index
        if isinstance(self.rows, slice):
            if isinstance(index, slice):
                return slice(self.rows.start + index.start, self.rows.start + index.stop)
            return index + self.rows.start
        return self.rows[index]

    def _stored(self, key: torch.Tensor | slice) -> torch.Tensor:
        """The stored values of the items at ``key``, as stored."""
        rows = self._rows_at(self._plain(key))
        if isinstance(rows, slice):
            return self.values[rows]
        # in increasing row order, then put back in place: a memory-mapped file is then read
        # forwards, which a disk serves far faster than the same pages at random
        ordered, where = rows.sort()
        out = torch.empty((len(rows), *self.image_shape), dtype=self.values.dtype)
        out[where] = self.values[ordered]
        return out

    def _as_float(self, stored: torch.Tensor) -> torch.Tensor:
        # always a new tensor: a slice of float32 values would otherwise be a view of the store,
        # which may be a read-only mapping of a file
        x = stored.to(torch.float32, copy=True)
        top = self.max_value if self.max_value is not None else 255.0 if stored.dtype == torch.uint8 else 1.0
        if top != 1.0:
            x = x.div_(top)
        if self.standardized is not None:
            mean, scale = self.standardized
            x = (x - mean) / scale
        return x


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
    give another. One streamed pass over the bytes, piece by piece, so a memory-mapped file is
    hashed without being held in memory (the 30 GB file of docs/results.md, L2, in about a minute).

    Values of a type other than ``uint8`` are hashed as float32, the type they were converted
    to up front before files were memory-mapped, so a run's recorded fingerprint still matches."""
    digest = hashlib.sha256()
    for part in parts:
        values = part.values
        hashed_as = values.dtype if values.dtype in (torch.uint8, torch.float32) else torch.float32
        digest.update(f"{hashed_as}{tuple(values.shape)};".encode())
        with reading_in_order(values):  # a piece at a time: a file larger than memory is never held
            for begin, end in ImageData(values).chunks():
                digest.update(values[begin:end].to(hashed_as).contiguous().numpy())
        if part.labels is None:
            digest.update(b"no labels;")
        else:
            digest.update(f"{part.labels.dtype}{tuple(part.labels.shape)};".encode())
            digest.update(part.labels.contiguous().numpy())
    return digest.hexdigest()


def _as_float(raw: RawData, where: str) -> ImageData:
    """The items as the model will see them: ``uint8`` as 0..255 -> [0, 1], other numbers as
    float32, both converted one batch at a time (nothing is converted here).
    :class:`DataError` for NaN or inf, found by one streamed pass over float values."""
    data = ImageData(raw.values, raw.labels)
    if raw.values.dtype == torch.uint8:
        return data
    with reading_in_order(raw.values):
        bad = torch.cat([(~torch.isfinite(raw.values[begin:end]).flatten(1).all(1)).nonzero().flatten() + begin
                         for begin, end in data.chunks()])
    if len(bad):
        raise DataError(f"{where}: {len(bad)} items hold NaN or infinite values (the first is item {bad[0].item()}); "
                        "remove or replace them")
    return data


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
    return data.take(train), data.take(val), data.take(test)  # index tensors: no value is copied


def _standardize(train: ImageData, *others: ImageData) -> list[ImageData]:
    """Every split minus the training split's per-feature mean, over its per-feature standard
    deviation (features below :data:`MIN_STD` are only centred), applied as each batch is read.
    The statistics are summed in float64 over pieces of the training split (two passes: the
    mean, then the squared deviations from it), so no split is converted whole."""
    pieces = train.chunks()
    total = sum(train[b:e].to(torch.float64).sum(0) for b, e in pieces)
    mean = total / len(train)
    squares = sum((train[b:e].to(torch.float64) - mean).square().sum(0) for b, e in pieces)
    std = (squares / len(train)).sqrt()
    scale = torch.where(std < MIN_STD, torch.ones_like(std), std)
    stats = (mean.to(torch.float32), scale.to(torch.float32))
    return [dataclasses.replace(d, standardized=stats) for d in (train, *others)]


def load_data(data: DataConfig, data_dir: str | Path | None = None, dataset: str | None = None,
              cache_dir: str | Path | None = None) -> Splits:
    """Read ``data.dataset`` (or ``dataset``, e.g. where a file has moved) into :class:`Splits`.

    - A torchvision name: the official test split; validation is the last ``data.val_size``
      items of the official training set (the 50,000 / 10,000 split of Burda et al. 2015 for
      MNIST); read from :func:`resolve_data_dir` ``(data_dir)``.
    - A folder of images or an array file (:mod:`pyro_vae.sources`): seeded random splits by
      ``data.val_fraction`` and ``data.test_fraction`` (``data.split_seed``); ``data_dir`` is
      not used, relative paths are relative to the working folder.

    ``uint8`` values are divided by 255, floats are taken as they are, both a batch at a time
    when the splits are indexed. ``data.train_limit > 0`` keeps the first ``train_limit``
    training items; ``data.standardize`` centres and scales every split by the training split's
    statistics (:func:`_standardize`). ``cache_dir``: where a folder of images is decoded to
    (:mod:`pyro_vae.folder_cache`; ``None``: ``$PYRO_VAE_CACHE``, else beside the images).

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
        train, val = full_train.head(n_train), full_train.part(n_train, len(full_train))
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


def _value_summary(data: ImageData, binary_too: bool) -> tuple[float, float, bool]:
    """``(low, high, binary)`` of the values a model sees of ``data``, in one streamed pass.
    ``binary``: every value is 0 or 1 (only worked out when ``binary_too``). Stored bytes are
    scanned as bytes, which is several times faster than converting them to floats first."""
    low, high, binary = math.inf, -math.inf, True
    raw = data.values.dtype == torch.uint8 and data.standardized is None
    top = (data.max_value or 255.0) if raw else 1.0
    # a split of a store is a subset of it: scanning the store in its own order reads the file
    # forwards, and a value outside the range anywhere in the data is worth refusing
    scanned = ImageData(data.values) if raw and data.rows is not None else data
    with reading_in_order(data.values):
        for begin, end in scanned.chunks():
            piece = scanned._stored(slice(begin, end)) if raw else scanned[begin:end]
            lo, hi = (v.item() for v in torch.aminmax(piece.detach()))
            low, high = min(low, lo), max(high, hi)
            if binary_too and binary:
                binary = bool(((piece == 0) | (piece == top)).all())
    return low / top, high / top, binary


def check_likelihood_range(images: torch.Tensor | ImageData, accepts: str, binarize: str, likelihood: str) -> None:
    """Refuse (:class:`DataError`) data outside what ``likelihood`` is defined on.

    :param images: the data, any shape: a tensor of values as the model sees them, or an
        :class:`ImageData` (whose whole store is scanned when it is bytes).
    :param accepts: the likelihood's ``accepts``, one of :data:`pyro_vae.contract.ACCEPTS`:
        ``"binary"`` (values in {0, 1}, or in [0, 1] when ``binarize`` is not ``"none"``),
        ``"unit_interval"`` ([0, 1]) or ``"real"`` (any finite value).
    :param binarize: ``data.binarize``; a Bernoulli draw needs values in [0, 1] whatever
        the likelihood.
    :param likelihood: its name, for the message.
    """
    if accepts not in ACCEPTS:  # a registered likelihood was checked; a hand-built one may say anything
        raise ValueError(f"accepts = {accepts!r}: expected one of {list(ACCEPTS)}")
    data = images if isinstance(images, ImageData) else ImageData(images, max_value=1.0)
    needs_bits = accepts == "binary" and binarize == "none"
    grey_bytes = data.values.dtype == torch.uint8 and data.standardized is None and data.max_value in (None, 255.0)
    if grey_bytes and not needs_bits:  # bytes over 255 lie in [0, 1]: nothing to scan (a large file starts at once)
        return
    low, high, binary = _value_summary(data, binary_too=needs_bits)
    found = f"the data range is {low:.4g}..{high:.4g}"
    if not (math.isfinite(low) and math.isfinite(high)):
        raise DataError(f"{found}: the data hold NaN or infinite values; remove or replace them")
    in_unit = low >= 0 and high <= 1
    real = "choose a likelihood for real values such as 'gaussian' (data.standardize = true scales the data)"
    if binarize != "none" and not in_unit:
        raise DataError(f"data.binarize = {binarize!r} draws bits with the values as probabilities, but {found}, "
                        f"outside [0, 1]; set data.binarize = 'none' and {real}")
    if accepts == "binary" and binarize == "none" and not binary:
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


def binarize_fast(images: torch.Tensor, generator: torch.Generator | None = None, of: tuple[int, int] | None = None
                  ) -> torch.Tensor:
    """The same distribution as :func:`binarize` (pixel = 1 with probability its grey value),
    drawn as ``uniform < grey``, which took half the time of ``torch.bernoulli`` on MNIST
    (measured for issue #12; docs/results.md), and it runs for every batch of a dynamically
    binarized run. The draws differ from :func:`binarize`'s for the same generator.

    :param of: ``(begin, total)`` when ``images`` are items ``begin`` on of a batch of
        ``total``: the uniforms of the whole batch are drawn and this part's taken, so a
        rank that reads only its shard binarizes it exactly as the whole batch would be.
    """
    begin, total = (0, len(images)) if of is None else of
    uniform = torch.rand((total, *images.shape[1:]), generator=generator, dtype=images.dtype, device=images.device)
    return (uniform[begin : begin + len(images)] < images).to(images.dtype)


def shift_images(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None,
                 of: tuple[int, int] | None = None) -> torch.Tensor:
    """Each image of ``(N, C, H, W)`` translated by a whole number of pixels, drawn uniformly
    from ``-max_shift .. max_shift`` in each axis and for each image independently, the vacated
    border filled with zeros: the random translations that train classifiers of small images
    from few labels (e.g. Simard et al. 2003; Laine & Aila 2017 on MNIST's 100 labels).

    :param of: ``(begin, total)`` as for :func:`binarize_fast`: the offsets of the whole batch
        are drawn and this part's taken, so every rank shifts its shard as the whole batch would be.
    """
    begin, total = (0, len(images)) if of is None else of
    offsets = torch.randint(-max_shift, max_shift + 1, (2, total), generator=generator)[:, begin : begin + len(images)]
    height, width = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    # output pixel (i, j) of an image moved by (dy, dx) is input pixel (i - dy, j - dx)
    rows = torch.arange(height)[None, :] + max_shift - offsets[0][:, None]  # (N, H)
    cols = torch.arange(width)[None, :] + max_shift - offsets[1][:, None]  # (N, W)
    items = torch.arange(len(images))[:, None, None]
    moved = padded[items, :, rows[:, :, None].to(images.device), cols[:, None, :].to(images.device)]  # (N, H, W, C)
    return moved.permute(0, 3, 1, 2).contiguous()


def check_shift(max_shift: int, item_shape: tuple[int, ...]) -> None:
    """Refuse (:class:`~pyro_vae.contract.ConfigError`, one line) ``data.augment_shift`` on items
    it cannot translate: vectors, or images with a side of at most ``max_shift`` pixels."""
    if max_shift and (len(item_shape) != 3 or max_shift >= min(item_shape[1:])):
        what = "vectors" if len(item_shape) != 3 else f"images of {item_shape[1]} x {item_shape[2]} pixels"
        raise ConfigError(f"data.augment_shift = {max_shift}: translates images by fewer pixels than their sides; "
                          f"this data holds {what}; set data.augment_shift = 0")


def binarize_once(data: ImageData, seed: int = EVAL_BINARIZATION_SEED) -> ImageData:
    """A seeded, fixed binarization (static binarization; held-out data of binarized runs).

    Drawn piece by piece and kept as bits in bytes (a quarter of float32's memory). CPU
    Bernoulli draws are taken one value after another from the generator, so the pieces give
    the very bits one draw over the whole split gives (a test keeps this true): the held-out
    images every earlier evaluation scored."""
    generator = torch.Generator().manual_seed(seed)
    bits = torch.empty(data.shape, dtype=torch.uint8)
    for begin, end in data.chunks():
        bits[begin:end] = binarize(data[begin:end], generator)
    return ImageData(bits, data.labels, max_value=1.0)


def prepare(data: ImageData, binarization: str, seed: int = EVAL_BINARIZATION_SEED) -> ImageData:
    """Held-out (or static training) images as a model of this binarization sees them."""
    return data if binarization == "none" else binarize_once(data, seed)


def whole(size: int) -> tuple[int, int]:
    """The part of a batch of ``size`` items one process trains on alone: all of it."""
    return 0, size


def iterate_batches(
    images: torch.Tensor | ImageData,
    batch_size: int,
    generator: torch.Generator,
    dynamic: bool,
    order: torch.Tensor,
    start: int = 0,
    shard: Callable[[int], tuple[int, int]] = whole,
    max_shift: int = 0,
):
    """Yield ``(step, batch)`` over one epoch: the items of a seeded permutation, a batch at a time.

    ``order`` is the epoch's order of the images (a ``torch.randperm``, or any sequence of
    positions, some repeated: a semi-supervised run draws its labelled items again); with
    ``dynamic=True`` every batch is freshly binarized from ``generator``. ``start`` lets an
    interrupted epoch continue at the step where it stopped. ``shard(n)`` gives the
    ``(begin, end)`` part of a batch of ``n`` this process trains on: only those items are
    read (converted to float and binarized), the batch's other items are other ranks' to read.
    ``max_shift > 0`` translates each image at random (:func:`shift_images`), after the draw
    of its bits.
    """
    for step, begin in enumerate(range(start * batch_size, len(order), batch_size), start):
        rows = order[begin : begin + batch_size]
        first, last = shard(len(rows))
        batch = images[rows[first:last]]
        if dynamic:
            batch = binarize_fast(batch, generator, of=(first, len(rows)))
        if max_shift:
            batch = shift_images(batch, max_shift, generator, of=(first, len(rows)))
        yield step, batch
