"""The notebooks run top to bottom in a fresh kernel, in the small setting (PYRO_VAE_SMOKE=1).

Each is executed in memory with nbclient, in a temporary working directory; the committed
file is never written. Any cell error raises nbclient's ``CellExecutionError``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_train_svi", "02_swap_likelihood_and_prior", "03_analytic_vs_monte_carlo_elbo", "04_latent_space",
         "05_your_own_data_and_parts", "06_flow_guides", "07_labels"]
KERNEL = "python3"
#: Seconds one cell may take in the small setting (each notebook takes well under a minute).
CELL_TIMEOUT = 300


def outputs(notebook) -> list:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def test_the_notebooks_are_there():
    assert sorted(path.stem for path in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) == NAMES


def test_the_kernel_runs_this_python():
    """The notebooks must import the pyro_vae of this environment, not of another Python."""
    command = KernelManager(kernel_name=KERNEL).format_kernel_cmd()
    assert command[0] == sys.executable, f"kernel {KERNEL!r} starts {command[0]}, not {sys.executable}"


@pytest.mark.parametrize("name", NAMES)
def test_committed_outputs_are_not_from_the_small_setting(name):
    """Saved outputs, if any, come from a full run (notebooks/execute.py without --smoke)."""
    texts = [output.get("text", "") for output in outputs(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4))]
    assert not any(text.startswith("setting: smoke") for text in texts)


@pytest.mark.mnist
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_the_small_setting(name, tmp_path, mnist_dir):
    path = NOTEBOOKS / f"{name}.ipynb"
    committed = path.read_bytes()
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name=KERNEL,
                            resources={"metadata": {"path": str(tmp_path)}})  # the kernel's working directory
    env = {**os.environ, "PYRO_VAE_SMOKE": "1", "PYRO_VAE_DATA": str(mnist_dir.resolve())}
    client.execute(env=env)  # raises CellExecutionError on the first failing cell

    assert path.read_bytes() == committed
    produced = outputs(notebook)
    assert sum("image/png" in output.get("data", {}) for output in produced) >= 4, "expected the notebook's figures"
    # warnings from the package, Pyro or torch would show as stderr
    assert [output.get("text") for output in produced if output.get("name") == "stderr"] == []
    # the last cell states the setting and the time the notebook took
    last = notebook.cells[-1].outputs[-1]["text"]
    assert last.startswith("setting: smoke") and "this notebook took" in last
    assert (tmp_path / "runs" / "notebooks" / name / "smoke").is_dir()
