"""The training recipe one ingredient at a time, every row trained for the same wall-clock time.

Two tables (``--base``): ``long``, ``configs/mnist_long.toml`` as it ships and with one
ingredient of issue #12 added per row; and ``hierarchical``, ``configs/mnist_hierarchical.toml``
as it ships and with one of its ingredients removed (or swapped) per row, issue #26's ablation.

The package trains for a number of epochs (the learning-rate schedule spans them), so "the same
time" is set by epochs: each row first times a few hundred training images in its own setting
(``--calibration-batches`` batches), then trains for as many epochs as ``--minutes`` hold at
that speed. The measured training time of each row is printed beside its numbers, so a row that
ran longer or shorter than the budget shows it. Each trained model is evaluated on the test
images (binarized once, as ``pyro-vae evaluate`` does) with K importance samples.

    python benchmarks/recipe.py --data-dir ../shared/data --minutes 60 --num-samples 5000
    python benchmarks/recipe.py --base hierarchical --data-dir ../shared/data --out runs/ablation

A full table is ``--minutes`` times the number of rows plus the evaluations: about 9 hours for
``long`` at the defaults on a 2-core CPU. ``--rows`` picks some rows (by key); finished rows are reused
(``OUT/ROW/recipe.json``, which records the machine: a row from another CPU, thread count or
torch is refused) and an interrupted row continues from its checkpoint. Run it on an otherwise
idle machine: the budget is wall-clock time. Rows can also run two at a time, each on one core
(``OMP_NUM_THREADS=1``, each process with its own ``--rows``), so long as every row of the table
ran that way. ``--report`` trains nothing: it prints the table of the rows finished in ``--out``
and names the rows still to run. The rows of issue #26's ablation are gathered, over sessions,
in ``benchmarks/ablation/hierarchical`` (each row's ``recipe.json`` is committed, its run folder
is not); a second run of the config, trained beside the last row for the machine's run-to-run
spread, in ``benchmarks/ablation/hierarchical_repeat``:

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/recipe.py --base hierarchical --data-dir ../shared/data \
        --out benchmarks/ablation/hierarchical --rows ROW
    python benchmarks/recipe.py --base hierarchical --out benchmarks/ablation/hierarchical --report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

import pyro_vae
from pyro_vae.data import prepare

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

#: key -> (what the row changes, overrides of mnist_long.toml)
LONG_ROWS = {
    "long": ("configs/mnist_long.toml as shipped", {}),
    "59k_images": ("+ 59,000 training images (1,000 held out)", {"data.val_size": 1_000}),
    "bias_init": ("+ output bias at the logit of the mean pixel", {"model.init_output_bias": True}),
    "vamp": ("+ VampPrior, 500 pseudo-inputs", {"model.prior": "vamp", "model.prior_options": {"num_components": 500}}),
    "stl": ("+ stl gradients", {"objective.elbo": "stl"}),
    "iwae_dreg5": ("+ iwae_dreg, K = 5", {"objective.elbo": "iwae_dreg", "objective.num_particles": 5}),
    "iaf": ("+ IAF guide, 2 flows", {"model.guide": "iaf", "model.guide_options": {"num_flows": 2}}),
    "gated": ("+ gated MLP units", {"model.arch": "gated_mlp"}),
}

#: key -> (what the row changes, overrides of mnist_hierarchical.toml)
HIERARCHICAL_ROWS = {
    "hierarchical": ("configs/mnist_hierarchical.toml as shipped", {}),
    "two_layers": ("- the top layer (two latent layers, z_dims [64, 32])", {"model.z_dims": [64, 32]}),
    # a one-layer model has no inference order or networks between layers
    "one_layer": ("- the top two layers (one latent layer, z1's 64)",
                  {"model.z_dims": [64], "model.inference": "ladder", "model.layer_hidden_dim": 0}),
    "ladder": ("the ladder guide instead of bottom-up", {"model.inference": "ladder"}),
    "no_batch_norm": ("- batch normalization (the plain MLP)", {"model.arch": "mlp"}),
    "no_warmup": ("- the KL warm-up (beta = 1 from the first step)", {"objective.beta_schedule": "constant"}),
    "constant_lr": ("- the cosine learning-rate decay", {"train.lr_schedule": "constant"}),
    "no_bias_init": ("- the output bias at the logit of the mean pixel", {"model.init_output_bias": False}),
    "no_final_phase": ("- the final phase of IWAE-DReG (the ELBO to the end)",
                       {"objective.final_elbo": "", "objective.final_epochs": 0}),
}

#: --base -> (the config every row changes, its rows; the first row is the config as shipped)
BASES = {
    "long": (CONFIGS / "mnist_long.toml", LONG_ROWS),
    "hierarchical": (CONFIGS / "mnist_hierarchical.toml", HIERARCHICAL_ROWS),
}


def epochs_for(config, splits, minutes: float, calibration_batches: int) -> tuple[int, float]:
    """Epochs of ``config`` that fit in ``minutes`` here, and the seconds per epoch measured.

    A final phase (``objective.final_epochs`` under ``objective.final_elbo``) is timed apart:
    its epochs at their own speed, and the rest of the minutes filled with the first estimator's."""
    objective = config.objective
    without_phase = {"objective.final_elbo": "", "objective.final_epochs": 0}
    per_epoch = seconds_per_epoch(config.replace(**without_phase), splits, calibration_batches)
    budget, final = minutes * 60, objective.final_epochs
    if final:
        as_final = config.replace(**without_phase, **{"objective.elbo": objective.final_elbo,
                                                      "objective.num_particles": objective.final_particles})
        budget -= final * seconds_per_epoch(as_final, splits, calibration_batches)
    return final + max(1, math.floor(budget / per_epoch)), per_epoch


def seconds_per_epoch(config, splits, calibration_batches: int) -> float:
    """An epoch of ``config`` here, in seconds, from the second of two epochs over a few batches."""
    batch = config.train.batch_size
    probe = config.replace(**{"train.epochs": 2})
    data = pyro_vae.Splits(train=splits.train.head(calibration_batches * batch), val=splits.val, test=splits.test)
    history = pyro_vae.fit(probe, data, progress=False).history
    per_image = history[-1]["seconds"] / (calibration_batches * batch)  # the second epoch: warm caches
    # each epoch also scores the validation images once (about a third of a training step's work per image)
    return per_image * (len(splits.train) + len(splits.val) / 3)


def this_machine() -> dict:
    """What a row's time budget bought depends on: the CPU (its model name and whether it has
    AVX-512: with it an epoch of the hierarchical config ran 1.5 to 2.5 times as fast here, H36
    against H39 and H26 in docs/results.md), the cores and threads, torch."""
    flags, model = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and value.strip():
                model = value.strip()
            elif name.strip() == "flags":
                flags = set(value.split())
    except OSError:  # not Linux: the processor's name alone
        pass
    threads = os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads())
    return {"cpu": model, "avx512": "avx512f" in flags, "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__}


def reused_row(result_path: Path, machine: dict) -> dict | None:
    """A finished row's result, if it was measured on a machine like this one; a row from
    another machine is refused, since rows are compared at the same wall-clock time."""
    if not result_path.exists():
        return None
    result = json.loads(result_path.read_text())
    measured_on = result.get("machine")
    if measured_on != machine:
        raise SystemExit(f"{result_path} was measured on {measured_on or 'an unrecorded machine'}, this machine is "
                         f"{machine}: rows at the same time compare only on the same machine; use another --out")
    return result


def run_row(base: str, key: str, out: Path, splits_for, minutes: float, num_samples: int, test_images: int,
            calibration_batches: int) -> dict:
    row_dir = out / key
    result_path = row_dir / "recipe.json"
    machine = this_machine()
    finished = reused_row(result_path, machine)
    if finished is not None:
        return finished
    path, rows = BASES[base]
    change, overrides = rows[key]
    config = pyro_vae.load_config(path, overrides)
    splits = splits_for(config)
    run_dir = row_dir / "run"
    if (run_dir / "checkpoint.pt").exists():  # an interrupted row continues with its epochs
        checkpoint = pyro_vae.load_checkpoint(run_dir)
        epochs, per_epoch = checkpoint["config"]["train"]["epochs"], float("nan")
    else:
        checkpoint = None
        epochs, per_epoch = epochs_for(config, splits, minutes, calibration_batches)
    config = config.replace(**{"train.epochs": epochs})
    started = time.perf_counter()
    fitted = pyro_vae.fit(config, splits, run_dir=run_dir, checkpoint=checkpoint, progress=True)
    if not fitted.completed:
        raise SystemExit(f"stopped during {key}; run the same command again to continue")
    train_minutes = (time.perf_counter() - started) / 60
    torch.manual_seed(0)
    test = prepare(splits.test, config.data.binarize)
    images = test.images[:test_images] if test_images else test.images
    result = pyro_vae.evaluate(fitted.vae, images, num_samples=num_samples, seed=0, progress=True)
    result.update({"row": key, "change": change, "overrides": overrides, "epochs": epochs,
                   "calibrated_seconds_per_epoch": per_epoch, "train_minutes": train_minutes,
                   "budget_minutes": minutes, "machine": machine})
    row_dir.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{key}: {epochs} epochs, {train_minutes:.1f} min; test ELBO {result['test_elbo']:.2f}, "
          f"log-likelihood {result['test_log_likelihood']:.2f} (K = {num_samples})", flush=True)
    return result


def print_table(results: list[dict], num_samples: int) -> None:
    """The rows as a Markdown table, each against the first."""
    reference = results[0]["test_log_likelihood"]
    print(f"\n| row | epochs | training minutes | test ELBO | test log-likelihood (K = {num_samples}) | vs first row |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['change']} | {r['epochs']} | {r['train_minutes']:.1f} | {r['test_elbo']:.2f} | "
              f"{r['test_log_likelihood']:.2f} | {r['test_log_likelihood'] - reference:+.2f} |")


def report(out: Path, keys: list[str], num_samples: int) -> None:
    """The finished rows among ``keys`` in ``out`` as a table, and the rows still to run: a table
    gathered over several sessions is read without training anything. Rows measured on different
    machines, or scored with another K, are refused together."""
    finished = {key: json.loads((out / key / "recipe.json").read_text())
                for key in keys if (out / key / "recipe.json").exists()}
    missing = [key for key in keys if key not in finished]
    if keys[0] in missing:
        print(f"{keys[0]}, the row the others are compared with, has not run")
    elif finished:
        machines = {json.dumps(r["machine"], sort_keys=True) for r in finished.values()}
        if len(machines) > 1:
            raise SystemExit(f"{out}: its rows were measured on {len(machines)} machines; they do not compare")
        if {r.get("num_samples") for r in finished.values()} != {num_samples}:
            raise SystemExit(f"{out}: not every row was scored with K = {num_samples} (--num-samples)")
        first = finished[keys[0]]
        print_table(list(finished.values()), num_samples)
        print(f"\n{first['num_images']} test images; {first['budget_minutes']:g} minutes a row on {first['machine']}")
    print(f"still to run: {' '.join(missing)}" if missing else "every row has run")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: $PYRO_VAE_DATA)")
    parser.add_argument("--minutes", type=float, default=60.0, help="training time of every row (default 60)")
    parser.add_argument("--num-samples", type=int, default=5000, help="K of the evaluation (default 5000)")
    parser.add_argument("--test-images", type=int, default=0, help="first N test images (default 0: all 10,000)")
    parser.add_argument("--calibration-batches", type=int, default=40, help="batches timed per row (default 40)")
    parser.add_argument("--base", choices=list(BASES), default="long",
                        help="long: ingredients added to mnist_long; hierarchical: removed from mnist_hierarchical")
    parser.add_argument("--rows", nargs="+", default=None, help="rows to run, by key (default all of the base's)")
    parser.add_argument("--out", default="runs/recipe")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: print the table of the rows finished in --out and name those still to run")
    args = parser.parse_args(argv)
    rows = BASES[args.base][1]
    keys = args.rows or list(rows)
    unknown = [key for key in keys if key not in rows]
    if unknown:
        parser.error(f"--rows {' '.join(unknown)}: the rows of --base {args.base} are {', '.join(rows)}")
    if args.report:
        report(Path(args.out), keys, args.num_samples)
        return

    loaded = {}

    def splits_for(config):
        key = (config.data.dataset, config.data.val_size)
        if key not in loaded:
            loaded[key] = pyro_vae.load_splits(config.data.dataset, args.data_dir, val_size=config.data.val_size)
        return loaded[key]

    results = [run_row(args.base, key, Path(args.out), splits_for, args.minutes, args.num_samples, args.test_images,
                       args.calibration_batches) for key in keys]
    print_table(results, args.num_samples)
    print(f"\n{results[0]['num_images']} test images; every row trained for about {args.minutes:g} minutes "
          f"on {results[0]['machine']}")


if __name__ == "__main__":
    main()
