"""``benchmarks/recipe.py``, the ablation at equal wall-clock time: every row it would train is a
config the package accepts, and a table gathered over sessions keeps to one machine and one K
(nothing here trains)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pyro_vae.config import load_config
from pyro_vae.model import check_model_fits

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "recipe.py"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("recipe_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(recipe):
    return [(base, key) for base, (_, rows) in recipe.BASES.items() for key in rows]


def test_every_row_is_a_valid_config(recipe):
    rows = _rows(recipe)
    assert len(rows) == len(recipe.LONG_ROWS) + len(recipe.HIERARCHICAL_ROWS) >= 2
    for base, key in rows:
        path, table = recipe.BASES[base]
        config = load_config(path, table[key][1])  # validated as `pyro-vae train --set` would
        check_model_fits(config.model, (1, 28, 28))
        # each row but the first changes what it says it changes
        for name, value in table[key][1].items():
            section, field = name.split(".")
            if name == "model.z_dims" and len(value) == 1:  # one layer is the plain VAE's z_dim
                name, field, value = "model.z_dim", "z_dim", value[0]
            assert getattr(getattr(config, section), field) == value, (key, name)
    for _, table in recipe.BASES.values():
        assert next(iter(table.values()))[1] == {}, "the first row is the config as it ships"


def _row(folder: Path, key: str, machine: dict, log_likelihood: float, num_samples: int = 5000) -> None:
    (folder / key).mkdir(parents=True)
    (folder / key / "recipe.json").write_text(json.dumps({
        "change": f"row {key}", "epochs": 10, "train_minutes": 1.0, "budget_minutes": 1.0, "test_elbo": -90.0,
        "test_log_likelihood": log_likelihood, "num_samples": num_samples, "num_images": 10000, "machine": machine}))


def test_report_tables_the_finished_rows_and_names_the_rest(recipe, tmp_path, capsys):
    machine = recipe.this_machine()
    _row(tmp_path, "hierarchical", machine, -82.0)
    _row(tmp_path, "ladder", machine, -82.5)
    keys = list(recipe.HIERARCHICAL_ROWS)
    recipe.report(tmp_path, keys, 5000)
    out = capsys.readouterr().out
    assert "| row hierarchical | 10 | 1.0 | -90.00 | -82.00 | +0.00 |" in out
    assert "| row ladder | 10 | 1.0 | -90.00 | -82.50 | -0.50 |" in out
    missing = [key for key in keys if key not in ("hierarchical", "ladder")]
    assert out.strip().splitlines()[-1] == "still to run: " + " ".join(missing)
    assert recipe.reused_row(tmp_path / "ladder" / "recipe.json", machine)["test_log_likelihood"] == -82.5


def test_rows_of_another_machine_or_another_k_are_refused(recipe, tmp_path):
    machine = recipe.this_machine()
    other = dict(machine, cpu="another CPU")
    _row(tmp_path, "hierarchical", machine, -82.0)
    _row(tmp_path, "ladder", other, -82.5)
    with pytest.raises(SystemExit, match="measured on 2 machines"):
        recipe.report(tmp_path, list(recipe.HIERARCHICAL_ROWS), 5000)
    with pytest.raises(SystemExit, match="rows at the same time compare only on the same machine"):
        recipe.reused_row(tmp_path / "ladder" / "recipe.json", machine)
    assert recipe.reused_row(tmp_path / "no_row" / "recipe.json", machine) is None
    with pytest.raises(SystemExit, match="K = 1000"):  # scored with K = 5000, not the K asked for
        recipe.report(tmp_path, ["hierarchical"], 1000)


def test_report_without_the_first_row_compares_nothing(recipe, tmp_path, capsys):
    _row(tmp_path, "ladder", recipe.this_machine(), -82.5)
    recipe.report(tmp_path, ["hierarchical", "ladder"], 5000)
    out = capsys.readouterr().out
    assert "hierarchical, the row the others are compared with, has not run" in out
    assert "|" not in out
    assert out.strip().splitlines()[-1] == "still to run: hierarchical"


@pytest.mark.parametrize("name", ["hierarchical", "hierarchical_repeat"])
def test_the_committed_ablation_rows_compare(recipe, capsys, name):
    """The rows kept in benchmarks/ablation (the table gathered over sessions, and a second run of
    the config beside its last row) are rows of the table, from one machine, scored with one K:
    ``--report`` tables them without refusing."""
    folder = SCRIPT.parent / "ablation" / name
    kept = sorted(path.parent.name for path in folder.glob("*/recipe.json"))
    assert kept and set(kept) <= set(recipe.HIERARCHICAL_ROWS)
    recipe.report(folder, list(recipe.HIERARCHICAL_ROWS), 5000)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + len(kept)  # the header and one line a kept row
