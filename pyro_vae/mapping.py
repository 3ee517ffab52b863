"""Arrays memory-mapped from files: read when touched, never copied whole, writable copy-on-write.

Data files (``.npy`` files, members of ``.npz`` archives, the cache of decoded folders) are
mapped rather than read, so a data set larger than memory can be trained on. The mapping is
private and writable: writing to it changes this process's copy of a page, never the file,
and torch can wrap it without a warning about read-only memory.

Training reads the items of each batch at random places, so the map is advised so
(``MADV_RANDOM``): the kernel otherwise reads ahead around every page a batch touches, 8 MB on
the development machine, for items of 48 kB, and an epoch over a 30 GB file read the disk 19
times over. A pass in file order (the fingerprint, the range check) asks for read-ahead again
while it runs (:func:`reading_in_order`).

It is made with ``MAP_NORESERVE``. Linux counts a private writable mapping against the memory
it may commit unless told that the pages need no reserve, so NumPy's copy-on-write map
(``numpy.memmap(mode="c")``) of a 30 GB file failed on a 24 GB machine with "Cannot allocate
memory", though reading the file touches no anonymous memory at all. Where the flag is not
available (not Linux), ``numpy.memmap(mode="c")`` is used instead.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import sys
import weakref
from pathlib import Path

import numpy as np
import torch

#: Linux's MAP_NORESERVE, which Python's mmap module names only from Python 3.13 on; its value
#: is 0x4000 on x86-64 and arm64, the machines this package runs on.
_NO_RESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


def map_array(path: str | Path, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0,
              fortran_order: bool = False) -> torch.Tensor:
    """The array of ``dtype`` and ``shape`` stored at byte ``offset`` of ``path``, as a tensor
    sharing a private, writable memory map of the file (see the module's docstring). The
    caller checks that the file holds that many bytes."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    if count == 0:  # an empty array cannot be mapped; the readers refuse it by its shape
        return torch.from_numpy(np.empty(shape, dtype))
    order = "F" if fortran_order else "C"
    if not _NO_RESERVE:
        return torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape, order=order))
    start = offset - offset % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
    with open(path, "rb") as file:  # the mapping keeps the file open as long as it lives
        mapped = mmap.mmap(file.fileno(), offset - start + count * dtype.itemsize, offset=start,
                           flags=mmap.MAP_PRIVATE | _NO_RESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_RANDOM)
    array = np.frombuffer(mapped, dtype=dtype, count=count, offset=offset - start)
    tensor = torch.from_numpy(array.reshape(shape, order=order))
    _MAPPED[tensor.untyped_storage().data_ptr()] = mapped
    return tensor


#: The maps made here, by the address of their first byte, so that a pass over one can advise
#: it (weakly held: a map is closed when the last tensor over it is freed).
_MAPPED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


@contextlib.contextmanager
def reading_in_order(values: torch.Tensor):
    """Within: the kernel reads ahead in the map under ``values`` (a pass in file order, which
    a page at a time would read many times slower from a disk); after: random again. Nothing
    for a tensor that is not a map made by :func:`map_array`."""
    mapped = _MAPPED.get(values.untyped_storage().data_ptr())
    if mapped is None or not hasattr(mapped, "madvise"):
        yield
        return
    mapped.madvise(mmap.MADV_NORMAL)
    try:
        yield
    finally:
        mapped.madvise(mmap.MADV_RANDOM)
