"""Your own data and your own parts through the command line, as a user runs it: every data
format written by the test itself, trained, evaluated, plotted and resumed; a changed file is
refused; a plugin's likelihood and prior used by name."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_vae.checkpoint import load_checkpoint

from helpers import assert_one_line_error

N = 120  # items per dataset: 96 train, 12 validation, 12 test with the default fractions
TINY = ["--set", "model.hidden_dim=16", "--set", "model.z_dim=2", "--set", "train.batch_size=32", "--quiet"]


def _shapes(n: int, size: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, size, size, channels) of a bright square in one of four corners; the corner is the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 40, (n, size, size, channels), dtype=np.uint8)
    half = size // 2
    for image, label in zip(images, labels):
        r, c = divmod(int(label), 2)
        image[r * half:(r + 1) * half, c * half:(c + 1) * half] = 215
    return images, labels


def write_png_folder(folder, channels: int, classes: bool, size: int = 8, n: int = N):
    images, labels = _shapes(n, size, channels, seed=channels)
    for i, (image, label) in enumerate(zip(images, labels)):
        where = folder / f"class_{label}" if classes else folder
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0] if channels == 1 else image).save(where / f"{i:04d}.png")
    return folder


def write_arrays(path, kind: str):
    images, labels = _shapes(N, 8, 1, seed=5)
    if kind == "npy-images":  # (N, H, W) uint8
        np.save(path, images[..., 0])
    elif kind == "npy-vectors":  # (N, D) real-valued measurements
        rng = np.random.default_rng(0)
        np.save(path, (rng.normal(size=(N, 3)) @ rng.normal(size=(3, 10)) + 5.0).astype(np.float32))
    elif kind == "npz":
        np.savez(path, images=images.transpose(0, 3, 1, 2), labels=labels)  # (N, C, H, W)
    elif kind == "pt":
        torch.save({"x": torch.from_numpy(images[..., 0]).float() / 255, "y": torch.from_numpy(labels)}, path)
    return path


FORMATS = {
    "png-grey-classes": (lambda tmp: write_png_folder(tmp / "grey", 1, classes=True), []),
    "png-rgb-flat": (lambda tmp: write_png_folder(tmp / "rgb", 3, classes=False), []),
    "npy-images": (lambda tmp: write_arrays(tmp / "images.npy", "npy-images"), []),
    "npy-vectors": (lambda tmp: write_arrays(tmp / "vectors.npy", "npy-vectors"),
                    ["--likelihood", "gaussian_learned", "--set", "data.binarize=none", "--set", "data.standardize=true"]),
    "npz-labels": (lambda tmp: write_arrays(tmp / "data.npz", "npz"), []),
    "pt-dict": (lambda tmp: write_arrays(tmp / "data.pt", "pt"), []),
}


@pytest.mark.parametrize("name", FORMATS)
def test_train_evaluate_plot_resume_on_each_format(name, tmp_path, run_cli):
    make, extra = FORMATS[name]
    source = make(tmp_path)
    run = tmp_path / "run"
    status, out, err = run_cli("train", "--data", str(source), *TINY, *extra, "--epochs", "1", "--out", str(run))
    assert status == 0, err
    state = load_checkpoint(run)
    assert state["data"]["fingerprint"] and state["data"]["kind"] in ("folder", "array")
    assert state["config"]["data"]["dataset"] == str(source)

    status, out, err = run_cli("evaluate", str(run), "-k", "4", "--quiet")
    assert status == 0, err
    result = json.loads(out)
    assert result["num_images"] == 12 and np.isfinite(result["test_log_likelihood"])

    status, out, err = run_cli("plot", str(run))
    assert status == 0, err
    assert (run / "latent_space.png").stat().st_size > 1000

    status, out, err = run_cli("train", "--resume", str(run), "--epochs", "2")
    assert status == 0, err
    assert load_checkpoint(run)["epoch"] == 2


@pytest.mark.parametrize("name", ["png-grey-classes", "npz-labels"])
@pytest.mark.parametrize("labels", ["conditional", "semi_supervised"])
def test_labelled_models_on_own_data_with_labels(name, labels, tmp_path, run_cli):
    """A folder's classes and an .npz's labels train labelled models through every command."""
    make, extra = FORMATS[name]
    source = make(tmp_path)
    run = tmp_path / "run"
    keep = ["--set", "data.labelled=6", "--set", "train.labelled_per_batch=4"] if labels == "semi_supervised" else []
    status, _, err = run_cli("train", "--data", str(source), *TINY, *extra, *keep, "--set", f"model.labels={labels}",
                             "--epochs", "1", "--out", str(run))
    assert status == 0, err
    assert load_checkpoint(run)["num_classes"] >= 2
    status, out, err = run_cli("evaluate", str(run), "-k", "4", "--quiet")
    assert status == 0, err
    result = json.loads(out)
    assert 0 <= result["test_accuracy"] <= 1 and np.isfinite(result["test_log_likelihood"])
    status, _, err = run_cli("plot", str(run))
    assert status == 0, err
    assert (run / "confusion_matrix.png").exists() and (run / "class_grid.png").exists()
    status, _, err = run_cli("sample", str(run), "--num", "4", "--label", "1", "--out", str(tmp_path / "ones.npy"))
    assert status == 0, err
    assert np.load(tmp_path / "ones.npy").shape[0] == 4
    status, _, err = run_cli("train", "--resume", str(run), "--epochs", "2")
    assert status == 0, err
    assert load_checkpoint(run)["epoch"] == 2


def test_a_changed_file_is_refused_and_a_moved_one_is_found(tmp_path, run_cli):
    source = write_arrays(tmp_path / "images.npy", "npy-images")
    run = tmp_path / "run"
    assert run_cli("train", "--data", str(source), *TINY, "--epochs", "1", "--out", str(run))[0] == 0

    moved = tmp_path / "elsewhere.npy"
    source.rename(moved)
    status, _, err = run_cli("evaluate", str(run), "-k", "2", "--quiet")
    assert status == 2 and "images.npy" in err, err  # gone: one line saying where it looked
    status, _, err = run_cli("evaluate", str(run), "-k", "2", "--quiet", "--data", str(moved))
    assert status == 0, err

    changed = np.load(moved)
    changed[0, 0, 0] ^= 1  # one value of one pixel
    np.save(moved, changed)
    for command in (["evaluate", str(run), "-k", "2"], ["plot", str(run)], ["train", "--resume", str(run), "--epochs", "2"],
                    ["compare-elbo", str(run), "--repeats", "1", "--grad-samples", "2"]):
        assert_one_line_error(run_cli(*command, "--data", str(moved)), "fingerprint")


PLUGIN = textwrap.dedent('''
    """A user's plugin: a Poisson-like likelihood for counts in [0, 1] x 4 and a Student-t prior."""
    import pyro.distributions as dist
    import torch
    from torch import nn

    import pyro_vae


    @pyro_vae.register_likelihood("squashed_normal")
    class SquashedNormal(nn.Module):
        """Normal pixels with a fixed scale, located at sigmoid(features)."""

        accepts = "real"

        def __init__(self, image_shape=None, scale: float = 0.2):
            super().__init__()
            self.scale = scale
            self.event_dim = len(image_shape)

        def forward(self, features):
            return dist.Normal(torch.sigmoid(features), self.scale).to_event(self.event_dim)


    @pyro_vae.register_prior("student_t")
    class StudentT(nn.Module):
        def __init__(self, z_dim, encoder=None, image_shape=None, df: float = 4.0):
            super().__init__()
            self.register_buffer("loc", torch.zeros(z_dim))
            self.df = df

        def forward(self):
            return dist.StudentT(self.df, self.loc, torch.ones_like(self.loc)).to_event(1)
''')


@pytest.mark.usefixtures("restore_registries")
@pytest.mark.parametrize("how", ["flags", "config"])
def test_a_plugin_registers_parts_used_by_name_through_evaluate_and_resume(how, tmp_path, run_cli):
    plugin = tmp_path / "my_parts.py"
    plugin.write_text(PLUGIN)
    source = write_arrays(tmp_path / "images.npy", "npy-images")
    run = tmp_path / "run"
    if how == "flags":
        choose = ["--likelihood", "squashed_normal", "--prior", "student_t"]
    else:
        config = tmp_path / "mine.toml"
        config.write_text('[data]\nbinarize = "none"\n[model]\nlikelihood = "squashed_normal"\nprior = "student_t"\n'
                          'prior_options = { df = 3.0 }\n')
        choose = ["--config", str(config)]
    status, _, err = run_cli("train", "--plugin", str(plugin), "--data", str(source), *TINY, *choose,
                          "--set", "data.binarize=none", "--epochs", "1", "--out", str(run))
    assert status == 0, err
    assert load_checkpoint(run)["plugins"] == [str(plugin.resolve())]
    # a fresh process knows nothing of the plugin: the run imports it again
    for command in (["evaluate", str(run), "-k", "4", "--quiet"], ["train", "--resume", str(run), "--epochs", "2"]):
        done = __import__("subprocess").run([sys.executable, "-m", "pyro_vae", *command], capture_output=True,
                                            text=True, timeout=300)
        assert done.returncode == 0, done.stderr


def test_a_missing_plugin_is_one_line(tmp_path, run_cli):
    for plugin, word in [(str(tmp_path / "nowhere.py"), "nowhere.py"), ("no_such_module_here", "no_such_module_here")]:
        assert_one_line_error(run_cli("train", "--plugin", plugin, "--out", str(tmp_path / "run")), word)


def test_evaluate_scores_the_validation_split_when_asked(tmp_path, run_cli):
    """``--split validation`` scores the held-out training items a recipe is chosen on, the same
    computation as :func:`pyro_vae.evaluate` on them, and keeps the test file apart."""
    from pyro_vae import evaluate, load_run
    from pyro_vae.data import load_data, prepare

    source = write_arrays(tmp_path / "images.npy", "npy-images")
    run = tmp_path / "run"
    assert run_cli("train", "--data", str(source), *TINY, "--epochs", "1", "--out", str(run))[0] == 0
    status, out, err = run_cli("evaluate", str(run), "-k", "4", "--split", "validation", "--quiet")
    assert status == 0, err
    result = json.loads(out)
    assert result["split"] == "validation" and result["data_protocol"].startswith("validation images")
    assert result == json.loads((run / "evaluation_validation_k4.json").read_text())
    assert not (run / "evaluation_k4.json").exists()  # the test file is the test split's alone

    vae = load_run(run)
    splits = load_data(vae.config.data)
    assert result["num_images"] == len(splits.val) == 12
    expected = evaluate(vae, prepare(splits.val, vae.config.data.binarize).images, num_samples=4, seed=0)
    assert result["test_log_likelihood"] == expected["test_log_likelihood"]  # the same computation, repeated

    status, out, err = run_cli("evaluate", str(run), "-k", "4", "--quiet")
    assert status == 0, err
    assert "split" not in json.loads(out) and (run / "evaluation_k4.json").exists()
    assert_one_line_error(run_cli("evaluate", str(run), "--split", "validation", "--limit", "13", "--quiet"),
                          "--limit 13", "validation split", "only 12")
