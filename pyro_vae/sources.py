"""Reading a dataset from files: a folder of image files, or an array file (.npy, .npz, .pt).

A reader returns the data as the file holds it (:class:`RawData`), in the file's type
(``uint8`` means 0..255; :mod:`pyro_vae.data` converts a batch at a time), memory-mapped
where the file allows it (``.npy``, and ``.npz`` saved without compression), and labels as
``int64`` class indices or ``None``. Anything it cannot read is refused with
one :class:`DataError` line naming the file and what to change. Scaling, splits, fingerprints
and range checks are :mod:`pyro_vae.data`'s job; nothing here knows about configs.

Layouts:

- a folder of ``.png`` / ``.jpg`` / ``.jpeg`` files: either flat (no labels), or one
  sub-folder per class (the ``torchvision.datasets.ImageFolder`` layout: the label of an
  image is the index of its folder's name among the sorted names). Files with other suffixes,
  and names starting with a dot, are ignored; a file with an image suffix that cannot be
  decoded is refused. Grey images (PIL modes ``1``, ``L``, ``LA``) give one channel, all
  others three (RGB); alpha is dropped; a folder mixing both gives three. 16-bit and float
  images are refused (converting them to 8 bits would clip them silently). The files are
  listed and decoded by :mod:`pyro_vae.image_files`, once, into the cache of
  :mod:`pyro_vae.folder_cache`; later reads map the cache.
- ``.npy``: one array; ``.npz``: arrays ``images`` (or ``x``) and optionally ``labels``
  (or ``y``); ``.pt``: a tensor, or a dict with those keys, read with ``weights_only=True``
  (no code in the file runs). Shapes: ``(N, H, W)`` grey images (a channel axis is added),
  ``(N, C, H, W)`` images, ``(N, D)`` vectors.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .contract import DataError
from .folder_cache import read_cached
from .mapping import map_array

ARRAY_SUFFIXES = (".npy", ".npz", ".pt")
#: Keys of an .npz archive or a .pt dict, in the order they are looked for.
IMAGE_KEYS = ("images", "x")
LABEL_KEYS = ("labels", "y")
#: Bytes of a zip member's local header before its name (the zip format's fixed part).
_LOCAL_HEADER_SIZE = 30
#: Channel counts of image formats (grey, RGB, RGBA). A 4-D array with more channels than that
#: on its second axis and one of these on its last is channels-last (N, H, W, C), which would
#: otherwise be read as (N, C, H, W) silently: many channels of images 1 to 4 pixels wide.
_FORMAT_CHANNELS = (1, 3, 4)


@dataclass(frozen=True)
class RawData:
    """Data as read. ``values``: ``(N, C, H, W)`` images or ``(N, D)`` vectors in the file's
    number type (``uint8`` means 0..255), often a memory map of the file; ``labels``: ``int64`` ``(N,)`` or ``None``; ``classes``: the
    class names that labels index, where the source names them."""

    values: torch.Tensor
    labels: torch.Tensor | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return self.values.shape[0]


def is_path_like(spec: str) -> bool:
    """Whether ``spec`` names a path rather than a dataset: it has a path separator, an
    array file's suffix, or names something that exists. Reads nothing but a ``stat``."""
    if not spec:
        return False
    separators = [os.sep] + ([os.altsep] if os.altsep else [])
    return (any(s in spec for s in separators) or Path(spec).suffix.lower() in ARRAY_SUFFIXES
            or Path(spec).expanduser().exists())


def read_path(path: str | Path, image_size: int = 0, cache_dir: str | Path | None = None) -> RawData:
    """Read a folder of images or an array file (see the module's docstring).

    :param image_size: resize every image to ``image_size`` x ``image_size`` (0: keep the
        size, which must then be the same for all); unused for array files.
    :param cache_dir: where a folder's decoded images are cached (:mod:`pyro_vae.folder_cache`);
        unused for array files.
    :raises DataError: a missing path, an unreadable or malformed file, unusable shapes.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist; give a folder of images or a .npy, .npz or .pt file")
    if path.is_dir():
        return read_folder(path, image_size, cache_dir)
    if path.suffix.lower() in ARRAY_SUFFIXES and path.is_file():
        return read_array(path)
    raise DataError(f"{path} is neither a folder of images nor a .npy, .npz or .pt file")


# --- folders of image files -------------------------------------------------------------------
def read_folder(folder: str | Path, image_size: int = 0, cache_dir: str | Path | None = None) -> RawData:
    """Every image of ``folder`` as one ``uint8`` ``(N, C, H, W)`` tensor, with labels from
    class sub-folders (layouts in :mod:`pyro_vae.image_files`).

    All images must have one size unless ``image_size > 0`` resizes them (bilinear, to a
    square: the aspect ratio is not kept); otherwise the first two files of different sizes
    are named. Files are read in sorted order, so the same folder gives the same tensor. The
    folder is decoded once, into a cache that later reads map (:mod:`pyro_vae.folder_cache`,
    which says where: ``cache_dir``, else ``$PYRO_VAE_CACHE``, else beside the data).
    """
    values, labels, classes = read_cached(Path(folder), image_size, cache_dir)
    return RawData(values, labels, classes)


# --- array files --------------------------------------------------------------------------------
def _pick(mapping, keys: tuple[str, ...], path: Path, required: bool):
    found = [key for key in keys if key in mapping]
    if len(found) > 1:
        raise DataError(f"{path} has both {found[0]!r} and {found[1]!r}; keep one of them")
    if found:
        return mapping[found[0]]
    if required:
        raise DataError(f"{path} has no {' or '.join(map(repr, keys))} (it has {sorted(map(str, mapping))}); "
                        f"store the images as {keys[0]!r} and optional labels as {LABEL_KEYS[0]!r}")
    return None


def _load(path: Path):
    """(values, labels or None) as the file stores them (NumPy arrays or tensors)."""
    try:
        if path.suffix.lower() == ".pt":
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(loaded, torch.Tensor):
                return loaded, None
            if isinstance(loaded, dict):
                return _pick(loaded, IMAGE_KEYS, path, True), _pick(loaded, LABEL_KEYS, path, False)
            raise DataError(f"{path} holds a {type(loaded).__name__}; expected a tensor, or a dict with "
                            f"{IMAGE_KEYS[0]!r} (or {IMAGE_KEYS[1]!r}) and optional {LABEL_KEYS[0]!r} (or {LABEL_KEYS[1]!r})")
        if path.suffix.lower() == ".npy":
            return _mapped_npy(path), None
        with zipfile.ZipFile(path) as archive:  # an .npz archive: a zip file of .npy files
            members = {name[: -len(".npy")]: info for info in archive.infolist()
                       if (name := info.filename).endswith(".npy")}
            values = _pick(members, IMAGE_KEYS, path, True)
            labels = _pick(members, LABEL_KEYS, path, False)
            return _npz_member(path, archive, values), None if labels is None else _npz_member(path, archive, labels)
    except DataError:
        raise
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error.strerror or error})") from None
    except Exception as error:  # any failure to parse a file means the same to a user: not this format
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{path} is not a valid {path.suffix.lower()} file ({reason})") from None


def _truncated(path: Path, header: int, dtype: np.dtype, shape: tuple, available: int) -> DataError | None:
    """A refusal if an array of ``shape`` and ``dtype`` whose data start ``header`` bytes into
    ``available`` bytes needs more than they hold."""
    needed, held = math.prod(shape) * dtype.itemsize, max(0, available - header)
    if needed <= held:
        return None
    return DataError(f"{path} is truncated: its header promises an array of shape {shape} and type {dtype}, "
                     f"{needed:,} bytes of data, but the file holds {held:,}; write the file again")


def _map(path: Path, file, offset: int, available: int) -> torch.Tensor | np.ndarray:
    """The array whose .npy header starts at the position of ``file``, memory-mapped from
    ``path`` (:mod:`pyro_vae.mapping`): its pages are read when a batch touches them."""
    version = np.lib.format.read_magic(file)
    # format 1.0 has a 2-byte header length, 2.0 and 3.0 (UTF-8 field names) a 4-byte one
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(file)
    if dtype.hasobject:
        raise DataError(f"{path} holds Python objects; store numbers (integers or floats)")
    data_offset = file.tell()
    truncated = _truncated(path, data_offset - offset, dtype, shape, available)
    if truncated is not None:
        raise truncated
    if dtype.kind not in "biuf" or not dtype.isnative:  # read whole: refused, or converted, later
        order = "F" if fortran_order else "C"
        return np.fromfile(file, dtype=dtype, count=math.prod(shape)).reshape(shape, order=order)
    return map_array(path, dtype, shape, data_offset, fortran_order)


def _mapped_npy(path: Path) -> torch.Tensor | np.ndarray:
    with open(path, "rb") as file:
        return _map(path, file, 0, path.stat().st_size)


def _npz_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> torch.Tensor | np.ndarray:
    """One array of an .npz archive: memory-mapped where it is stored uncompressed
    (``numpy.savez``), read whole where it is compressed (``numpy.savez_compressed``), as a
    compressed member cannot be read at random."""
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)
    with open(path, "rb") as file:
        # the member's data follow its local header: 30 bytes, then its name and extra field,
        # whose lengths the local header itself gives (they may differ from the directory's)
        file.seek(info.header_offset)
        header = file.read(_LOCAL_HEADER_SIZE)
        if len(header) < _LOCAL_HEADER_SIZE or header[:4] != b"PK\x03\x04":
            raise DataError(f"{path}: the archive's member {info.filename} is damaged; write the file again")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        start = info.header_offset + _LOCAL_HEADER_SIZE + name_length + extra_length
        file.seek(start)
        available = min(info.file_size, max(0, path.stat().st_size - start))
        return _map(path, file, start, available)


def _as_tensor(array, path: Path, what: str) -> torch.Tensor:
    """A NumPy array or tensor of real numbers (bool, integers, floats) as a tensor of its type."""
    if isinstance(array, np.ndarray):
        if array.dtype.kind not in "biuf":
            raise DataError(f"{path}: the {what} are of type {array.dtype}; expected numbers (integers or floats)")
        if not array.dtype.isnative:  # torch reads only the machine's byte order: a copy, once
            array = array.astype(array.dtype.newbyteorder("="))
        array = torch.from_numpy(array)
    if not isinstance(array, torch.Tensor):
        raise DataError(f"{path}: the {what} are a {type(array).__name__}; expected an array or a tensor")
    if array.is_complex():
        raise DataError(f"{path}: the {what} are complex numbers; expected real numbers")
    return array


def _as_items(values: torch.Tensor, path: Path) -> torch.Tensor:
    """``(N, H, W)`` -> ``(N, 1, H, W)``; ``(N, C, H, W)`` and ``(N, D)`` as they are."""
    shape = tuple(values.shape)
    if values.dim() not in (2, 3, 4):
        raise DataError(f"{path}: an array of shape {shape}; expected images (N, H, W) or (N, C, H, W), "
                        "or vectors (N, D)")
    if 0 in shape:
        raise DataError(f"{path}: an array of shape {shape} holds no data")
    if values.dim() == 4 and shape[1] > max(_FORMAT_CHANNELS) and shape[3] in _FORMAT_CHANNELS:
        raise DataError(f"{path}: shape {shape} looks channels-last (N, H, W, C); store images as (N, C, H, W), "
                        "e.g. numpy.transpose(images, (0, 3, 1, 2))")
    return values.unsqueeze(1) if values.dim() == 3 else values


def _as_labels(labels, n: int, path: Path) -> torch.Tensor:
    labels = _as_tensor(labels, path, "labels")
    if tuple(labels.shape) != (n,):
        raise DataError(f"{path}: labels of shape {tuple(labels.shape)} for {n} items; expected one label each, ({n},)")
    if labels.is_floating_point() and not (torch.isfinite(labels).all() and torch.equal(labels, labels.round())):
        raise DataError(f"{path}: labels must be whole numbers (class indices)")
    return labels.to(torch.int64)


def read_array(path: str | Path) -> RawData:
    """Read an ``.npy``, ``.npz`` or ``.pt`` file (see the module's docstring)."""
    path = Path(path)
    values, labels = _load(path)
    values = _as_items(_as_tensor(values, path, "values"), path)  # in the file's type; uint8 means 0..255
    return RawData(values, None if labels is None else _as_labels(labels, len(values), path))
