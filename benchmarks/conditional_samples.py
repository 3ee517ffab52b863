"""Does a conditional run draw the class it is asked for? The share of its class-conditional
samples that an independent classifier, which never saw a generated image, puts in that class.

The judge is a small conv net (two 5x5 convolutions of 32 and 64 channels, each with 2x2 max
pooling, then 128 ReLU units), trained with Adam (lr 1e-3, batches of 128, ``--judge-epochs``
passes, seed ``--seed``) on the run's own training split as grey levels: the real images the
VAE learnt from. Its accuracy on the real test images is printed first, so a reader can weigh
its verdicts. Then ``--per-class`` items of each class are drawn from the run as ``pyro-vae
sample --label`` draws them (``sample_images``: the means of p(x|z,y), z from the prior), and
the judge's verdicts are counted, per class and overall; the same for binary images drawn
from those means (the model's own samples of x, noisier than the means a figure shows).

    python benchmarks/conditional_samples.py runs/conditional --data-dir ../shared/data

A few minutes on 2 cores (the judge's three epochs are most of it).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F

from pyro_vae import load_data, load_run
from pyro_vae.labelled import LabelledVAE
from pyro_vae.seeding import seeded


def judge_network(channels: int, size: int, num_classes: int) -> nn.Module:
    """The classifier that judges the samples: LeNet-like, for ``size`` x ``size`` images."""
    pooled = size // 4  # two 2x2 poolings, the convolutions padded to keep the size
    return nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * pooled * pooled, 128), nn.ReLU(), nn.Linear(128, num_classes))


def train_judge(train, num_classes: int, epochs: int, seed: int) -> nn.Module:
    """The judge, trained on ``train`` (an :class:`~pyro_vae.ImageData` with labels)."""
    channels, size = train.values.shape[1], train.values.shape[-1]
    with seeded(seed):
        judge = judge_network(channels, size, num_classes)
        optimizer = torch.optim.Adam(judge.parameters(), lr=1e-3)
        for _ in range(epochs):
            order = torch.randperm(len(train))
            for begin in range(0, len(train), 128):
                rows = order[begin:begin + 128]
                loss = F.cross_entropy(judge(train[rows]), train.labels[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return judge.eval()


@torch.no_grad()
def verdicts(judge: nn.Module, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """The judge's class of each image ``(N,)``."""
    return torch.cat([judge(images[i:i + batch]).argmax(-1) for i in range(0, len(images), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a trained model.labels = 'conditional' run")
    parser.add_argument("--data-dir", default=None, help="the data root (default: PYRO_VAE_DATA, then the package's)")
    parser.add_argument("--per-class", type=int, default=1000, help="samples drawn of each class (default 1000)")
    parser.add_argument("--judge-epochs", type=int, default=3, help="the judge's passes over the training split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the judge and of the draws")
    args = parser.parse_args()

    vae = load_run(args.run_dir)
    if not isinstance(vae, LabelledVAE):
        raise SystemExit(f"{args.run_dir} is a model.labels = {vae.config.model.labels!r} run; this needs a "
                         "labelled one")
    splits = load_data(vae.config.data, args.data_dir)
    if splits.train.labels is None:
        raise SystemExit(f"{args.run_dir}'s data has no labels to train a judge with")

    start = time.perf_counter()
    judge = train_judge(splits.train, vae.num_classes, args.judge_epochs, args.seed)
    test_accuracy = (verdicts(judge, splits.test[:]) == splits.test.labels).float().mean().item()
    print(f"judge: {args.judge_epochs} epochs on {len(splits.train):,} real training images in "
          f"{time.perf_counter() - start:.0f} s; real test accuracy {100 * test_accuracy:.2f} %")

    labels = torch.arange(vae.num_classes).repeat_interleave(args.per_class)
    with seeded(args.seed):
        means = vae.sample_images(len(labels), labels=labels)
        binary = torch.bernoulli(means)
    print(f"{args.per_class} draws of each of {vae.num_classes} classes from {args.run_dir}")
    print("class | means recognised | binary draws recognised")
    print("--- | --- | ---")
    for c in range(vae.num_classes):
        rows = labels == c
        print(f"{c} | {100 * (verdicts(judge, means[rows]) == c).float().mean():.1f} % | "
              f"{100 * (verdicts(judge, binary[rows]) == c).float().mean():.1f} %")
    print(f"all | {100 * (verdicts(judge, means) == labels).float().mean():.2f} % | "
          f"{100 * (verdicts(judge, binary) == labels).float().mean():.2f} %")


if __name__ == "__main__":
    main()
