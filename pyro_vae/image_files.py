"""What a folder of image files holds: its images (and classes), each image's size and mode
read from its header, and one image decoded to pixels.

Layouts: either flat (no labels), or one sub-folder per class (the
``torchvision.datasets.ImageFolder`` layout: the label of an image is the index of its
folder's name among the sorted names). Only ``.png`` / ``.jpg`` / ``.jpeg`` files count, in any
case; names starting with a dot (files and folders, such as the image cache
``.pyro-vae-cache/``) are ignored. Grey images (PIL modes ``1``, ``L``, ``LA``) give one
channel, all others three (RGB); alpha is dropped. 16-bit and float images are refused
(converting them to 8 bits would clip them silently). Every refusal is one
:class:`~pyro_vae.contract.DataError` line naming the file.

Pillow is imported inside the functions that read pixels or headers: listing a folder, and
importing this module, need no Pillow.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .contract import DataError

__all__ = ["IMAGE_SUFFIXES", "list_images", "probe", "decode", "check_one_size"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: PIL modes read as one grey channel; 16-bit ("I;16", "I") and float ("F") are refused.
_GREY_MODES = {"1", "L", "LA"}
_DEEP_MODES = ("I", "F")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder``, sorted; hidden files and folders skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if _is_image(Path(f))]
    return found


def list_images(folder: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """The image files of ``folder`` in reading order, their class indices and the class
    names (``None`` twice for a flat folder). Hidden names are skipped at every level.

    :raises DataError: an unreadable folder, no images, images beside class folders, an
        empty class folder.
    """
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as error:
        raise DataError(f"{folder} cannot be read ({error.strerror or error})") from None
    files = [p for p in entries if p.is_file() and _is_image(p)]
    subfolders = [p for p in entries if p.is_dir()]
    if files:
        nested = next((d for d in subfolders if _images_under(d)), None)
        if nested is not None:
            raise DataError(f"{folder} holds both image files ({files[0].name}) and a class folder with images "
                            f"({nested.name}/); put every image in a class folder, or none")
        return files, None, None
    if not subfolders:
        others = [p.name for p in entries if p.is_file()]
        found = f" (it holds {len(others)} other files, e.g. {others[0]})" if others else ""
        raise DataError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}), neither directly nor in "
                        f"class sub-folders{found}")
    labels = []
    for index, subfolder in enumerate(subfolders):
        images = _images_under(subfolder)
        if not images:  # its class index would name no image: a mislabelled class is worse than a refusal
            raise DataError(f"class folder {subfolder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        files += images
        labels += [index] * len(images)
    return files, labels, [d.name for d in subfolders]


def _unreadable(file: Path, error: Exception) -> DataError:
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0] or type(error).__name__
    return DataError(f"{file} cannot be read as an image ({reason})")


def _refuse_deep(file: Path, mode: str) -> None:
    if mode.startswith(_DEEP_MODES):
        raise DataError(f"{file}: {mode} images (16-bit or float) are not supported; save them as 8-bit grey or RGB")


def probe(file: Path) -> tuple[int, int, int]:
    """``(width, height, channels)`` of an image, from its header only (``Image.open`` reads no
    pixels), channels 1 (grey) or 3 (RGB): what :func:`decode` will give without resizing.

    :raises DataError: not an image, or a 16-bit or float one.
    """
    from PIL import Image  # Pillow comes with matplotlib; imported here, only where images are read

    try:
        with Image.open(file) as image:
            _refuse_deep(file, image.mode)
            return image.width, image.height, 1 if image.mode in _GREY_MODES else 3
    except DataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
        raise _unreadable(file, error) from None


def decode(file: Path, image_size: int) -> np.ndarray:
    """One image file as ``uint8`` ``(H, W, C)``, C = 1 (grey) or 3 (RGB); with ``image_size > 0``
    resized (bilinear) to ``image_size`` x ``image_size``.

    :raises DataError: not an image, or a 16-bit or float one.
    """
    from PIL import Image

    try:
        with Image.open(file) as image:
            _refuse_deep(file, image.mode)
            mode = "L" if image.mode in _GREY_MODES else "RGB"
            if image.mode != mode:  # converting to the same mode would copy every image once more
                image = image.convert(mode)
            if image_size:
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.asarray(image)
    except DataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise _unreadable(file, error) from None
    return array[:, :, None] if array.ndim == 2 else array


def check_one_size(files: list[Path], sizes: list[tuple[int, int]]) -> None:
    """Refuse, naming the first two files of different ``(width, height)``, images that are not
    all of one size (only needed where ``image_size`` does not resize them)."""
    for file, size in zip(files, sizes):
        if size != sizes[0]:
            (w1, h1), (w2, h2) = sizes[0], size
            raise DataError(f"images of different sizes: {files[0]} is {w1}x{h1}, {file} is {w2}x{h2} "
                            "(width x height); resize them to one size, or set data.image_size")
