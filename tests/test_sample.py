"""``pyro-vae sample``: generated items of a run as a PNG grid or an .npy array, seeded, from a
labelled run (by class, or the classes in turn) or a run without labels; each refusal one line.

The runs are trained in Python on tensors (``from_tensors``), whose data no command can read
again: ``sample`` works on them because it reads no data.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import pyro_vae.cli as cli
from pyro_vae.config import load_config
from pyro_vae.data import from_tensors
from pyro_vae.train import fit

from helpers import assert_one_line_error

NUM_CLASSES = 3
IMAGE_SHAPE = (1, 4, 4)
NUM_FEATURES = 5
TINY = {"model.z_dim": 2, "model.hidden_dim": 16, "train.batch_size": 16, "train.epochs": 1}


def _class_images(n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary 4 x 4 images of three classes: class c lights row c."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % NUM_CLASSES
    on = torch.full((n, *IMAGE_SHAPE), 0.1)
    for c in range(NUM_CLASSES):
        on[labels == c, 0, c] = 0.9
    return torch.bernoulli(on, generator=generator), labels


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """Three tiny runs: conditional (labelled), plain images, and vectors."""
    folder = tmp_path_factory.mktemp("sample_runs")
    images, labels = _class_images()
    vectors = torch.randn(60, NUM_FEATURES, generator=torch.Generator().manual_seed(1))
    made = {
        "labelled": (from_tensors(images, labels), {"model.labels": "conditional"}),
        "plain": (from_tensors(images), {}),
        "vectors": (from_tensors(vectors), {"model.likelihood": "gaussian", "data.binarize": "none"}),
    }
    for name, (splits, extra) in made.items():
        fit(load_config(None, {**TINY, **extra}), splits, folder / name, progress=False)
    return {name: str(folder / name) for name in made}


@pytest.fixture
def no_data(monkeypatch):
    """Reading a data set fails the test: generation needs none."""
    def trap(*args, **kwargs):
        raise AssertionError("sample read the data set")
    monkeypatch.setattr(cli, "load_data", trap)


pytestmark = pytest.mark.usefixtures("no_data")


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.mark.parametrize("run, shape", [("labelled", IMAGE_SHAPE), ("plain", IMAGE_SHAPE),
                                        ("vectors", (NUM_FEATURES,))])
def test_npy_holds_n_float32_items_of_the_runs_shape(run, shape, runs, tmp_path, run_cli):
    out = tmp_path / "deep" / "items.npy"  # a missing folder is made
    status, stdout, err = run_cli("sample", runs[run], "--num", "7", "--out", str(out))
    assert status == 0, err
    assert stdout.strip() == str(out)
    items = np.load(out)
    assert items.shape == (7, *shape) and items.dtype == np.float32 and np.isfinite(items).all()


@pytest.mark.parametrize("run, num, grid", [
    ("labelled", 7, (3, 3)),  # one column per class, the classes in turn
    ("plain", 7, (3, 3)),  # a square grid
    ("plain", 1, (1, 1)),
])
def test_png_is_a_grid_of_the_items(run, num, grid, runs, tmp_path, run_cli):
    out = tmp_path / "items.png"
    status, _, err = run_cli("sample", runs[run], "--num", str(num), "--out", str(out), "--quiet")
    assert status == 0, err
    rows, columns = grid
    height, width = IMAGE_SHAPE[1:]
    # one pixel per pixel, 1-pixel gutters between the items
    assert _pixels(out).shape[:2] == (rows * (height + 1) - 1, columns * (width + 1) - 1)


@pytest.mark.parametrize("suffix", [".png", ".npy"])
def test_the_same_seed_writes_the_same_bytes_and_leaves_the_callers_state(suffix, runs, tmp_path, run_cli):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    written = {}
    for name, seed in [("a", "5"), ("b", "5"), ("c", "6")]:
        out = tmp_path / f"{name}{suffix}"
        status, _, err = run_cli("sample", runs["plain"], "--num", "9", "--seed", seed, "--out", str(out))
        assert status == 0, err
        written[name] = out.read_bytes()
    assert torch.equal(torch.get_rng_state(), before)
    assert written["a"] == written["b"] and written["a"] != written["c"]


def test_label_fixes_the_class_of_every_item(runs, tmp_path, run_cli, monkeypatch):
    # the items of class 2 are the decodings of the same draws of z with y = 2 for every one
    asked = {}
    sample_images = cli.LabelledVAE.sample_images

    def spy(vae, num_samples, labels=None):
        asked["labels"] = labels
        return sample_images(vae, num_samples, labels)
    monkeypatch.setattr(cli.LabelledVAE, "sample_images", spy)
    out = tmp_path / "twos.npy"
    status, _, err = run_cli("sample", runs["labelled"], "--num", "4", "--label", "2", "--out", str(out))
    assert status == 0, err
    assert asked["labels"].tolist() == [2, 2, 2, 2]
    assert np.load(out).shape == (4, *IMAGE_SHAPE)
    status, _, err = run_cli("sample", runs["labelled"], "--num", "4", "--out", str(tmp_path / "cycled.npy"))
    assert status == 0, err
    assert asked["labels"] is None  # the classes in turn


@pytest.mark.parametrize("run, argv, words", [
    ("plain", ["--label", "0", "--out", "{tmp}/a.npy"], ["--label 0", "model.labels = 'none'", "no class"]),
    ("labelled", ["--label", "3", "--out", "{tmp}/a.npy"], ["--label 3", "3 classes", "0 to 2"]),
    ("labelled", ["--label", "-1", "--out", "{tmp}/a.npy"], ["--label", ">= 0"]),
    ("vectors", ["--out", "{tmp}/a.png"], ["a.png", "vectors of 5 features", ".npy"]),
    ("plain", ["--out", "{tmp}/a.jpg"], ["--out", "'.jpg'", ".png", ".npy"]),
    ("plain", ["--out", "{tmp}/a"], ["--out", "no suffix"]),
    ("plain", ["--out", "{tmp}"], ["--out", "is a folder"]),
    ("plain", ["--out", "{file}/a.png"], ["--out", "is a file"]),
    ("plain", ["--num", "0", "--out", "{tmp}/a.png"], ["--num", ">= 1"]),
    ("plain", ["--seed", "-1", "--out", "{tmp}/a.png"], ["--seed", "between 0"]),
], ids=["label-without-labels", "label-too-large", "label-negative", "png-of-vectors", "suffix-unknown",
        "no-suffix", "out-is-folder", "out-under-file", "num-zero", "seed-negative"])
def test_refused_with_one_line(run, argv, words, runs, tmp_path, run_cli):
    (tmp_path / "file.txt").write_text("a file\n")
    places = {"{tmp}": str(tmp_path), "{file}": str(tmp_path / "file.txt")}
    argv = [next((a.replace(k, v) for k, v in places.items() if k in a), a) for a in argv]
    if "--num" not in argv:
        argv += ["--num", "3"]
    assert_one_line_error(run_cli("sample", runs[run], *argv), *words)
    assert not list(tmp_path.glob("a.*"))


def test_a_png_as_a_user_runs_it(runs, tmp_path):
    out = tmp_path / "items.png"
    done = subprocess.run([sys.executable, "-m", "pyro_vae", "sample", runs["labelled"], "--num", "6", "--out",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and _pixels(out).shape[:2] == (9, 14)
