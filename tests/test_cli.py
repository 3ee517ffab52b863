"""The command line as a user runs it: a subprocess, its exit status, stdout and stderr."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pyro_vae.checkpoint import CHECKPOINT_NAME

from helpers import assert_one_line_error


def run(*args, env=None, cwd=None, timeout=600):
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pyro_vae", *args], capture_output=True, text=True,
                          env=environment, cwd=cwd, timeout=timeout)


def test_help_explains_every_flag():
    out = run("train", "--help").stdout
    for flag in ("--config", "--set", "--epochs", "--seed", "--out", "--data-dir", "--train-limit", "--resume"):
        assert flag in out
    assert "evaluate" in run("--help").stdout
    assert "--num-samples" in run("evaluate", "--help").stdout


@pytest.mark.parametrize("args, words", [
    (["--set", "model.zdim=2"], ["model.zdim", "z_dim"]),
    (["--set", "model.arch=transformer"], ["model.arch", "transformer", "mlp"]),
    (["--set", "train.lr=-1"], ["train.lr", "-1", "> 0"]),
    (["--set", "objective.beta=lots"], ["objective.beta", "lots", "number"]),
    (["--set", "nonsense"], ["section.key=value"]),
    (["--set", "data.binarize=none"], ["bernoulli", "data.binarize"]),
    (["--config", "no/such/file.toml"], ["does not exist"]),
    (["--prior", "flow"], ["model.prior", "flow", "vamp"]),
    (["--likelihood", "poisson"], ["model.likelihood", "poisson", "continuous_bernoulli"]),
    (["--beta", "-1"], ["objective.beta", "-1"]),
    (["--prior", "mixture", "--set", "model.prior_options.num_components=0"], ["num_components", ">= 1"]),
])
def test_bad_config_one_line_exit_2(tmp_path, args, words):
    assert_one_line_error(run("train", *args, "--out", str(tmp_path / "run")), *words)


def test_bad_flag_value_is_a_usage_error():
    result = run("train", "--epochs", "many")
    assert result.returncode == 2 and "--epochs" in result.stderr and "Traceback" not in result.stderr


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "nowhere"
    result = run("train", "--data-dir", str(missing), "--out", str(tmp_path / "run"))
    assert_one_line_error(result, str(missing / "MNIST" / "raw"), "train-images-idx3-ubyte")


def test_corrupted_and_truncated_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / CHECKPOINT_NAME).write_bytes(b"PK\x03\x04 truncated zip")
    assert_one_line_error(run("evaluate", str(run_dir)), "corrupted or truncated")
    assert_one_line_error(run("train", "--resume", str(run_dir)), "corrupted or truncated")
    assert_one_line_error(run("plot", str(tmp_path / "empty")), "no checkpoint")


@pytest.mark.mnist
def test_train_evaluate_plot_resume(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    env = {"PYRO_VAE_DATA": str(mnist_dir)}
    base = ["--set", "model.hidden_dim=64", "--set", "model.z_dim=2", "--set", "data.val_size=1000"]
    trained = run("train", *base, "--epochs", "1", "--train-limit", "1000", "--out", str(run_dir), "--quiet", env=env)
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout)
    assert summary["epoch"] == 1 and summary["run_dir"] == str(run_dir)

    again = run("train", *base, "--out", str(run_dir), env=env)
    assert_one_line_error(again, "already holds a run", "--resume")

    resumed = run("train", "--resume", str(run_dir), "--epochs", "2", "--quiet", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["epoch"] == 2
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2

    evaluated = run("evaluate", str(run_dir), "-k", "20", "--limit", "300", "--quiet", env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result == json.loads((run_dir / "evaluation_k20.json").read_text())
    assert result["num_images"] == 300 and result["likelihood"] == "bernoulli"
    assert result["test_log_likelihood"] >= result["test_elbo"]

    plotted = run("plot", str(run_dir), env=env)
    assert plotted.returncode == 0, plotted.stderr
    for name in ("reconstructions", "samples", "latent_space", "manifold", "training_curves"):
        assert (run_dir / f"{name}.png").stat().st_size > 1000


@pytest.mark.mnist
def test_ctrl_c_saves_and_resume_finishes(tmp_path, mnist_dir):
    """SIGINT to a running `pyro-vae train`: exit 130, a usable checkpoint, then --resume."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pyro_vae", "train", "--set", "model.hidden_dim=32", "--set", "data.val_size=500",
            "--train-limit", "2000", "--epochs", "500", "--out", str(run_dir), "--quiet"]
    env = {**os.environ, "PYRO_VAE_DATA": str(mnist_dir)}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() else "timeout"
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    epochs_done = len(metrics.read_text().splitlines())
    assert 2 <= epochs_done < 500

    resumed = run("train", "--resume", str(run_dir), "--epochs", str(epochs_done + 1), "--quiet",
                  env={"PYRO_VAE_DATA": str(mnist_dir)})
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["epoch"] == epochs_done + 1


def test_compare_elbo_bad_input(tmp_path):
    assert_one_line_error(run("compare-elbo", str(tmp_path), "--estimators", "renyi"), "renyi", "choose one of")
    assert_one_line_error(run("compare-elbo", str(tmp_path), "--estimators", "iwae:x"), "iwae:x")
    assert_one_line_error(run("compare-elbo"), "RUN_DIR", "compare-training trains")


@pytest.mark.mnist
def test_compare_elbo_on_a_run(tmp_path, mnist_dir):
    env = {"PYRO_VAE_DATA": str(mnist_dir)}
    small = ["--set", "model.hidden_dim=32", "--set", "data.val_size=500", "--set", "data.train_limit=300"]
    run_dir = tmp_path / "run"
    trained = run("train", *small, "--epochs", "1", "--out", str(run_dir), "--quiet", env=env)
    assert trained.returncode == 0, trained.stderr

    compared = run("compare-elbo", str(run_dir), "--limit", "200", "--repeats", "2", "--grad-samples", "3",
                   "--estimators", "mc", "analytic", "iwae:3", env=env)
    assert compared.returncode == 0, compared.stderr
    records = json.loads((run_dir / "elbo_comparison.json").read_text())
    assert [r["estimator"] for r in records] == ["mc", "analytic", "iwae:3"]
    assert records[2]["estimate"] > records[0]["estimate"]  # the K = 3 bound is tighter
    assert (run_dir / "elbo_comparison.csv").is_file() and (run_dir / "elbo_comparison.png").is_file()
    assert "iwae:3" in compared.stdout


def test_compare_help_shows_each_commands_own_flags():
    """compare-elbo (estimators on a run) and compare-training (a run per estimator) list only their own."""
    assert "compare-training" in run("--help").stdout
    on_a_run, training = run("compare-elbo", "--help").stdout, run("compare-training", "--help").stdout
    for flag in ("--repeats", "--grad-samples", "--limit"):
        assert flag in on_a_run and flag not in training, flag
    for flag in ("--config", "--set", "--epochs", "--out", "--num-samples"):
        assert flag in training and flag not in on_a_run, flag
    assert "--train" not in on_a_run  # the old form still runs, but is no longer offered


@pytest.mark.parametrize("args, words", [
    (["--estimators", "renyi"], ["renyi", "choose one of"]),
    (["--set", "train.lr=nan"], ["train.lr", "finite"]),
    (["--repeats", "3"], ["unrecognized arguments", "--repeats"]),  # compare-elbo's, not this command's
])
def test_compare_training_bad_input(tmp_path, args, words):
    assert_one_line_error(run("compare-training", *args, "--out", str(tmp_path / "runs")), *words)


@pytest.mark.mnist
def test_compare_training_and_its_old_form(tmp_path, mnist_dir):
    """compare-training trains once per estimator; compare-elbo --train, the form it replaces, says
    so in one line and then does the same: same seed, same numbers."""
    env = {"PYRO_VAE_DATA": str(mnist_dir)}
    small = ["--set", "model.hidden_dim=32", "--set", "data.val_size=500", "--set", "data.train_limit=300",
             "--epochs", "1", "--estimators", "mc", "iwae:2", "-k", "5", "--quiet"]
    new, old = tmp_path / "new", tmp_path / "old"
    trained = run("compare-training", *small, "--out", str(new), env=env)
    assert trained.returncode == 0, trained.stderr
    assert trained.stderr.strip() == "", trained.stderr
    records = json.loads((new / "training_comparison.json").read_text())
    assert [r["estimator"] for r in records] == ["mc", "iwae:2"]
    assert (new / "training_comparison.csv").is_file() and (new / "training_comparison.png").is_file()
    assert "iwae:2" in trained.stdout

    old_form = run("compare-elbo", "--train", *small, "--out", str(old), env=env)
    assert old_form.returncode == 0, old_form.stderr
    lines = old_form.stderr.splitlines()
    assert len(lines) == 1 and "compare-elbo --train" in lines[0] and "compare-training" in lines[0], lines

    def scores(out):  # all but the time each run took
        return [{k: v for k, v in r.items() if k != "train_seconds"}
                for r in json.loads((out / "training_comparison.json").read_text())]

    assert scores(old) == scores(new)
    assert (old / "training_comparison.csv").is_file() and (old / "training_comparison.png").is_file()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", [["train"], ["evaluate", "runs/none"]])
def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path, command):
    result = run(*command, "--device", "cuda", cwd=tmp_path)
    assert_one_line_error(result, "cuda", "no CUDA device")


def test_evaluate_refuses_torchrun(tmp_path):
    result = run("evaluate", "runs/none", cwd=tmp_path, env={"WORLD_SIZE": "2"})
    assert_one_line_error(result, "one process", "torchrun")
