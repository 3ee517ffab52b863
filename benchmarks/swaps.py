"""Swapping prior, likelihood and beta by config alone, at one equal epoch budget.

Trains each shipped config (with ``--epochs`` epochs), evaluates it on the 10,000 test
images with K importance samples, and prints three tables: the priors on dynamically
binarized MNIST, the grey-pixel likelihoods, and beta against reconstruction and KL (a
rate-distortion table). Also writes ``OUT/grey_samples.png``: samples of the two grey-pixel
models side by side. Finished runs are reused and interrupted ones resume, so an interrupted sweep continues.

    python benchmarks/swaps.py --data-dir ../shared/data --epochs 40 --num-samples 1000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import pyro_vae
from pyro_vae.data import prepare
from pyro_vae.plotting import plot_image_panels

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# name -> (shipped config, overrides besides the epoch budget)
RUNS = {
    "standard_normal": ("default.toml", {}),
    "mixture": ("mixture_prior.toml", {}),
    "vamp": ("vamp_prior.toml", {}),
    "continuous_bernoulli": ("continuous_bernoulli.toml", {}),
    "gaussian_learned": ("gaussian_learned.toml", {}),
    "beta_0.5": ("default.toml", {"objective.beta": 0.5}),
    "beta_4": ("beta_vae.toml", {}),
}


def run_one(name, out, splits_for, epochs, num_samples):
    run_dir = out / name
    result_path = run_dir / f"evaluation_k{num_samples}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    file, overrides = RUNS[name]
    config = pyro_vae.load_config(CONFIGS / file, {**overrides, "train.epochs": epochs})
    splits = splits_for(config.data.dataset)
    started = time.perf_counter()
    # an interrupted sweep continues each run from its checkpoint
    checkpoint = pyro_vae.load_checkpoint(run_dir) if (run_dir / "checkpoint.pt").exists() else None
    fit_result = pyro_vae.fit(config, splits, run_dir=run_dir, checkpoint=checkpoint, progress=False)
    if not fit_result.completed:  # Ctrl-C or SIGTERM: the state is saved, nothing to evaluate
        raise SystemExit(f"stopped during {name}; run the same command again to continue")
    train_seconds = time.perf_counter() - started
    torch.manual_seed(0)
    test = prepare(splits.test, config.data.binarize)
    result = pyro_vae.evaluate(fit_result.vae, test.images, num_samples=num_samples)
    result.update({"run": name, "config": file, "overrides": overrides, "epochs": epochs,
                   "binarize": config.data.binarize, "likelihood": config.model.likelihood,
                   "prior": config.model.prior, "beta": config.objective.beta,
                   "train_seconds": train_seconds})
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def table(rows, columns):
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row) for _, fmt in columns) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--out", default="runs/swaps")
    args = parser.parse_args(argv)
    out = Path(args.out)
    cache = {}

    def splits_for(dataset):
        if dataset not in cache:
            cache[dataset] = pyro_vae.load_splits(dataset, args.data_dir)
        return cache[dataset]

    results = {name: run_one(name, out, splits_for, args.epochs, args.num_samples) for name in RUNS}
    k = args.num_samples
    print(f"\n{args.epochs} epochs each, test set of 10,000 images, K = {k}\n")
    print(table([results[n] for n in ("standard_normal", "mixture", "vamp")], [
        ("prior", lambda r: f"`{r['prior']}`"),
        ("test log-likelihood", lambda r: f"{r['test_log_likelihood']:.2f}"),
        ("test ELBO", lambda r: f"{r['test_elbo']:.2f}"),
    ]))
    print()
    print(table([results[n] for n in ("continuous_bernoulli", "gaussian_learned")], [
        ("likelihood (grey pixels)", lambda r: f"`{r['likelihood']}`"),
        ("test log-likelihood", lambda r: f"{r['test_log_likelihood']:.2f}"),
        ("test ELBO", lambda r: f"{r['test_elbo']:.2f}"),
    ]))
    print()
    print(table([results[n] for n in ("beta_0.5", "standard_normal", "beta_4")], [
        ("beta", lambda r: f"{r['beta']:g}"),
        ("reconstruction E[log p(x|z)]", lambda r: f"{r['test_reconstruction']:.2f}"),
        ("KL(q(z|x) || p(z))", lambda r: f"{r['test_kl']:.2f}"),
        ("ELBO (beta = 1)", lambda r: f"{r['test_elbo']:.2f}"),
        ("test log-likelihood", lambda r: f"{r['test_log_likelihood']:.2f}"),
    ]))

    torch.manual_seed(0)
    figure = plot_image_panels({
        f"{name}: mean of p(x|z), z ~ p(z)": pyro_vae.load_run(out / name).sample_images(64)
        for name in ("continuous_bernoulli", "gaussian_learned")
    })
    figure.savefig(out / "grey_samples.png", dpi=100)
    print(f"\nwrote {out / 'grey_samples.png'}")


if __name__ == "__main__":
    main()
