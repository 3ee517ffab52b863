"""The cache of decoded image folders (pyro_vae.folder_cache): the same bytes as decoding, no
decoding the second time, every change of the folder seen, the cache folder chosen in order,
and each bad case (a corrupt cache, a full disk, a folder changing while it is decoded) refused
with one line and nothing half-written left behind."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pyro_vae.folder_cache as folder_cache
from pyro_vae.contract import DataError
from pyro_vae.image_files import decode, list_images
from pyro_vae.sources import DataError as SourcesDataError
from pyro_vae.sources import read_folder, read_path

from helpers import assert_one_line_error, one_line


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _image(seed: int, grey: bool = False, h: int = 5, w: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w) if grey else (h, w, 3), dtype=np.uint8)


def _class_folder(root: Path, per_class: int = 12) -> Path:
    """Two classes; every third image grey, the others RGB (so the folder reads as RGB)."""
    for c, name in enumerate(["cat", "dog"]):
        for i in range(per_class):
            _png(root / name / f"{i:03d}.png", _image(100 * c + i, grey=i % 3 == 0))
    return root


def _flat_folder(root: Path, n: int = 20, **kwargs) -> Path:
    for i in range(n):
        _png(root / f"{i:03d}.png", _image(i, **kwargs))
    return root


def _decoded(folder: Path, image_size: int = 0):
    """What reading the folder gave before the cache: every file decoded here and stacked."""
    files, labels, classes = list_images(folder)
    arrays = [decode(f, image_size) for f in files]
    channels = max(a.shape[2] for a in arrays)
    values = np.stack([np.broadcast_to(a, (*a.shape[:2], channels)) for a in arrays]).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(values)), labels, classes


def _files_under(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(autouse=True)
def _no_cache_named(monkeypatch, tmp_path):
    """No cache folder from the environment; the user's cache folder under tmp_path."""
    monkeypatch.delenv(folder_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


def _no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("decoded again")
    monkeypatch.setattr(folder_cache, "decode", refuse)
    monkeypatch.setattr(folder_cache, "probe", refuse)


@pytest.mark.parametrize("image_size", [0, 4])
def test_cached_read_is_the_decoded_folder_bit_for_bit(tmp_path, image_size, monkeypatch):
    folder = _class_folder(tmp_path / "imgs")
    expected, labels, classes = _decoded(folder, image_size)
    first = read_folder(folder, image_size)
    assert (folder / ".pyro-vae-cache").is_dir()  # beside the data, hidden
    _no_decoding(monkeypatch)
    second = read_folder(folder, image_size)  # the hidden cache is not read as a class folder
    for raw in (first, second):
        assert raw.values.dtype == torch.uint8 and raw.values.is_contiguous()
        assert raw.values.shape == (24, 3, image_size or 5, image_size or 6)
        assert torch.equal(raw.values, expected)
        assert raw.labels.dtype == torch.int64 and raw.labels.tolist() == labels
        assert raw.classes == classes == ["cat", "dog"]
    second.values[0] += 1  # copy-on-write: writable, and the cache file is not changed
    assert torch.equal(read_folder(folder, image_size).values, expected)


def test_a_flat_grey_folder_has_no_labels_and_one_channel(tmp_path, monkeypatch):
    folder = _flat_folder(tmp_path / "imgs", grey=True)
    raw = read_path(folder)
    assert raw.values.shape == (20, 1, 5, 6) and raw.labels is None and raw.classes is None
    assert torch.equal(raw.values, _decoded(folder)[0])
    _no_decoding(monkeypatch)
    assert read_path(folder).labels is None


def test_sizes_share_one_cache_folder(tmp_path, monkeypatch):
    folder = _flat_folder(tmp_path / "imgs")
    native, small = read_folder(folder).values, read_folder(folder, 3).values
    assert native.shape[2:] == (5, 6) and small.shape[2:] == (3, 3)
    assert len(list((folder / ".pyro-vae-cache").glob("*.json"))) == 2
    _no_decoding(monkeypatch)
    assert torch.equal(read_folder(folder).values, native) and torch.equal(read_folder(folder, 3).values, small)


@pytest.mark.parametrize("change", ["rewritten", "rewritten-same-time", "added", "removed"])
def test_a_changed_folder_is_decoded_again(tmp_path, change, capsys):
    folder = _flat_folder(tmp_path / "imgs")
    read_folder(folder)
    target = folder / "007.png"
    if change.startswith("rewritten"):
        stat = target.stat()
        _png(target, _image(999))  # new pixels, the same size in bytes (no compression of noise)
        assert target.stat().st_size == stat.st_size
        if change == "rewritten-same-time":  # only the content key can tell
            os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    elif change == "added":
        _png(folder / "100.png", _image(100))
    else:
        target.unlink()
    capsys.readouterr()
    raw = read_folder(folder)
    assert "changed since it was cached; decoding it again" in capsys.readouterr().err
    assert torch.equal(raw.values, _decoded(folder)[0])
    assert len(list((folder / ".pyro-vae-cache").glob("*.json"))) == 1  # the old entry is gone


def test_a_named_cache_folder_is_used_argument_before_environment(tmp_path, monkeypatch):
    folder = _flat_folder(tmp_path / "imgs")
    monkeypatch.setenv(folder_cache.CACHE_ENV, str(tmp_path / "from-env"))
    read_folder(folder, cache_dir=tmp_path / "named" / "deeper")
    assert len(list((tmp_path / "named" / "deeper").glob("*.npy"))) == 1
    assert not (tmp_path / "from-env").exists() and not (folder / ".pyro-vae-cache").exists()
    read_folder(folder)
    assert len(list((tmp_path / "from-env").glob("*.npy"))) == 1 and not (folder / ".pyro-vae-cache").exists()


@pytest.mark.parametrize("where", ["file", "inside"])
def test_an_unusable_named_cache_folder_is_refused(tmp_path, where):
    folder = _class_folder(tmp_path / "imgs")
    (tmp_path / "file.txt").write_text("a file\n")
    named = {"file": tmp_path / "file.txt", "inside": folder / "cache"}[where]
    with pytest.raises(SourcesDataError) as error:
        read_folder(folder, cache_dir=named)
    one_line(error, str(named), "--cache-dir")
    read_folder(folder, cache_dir=folder / ".hidden-cache")  # inside, hidden: never read as data


def _read_only_fallback(folder: Path, tmp_path: Path, capsys) -> None:
    raw = read_folder(folder)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot be written" in err and "--cache-dir" in err, err
    assert len(list((tmp_path / "user-cache" / "pyro-vae").glob("*.npy"))) == 1
    assert torch.equal(raw.values, _decoded(folder)[0])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_folder_falls_back_to_the_users_cache_folder(tmp_path, capsys):
    folder = _flat_folder(tmp_path / "imgs")
    folder.chmod(0o555)
    try:
        _read_only_fallback(folder, tmp_path, capsys)
    finally:
        folder.chmod(0o755)


def test_a_folder_that_cannot_be_written_falls_back_to_the_users_cache_folder(tmp_path, capsys, monkeypatch):
    # the same as above, also as root: the try at writing beside the data fails
    folder = _flat_folder(tmp_path / "imgs")
    writable = folder_cache._writable
    monkeypatch.setattr(folder_cache, "_writable", lambda where: where.parent != folder and writable(where))
    _read_only_fallback(folder, tmp_path, capsys)


def _entry(folder: Path) -> Path:
    (meta,) = (folder / ".pyro-vae-cache").glob("*.json")
    return meta.with_suffix("")


@pytest.mark.parametrize("damage", ["metadata", "metadata-key", "truncated", "flipped", "labels"])
def test_a_corrupt_cache_is_refused_with_one_line(tmp_path, damage):
    folder = _class_folder(tmp_path / "imgs")
    read_folder(folder)
    entry = _entry(folder)
    if damage == "metadata":
        Path(f"{entry}.json").write_text("{not json")
    elif damage == "metadata-key":
        meta = json.loads(Path(f"{entry}.json").read_text())
        del meta["data_sha256"]
        Path(f"{entry}.json").write_text(json.dumps(meta))
    elif damage == "truncated":
        os.truncate(f"{entry}.npy", 1000)
    elif damage == "flipped":  # the same size: only the checksum tells
        with open(f"{entry}.npy", "r+b") as stream:
            stream.seek(-1, os.SEEK_END)
            last = stream.read(1)
            stream.seek(-1, os.SEEK_END)
            stream.write(bytes([last[0] ^ 1]))
    else:
        np.save(f"{entry}.labels.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError) as error:
        read_folder(folder)
    one_line(error, "image cache", str(entry.parent), "corrupt", "delete")


def test_a_full_disk_is_refused_with_the_space_needed_and_leaves_nothing(tmp_path, monkeypatch):
    folder = _flat_folder(tmp_path / "imgs")

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(folder_cache.os, "posix_fallocate", full)
    with pytest.raises(DataError) as error:
        read_folder(folder, cache_dir=tmp_path / "cache")
    one_line(error, "no space left", str(tmp_path / "cache"), "1 MB", "--cache-dir", folder_cache.CACHE_ENV)
    assert _files_under(tmp_path / "cache") == []


def test_a_full_disk_while_writing_the_labels_leaves_nothing(tmp_path, monkeypatch):
    folder = _class_folder(tmp_path / "imgs")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(folder_cache.np, "save", full)
    with pytest.raises(DataError) as error:
        read_folder(folder)
    one_line(error, "no space left", "MB")
    assert _files_under(folder / ".pyro-vae-cache") == []


@pytest.mark.parametrize("change", ["added", "vanished"])
def test_a_folder_changing_while_it_is_decoded_is_refused(tmp_path, change, monkeypatch):
    folder = _flat_folder(tmp_path / "imgs")
    calls = []

    def decode_and_change(file, image_size):
        if not calls:
            if change == "added":
                _png(folder / "050.png", _image(50))
            else:
                (folder / "019.png").unlink()
        calls.append(file)
        return decode(file, image_size)
    monkeypatch.setattr(folder_cache, "decode", decode_and_change)
    with pytest.raises(DataError) as error:
        read_folder(folder)
    one_line(error, str(folder), "changed while it was decoded", "once it is stable")
    assert _files_under(folder / ".pyro-vae-cache") == []


def test_an_undecodable_image_is_named_as_without_a_cache(tmp_path):
    folder = _flat_folder(tmp_path / "imgs")
    (folder / "010.png").write_bytes(b"not a PNG")
    with pytest.raises(DataError) as error:
        read_folder(folder)
    one_line(error, "010.png", "cannot be read as an image")
    assert _files_under(folder / ".pyro-vae-cache") == []


@pytest.fixture
def pool(monkeypatch):
    """The worker processes, even for a small folder and on one core; the pools started."""
    started = []

    class Pool(folder_cache.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(kwargs["max_workers"])
    monkeypatch.setattr(folder_cache, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(folder_cache, "POOL_MIN_FILES", 0)
    monkeypatch.setattr(folder_cache.os, "cpu_count", lambda: 2)
    return started


def test_worker_processes_give_the_same_bytes_as_this_process(tmp_path, pool):
    folder = _class_folder(tmp_path / "imgs", per_class=50)
    raw = read_folder(folder, cache_dir=tmp_path / "pooled")
    assert torch.equal(raw.values, _decoded(folder)[0]) and raw.labels.tolist() == [0] * 50 + [1] * 50
    assert len(list((tmp_path / "pooled").glob("*.npy"))) == 2  # the images and the labels
    assert pool == [2]


def test_a_workers_decoding_error_is_one_line_naming_the_file(tmp_path, pool):
    folder = _flat_folder(tmp_path / "imgs", n=100)
    # a PNG whose header is whole but whose pixels are cut off: only decoding it fails
    data = (folder / "077.png").read_bytes()
    (folder / "077.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as error:
        read_folder(folder)
    one_line(error, "077.png", "cannot be read as an image")
    assert _files_under(folder / ".pyro-vae-cache") == [] and pool == [2]


def test_train_takes_cache_dir(tmp_path, run_cli):
    folder = _flat_folder(tmp_path / "imgs", n=30, grey=True)
    status, _, err = run_cli("train", "--data", str(folder), "--cache-dir", str(tmp_path / "cache"), "--epochs", "0",
                             "--out", str(tmp_path / "run"), "--quiet")
    assert status == 0, err
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1 and not (folder / ".pyro-vae-cache").exists()
    (tmp_path / "file.txt").write_text("a file\n")
    assert_one_line_error(run_cli("train", "--data", str(folder), "--cache-dir", str(tmp_path / "file.txt"),
                                  "--out", str(tmp_path / "run2")), "--cache-dir", "is a file")
