"""Data from anywhere: folders of images and array files, written here by each test, read by
:func:`pyro_vae.data.load_data`; splits, fingerprints, range checks and every refusal."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pyro_vae.data as data
import pyro_vae.sources as sources
from pyro_vae.config import ConfigError, DataConfig
from pyro_vae.data import (
    DataError,
    DataNotFoundError,
    Splits,
    check_likelihood_range,
    check_source,
    load_data,
)
from pyro_vae.sources import is_path_like, read_path

from helpers import one_line


def _config(path, **overrides) -> DataConfig:
    return DataConfig(dataset=str(path), binarize="none", **overrides)


def _png(path: Path, array: np.ndarray, format: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=format)


def _grey(seed: int, h: int = 4, w: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _all_items(splits: Splits) -> torch.Tensor:
    return torch.cat([splits.train.images, splits.val.images, splits.test.images])


def _sorted_rows(x: torch.Tensor) -> list:
    return sorted(map(tuple, x.flatten(1).tolist()))


# --- folders ---------------------------------------------------------------------------------------
def test_flat_folder_of_grey_pngs(tmp_path):
    arrays = [_grey(i) for i in range(5)]
    for i, array in enumerate(arrays):
        _png(tmp_path / "imgs" / f"{i}.png", array)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image: ignored\n")
    raw = read_path(tmp_path / "imgs")
    assert raw.values.dtype == torch.uint8 and raw.labels is None
    assert torch.equal(raw.values, torch.from_numpy(np.stack(arrays))[:, None])  # sorted file order, (N, 1, H, W)
    splits = load_data(_config(tmp_path / "imgs", val_fraction=0.2, test_fraction=0.2))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 1, 1)
    assert splits.train.image_shape == (1, 4, 6) and splits.train.labels is None
    assert _sorted_rows(_all_items(splits)) == _sorted_rows(raw.values.float() / 255)
    source = splits.source
    assert source["kind"] == "folder" and source["path"] == str((tmp_path / "imgs").absolute())
    assert source["data_shape"] == [1, 4, 6] and source["num_items"] == 5 and source["has_labels"] is False
    assert len(source["fingerprint"]) == 64


def test_class_folders_of_rgb_pngs_give_labels_by_sorted_name(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    _png(tmp_path / "imgs" / "zebra" / "a.png", rgb[0])
    _png(tmp_path / "imgs" / "ant" / "b.png", rgb[1])
    _png(tmp_path / "imgs" / "ant" / "deeper" / "c.png", rgb[2])  # below a class folder: still that class
    _png(tmp_path / "imgs" / ".hidden" / "d.png", rgb[2])  # hidden: ignored
    raw = read_path(tmp_path / "imgs")
    assert raw.classes == ["ant", "zebra"]
    assert raw.labels.tolist() == [0, 0, 1]
    assert raw.values.shape == (3, 3, 5, 4)
    assert torch.equal(raw.values[2], torch.from_numpy(rgb[0]).permute(2, 0, 1))
    splits = load_data(_config(tmp_path / "imgs", val_fraction=0.3, test_fraction=0.3))
    assert splits.source["has_labels"] and splits.source["classes"] == ["ant", "zebra"]
    assert splits.train.labels.dtype == torch.int64


def test_grey_and_rgb_in_one_folder_become_rgb(tmp_path):
    grey, rgb = _grey(0), np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    _png(tmp_path / "a.png", grey)
    _png(tmp_path / "b.png", rgb)
    _png(tmp_path / "c.png", grey)
    values = read_path(tmp_path).values
    assert values.shape == (3, 3, 4, 6)
    for i in (0, 2):
        assert all(torch.equal(values[i, c], torch.from_numpy(grey)) for c in range(3))


def test_jpegs_and_palette_and_binary_modes(tmp_path):
    flat = np.full((8, 8, 3), 200, dtype=np.uint8)
    _png(tmp_path / "a.jpg", flat, format="JPEG")
    _png(tmp_path / "b.JPEG", flat, format="JPEG")  # suffixes in any case
    Image.fromarray(flat).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "c.png")
    values = read_path(tmp_path).values
    assert values.shape == (3, 3, 8, 8)
    assert (values[:2].float() - 200).abs().max() <= 3  # JPEG is lossy; a flat colour nearly survives
    assert (values[2] == 200).all()  # a palette image is read as the RGB colours it shows
    (tmp_path / "bits").mkdir()
    Image.fromarray(np.eye(8, dtype=np.uint8) * 255).convert("1").save(tmp_path / "bits" / "x.png")
    bits = read_path(tmp_path / "bits").values
    assert bits.shape == (1, 1, 8, 8) and set(bits.unique().tolist()) == {0, 255}


def test_mixed_sizes_are_refused_naming_two_files_or_resized(tmp_path):
    _png(tmp_path / "a.png", _grey(0, 4, 6))
    _png(tmp_path / "b.png", _grey(1, 4, 6))
    _png(tmp_path / "c.png", _grey(2, 7, 5))
    with pytest.raises(DataError) as error:
        load_data(_config(tmp_path))
    one_line(error, "a.png is 6x4", "c.png is 5x7", "data.image_size")
    splits = load_data(_config(tmp_path, image_size=8, val_fraction=0.3, test_fraction=0.3))
    assert splits.train.image_shape == (1, 8, 8) and splits.source["data_shape"] == [1, 8, 8]


# --- array files -----------------------------------------------------------------------------------
def test_npy_grey_images_uint8_mean_0_to_255(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 5), dtype=np.uint8)
    images[0, 0, 0] = 255
    np.save(tmp_path / "x.npy", images)
    splits = load_data(_config(tmp_path / "x.npy"))
    everything = _all_items(splits)
    assert splits.train.image_shape == (1, 4, 5) and everything.dtype == torch.float32
    assert everything.max() == 1.0
    assert _sorted_rows(everything) == _sorted_rows(torch.from_numpy(images).float()[:, None] / 255)
    assert splits.source["kind"] == "array" and splits.source["has_labels"] is False


def test_npy_float_images_and_vectors_are_taken_as_they_are(tmp_path):
    images = np.random.default_rng(0).normal(size=(10, 3, 4, 5)) * 300  # float64, far outside [0, 1]
    np.save(tmp_path / "rgb.npy", images)
    splits = load_data(_config(tmp_path / "rgb.npy"))
    assert splits.train.image_shape == (3, 4, 5)
    assert _sorted_rows(_all_items(splits)) == _sorted_rows(torch.from_numpy(images).float())
    vectors = np.arange(40, dtype=np.int64).reshape(10, 4)  # integers other than uint8: values as they are
    np.save(tmp_path / "table.npy", vectors)
    splits = load_data(_config(tmp_path / "table.npy"))
    assert splits.train.image_shape == (4,) and splits.source["data_shape"] == [4]
    assert _all_items(splits).max() == 39.0


@pytest.mark.parametrize("keys", [("images", "labels"), ("x", "y")])
def test_npz_with_labels(tmp_path, keys):
    images = np.random.default_rng(0).random((12, 1, 3, 3)).astype(np.float32)
    labels = np.arange(12) % 3
    np.savez(tmp_path / "d.npz", **{keys[0]: images, keys[1]: labels})
    splits = load_data(_config(tmp_path / "d.npz", val_fraction=0.25, test_fraction=0.25))
    assert splits.source["has_labels"]
    for split in (splits.train, splits.val, splits.test):  # each label stays with its item
        for image, label in zip(split.images, split.labels):
            assert label.item() == labels[np.flatnonzero((images == image.numpy()).all(axis=(1, 2, 3)))[0]]


def test_pt_tensor_and_dict(tmp_path):
    images = torch.rand(10, 2, 3, 3)
    torch.save(images, tmp_path / "t.pt")
    assert torch.equal(read_path(tmp_path / "t.pt").values, images)
    labels = torch.arange(10)
    torch.save({"x": (images * 255).to(torch.uint8), "y": labels}, tmp_path / "d.pt")
    raw = read_path(tmp_path / "d.pt")
    assert raw.values.dtype == torch.uint8 and torch.equal(raw.labels, labels)
    splits = load_data(_config(tmp_path / "d.pt"))
    assert _all_items(splits).max() <= 1.0 and splits.source["has_labels"]


# --- splits, limits, standardization -----------------------------------------------------------------
def test_seeded_splits_are_reproducible_disjoint_and_cover_the_data(tmp_path):
    np.save(tmp_path / "v.npy", np.arange(100, dtype=np.float32)[:, None])
    config = _config(tmp_path / "v.npy", val_fraction=0.15, test_fraction=0.25, split_seed=7)
    first, again = load_data(config), load_data(config)
    ids = [split.images.flatten().tolist() for split in (first.train, first.val, first.test)]
    assert [len(i) for i in ids] == [60, 15, 25]
    assert sorted(sum(ids, [])) == list(range(100))  # disjoint and covering
    assert all(torch.equal(a.images, b.images) for a, b in zip((first.train, first.val, first.test),
                                                                (again.train, again.val, again.test)))
    other = load_data(_config(tmp_path / "v.npy", val_fraction=0.15, test_fraction=0.25, split_seed=8))
    assert not torch.equal(other.test.images, first.test.images)
    assert first.source["fingerprint"] == other.source["fingerprint"]  # the data, not its split
    limited = load_data(_config(tmp_path / "v.npy", val_fraction=0.15, test_fraction=0.25, split_seed=7,
                                train_limit=10))
    assert torch.equal(limited.train.images, first.train.images[:10])
    assert torch.equal(limited.test.images, first.test.images)
    with pytest.raises(ConfigError, match=r"data.train_limit = 61: must be between 0 \(all\) and 60"):
        load_data(_config(tmp_path / "v.npy", val_fraction=0.15, test_fraction=0.25, train_limit=61))


def test_small_fractions_still_give_one_item_and_too_few_items_are_refused(tmp_path):
    np.save(tmp_path / "v.npy", np.arange(5, dtype=np.float32)[:, None])
    splits = load_data(_config(tmp_path / "v.npy", val_fraction=0.01, test_fraction=0.01))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 1, 1)
    np.save(tmp_path / "two.npy", np.arange(2, dtype=np.float32)[:, None])
    with pytest.raises(DataError, match="holds 2 items: too few"):
        load_data(_config(tmp_path / "two.npy"))


def test_standardize_with_the_training_statistics(tmp_path):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(400, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 0.0]) + 7
    torch.save(values, tmp_path / "v.pt")
    splits = load_data(_config(tmp_path / "v.pt", standardize=True))
    train = splits.train.images
    torch.testing.assert_close(train.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(train[:, :4].std(0, correction=0), torch.ones(4), atol=1e-5, rtol=0)
    assert torch.equal(train[:, 4], torch.zeros(len(train)))  # constant in training: centred, not scaled
    raw = load_data(_config(tmp_path / "v.pt"))
    mean, std = raw.train.images.mean(0), raw.train.images.std(0, correction=0)
    torch.testing.assert_close(splits.test.images[:, :4], ((raw.test.images - mean) / std)[:, :4])


# --- the source, its fingerprint, and moved or changed data ------------------------------------------
def test_fingerprint_catches_one_changed_value_and_a_moved_file_is_found(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (20, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    trained = load_data(_config(tmp_path / "x.npy"))
    check_source(trained.source, load_data(_config(tmp_path / "x.npy")))  # the same file: accepted
    (tmp_path / "moved").mkdir()
    (tmp_path / "x.npy").rename(tmp_path / "moved" / "x.npy")
    moved = load_data(_config(tmp_path / "x.npy"), dataset=str(tmp_path / "moved" / "x.npy"))
    assert moved.source["path"] == str(tmp_path / "moved" / "x.npy")
    check_source(trained.source, moved)
    images[3, 2, 1] ^= 1
    np.save(tmp_path / "moved" / "x.npy", images)
    changed = load_data(_config(tmp_path / "moved" / "x.npy"))
    assert changed.source["fingerprint"] != trained.source["fingerprint"]
    with pytest.raises(DataError) as error:
        check_source(trained.source, changed)
    one_line(error, "changed since the run was trained", "silently wrong", "x.npy")
    check_source({"dataset": "tensors"}, changed)  # nothing recorded, nothing to check


def test_fingerprint_of_a_folder_changes_with_one_pixel(tmp_path):
    for i in range(4):
        _png(tmp_path / f"{i}.png", _grey(i))
    before = load_data(_config(tmp_path)).source["fingerprint"]
    changed = _grey(2)
    changed[0, 0] ^= 1
    _png(tmp_path / "2.png", changed)
    assert load_data(_config(tmp_path)).source["fingerprint"] != before


class _FakeCIFAR10:
    """torchvision's CIFAR10 as it looks from outside: channels-last uint8 array, list targets."""

    classes = ["airplane", "automobile"]

    def __init__(self, root, train, download):
        n = 6 if train else 2
        self.data = np.arange(n * 2 * 2 * 3, dtype=np.uint8).reshape(n, 2, 2, 3)
        self.targets = [i % 2 for i in range(n)]


def test_colour_torchvision_datasets_become_channels_first(monkeypatch):
    monkeypatch.setattr(data, "_torchvision_datasets", lambda: type("tv", (), {"CIFAR10": _FakeCIFAR10}))
    splits = load_data(DataConfig(dataset="cifar10", val_size=2))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 2, 2)
    assert splits.train.image_shape == (3, 2, 2)
    expected = torch.from_numpy(_FakeCIFAR10("", True, False).data).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(splits.train.images, expected[:4]) and torch.equal(splits.val.images, expected[4:])
    assert splits.val.labels.tolist() == [0, 1]
    source = splits.source
    assert source["kind"] == "torchvision" and source["path"] is None and source["num_items"] == 8
    assert source["classes"] == ["airplane", "automobile"]


def test_missing_torchvision_files_are_named(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        load_data(DataConfig(dataset="cifar10"), tmp_path)
    assert "cifar-10-batches-py" in str(error.value) and "data_batch_1" in str(error.value)


def test_what_looks_like_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not is_path_like("mnist") and not is_path_like("")
    assert is_path_like("x.npy") and is_path_like("X.PT") and is_path_like("imgs/") and is_path_like("a/b")
    (tmp_path / "photos").mkdir()
    assert is_path_like("photos")


# --- the data's range against the likelihood ----------------------------------------------------------
BITS, GREY, REAL = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5, 1.0]), torch.tensor([-2.0, 3.5])


@pytest.mark.parametrize("values, accepts, binarize", [
    (BITS, "binary", "none"), (GREY, "binary", "dynamic"), (GREY, "binary", "static"),
    (GREY, "unit_interval", "none"), (BITS, "unit_interval", "dynamic"), (REAL, "real", "none"),
])
def test_likelihood_range_accepted(values, accepts, binarize):
    check_likelihood_range(values, accepts, binarize, "some_likelihood")


@pytest.mark.parametrize("values, accepts, binarize, words", [
    (GREY, "binary", "none", ["'bernoulli'", "binary", "0..1", "data.binarize", "continuous_bernoulli"]),
    (REAL, "binary", "none", ["'bernoulli'", "-2..3.5", "gaussian", "data.standardize"]),
    (REAL, "unit_interval", "none", ["'bernoulli'", "[0, 1]", "-2..3.5", "gaussian"]),
    (REAL, "real", "dynamic", ["data.binarize = 'dynamic'", "-2..3.5", "'none'"]),
    (torch.tensor([0.0, float("nan")]), "real", "none", ["NaN"]),
    (torch.tensor([0.0, float("inf")]), "real", "none", ["infinite"]),
])
def test_likelihood_range_refused_in_one_line(values, accepts, binarize, words):
    with pytest.raises(DataError) as error:
        check_likelihood_range(values, accepts, binarize, "bernoulli")
    one_line(error, *words)


# --- bad data: one DataError line each ----------------------------------------------------------------
def _write_bad(tmp_path: Path, case: str) -> Path:
    """Write the bad data of ``case`` under ``tmp_path``; return the path to read."""
    if case == "empty-folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if case == "only-other-files":
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "readme.txt").write_text("hello\n")
        return tmp_path / "docs"
    if case == "not-an-image":
        _png(tmp_path / "imgs" / "a.png", _grey(0))
        (tmp_path / "imgs" / "b.png").write_bytes(b"this is not a PNG")
        return tmp_path / "imgs"
    if case == "empty-class-folder":
        _png(tmp_path / "imgs" / "cat" / "a.png", _grey(0))
        (tmp_path / "imgs" / "dog").mkdir()
        return tmp_path / "imgs"
    if case == "images-beside-class-folders":
        _png(tmp_path / "imgs" / "a.png", _grey(0))
        _png(tmp_path / "imgs" / "cat" / "b.png", _grey(1))
        return tmp_path / "imgs"
    if case == "16-bit-png":
        Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
        return tmp_path
    arrays = {
        "nan": np.where(np.eye(4, dtype=bool), np.nan, 0.5)[None].repeat(5, 0),
        "inf": np.full((5, 3), np.inf),
        "one-dimensional": np.zeros(10),
        "five-dimensional": np.zeros((2, 1, 1, 3, 3)),
        "no-items": np.zeros((0, 3)),
        "channels-last": np.zeros((5, 8, 8, 3)),
        "strings": np.array([["a", "b"], ["c", "d"]]),
    }
    if case in arrays:
        np.save(tmp_path / f"{case}.npy", arrays[case])
        return tmp_path / f"{case}.npy"
    if case == "labels-wrong-length":
        np.savez(tmp_path / "d.npz", images=np.zeros((5, 2, 2)), labels=np.arange(4))
    elif case == "labels-not-whole":
        np.savez(tmp_path / "d.npz", images=np.zeros((5, 2, 2)), labels=np.linspace(0, 1, 5))
    elif case == "npz-without-images":
        np.savez(tmp_path / "d.npz", pixels=np.zeros((5, 2, 2)))
    elif case == "npz-with-images-and-x":
        np.savez(tmp_path / "d.npz", images=np.zeros((5, 2, 2)), x=np.zeros((5, 2, 2)))
    elif case == "pt-list":
        torch.save([torch.zeros(3)], tmp_path / "d.pt")
        return tmp_path / "d.pt"
    elif case == "pt-garbage":
        (tmp_path / "d.pt").write_bytes(b"garbage")
        return tmp_path / "d.pt"
    elif case == "npy-garbage":
        (tmp_path / "d.npy").write_bytes(b"garbage")
        return tmp_path / "d.npy"
    elif case == "missing":
        return tmp_path / "nowhere.npy"
    elif case == "unsupported-file":
        (tmp_path / "table.csv").write_text("1,2\n")
        return tmp_path / "table.csv"
    return tmp_path / "d.npz"


BAD_DATA = {
    "empty-folder": ["empty", "no image files", ".png"],
    "only-other-files": ["docs", "no image files", "readme.txt"],
    "not-an-image": ["b.png", "cannot be read as an image"],
    "empty-class-folder": ["class folder", "dog", "no image files"],
    "images-beside-class-folders": ["a.png", "cat/", "class folder"],
    "16-bit-png": ["deep.png", "16-bit", "8-bit"],
    "nan": ["nan.npy", "5 items hold NaN or infinite values", "item 0"],
    "inf": ["inf.npy", "NaN or infinite"],
    "one-dimensional": ["one-dimensional.npy", "(10,)", "(N, C, H, W)", "(N, D)"],
    "five-dimensional": ["five-dimensional.npy", "(2, 1, 1, 3, 3)", "(N, H, W)"],
    "no-items": ["no-items.npy", "holds no data"],
    "channels-last": ["channels-last", "(N, H, W, C)", "transpose"],
    "strings": ["strings.npy", "numbers"],
    "labels-wrong-length": ["d.npz", "labels of shape (4,) for 5 items", "(5,)"],
    "labels-not-whole": ["d.npz", "whole numbers"],
    "npz-without-images": ["d.npz", "'images' or 'x'", "pixels"],
    "npz-with-images-and-x": ["d.npz", "both 'images' and 'x'"],
    "pt-list": ["d.pt", "holds a list", "dict"],
    "pt-garbage": ["d.pt", "not a valid .pt file"],
    "npy-garbage": ["d.npy", "not a valid .npy file"],
    "missing": ["nowhere.npy", "does not exist"],
    "unsupported-file": ["table.csv", "neither a folder of images nor"],
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_line(tmp_path, case):
    path = _write_bad(tmp_path, case)
    with pytest.raises(DataError) as error:
        load_data(_config(path))
    one_line(error, *BAD_DATA[case])


def _permission_denied(*args, **kwargs):
    raise PermissionError(13, "Permission denied", str(args[0]) if args else None)


@pytest.mark.parametrize("kind", ["npy", "pt", "png", "folder"])
def test_unreadable_files(tmp_path, monkeypatch, kind):
    if kind == "npy":
        np.save(tmp_path / "secret.npy", np.zeros((5, 2)))
        path = tmp_path / "secret.npy"
    elif kind == "pt":
        torch.save(torch.zeros(5, 2), tmp_path / "secret.pt")
        path = tmp_path / "secret.pt"
    else:
        _png(tmp_path / "imgs" / "secret.png", _grey(0))
        path = tmp_path / "imgs"
    target = {"npy": path, "pt": path, "png": path / "secret.png", "folder": path}[kind]
    target.chmod(0)
    try:
        if os.geteuid() == 0:  # root reads it anyway: stand in the error a user would get
            # an .npy file is opened (to be mapped) by the built-in open, shadowed in the module
            patched = {"npy": (sources, "open"), "pt": (sources.torch, "load"), "png": (Image, "open"),
                       "folder": (Path, "iterdir")}[kind]
            monkeypatch.setattr(*patched, _permission_denied, raising=False)
        with pytest.raises(DataError) as error:
            load_data(_config(path))
    finally:
        target.chmod(0o755)
    message = one_line(error, "Permission denied")
    assert "secret" in message or "imgs" in message, message


@pytest.mark.parametrize("overrides, words", [
    ({"dataset": "cifar"}, ["data.dataset = 'cifar'", "mnist", "cifar10", "folder of images", ".npy/.npz/.pt"]),
    ({"dataset": "d.npy", "test_fraction": 0.0}, ["data.test_fraction = 0.0", "test split"]),
    ({"dataset": "d.npy", "val_fraction": 0.0}, ["data.val_fraction = 0.0", "validation split"]),
    ({"dataset": "d.npy", "val_fraction": 0.5, "test_fraction": 0.5}, ["data.val_fraction + data.test_fraction"]),
    ({"standardize": True, "binarize": "dynamic"}, ["data.standardize", "data.binarize = 'none'"]),
])
def test_config_refusals_before_reading(overrides, words):
    with pytest.raises(ConfigError) as error:
        data.check_dataset_config(DataConfig(**{"binarize": "none", **overrides}))
    for word in words:
        assert word in str(error.value), str(error.value)
    data.check_dataset_config(DataConfig(dataset="mnist", test_fraction=0.0))  # a torchvision name ignores it
