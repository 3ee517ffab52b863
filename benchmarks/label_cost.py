"""What a latent label costs per training image: a training step (loss, backward pass, Adam) of
the semi-supervised M2 model of a config against the unlabelled VAE of the same encoder,
decoder and likelihood, in milliseconds per image, side by side.

Contenders, on the same batch of binarized MNIST images:

- ``vae``: ``model.labels = "none"``, the same networks and z (no classifier, no y);
- ``m2, all unlabelled``: every item's y latent, handled by ``objective.labels_by`` in turn
  (``enumerate`` decodes each item once per class; the others once);
- ``m2, as trained``: the config's mix of ``train.labelled_per_batch`` labelled items (y
  observed, plus the classifier's weighted cross-entropy) and unlabelled ones, enumerated.

They run in alternating rounds, so a change in the machine's load hits all of them; the script
prints the median of each and its ratio to the VAE's.

    python benchmarks/label_cost.py --data-dir ../shared/data --config configs/semi_supervised.toml

Run it on an otherwise idle machine: with 2 cores, anything else running skews the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from pyro_vae import load_config, load_splits
from pyro_vae.config import LABELS_BY
from pyro_vae.data import binarize_fast
from pyro_vae.labelled import build_model, make_training_loss


def make_step(config, image_shape, num_classes: int, x: torch.Tensor, y: torch.Tensor):
    """One training step of ``config``'s model on ``(x, y)``, as a function of no arguments."""
    vae = build_model(config.model, image_shape, num_classes)
    loss_module = make_training_loss(vae, config.objective)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    labelled = config.model.labels != "none"

    def step():
        loss = loss_module(x, y) if labelled else loss_module(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/semi_supervised.toml")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every contender (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="steps timed in a round (default 20)")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    if config.model.labels != "semi_supervised":
        raise SystemExit(f"{args.config}: model.labels is {config.model.labels!r}; this compares a semi_supervised "
                         "model with its unlabelled VAE")
    batch = config.train.batch_size
    splits = load_splits(config.data.dataset, args.data_dir, val_size=config.data.val_size)
    num_classes = int(splits.train.labels.max()) + 1
    torch.manual_seed(0)
    x = binarize_fast(splits.train[:batch])
    image_shape = tuple(x.shape[1:])
    unlabelled = torch.full((batch,), -1)
    mixed = unlabelled.clone()
    per_batch = min(config.train.labelled_per_batch, batch - 1)
    mixed[batch - per_batch:] = splits.train.labels[batch - per_batch:batch]

    def variant(**changes):
        sections = {section: dataclasses.replace(getattr(config, section), **keys)
                    for section, keys in changes.items()}
        return dataclasses.replace(config, **sections)

    contenders = {"vae": make_step(variant(model={"labels": "none", "class_prior": False}), image_shape,
                                   num_classes, x, None)}
    for labels_by in LABELS_BY:
        contenders[f"m2 {labels_by}, all unlabelled"] = make_step(
            variant(objective={"labels_by": labels_by}), image_shape, num_classes, x, unlabelled)
    contenders[f"m2 enumerate, as trained ({per_batch} of {batch} labelled)"] = make_step(
        variant(objective={"labels_by": "enumerate"}), image_shape, num_classes, x, mixed)

    seconds = {name: [] for name in contenders}
    for step in contenders.values():  # warm-up: the first steps allocate
        for _ in range(3):
            step()
    for _ in range(args.rounds):
        for name, step in contenders.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            seconds[name].append((time.perf_counter() - start) / args.steps)

    base = statistics.median(seconds["vae"])
    print(f"{args.config}: batches of {batch}, {torch.get_num_threads()} threads, median of {args.rounds} rounds "
          f"of {args.steps} steps")
    print("contender | ms per step | ms per image | against the VAE")
    print("--- | --- | --- | ---")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name} | {1000 * median:.1f} | {1000 * median / batch:.3f} | {median / base:.2f}x")


if __name__ == "__main__":
    main()
