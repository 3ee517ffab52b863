"""Watching a VAE learn: the snapshots a run keeps, the TensorBoard events it writes (read back
with TensorBoard's own reader), and the training.gif that `pyro-vae plot` makes of them."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the dev extra has it

from pyro_vae import cli
from pyro_vae.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from pyro_vae.data import prepare
from pyro_vae.elbo import ACTIVE_UNIT_THRESHOLD, elbo_per_image
from pyro_vae.model import build_vae
from pyro_vae.monitor import (INSTALL_TENSORBOARD, RECORD_SCALARS, SNAPSHOT_IMAGES, SNAPSHOT_SAMPLES, TENSORBOARD_NAME,
                              Monitor, TensorBoardMissing, to_uint8, validation_terms)
from pyro_vae.seeding import seeded
from pyro_vae.train import METRICS_NAME, fit

from helpers import one_line


TERMS = ("validation/reconstruction", "validation/kl", "validation/active_units")
IMAGE_TAGS = ["images/reconstructions", "images/samples"]


def events(run_dir) -> EventAccumulator:
    """Everything TensorBoard would show of the run, orphaned steps purged as it purges them."""
    accumulator = EventAccumulator(str(run_dir / TENSORBOARD_NAME), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_NAME).read_text().splitlines()]


def as_float32(value: float) -> float:
    """What an event holds of a metric: TensorBoard stores float32."""
    return torch.tensor(value, dtype=torch.float32).item()


def assert_events_match_metrics(run_dir, epochs: int):
    accumulator, records = events(run_dir), metrics(run_dir)
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    assert set(accumulator.Tags()["scalars"]) == {*RECORD_SCALARS, *TERMS}
    for tag, key in RECORD_SCALARS.items():
        scalars = accumulator.Scalars(tag)
        assert [e.step for e in scalars] == [r["epoch"] for r in records], tag  # each epoch once, in order
        assert [e.value for e in scalars] == [as_float32(r[key]) for r in records], tag
    for tag in TERMS:
        assert [e.step for e in accumulator.Scalars(tag)] == list(range(1, epochs + 1)), tag
    return accumulator


def test_tensorboard_events_hold_each_epoch_as_metrics_jsonl(tmp_path, splits, tiny_config):
    config = tiny_config.replace(**{"train.tensorboard": True, "train.epochs": 3})
    fit(config, splits, tmp_path, progress=False)
    accumulator = assert_events_match_metrics(tmp_path, 3)
    assert accumulator.Tags()["images"] == IMAGE_TAGS
    height, width = splits.val.image_shape[1:]
    reconstructions, samples = (accumulator.Images(tag) for tag in IMAGE_TAGS)
    assert [e.step for e in reconstructions] == [e.step for e in samples] == [1, 2, 3]
    # inputs above their reconstructions, SNAPSHOT_IMAGES columns, 2-pixel gutters (make_grid)
    assert (reconstructions[0].height, reconstructions[0].width) == (2 * (height + 2) + 2,
                                                                      SNAPSHOT_IMAGES * (width + 2) + 2)
    sample_rows = SNAPSHOT_SAMPLES // SNAPSHOT_IMAGES
    assert (samples[0].height, samples[0].width) == (sample_rows * (height + 2) + 2, SNAPSHOT_IMAGES * (width + 2) + 2)
    active = [e.value for e in accumulator.Scalars("validation/active_units")]
    assert all(0 <= a <= config.model.z_dim and a == int(a) for a in active)


def test_resume_continues_the_event_stream_without_duplicate_steps(tmp_path, splits, tiny_config):
    config = tiny_config.replace(**{"train.tensorboard": True, "train.epochs": 3})
    fit(config.replace(**{"train.epochs": 1}), splits, tmp_path, progress=False)
    after_one = tmp_path.parent / f"{tmp_path.name}-epoch1.pt"
    shutil.copy(tmp_path / CHECKPOINT_NAME, after_one)
    fit(config, splits, tmp_path, checkpoint=load_checkpoint(tmp_path), progress=False)
    assert_events_match_metrics(tmp_path, 3)
    # A process that wrote the events of epochs 2 and 3 and died before their checkpoint: the
    # resumed run logs them again, and the earlier ones are purged, not shown twice.
    shutil.copy(after_one, tmp_path / CHECKPOINT_NAME)
    fit(config, splits, tmp_path, checkpoint=load_checkpoint(tmp_path), progress=False)
    assert len(list((tmp_path / TENSORBOARD_NAME).glob("events.out.tfevents.*"))) == 3  # one file per process
    assert_events_match_metrics(tmp_path, 3)


def test_missing_tensorboard_is_one_clear_error_before_anything_is_written(tmp_path, splits, tiny_config,
                                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    config = tiny_config.replace(**{"train.tensorboard": True})
    with pytest.raises(TensorBoardMissing, match=r"pip install 'pyro-vae\[tensorboard\]'") as error:
        fit(config, splits, tmp_path / "run", progress=False)
    assert isinstance(error.value, ImportError)
    one_line(error)
    assert not (tmp_path / "run").exists()
    # without TensorBoard, or without a run folder to write it to, the package is not needed
    assert fit(tiny_config, splits, tmp_path / "plain", progress=False).completed
    assert fit(config, splits, progress=False).completed


def _npy_images(path, n: int = 120):
    """uint8 images (n, 8, 8) of a bright square in one of four corners, as a .npy file."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 40, (n, 8, 8), dtype=np.uint8)
    for image, corner in zip(images, rng.integers(0, 4, n)):
        r, c = divmod(int(corner), 2)
        image[4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 215
    np.save(path, images)
    return path


TINY = ["--set", "model.hidden_dim=16", "--set", "model.z_dim=2", "--set", "train.batch_size=32", "--quiet"]


def test_the_cli_without_tensorboard_says_how_to_install_it(tmp_path, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)

    def trap(*args, **kwargs):
        raise AssertionError("the data was read or training started")

    monkeypatch.setattr(cli, "_run_data", trap)
    monkeypatch.setattr(cli, "fit", trap)
    data = _npy_images(tmp_path / "images.npy")
    for flags in (["--tensorboard"], ["--set", "train.tensorboard=true"]):
        status, _, err = run_cli("train", "--data", str(data), *TINY, *flags, "--out", str(tmp_path / "run"))
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1, err
        assert lines[0].startswith("pyro-vae: error: ") and INSTALL_TENSORBOARD in lines[0]
    assert not (tmp_path / "run").exists()


def test_train_with_tensorboard_resume_and_plot_the_gif(tmp_path, run_cli):
    data, run = _npy_images(tmp_path / "images.npy"), tmp_path / "run"
    status, _, err = run_cli("train", "--data", str(data), *TINY, "--epochs", "2", "--tensorboard", "--out", str(run))
    assert status == 0, err
    assert load_checkpoint(run)["config"]["train"]["tensorboard"] is True
    status, _, err = run_cli("train", "--resume", str(run), "--epochs", "3")
    assert status == 0, err
    assert_events_match_metrics(run, 3)

    status, out, err = run_cli("plot", str(run))
    assert status == 0, err
    gif = run / "training.gif"
    assert str(gif) in out.splitlines()
    with Image.open(gif) as image:
        assert image.n_frames == 3  # one per epoch
        width, height = image.size
    assert width >= SNAPSHOT_IMAGES * 8 and height >= 4 * 8  # every image at least at its own resolution
    assert gif.stat().st_size < 200_000


def test_plot_skips_the_gif_with_a_note_for_runs_without_snapshots(tmp_path, run_cli):
    data, run = _npy_images(tmp_path / "images.npy"), tmp_path / "run"
    assert run_cli("train", "--data", str(data), *TINY, "--epochs", "1", "--out", str(run))[0] == 0
    state = load_checkpoint(run)
    del state["snapshots"]  # as a run saved before snapshots were kept
    save_checkpoint(state, run / CHECKPOINT_NAME)
    status, out, err = run_cli("plot", str(run))
    assert status == 0, err
    assert err.strip().splitlines() == ["note: no training.gif: it was trained before runs kept a snapshot of each epoch"]
    assert not (run / "training.gif").exists() and (run / "reconstructions.png").exists()


def test_vector_data_keep_no_snapshots_and_plot_says_why(tmp_path, run_cli):
    rng = np.random.default_rng(0)
    vectors = tmp_path / "vectors.npy"
    np.save(vectors, (rng.normal(size=(120, 3)) @ rng.normal(size=(3, 10))).astype(np.float32))
    run = tmp_path / "run"
    status, _, err = run_cli("train", "--data", str(vectors), *TINY, "--likelihood", "gaussian_learned", "--set",
                          "data.binarize=none", "--epochs", "1", "--tensorboard", "--out", str(run))
    assert status == 0, err
    assert load_checkpoint(run)["snapshots"] is None
    accumulator = assert_events_match_metrics(run, 1)  # the scalars, and no image grids of vectors
    assert accumulator.Tags()["images"] == []
    status, _, err = run_cli("plot", str(run))
    assert status == 0, err
    assert "note: no training.gif: its data are vectors" in err and not (run / "training.gif").exists()


def _assert_same_snapshots(a: dict, b: dict):
    assert torch.equal(a["inputs"], b["inputs"])
    assert [f["epoch"] for f in a["frames"]] == [f["epoch"] for f in b["frames"]]
    for ours, theirs in zip(a["frames"], b["frames"]):
        assert torch.equal(ours["reconstructions"], theirs["reconstructions"])
        assert torch.equal(ours["samples"], theirs["samples"])


def test_snapshots_of_a_resumed_run_equal_an_uninterrupted_one(tmp_path, splits, tiny_config):
    config = tiny_config.replace(**{"train.epochs": 3})
    fit(config, splits, tmp_path / "whole", progress=False)
    fit(config.replace(**{"train.epochs": 1}), splits, tmp_path / "parts", progress=False)
    fit(config, splits, tmp_path / "parts", checkpoint=load_checkpoint(tmp_path / "parts"), progress=False)
    whole = load_checkpoint(tmp_path / "whole")["snapshots"]
    _assert_same_snapshots(load_checkpoint(tmp_path / "parts")["snapshots"], whole)
    assert [f["epoch"] for f in whole["frames"]] == [1, 2, 3]


def test_a_run_saved_without_snapshots_animates_from_where_it_resumed(tmp_path, splits, tiny_config):
    config = tiny_config.replace(**{"train.epochs": 3})
    fit(config.replace(**{"train.epochs": 1}), splits, tmp_path, progress=False)
    state = load_checkpoint(tmp_path)
    del state["snapshots"]
    save_checkpoint(state, tmp_path / CHECKPOINT_NAME)
    fit(config, splits, tmp_path, checkpoint=load_checkpoint(tmp_path), progress=False)
    assert [f["epoch"] for f in load_checkpoint(tmp_path)["snapshots"]["frames"]] == [2, 3]


def test_tensorboard_and_snapshots_change_no_number(tmp_path, splits, tiny_config, monkeypatch):
    plain = fit(tiny_config, splits, tmp_path / "plain", progress=False)
    watched = fit(tiny_config.replace(**{"train.tensorboard": True}), splits, tmp_path / "watched", progress=False)
    without_run = fit(tiny_config, splits, progress=False)
    monkeypatch.setattr(Monitor, "observe", lambda self, vae, record: None)  # no snapshot either
    unwatched = fit(tiny_config, splits, tmp_path / "unwatched", progress=False)
    for result in (watched, without_run, unwatched):
        for name, value in plain.vae.state_dict().items():
            assert torch.equal(value, result.vae.state_dict()[name]), name  # bit for bit
        assert [r["val_elbo"] for r in result.history] == [r["val_elbo"] for r in plain.history]
    _assert_same_snapshots(load_checkpoint(tmp_path / "watched")["snapshots"],
                           load_checkpoint(tmp_path / "plain")["snapshots"])


def test_a_snapshot_is_fixed_inputs_and_fixed_prior_draws_and_draws_nothing(tmp_path, splits, tiny_config):
    result = fit(tiny_config, splits, tmp_path, progress=False)
    vae, snapshots = result.vae, load_checkpoint(tmp_path)["snapshots"]
    val = prepare(splits.val, tiny_config.data.binarize).images  # as the model sees them: binarized once
    assert torch.equal(snapshots["inputs"], to_uint8(val[:SNAPSHOT_IMAGES]))
    last = snapshots["frames"][-1]
    assert torch.equal(last["reconstructions"], to_uint8(vae.reconstruct(val[:SNAPSHOT_IMAGES])))
    with seeded(tiny_config.train.seed):
        z = vae.prior().sample((SNAPSHOT_SAMPLES,))
    assert torch.equal(last["samples"], to_uint8(vae.decode(z).mean))
    assert last["reconstructions"].dtype == torch.uint8
    assert last["samples"].shape == (SNAPSHOT_SAMPLES, *splits.val.image_shape)

    monitor = Monitor(val, seed=tiny_config.train.seed)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with monitor:
        monitor.observe(vae, {"epoch": 1})
    assert torch.equal(torch.get_rng_state(), before)



def test_validation_terms_split_the_one_sample_elbo(splits, tiny_config):
    vae = build_vae(tiny_config.model, splits.val.image_shape).eval()
    images = prepare(splits.val, tiny_config.data.binarize).images
    terms = validation_terms(vae, images, seed=5)
    assert terms == validation_terms(vae, images, seed=5)  # the seed decides the draws
    with seeded(5):  # the same one draw of z per image, as one batch
        elbo = elbo_per_image(vae, images).mean().item()
    assert terms["reconstruction"] - terms["kl"] == pytest.approx(elbo, rel=1e-5)
    activity = vae.encode(images).mean.var(0)
    assert terms["active_units"] == int((activity > ACTIVE_UNIT_THRESHOLD).sum())


def test_a_full_disk_while_writing_events_keeps_the_last_checkpoint(tmp_path, splits, tiny_config, monkeypatch):
    import errno

    from torch.utils.tensorboard import SummaryWriter

    from pyro_vae.checkpoint import DiskFullError

    real = SummaryWriter.add_scalar

    def full_at_epoch_2(self, tag, value, step, *args, **kwargs):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tag, value, step, *args, **kwargs)

    def close_on_a_full_disk(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full_at_epoch_2)
    monkeypatch.setattr(SummaryWriter, "close", close_on_a_full_disk)
    with pytest.raises(DiskFullError, match="the checkpoint of epoch 1 is intact"):
        fit(tiny_config.replace(**{"train.tensorboard": True}), splits, tmp_path, progress=False)
    assert load_checkpoint(tmp_path)["epoch"] == 1
