"""Data of any size: values stay in the file's type until the batch, arrays are memory-mapped,
splits are index views, the fingerprint streams, and a rank reads only its part of a batch.

Every claim is checked against the in-memory path on the same values, bit for bit: the two read
the same bytes and apply the same element-wise conversion, so nothing may differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import signal
import zipfile

import numpy as np
import pytest
import torch

import pyro_vae.data as data_module
import pyro_vae.train as train_module
from helpers import assert_one_line_error, one_line
from pyro_vae import fit, from_tensors, load_config
from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.config import DataConfig
from pyro_vae.data import (DataError, ImageData, binarize, binarize_fast, binarize_once, check_likelihood_range,
                           fingerprint, iterate_batches, load_data)
from pyro_vae.distributed import shard_bounds
from pyro_vae.sources import RawData, read_path

SHAPE = (1, 6, 6)


def _bytes(n: int = 120, seed: int = 0) -> np.ndarray:
    """``n`` grey images as a file would hold them: uint8, with every value 0..255 present."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *SHAPE), dtype=np.uint8)


def _config(**overrides):
    settings = {"model.z_dim": 2, "model.hidden_dim": 16, "train.epochs": 2, "train.batch_size": 16,
                "data.binarize": "dynamic", "data.val_fraction": 0.1, "data.test_fraction": 0.1}
    settings.update(overrides)
    return load_config(None, settings)


def _mapped(array: torch.Tensor, path) -> bool:
    """Whether ``array``'s memory lies in a mapping of the file ``path`` (Linux's table of this
    process's mappings), i.e. it was not read into memory allocated for it."""
    address, name = array.data_ptr(), str(path.resolve())
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == name:
                low, high = (int(v, 16) for v in fields[0].split("-"))
                if low <= address < high:
                    return True
    return False


def test_an_npy_file_is_mapped_in_its_own_type_and_its_splits_are_views(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, _bytes())
    raw = read_path(path)
    assert raw.values.dtype == torch.uint8 and _mapped(raw.values, path)
    splits = load_data(DataConfig(dataset=str(path)))
    stores = {split.values.data_ptr() for split in (splits.train, splits.val, splits.test)}
    assert len(stores) == 1 and _mapped(splits.train.values, path)  # one mapping, shared by the splits
    assert splits.train.values.dtype == torch.uint8
    assert sum(len(s) for s in (splits.train, splits.val, splits.test)) == 120
    batch = splits.train[torch.tensor([3, 0, 7])]
    assert batch.dtype == torch.float32 and tuple(batch.shape) == (3, *SHAPE)


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float64, np.int16])
def test_mapped_splits_give_the_batches_of_values_converted_up_front(tmp_path, dtype):
    stored = _bytes().astype(dtype)
    path = tmp_path / "images.npy"
    np.save(path, stored)
    mapped = load_data(DataConfig(dataset=str(path), val_fraction=0.1, test_fraction=0.1))
    # the old way: every value converted to float32 at once, then split by copying
    floats = torch.from_numpy(stored).to(torch.float32)
    floats = floats / 255 if dtype == np.uint8 else floats
    held = from_tensors(floats, val_fraction=0.1, test_fraction=0.1)
    assert mapped.train.values.dtype == torch.from_numpy(stored).dtype  # not converted
    for a, b in [(mapped.train, held.train), (mapped.val, held.val), (mapped.test, held.test)]:
        assert torch.equal(a.images, b.images)
    order = torch.randperm(len(mapped.train), generator=torch.Generator().manual_seed(1))
    for dynamic in (False, True):
        ours = list(iterate_batches(mapped.train, 16, torch.Generator().manual_seed(2), dynamic, order))
        theirs = list(iterate_batches(held.train.images, 16, torch.Generator().manual_seed(2), dynamic, order))
        assert len(ours) == len(theirs) and all(torch.equal(a, b) for (_, a), (_, b) in zip(ours, theirs))


def test_training_on_a_mapped_file_equals_training_on_the_same_tensors(tmp_path):
    stored = _bytes(160)
    path = tmp_path / "images.npy"
    np.save(path, stored)
    config = _config()
    mapped = fit(config, load_data(dataclasses.replace(config.data, dataset=str(path))), progress=False)
    # the old way: the values converted to float32 at once, held in memory, split by copying
    held = fit(config, from_tensors(torch.from_numpy(stored.copy()).to(torch.float32) / 255), progress=False)
    assert [r["train_loss"] for r in mapped.history] == [r["train_loss"] for r in held.history]
    assert [r["val_elbo"] for r in mapped.history] == [r["val_elbo"] for r in held.history]


def test_an_uncompressed_npz_is_mapped_and_a_compressed_one_read_whole(tmp_path):
    stored, labels = _bytes(), np.arange(120) % 3
    np.savez(tmp_path / "plain.npz", images=stored, labels=labels)
    np.savez_compressed(tmp_path / "packed.npz", images=stored, labels=labels)
    plain, packed = read_path(tmp_path / "plain.npz"), read_path(tmp_path / "packed.npz")
    assert _mapped(plain.values, tmp_path / "plain.npz") and not _mapped(packed.values, tmp_path / "packed.npz")
    for raw in (plain, packed):
        assert torch.equal(raw.values, torch.from_numpy(stored)) and torch.equal(raw.labels, torch.from_numpy(labels))
    assert fingerprint(plain) == fingerprint(packed)


def test_a_fortran_order_file_reads_the_same_items(tmp_path):
    stored = _bytes(20)
    np.save(tmp_path / "f.npy", np.asfortranarray(stored))
    raw = read_path(tmp_path / "f.npy")
    assert torch.equal(raw.values, torch.from_numpy(stored))
    assert fingerprint(raw) == fingerprint(RawData(torch.from_numpy(stored)))


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_a_truncated_array_file_is_refused_in_one_line(tmp_path, suffix, run_cli):
    path = tmp_path / f"cut{suffix}"
    (np.save if suffix == ".npy" else np.savez)(path, _bytes(50))
    whole = path.read_bytes()
    if suffix == ".npy":
        path.write_bytes(whole[: len(whole) - 1000])  # the header promises 1,000 bytes more
    else:  # cut the member's data, then write the archive's directory back after it
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("x.npy" if "x.npy" in archive.namelist() else archive.namelist()[0])
        start = info.header_offset + 30 + len(info.filename)
        path.write_bytes(whole[: start + 200])
    with pytest.raises(DataError) as error:
        read_path(path)
    one_line(error, str(path))
    if suffix == ".npy":
        one_line(error, "truncated", "1,800 bytes")
        outcome = run_cli("train", "--data", str(path), "--out", str(tmp_path / "run"), "--epochs", "1")
        assert_one_line_error(outcome, "truncated")
        assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_the_streamed_fingerprint_is_the_digest_of_the_whole_bytes(monkeypatch):
    values = torch.from_numpy(_bytes(40))
    labels = torch.arange(40)
    whole = hashlib.sha256()
    whole.update(f"{values.dtype}{tuple(values.shape)};".encode())
    whole.update(values.numpy())
    whole.update(f"{labels.dtype}{tuple(labels.shape)};".encode())
    whole.update(labels.numpy())
    monkeypatch.setattr(data_module, "CHUNK_VALUES", 100)  # pieces of 2 images: many updates
    assert fingerprint(RawData(values, labels)) == whole.hexdigest()
    # other number types are hashed as the float32 they were once converted to
    doubles = values.to(torch.float64)
    assert fingerprint(RawData(doubles, labels)) == fingerprint(RawData(doubles.to(torch.float32), labels))


def test_a_fixed_binarization_drawn_in_pieces_is_the_draw_over_the_whole_split(monkeypatch):
    grey = ImageData(torch.from_numpy(_bytes(50)))
    monkeypatch.setattr(data_module, "CHUNK_VALUES", 7 * 36)  # 7 images a piece: 8 pieces
    pieces = binarize_once(grey, seed=3)
    whole = binarize(grey.images, torch.Generator().manual_seed(3))
    assert pieces.values.dtype == torch.uint8  # bits in bytes, not floats
    assert torch.equal(pieces.images, whole)


def test_each_rank_reads_only_its_part_and_the_parts_make_the_batch():
    data = ImageData(torch.from_numpy(_bytes(37)))
    read = []

    class Spy(ImageData):
        def __getitem__(self, key):
            read.append(key.clone())
            return super().__getitem__(key)

    spied = Spy(data.values)
    order = torch.randperm(37, generator=torch.Generator().manual_seed(0))
    whole = list(iterate_batches(data, 10, torch.Generator().manual_seed(5), True, order))
    parts = []
    for rank in range(3):
        read.clear()
        shard = lambda n, rank=rank: shard_bounds(n, rank, 3)  # noqa: E731
        parts.append(list(iterate_batches(spied, 10, torch.Generator().manual_seed(5), True, order, shard=shard)))
        seen = torch.cat(read)
        assert len(seen) == len(set(seen.tolist())) <= 4 * 4  # at most ceil(10 / 3) items of each of 4 batches
        for step, rows in enumerate(read):  # exactly this rank's rows of each batch
            begin, end = shard_bounds(len(order[10 * step : 10 * step + 10]), rank, 3)
            assert torch.equal(rows, order[10 * step : 10 * step + 10][begin:end])
    for step, (_, batch) in enumerate(whole):  # the ranks' parts, binarized alike, make the batch
        assert torch.equal(torch.cat([parts[rank][step][1] for rank in range(3)]), batch)


def test_resume_on_a_mapped_file_is_exact(tmp_path, monkeypatch):
    path = tmp_path / "images.npy"
    np.save(path, _bytes(160))
    config = _config()
    splits = load_data(DataConfig(dataset=str(path), binarize="dynamic"))
    full = fit(config, splits, progress=False).history
    real = train_module.iterate_batches

    def interrupted(*args, **kwargs):
        for step, batch in real(*args, **kwargs):
            if step == 3:
                signal.raise_signal(signal.SIGINT)
            yield step, batch

    monkeypatch.setattr(train_module, "iterate_batches", interrupted)
    stopped = fit(config, splits, run_dir=tmp_path / "run", progress=False)
    monkeypatch.setattr(train_module, "iterate_batches", real)
    assert not stopped.completed
    again = load_data(DataConfig(dataset=str(path), binarize="dynamic"))  # mapped afresh, as a new process would
    resumed = fit(config, again, run_dir=tmp_path / "run", checkpoint=load_checkpoint(tmp_path / "run"),
                  progress=False)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full]


def test_a_changed_file_is_detected_by_its_fingerprint(tmp_path):
    path = tmp_path / "images.npy"
    stored = _bytes()
    np.save(path, stored)
    before = load_data(DataConfig(dataset=str(path))).source["fingerprint"]
    stored[17, 0, 3, 3] ^= 1  # one bit of one value
    np.save(path, stored)
    assert load_data(DataConfig(dataset=str(path))).source["fingerprint"] != before


def test_bytes_are_checked_against_the_likelihood_as_bytes():
    bits = torch.from_numpy(_bytes() // 128 * 255)  # 0 or 255: binary once divided by 255
    check_likelihood_range(ImageData(bits), "binary", "none", "bernoulli")
    with pytest.raises(DataError) as error:
        check_likelihood_range(ImageData(torch.from_numpy(_bytes())), "binary", "none", "bernoulli")
    one_line(error, "binary", "0..1")


def test_standardized_batches_have_the_training_statistics():
    stored = torch.from_numpy(_bytes(400))
    splits = from_tensors(stored)
    standardized = data_module._standardize(splits.train, splits.val)[0].images
    assert standardized.mean(0).abs().max() < 1e-5
    assert (standardized.std(0, correction=0) - 1).abs().max() < 1e-4


def test_dynamic_binarization_of_a_part_is_that_part_of_the_whole_draw():
    grey = torch.rand(10, 4)
    whole = binarize_fast(grey, torch.Generator().manual_seed(0))
    part = binarize_fast(grey[3:7], torch.Generator().manual_seed(0), of=(3, 10))
    assert torch.equal(part, whole[3:7])


def test_a_mapped_file_is_written_only_in_this_process_copy(tmp_path):
    path = tmp_path / "images.npy"
    stored = _bytes(10)
    np.save(path, stored)
    raw = read_path(path)
    raw.values[0] += 1  # copy-on-write: the page is copied, the file stays as it was
    assert not torch.equal(raw.values[0], torch.from_numpy(stored[0]))
    assert np.array_equal(np.load(path), stored)


def test_a_mapped_file_is_advised_random_and_a_pass_in_order_reads_ahead(tmp_path, monkeypatch):
    import mmap

    from pyro_vae import mapping

    path = tmp_path / "images.npy"
    np.save(path, _bytes(10))
    values = read_path(path).values
    mapped = mapping._MAPPED[values.untyped_storage().data_ptr()]  # registered: a pass may advise it
    advised = []
    monkeypatch.setattr(mapping, "_MAPPED", {values.untyped_storage().data_ptr(): _Advised(mapped, advised)})
    with mapping.reading_in_order(values):
        assert advised == [mmap.MADV_NORMAL]
    assert advised == [mmap.MADV_NORMAL, mmap.MADV_RANDOM]
    with mapping.reading_in_order(torch.zeros(3)):  # not a map: nothing to advise
        pass
    assert len(advised) == 2


class _Advised:
    """A map that records the advice it is given, then passes it on."""

    def __init__(self, mapped, advised):
        self.mapped, self.advised = mapped, advised

    def madvise(self, advice):
        self.advised.append(advice)
        self.mapped.madvise(advice)
