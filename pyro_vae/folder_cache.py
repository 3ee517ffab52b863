"""A folder of images, decoded once into a memory-mapped cache that later reads map.

Decoding every PNG or JPEG of a folder is the slow part of reading it, and it gives the same
array each time: :func:`read_cached` decodes a folder once, with a few worker processes, into a
``uint8`` ``(N, C, H, W)`` ``.npy`` file, and later reads map that file (copy-on-write, so the
tensor is writable, yet no page is copied unless written) instead of decoding again.

**Where.** :func:`cache_folder`: the ``cache_dir`` argument (``--cache-dir``), else the folder
in ``$PYRO_VAE_CACHE``, else ``.pyro-vae-cache/`` inside the image folder (hidden: listing the
folder skips names starting with a dot). Where the image folder cannot be written and no cache
folder is named, the user's cache folder (``$XDG_CACHE_HOME/pyro-vae``, else
``~/.cache/pyro-vae``) is used, and one line on stderr says so.

**What an entry is.** Per folder and ``image_size``, three files named by the *listing key* (a
sha256 of the image files' sorted relative names, sizes and ``mtime_ns``, and ``image_size``), so
several folders and sizes share one cache folder: ``KEY.npy`` (the images), ``KEY.labels.npy``
(class indices of a class-folder layout) and ``KEY.json`` (shape, keys, classes, the data
file's sha256, the format version), written last: an entry without it does not exist.

**What invalidates it.** Another listing (a file added, removed, touched or resized) names
another entry; the *content key*, a sha256 streamed over every file's bytes, is checked on each
read, so a file rewritten with the same size and time is decoded again too. Reading the files
once costs little beside decoding them. The superseded entry of the same folder is removed.

**Refusals**, each one :class:`~pyro_vae.contract.DataError` line, with no temporary file left
behind: a corrupt entry (unreadable metadata, a data file of the wrong size or checksum: delete
it), a folder that changes while it is decoded, a full disk (where, and how many MB), an image
that cannot be decoded (named, as when there was no cache).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import multiprocessing
import os
import sys
import tempfile
import warnings
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from .contract import DataError
from .image_files import check_one_size, decode, list_images, probe
from .mapping import map_array

__all__ = ["CACHE_ENV", "BESIDE_DATA", "read_cached", "cache_folder", "listing_key", "content_key"]

#: Environment variable naming the cache folder where ``--cache-dir`` is not given.
CACHE_ENV = "PYRO_VAE_CACHE"
#: The cache folder beside the data: inside the image folder, hidden so that listing skips it.
BESIDE_DATA = ".pyro-vae-cache"
#: Written into every entry; an entry of another version is decoded again, not trusted.
FORMAT_VERSION = 1
#: Below this many files a folder is decoded in this process: starting a pool of worker
#: processes costs about a second, more than decoding a few dozen small images.
POOL_MIN_FILES = 64
#: Workers at most: decoding is CPU-bound, and more processes than this mostly wait on the disk.
MAX_WORKERS = 8
_BLOCK = 1 << 20  # bytes read at a time when hashing: memory stays flat whatever the file size


def read_cached(folder: str | Path, image_size: int = 0, cache_dir: str | Path | None = None):
    """The images of ``folder`` (see :mod:`pyro_vae.image_files`) as
    ``(values, labels, classes)``: ``uint8`` ``(N, C, H, W)`` mapped from the cache, ``int64``
    ``(N,)`` class indices or ``None``, the class names or ``None``. Decodes the folder into the
    cache first where the cache holds no valid entry for it.

    :param image_size: resize every image to ``image_size`` x ``image_size`` (0: keep the size,
        which must then be the same for all).
    :param cache_dir: the cache folder (else ``$PYRO_VAE_CACHE``, else beside the data).
    :raises DataError: unreadable, undecodable or mixed-size images; a corrupt cache; a folder
        that changed while it was decoded; a full disk.
    """
    folder = Path(folder)
    files, labels, classes = list_images(folder)
    listing = listing_key(folder, files, image_size)
    content = content_key(files)
    where = cache_folder(folder, cache_dir, name := _entry_name(listing, image_size))
    meta = _verified_meta(where, name, listing)
    rewritten = meta is not None and meta["content_key"] != content  # same names, sizes and times
    if meta is None or rewritten:
        superseded = _entries_of(where, folder, image_size, name)
        if rewritten or superseded:
            print(f"note: {folder} changed since it was cached; decoding it again", file=sys.stderr)
        meta = _build(folder, files, labels, classes, image_size, where, name, listing, content)
        for old in superseded:  # the folder as it was: no read will name that listing again
            _remove_entry(where, old)
    return _mapped(where, name, meta)


# --- keys -----------------------------------------------------------------------------------------
def listing_key(folder: Path, files: list[Path], image_size: int) -> str:
    """sha256 of the files' relative names, sizes and ``mtime_ns``, in reading order, and of
    ``image_size``: what a ``stat`` tells, so it costs no read of the files."""
    digest = hashlib.sha256(f"pyro-vae image folder {FORMAT_VERSION} image_size={image_size}\n".encode())
    for file in files:
        try:
            stat = file.stat()
        except FileNotFoundError:
            raise _changed(folder) from None
        except OSError as error:
            raise DataError(f"{file} cannot be read ({error.strerror or error})") from None
        digest.update(f"{file.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def content_key(files: list[Path]) -> str:
    """sha256 over each file's own sha256, in order: the bytes, whatever their times say."""
    digest = hashlib.sha256()
    for file in files:
        try:
            digest.update(_sha256(file))
        except OSError as error:
            raise DataError(f"{file} cannot be read ({error.strerror or error})") from None
    return digest.hexdigest()


def _sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(_BLOCK):
            digest.update(block)
    return digest.digest()


def _entry_name(listing: str, image_size: int) -> str:
    return f"{listing[:32]}-{image_size or 'native'}"


# --- where ------------------------------------------------------------------------------------------
def cache_folder(folder: Path, cache_dir: str | Path | None = None, name: str | None = None) -> Path:
    """The cache folder for the image folder ``folder`` (the order is in the module's
    docstring). The folder beside the data is used when it can be written, or when it
    already holds the entry ``name``; otherwise the user's cache folder, said on stderr.

    :raises DataError: a named cache folder that is a file, cannot be made, or lies inside
        the image folder under a name that is not hidden (it would read as a class folder).
    """
    named, how = (cache_dir, "--cache-dir") if cache_dir else (os.environ.get(CACHE_ENV), CACHE_ENV)
    if named:
        where = Path(named).expanduser()
        _refuse_inside(where, folder, how)
        _make(where, how)
        return where
    beside = folder / BESIDE_DATA
    if (name and (beside / f"{name}.json").is_file()) or _writable(beside):
        return beside
    fallback = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyro-vae"
    _make(fallback, "the user's cache folder")
    print(f"note: {folder} cannot be written, so its decoded images are cached in {fallback}; "
          f"name another cache folder with --cache-dir or {CACHE_ENV}", file=sys.stderr)
    return fallback


def _refuse_inside(where: Path, folder: Path, how: str) -> None:
    inside, data = os.path.abspath(where), os.path.abspath(folder)
    if os.path.commonpath([inside, data]) == data:
        parts = Path(os.path.relpath(inside, data)).parts
        if not any(part.startswith(".") for part in parts):
            raise DataError(f"cache folder {where} ({how}) is inside the image folder {folder}, where it would be "
                            f"read as part of the data; name one outside it, or a hidden one such as {BESIDE_DATA}")


def _make(where: Path, how: str) -> None:
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = "it is a file" if where.exists() and not where.is_dir() else (error.strerror or str(error))
        raise DataError(f"cache folder {where} ({how}) cannot be used ({reason}); name a folder that can be "
                        f"written with --cache-dir or {CACHE_ENV}") from None


def _writable(where: Path) -> bool:
    """Whether files can be made in ``where`` (made if missing): a try, since permissions, a
    read-only mount and ACLs all say no in different ways."""
    try:
        where.mkdir(exist_ok=True)
        handle, probe_path = tempfile.mkstemp(dir=where, prefix=".probe-")
        os.close(handle)
        os.unlink(probe_path)
        return True
    except OSError:
        return False


# --- reading an entry -----------------------------------------------------------------------------
def _corrupt(path: Path, what: str) -> DataError:
    return DataError(f"the image cache {path} is corrupt ({what}); delete {path.with_suffix('')}.* and run again")


def _verified_meta(where: Path, name: str, listing: str) -> dict | None:
    """The metadata of entry ``name``, its data file checked (size, then sha256); ``None`` where
    there is no entry, or one of another format version (decoded again, not trusted)."""
    meta_path = where / f"{name}.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise _corrupt(meta_path, f"its metadata cannot be read: {error}".splitlines()[0]) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        return None
    try:
        shape, data_bytes, checksum = tuple(meta["shape"]), int(meta["data_bytes"]), meta["data_sha256"]
        ok = meta["listing_key"] == listing and isinstance(meta["content_key"], str) and len(shape) == 4
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise _corrupt(meta_path, "its metadata lack a key or do not match its name")
    data_path = where / f"{name}.npy"
    try:
        size = data_path.stat().st_size
        if size != data_bytes:
            raise _corrupt(data_path, f"{size} bytes, expected {data_bytes}")
        # Checked on every read: a flipped bit in a mapped file would train silently on wrong
        # pixels, and hashing the file costs a fraction of decoding it again.
        if _sha256(data_path).hex() != checksum:
            raise _corrupt(data_path, "its checksum does not match")
    except OSError as error:
        raise _corrupt(data_path, error.strerror or str(error)) from None
    return meta


def _mapped(where: Path, name: str, meta: dict):
    data_path, labels_path = where / f"{name}.npy", where / f"{name}.labels.npy"
    try:
        values = np.load(data_path, mmap_mode="r", allow_pickle=False)  # the header, checked below
        labels = np.load(labels_path, allow_pickle=False) if meta["has_labels"] else None
    except (OSError, ValueError) as error:
        raise _corrupt(data_path, str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    if values.dtype != np.uint8 or values.shape != tuple(meta["shape"]):
        raise _corrupt(data_path, f"an array of {values.dtype} {values.shape}, expected uint8 {tuple(meta['shape'])}")
    if labels is not None and (labels.dtype != np.int64 or labels.shape != values.shape[:1]):
        raise _corrupt(labels_path, f"labels of {labels.dtype} {labels.shape}, expected int64 {values.shape[:1]}")
    # mapped again by pyro_vae.mapping: a writable copy-on-write map that also maps what memory
    # cannot hold (values.offset: where numpy found the data, after the .npy header)
    values = map_array(data_path, values.dtype, values.shape, values.offset)
    return values, None if labels is None else torch.from_numpy(labels), meta["classes"]


def _entries_of(where: Path, folder: Path, image_size: int, name: str) -> list[str]:
    """Other entries of ``folder`` at ``image_size`` in ``where``: the folder as it was."""
    found, data = [], str(folder.resolve())
    for meta_path in where.glob("*.json"):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta["folder"] == data and meta["image_size"] == image_size and meta_path.stem != name:
                found.append(meta_path.stem)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # another tool's file, or a corrupt entry: refused when it is read, not here
    return found


def _remove_entry(where: Path, name: str) -> None:
    for suffix in (".json", ".npy", ".labels.npy"):  # the metadata first: without it, no entry
        try:
            (where / f"{name}{suffix}").unlink(missing_ok=True)
        except OSError:
            pass  # a stale entry left behind costs disk space, not correctness


# --- writing an entry -----------------------------------------------------------------------------
def _changed(folder: Path) -> DataError:
    return DataError(f"{folder} changed while it was decoded (files added, removed or rewritten); "
                     "try again once it is stable")


def _disk_full(where: Path, needed: int) -> DataError:
    return DataError(f"no space left on the disk for the image cache: {where} needs {math.ceil(needed / 1e6)} MB; "
                     f"free some space, or name a cache folder elsewhere with --cache-dir or {CACHE_ENV}")


def _build(folder, files, labels, classes, image_size, where, name, listing, content) -> dict:
    """Decode ``files`` into a new entry ``name`` of ``where``; its metadata."""
    temporary = {suffix: where / f".{name}.{os.getpid()}.tmp{suffix}" for suffix in (".npy", ".labels.npy", ".json")}
    needed = 0
    try:
        try:
            shape = _shape_of(files, image_size)
            needed = math.prod(shape)
            offset = _allocate(temporary[".npy"], shape)
            _decode_all(folder, files, image_size, temporary[".npy"], offset, shape)
        except DataError:
            _refuse_if_changed(folder, listing, image_size)  # a file that vanished: the folder changed
            raise
        _refuse_if_changed(folder, listing, image_size)
        meta = {"format": FORMAT_VERSION, "folder": str(folder.resolve()), "image_size": image_size,
                "shape": list(shape), "dtype": "uint8", "listing_key": listing, "content_key": content,
                "has_labels": labels is not None, "classes": classes,
                "data_bytes": temporary[".npy"].stat().st_size, "data_sha256": _sha256(temporary[".npy"]).hex()}
        if labels is not None:
            with open(temporary[".labels.npy"], "wb") as stream:
                np.save(stream, np.asarray(labels, dtype=np.int64))
        temporary[".json"].write_text(json.dumps(meta, indent=1), encoding="utf-8")
        (where / f"{name}.json").unlink(missing_ok=True)  # no moment where old metadata describe new data
        for suffix in (".npy", ".labels.npy", ".json"):  # the metadata last: it says the entry is whole
            if temporary[suffix].exists():
                os.replace(temporary[suffix], where / f"{name}{suffix}")
        return meta
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(where, needed) from None
        raise DataError(f"the image cache cannot be written in {where} ({error.strerror or error}); "
                        f"name another cache folder with --cache-dir or {CACHE_ENV}") from None
    finally:
        for path in temporary.values():
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass


def _shape_of(files: list[Path], image_size: int) -> tuple[int, int, int, int]:
    """``(N, C, H, W)`` from the files' headers (no pixel is decoded), C = 3 if any image is in
    colour; images of different sizes are refused unless ``image_size`` resizes them."""
    sizes, channels = zip(*[((width, height), c) for width, height, c in map(probe, files)])
    if not image_size:
        check_one_size(files, list(sizes))
    width, height = (image_size, image_size) if image_size else sizes[0]
    return len(files), max(channels), height, width


def _refuse_if_changed(folder: Path, listing: str, image_size: int) -> None:
    try:
        now = listing_key(folder, list_images(folder)[0], image_size)
    except DataError:  # a folder that no longer lists (emptied, a class folder gone) has changed too
        raise _changed(folder) from None
    if now != listing:
        raise _changed(folder)


def _allocate(path: Path, shape: tuple[int, ...]) -> int:
    """Create ``path`` as an ``.npy`` file of ``uint8`` ``shape``, its blocks reserved; the
    header's length (where the rows start)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    header = header.getvalue()
    handle = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)  # this process's own name
    try:
        os.write(handle, header)  # 128 bytes or so: one write
        total = len(header) + math.prod(shape)
        try:
            # Reserved up front: a full disk fails here with ENOSPC, not later as a SIGBUS when a
            # worker writes to a mapped page the file system has no block for.
            os.posix_fallocate(handle, 0, total)
        except (AttributeError, OSError) as error:  # no posix_fallocate (macOS), or a file system without it
            if isinstance(error, OSError) and error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.ftruncate(handle, total)
    finally:
        os.close(handle)
    return len(header)


def _decode_rows(path: Path, offset: int, shape: tuple[int, ...], start: int, files: list[Path],
                 image_size: int) -> int:
    """Decode ``files`` into rows ``start``, ``start + 1``, ... of the data file (run by a worker,
    or in this process); the number decoded. Only these rows are touched, so no process holds
    the whole array."""
    rows = np.memmap(path, dtype=np.uint8, mode="r+", offset=offset, shape=shape)
    try:
        for row, file in enumerate(files, start):
            image = decode(file, image_size)  # (H, W, C)
            if image.shape[:2] != shape[2:] or image.shape[2] > shape[1]:  # not what its header said a moment ago
                raise DataError(f"{file} changed while its folder was decoded; try again once it is stable")
            rows[row] = image.transpose(2, 0, 1)  # a grey (1, H, W) image broadcasts to RGB
        # No flush (msync): the shared mapping's pages are already what any process reads; forcing
        # them to the disk would cost time for nothing the checksum does not catch after a crash.
    finally:
        del rows
    return len(files)


def _decode_all(folder: Path, files: list[Path], image_size: int, path: Path, offset: int, shape) -> None:
    from tqdm.auto import tqdm

    workers = min(os.cpu_count() or 1, MAX_WORKERS)
    size = max(1, min(64, math.ceil(len(files) / (workers * 4))))  # a few chunks a worker: even ends
    chunks = [(start, files[start:start + size]) for start in range(0, len(files), size)]
    # disable=None: no bar where stderr is not a terminal (logs, tests)
    with tqdm(total=len(files), desc=f"decoding {folder.name}", unit="image", disable=None, leave=False,
              file=sys.stderr) as bar:
        if workers < 2 or len(files) < POOL_MIN_FILES:
            for start, chunk in chunks:
                bar.update(_decode_rows(path, offset, shape, start, chunk, image_size))
            return
        # fork, where there is one: a worker then starts without importing torch and this
        # package again (seconds each); it runs only Pillow and NumPy.
        context = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
        with warnings.catch_warnings():  # Python >= 3.12 warns on fork beside threads; the workers take no lock
            warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks", category=DeprecationWarning)
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                pending = {pool.submit(_decode_rows, path, offset, shape, start, chunk, image_size)
                           for start, chunk in chunks}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        if future.exception() is not None:
                            for other in pending:
                                other.cancel()
                            raise future.exception()
                        bar.update(future.result())
