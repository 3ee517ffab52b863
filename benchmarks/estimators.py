"""Milliseconds per training step of each estimator, side by side: the loss, its backward pass
and an Adam step on one batch of binarized MNIST images, for a config's network.

The estimators run in alternating rounds (mc, stl, ..., mc, stl, ...), so a change in the
machine's load hits all of them; the script prints the median of each and its ratio to the
first. ``stl:two-pass`` is ``stl`` in the form flow guides need (the draw detached, d log w / dz
in a second backward pass through the decoder) on the same Gaussian guide, to show what the
one-pass form of the diagonal Gaussian guide saves.

    python benchmarks/estimators.py --data-dir ../shared/data --config configs/mnist_long.toml

Run it on an otherwise idle machine: with 2 cores, anything else running skews the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from unittest import mock

import torch

import pyro_vae
from pyro_vae import elbo, estimators
from pyro_vae.data import binarize_fast
from pyro_vae.model import build_vae


def make_step(vae, optimizer, x, spec: str):
    name, _, k = spec.partition(":")
    two_pass = k == "two-pass"
    estimator = elbo.make_elbo(name, 1 if two_pass or not k else int(k))

    def step():
        # the detached-draw form is what a guide without detachable parameters gets
        with mock.patch.object(estimators, "_with_detached_parameters", lambda fn: None) if two_pass else nullcontext():
            loss = estimator.differentiable_loss(vae.model_body, vae.guide_body, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: $PYRO_VAE_DATA)")
    parser.add_argument("--config", default="configs/mnist_long.toml", help="the network and batch size")
    parser.add_argument("--estimators", nargs="+", default=["mc", "stl", "stl:two-pass", "iwae:5", "iwae_dreg:5"])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
    parser.add_argument("--steps", type=int, default=40, help="steps timed per round (default 40)")
    args = parser.parse_args(argv)

    config = pyro_vae.load_config(args.config)
    splits = pyro_vae.load_splits(config.data.dataset, args.data_dir)
    generator = torch.Generator().manual_seed(0)
    x = binarize_fast(splits.train.images[: config.train.batch_size], generator)
    torch.manual_seed(0)
    vae = build_vae(config.model, tuple(x.shape[1:]))
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-5)  # small steps: the weights stay near their start
    steps = {spec: make_step(vae, optimizer, x, spec) for spec in args.estimators}
    times = {spec: [] for spec in args.estimators}
    for spec, step in steps.items():  # warm-up: allocator, first-call costs
        for _ in range(3):
            step()
    for _ in range(args.rounds):
        for spec, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[spec].append((time.perf_counter() - started) / args.steps * 1e3)
    first = statistics.median(times[args.estimators[0]])
    print(f"{config.model.arch} {config.model.hidden_dim}x{config.model.num_layers}, z_dim {config.model.z_dim}, "
          f"batch {config.train.batch_size}; median of {args.rounds} rounds of {args.steps} steps\n")
    print(f"| estimator | ms per step | ratio to {args.estimators[0]} |")
    print("| --- | --- | --- |")
    for spec, values in times.items():
        median = statistics.median(values)
        print(f"| `{spec}` | {median:.1f} | {median / first:.2f} |")


if __name__ == "__main__":
    main()
