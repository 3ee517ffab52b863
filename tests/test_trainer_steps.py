"""The trainer's parts on their own: divergence told by the numbers (never by an error's text),
the run folder's one disk guard, and the console as a callback."""

from __future__ import annotations

import errno
import json

import pytest
import torch

import pyro_vae.labelled as labelled_module
import pyro_vae.train as train_module
from pyro_vae.callbacks import CallbackList
from pyro_vae.checkpoint import CHECKPOINT_NAME, DiskFullError, RunExistsError
from pyro_vae.run_folder import METRICS_NAME, RunFolder, position
from pyro_vae.train import TrainingDiverged, fit

#: the text of Pyro's (torch's) refusal of a NaN parameter, which must not decide anything
REFUSAL = "Expected parameter loc to satisfy the constraint Real(), but found invalid values"


def _scaled_encoder(monkeypatch, factor: float) -> None:
    """Multiply every weight of the encoder ``fit`` builds by ``factor``."""
    real = train_module.build_model

    def build(*args, **kwargs):
        vae = real(*args, **kwargs)
        with torch.no_grad():
            for parameter in vae.encoder.parameters():
                parameter.mul_(factor)
        return vae

    monkeypatch.setattr(train_module, "build_model", build)


def test_finite_weights_whose_activations_overflow_are_a_divergence(splits, tiny_config, monkeypatch):
    """Every weight is finite (1e30 times its value), the encoder's output is not: Pyro refuses
    q(z|x)'s parameters, and the step is a divergence, not an error of the code."""
    _scaled_encoder(monkeypatch, 1e30)
    with pytest.raises(TrainingDiverged, match="epoch 1, step 1: a parameter of q\\(z\\|x\\) or p\\(x\\|z\\)"):
        fit(tiny_config, splits, progress=False)


def test_an_invalid_argument_with_finite_numbers_is_raised_as_it_is(splits, tiny_config, monkeypatch):
    """A ValueError with the very text of Pyro's refusal, raised by the code whatever the
    numbers, stays the ValueError it is: the message decides nothing."""
    real = labelled_module.make_elbo  # the estimator the training loss is built on

    class Failing:
        def __init__(self, estimator):
            self.estimator = estimator

        def differentiable_loss(self, *args, **kwargs):
            raise ValueError(REFUSAL)

    monkeypatch.setattr(labelled_module, "make_elbo", lambda *a, **k: Failing(real(*a, **k)))
    with pytest.raises(ValueError, match="found invalid values") as raised:
        fit(tiny_config, splits, progress=False)
    assert not isinstance(raised.value, TrainingDiverged)


def test_a_folder_that_writes_nothing(tiny_config):
    folder = RunFolder(None)
    folder.start(tiny_config, [], resuming=False)
    folder.save_epoch({"epoch": 1, "step": 0}, {"epoch": 1})
    assert not folder.writes and folder.kept() == "nothing was saved"


def test_the_run_folder_writes_config_metrics_and_checkpoint(tmp_path, tiny_config):
    folder = RunFolder(tmp_path / "run")
    folder.start(tiny_config, [{"epoch": 1}], resuming=False)
    assert folder.kept() == f"no checkpoint had been written to {tmp_path / 'run'} yet"
    folder.save_epoch({"epoch": 2, "step": 0}, {"epoch": 2})
    lines = [json.loads(line) for line in (tmp_path / "run" / METRICS_NAME).read_text().splitlines()]
    assert lines == [{"epoch": 1}, {"epoch": 2}]
    assert (tmp_path / "run" / "config.toml").is_file() and (tmp_path / "run" / CHECKPOINT_NAME).is_file()
    assert folder.kept() == f"the checkpoint of epoch 2 in {tmp_path / 'run'} is intact"
    with pytest.raises(RunExistsError):
        RunFolder(tmp_path / "run").start(tiny_config, [], resuming=False)


def test_the_disk_guard_names_the_checkpoint_that_survived(tmp_path):
    folder = RunFolder(tmp_path, checkpoint={"epoch": 3, "step": 5})
    with pytest.raises(DiskFullError, match="is full; the checkpoint of step 5 of epoch 4 is intact: .*--resume"):
        with folder.guard():
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError):  # any other error passes through as it is
        with folder.guard():
            raise PermissionError(errno.EACCES, "Permission denied")


def test_position_in_words():
    assert (position(3, 0), position(3, 7)) == ("epoch 3", "step 7 of epoch 4")


def test_the_console_prints_one_line_per_epoch(splits, tiny_config, capsys):
    result = fit(tiny_config, splits, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["epoch", str(r["epoch"])] for r in result.history]
    assert all("train_loss" in line and "val_elbo" in line and "img/s" in line for line in lines)


class Recording:
    """A callback that writes down the hooks called, in order."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __enter__(self):
        self.calls.append((self.name, "enter"))
        return self

    def __exit__(self, *exc):
        self.calls.append((self.name, "exit"))
        return False

    def epoch_begins(self, epoch, step):
        self.calls.append((self.name, "epoch_begins"))

    def step_ends(self, step, loss):
        self.calls.append((self.name, "step_ends"))

    def steps_end(self):
        self.calls.append((self.name, "steps_end"))

    def observe(self, vae, record):
        self.calls.append((self.name, "observe"))

    def epoch_ends(self, record):
        self.calls.append((self.name, "epoch_ends"))


def test_a_callback_list_calls_each_in_order_and_exits_in_reverse():
    calls = []
    with CallbackList([Recording("a", calls), Recording("b", calls)]) as callbacks:
        callbacks.observe(None, {})
    assert calls == [("a", "enter"), ("b", "enter"), ("a", "observe"), ("b", "observe"), ("b", "exit"),
                     ("a", "exit")]


def test_the_run_folder_replaces_whole_files_and_removes_what_a_killed_start_left(tmp_path, tiny_config):
    stray = [tmp_path / ".config.toml.123.tmp", tmp_path / ".metrics.jsonl.456.tmp", tmp_path / ".checkpoint.pt.x.tmp"]
    for path in stray:
        path.write_text("half a file")
    RunFolder(tmp_path).start(tiny_config, [{"epoch": 1}], resuming=True)
    assert not list(tmp_path.glob(".*.tmp"))
    assert json.loads((tmp_path / METRICS_NAME).read_text()) == {"epoch": 1}
