"""Data-parallel training: the pieces in one process, then real two-process runs (gloo, torchrun).

The two-process tests start ``torchrun`` themselves, on CPU, with a time limit, and compare
with a single-process :func:`pyro_vae.fit` of the same config in this process.
"""

import json
import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.config import load_config, parse_override
from pyro_vae.data import load_splits
from pyro_vae.distributed import SharedNoise, resolve_device, setup, shard_bounds
from pyro_vae.model import LATENT
from pyro_vae.train import fit

from launch import TORCHRUN, TORCHRUN_ENV
from parts import binary_batch, small_vae

TIMEOUT = 180  # seconds for one torchrun launch; a hang fails the test instead of CI


@pytest.mark.parametrize("size", [1, 2, 7, 100, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_cover_the_batch_in_order_and_differ_by_at_most_one(size, world_size):
    bounds = [shard_bounds(size, rank, world_size) for rank in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    lengths = [end - begin for begin, end in bounds]
    assert max(lengths) - min(lengths) <= 1


def test_shared_noise_gives_each_rank_the_single_process_draws():
    """Each rank's noise is, bit for bit, its rows of the one process's noise; its z is the one
    process's z up to rounding (the encoder's matrix products over 3 rows and over 7 rows may
    round differently, e.g. on a CPU without AVX-512, so z is compared within float tolerance)."""
    vae, x = small_vae(), binary_batch()
    pyro.set_rng_seed(3)
    z = poutine.trace(vae.guide_body).get_trace(x).nodes[LATENT]["value"]
    pyro.set_rng_seed(3)
    eps = torch.randn(len(x), z.shape[-1])  # the first draw the guide makes: the whole batch's noise
    for rank in range(3):
        begin, end = shard_bounds(len(x), rank, 3)
        pyro.set_rng_seed(3)  # every rank holds the same random stream
        with SharedNoise(LATENT, begin, end, len(x)):
            site = poutine.trace(vae.guide_body).get_trace(x[begin:end]).nodes[LATENT]
        q, shard_z = site["fn"], site["value"]
        # the same computation on the same shapes, repeated: exact
        assert torch.equal(shard_z, q.mean + eps[begin:end] * q.stddev)
        torch.testing.assert_close(shard_z, z[begin:end], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator, particles", [("mc", 1), ("analytic", 1), ("mc", 3), ("iwae", 4)])
def test_shard_losses_add_up_to_the_batch_loss_and_gradient(estimator, particles, assert_shards_add_up):
    """What DDP relies on: summing the shards' losses (and gradients) gives the whole batch's."""
    vae, x = small_vae(), binary_batch()
    assert_shards_add_up(vae, x, estimator, particles)


def test_a_rank_with_an_empty_shard_scores_one_image_with_weight_zero():
    from pyro_vae.distributed import Runtime, local_part

    assert local_part(1, Runtime(rank=1, world_size=2)) == (0, 1, 0.0)
    assert local_part(1, Runtime(rank=0, world_size=2)) == (0, 1, 2.0)
    assert local_part(101, Runtime(rank=1, world_size=2)) == (51, 101, 2.0)


def test_communication_errors_are_told_from_bugs():
    from pyro_vae.distributed import is_communication_error

    gloo = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:7044: "
                        "Connection reset by peer.")
    assert is_communication_error(gloo)
    assert not is_communication_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_communication_error(ValueError("Connection"))


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="choose one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_more_processes_than_gpus_is_refused_before_nccl_starts(monkeypatch):
    # two ranks on one GPU: NCCL fails only once both have joined, with "invalid usage"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail("NCCL was started"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: pytest.fail("a GPU was claimed"))
    for name, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"2 processes on this machine but 1 GPU.*--nproc_per_node=1"):
        setup("cuda")


def test_fit_on_an_explicit_device_matches_the_default(splits, tiny_config):
    a = fit(tiny_config, splits, progress=False).history
    b = fit(tiny_config, splits, progress=False, device=torch.device("cpu")).history
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]


# ---------------------------------------------------------------- two processes, torchrun

# 1011 images in batches of 101: ten full batches (shards of 51 and 50 images) and a last
# batch of one image, so that one rank's shard is empty.
OVERRIDES = {
    "data.train_limit": 1011, "data.val_size": 500, "train.batch_size": 101, "train.epochs": 2,
    "model.hidden_dim": 64, "model.z_dim": 8,
}


def _cli_args(overrides):
    args = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


def _torchrun(*args, cwd, timeout=TIMEOUT):
    started = time.monotonic()
    result = subprocess.run([*TORCHRUN, *args], cwd=cwd, env=TORCHRUN_ENV, capture_output=True, text=True,
                            timeout=timeout)
    return result, time.monotonic() - started


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("ddp") / "run"
    # with TensorBoard, which must change no number and be written by rank 0 alone
    result, _ = _torchrun("-m", "pyro_vae", "train", *_cli_args(OVERRIDES), "--out", str(out), "--quiet",
                          "--tensorboard", "--device", "cpu", "--data-dir", str(mnist_dir), cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def mnist_subset(mnist_dir):
    return load_splits("mnist", mnist_dir, val_size=OVERRIDES["data.val_size"],
                       train_limit=OVERRIDES["data.train_limit"])


def _assert_same_parameters(state, vae):
    for name, value in vae.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=f"parameter {name}")


@pytest.mark.mnist
def test_two_processes_take_the_steps_of_one(two_process_run, mnist_subset):
    config = load_config(None, OVERRIDES)
    single = fit(config, mnist_subset, progress=False)
    state = load_checkpoint(two_process_run)
    assert state["step"] == 0 and state["epoch"] == 2  # 22 steps, the last with an empty shard
    _assert_same_parameters(state["model"], single.vae)
    for ours, theirs in zip(state["history"], single.history):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert ours["val_elbo"] == pytest.approx(theirs["val_elbo"], abs=2.0)  # different noise per shard
    # only rank 0 wrote the run folder: one metrics line per epoch
    assert len((two_process_run / "metrics.jsonl").read_text().splitlines()) == 2


#: A two-layer model with a KL weight per layer and warm-up (the first epoch masks both layers).
LAYERED = {**OVERRIDES, "model.z_dims": "[8, 4]", "objective.betas": "[1.0, 0.5]", "objective.beta_schedule": "warmup",
           "objective.beta_epochs": 1, "train.epochs": 2}


@pytest.mark.mnist
@pytest.mark.parametrize("inference", ["ladder", "bottom_up"])
def test_two_processes_take_the_steps_of_one_for_every_latent_layer(inference, tmp_path, mnist_dir, mnist_subset):
    """SharedNoise shares the noise of every layer, so a hierarchical model trained by two
    processes has the weights of one process's run."""
    overrides = {**LAYERED, "model.inference": inference}
    result, _ = _torchrun("-m", "pyro_vae", "train", *_cli_args(overrides), "--out", str(tmp_path / "run"), "--quiet",
                          "--device", "cpu", "--data-dir", str(mnist_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = dict(parse_override(f"{key}={value}") for key, value in overrides.items())  # as --set reads them
    single = fit(load_config(None, parsed), mnist_subset, progress=False)
    _assert_same_parameters(load_checkpoint(tmp_path / "run")["model"], single.vae)


@pytest.fixture(scope="module")
def three_epochs_in_one_process(mnist_subset):
    return fit(load_config(None, {**OVERRIDES, "train.epochs": 3}), mnist_subset, progress=False)


@pytest.mark.mnist
def test_a_two_process_checkpoint_resumes_in_one_process(two_process_run, mnist_subset, tmp_path,
                                                         three_epochs_in_one_process):
    run = Path(shutil.copytree(two_process_run, tmp_path / "run"))
    config = load_config(None, {**OVERRIDES, "train.epochs": 3, "train.tensorboard": True})
    resumed = fit(config, mnist_subset, run_dir=run, checkpoint=load_checkpoint(run), progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    _assert_same_parameters(resumed.vae.state_dict(), three_epochs_in_one_process.vae)


@pytest.mark.mnist
def test_torchrun_resume_continues_a_run(two_process_run, tmp_path, mnist_dir, mnist_subset,
                                        three_epochs_in_one_process):
    run = Path(shutil.copytree(two_process_run, tmp_path / "run"))
    result, _ = _torchrun("-m", "pyro_vae", "train", "--resume", str(run), "--epochs", "3", "--quiet",
                          "--device", "cpu", "--data-dir", str(mnist_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(run)
    assert state["epoch"] == 3
    _assert_same_parameters(state["model"], three_epochs_in_one_process.vae)
    _assert_rank_0_watched(run, state, three_epochs_in_one_process.vae, mnist_subset)


def _assert_rank_0_watched(run, state, vae, splits):
    """One TensorBoard event file per launch (rank 0's), each epoch once; the snapshots of every
    epoch, the last one those of the same model trained in one process (to a grey level)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pyro_vae.data import prepare
    from pyro_vae.monitor import SNAPSHOT_IMAGES, to_uint8

    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in accumulator.Scalars("validation/elbo")] == [r["epoch"] for r in records] == [1, 2, 3]
    assert [e.value for e in accumulator.Scalars("train/loss")] == pytest.approx([r["train_loss"] for r in records])
    frames = state["snapshots"]["frames"]
    assert [f["epoch"] for f in frames] == [1, 2, 3]
    inputs = prepare(splits.val, "dynamic").images[:SNAPSHOT_IMAGES]
    single = to_uint8(vae.reconstruct(inputs)).int()
    assert (frames[-1]["reconstructions"].int() - single).abs().max() <= 1


DYING_RANK = textwrap.dedent("""
    # Rank 1 dies (exit status 17) at its fourth step; rank 0 must stop with a clear error.
    import os, sys
    import pyro_vae.train as train
    from pyro_vae.cli import main

    batches = train.iterate_batches

    def dying(*args, **kwargs):
        for i, item in enumerate(batches(*args, **kwargs)):
            if i == 3 and os.environ["RANK"] == "1":
                os._exit(17)
            yield item

    train.iterate_batches = dying
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.mnist
def test_a_rank_that_dies_stops_the_other_with_a_clear_error(tmp_path, mnist_dir):
    script = tmp_path / "dying_rank.py"
    script.write_text(DYING_RANK)
    result, seconds = _torchrun(str(script), "train", *_cli_args(OVERRIDES), "--out", str(tmp_path / "run"),
                                "--quiet", "--device", "cpu", "--data-dir", str(mnist_dir), cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "exitcode  : 17" in result.stderr  # torchrun names the rank that died
    assert "pyro-vae: error: rank 0 of 2 lost contact with the other processes" in result.stderr
    assert seconds < 90, f"the surviving rank took {seconds:.0f} s to stop"


@pytest.mark.mnist
def test_a_stopped_torchrun_run_saves_its_state(tmp_path, mnist_dir):
    """SIGTERM to both ranks (what torchrun sends them on Ctrl-C): they stop together and save."""
    out = tmp_path / "run"
    command = [*TORCHRUN, "-m", "pyro_vae", "train", *_cli_args({**OVERRIDES, "train.epochs": 200}), "--out", str(out),
               "--quiet", "--device", "cpu", "--data-dir", str(mnist_dir)]
    process = subprocess.Popen(command, cwd=tmp_path, env=TORCHRUN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / "checkpoint.pt").exists(), "no epoch finished in 120 s"
        os.killpg(process.pid, 15)  # the launcher and both ranks, as a terminal's Ctrl-C would
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    assert "stopped; the state is saved" in stderr
    state = load_checkpoint(out)
    assert 1 <= state["epoch"] < 200
