"""What a final phase under another estimator gains, measured cheaply on a run already trained.

``objective.final_elbo`` trains the last epochs of a run with another estimator (for instance
``iwae_dreg`` after ``mc``). Choosing how many epochs is costly by whole runs; this continues a
trained run's weights for a few epochs under the estimator and scores the validation images
(importance-sampled log-likelihood, K samples, as ``pyro-vae evaluate --split validation``)
before and after each stage:

    python benchmarks/final_phase.py runs/mnist_hierarchical --elbo iwae_dreg --particles 5 --stages 4,12

It trains at the run's last learning rate (where the cosine schedule ends, as a final phase
would) with fresh Adam moments (a run's final phase keeps its own), on the run's training
images with its binarization. Nothing is written: the run folder is left as it was. It is a
pilot: the final phase of a whole run replaces some of its epochs of the first estimator,
which this does not measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import pyro
import torch

import pyro_vae
from pyro_vae.data import iterate_batches, load_data, prepare
from pyro_vae.labelled import make_training_loss
from pyro_vae.train import learning_rate, training_images


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a trained run folder")
    parser.add_argument("--elbo", default="iwae_dreg", help="the estimator of the phase (default iwae_dreg)")
    parser.add_argument("--particles", type=int, default=5, help="its particles (default 5)")
    parser.add_argument("--stages", default="4,12", help="epochs after which to score, ascending (default 4,12)")
    parser.add_argument("--num-samples", type=int, default=5000, help="K of the validation score (default 5000)")
    parser.add_argument("--data-dir", default=None, help="folder of the torchvision datasets (default $PYRO_VAE_DATA)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phase's draws (default 0)")
    args = parser.parse_args(argv)
    stages = [int(part) for part in args.stages.split(",")]
    if stages != sorted(stages) or stages[0] < 1:
        parser.error(f"--stages {args.stages}: epochs >= 1, ascending")

    vae = pyro_vae.load_run(args.run)
    config = vae.config
    splits = load_data(config.data, args.data_dir)
    val = prepare(splits.val, config.data.binarize)
    dynamic = config.data.binarize == "dynamic"
    train = training_images(config, splits)
    objective = dataclasses.replace(config.objective, elbo=args.elbo, num_particles=args.particles)
    loss = make_training_loss(vae, objective)
    lr = learning_rate(config, config.train.epochs - 1)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    pyro.set_rng_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    def score(epochs: int, seconds: float) -> None:
        vae.eval()
        started = time.perf_counter()
        result = pyro_vae.evaluate(vae, val, num_samples=args.num_samples)
        print(json.dumps({"epochs": epochs, "train_seconds": round(seconds, 1),
                          "val_log_likelihood": round(result["test_log_likelihood"], 3),
                          "val_elbo": round(result["test_elbo"], 3), "kl_per_layer": result.get("kl_per_layer"),
                          "eval_seconds": round(time.perf_counter() - started, 1)}), flush=True)

    print(f"{args.run}: {args.elbo} with {args.particles} particles at lr {lr:.3g}", flush=True)
    score(0, 0.0)
    done, seconds = 0, 0.0
    for stage in stages:
        vae.train()
        while done < stage:
            started = time.perf_counter()
            order = torch.randperm(len(train), generator=generator)
            for _, batch in iterate_batches(train, config.train.batch_size, generator, dynamic, order):
                value = loss(batch, beta=config.objective.beta,
                             reconstruction_weight=config.objective.reconstruction_weight)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
            done += 1
            seconds += time.perf_counter() - started
        score(done, seconds)


if __name__ == "__main__":
    main()
