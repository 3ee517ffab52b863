"""Seconds per MNIST epoch: hand-written PyTorch vs a minimal Pyro SVI loop vs ``pyro_vae.fit``.

All three train the same 784-400-50 MLP VAE (one hidden layer of 400 units in the encoder
and the decoder, ReLU) with Adam at lr 1e-3 and batch size 256, on the same preloaded
tensor of the 50,000 training images, dynamically binarized per batch the same way
(``pyro_vae.data.binarize_fast``: uniform < grey, which pyro_vae's loop uses). They run alternately
(plain, svi, pyro_vae, plain, ...), so a change in the machine's load hits all of them, and
the script prints the median epoch time of each and its ratio to plain PyTorch.

    python benchmarks/speed.py --data-dir ../shared/data --rounds 5

Run it on an otherwise idle machine: with 2 cores, anything else running skews the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn
from torch.nn import functional as F

import pyro_vae
from pyro_vae.data import binarize_fast


class PlainVAE(nn.Module):
    """The reference: a VAE written directly in PyTorch (Kingma & Welling 2014, appendix B)."""

    def __init__(self, x_dim: int, hidden_dim: int, z_dim: int):
        super().__init__()
        self.enc = nn.Linear(x_dim, hidden_dim)
        self.enc_loc = nn.Linear(hidden_dim, z_dim)
        self.enc_scale = nn.Linear(hidden_dim, z_dim)
        self.dec = nn.Sequential(nn.Linear(z_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, x_dim))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Negative ELBO summed over the batch, with the KL to N(0, I) in closed form."""
        x = x.flatten(1)
        h = F.relu(self.enc(x))
        loc, scale = self.enc_loc(h), F.softplus(self.enc_scale(h)) + 1e-5
        z = loc + scale * torch.randn_like(loc)
        reconstruction = F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="sum")
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1).sum() - scale.log().sum()
        return reconstruction + kl


def plain_epoch(vae, optimizer, images, batch_size, generator) -> float:
    started = time.perf_counter()
    order = torch.randperm(len(images), generator=generator)
    for begin in range(0, len(images), batch_size):
        x = binarize_fast(images[order[begin : begin + batch_size]], generator)
        loss = vae.loss(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # the same host sync as the other loops, which log the loss
    return time.perf_counter() - started


def minimal_svi_epoch(svi, images, batch_size, generator) -> float:
    """The loop of Pyro's examples/vae/vae.py: SVI with pyro.optim.Adam and Trace_ELBO."""
    started = time.perf_counter()
    order = torch.randperm(len(images), generator=generator)
    for begin in range(0, len(images), batch_size):
        x = binarize_fast(images[order[begin : begin + batch_size]], generator)
        svi.step(x)
    return time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: $PYRO_VAE_DATA)")
    parser.add_argument("--rounds", type=int, default=5, help="epochs of each contender (default 5)")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)

    splits = pyro_vae.load_splits("mnist", args.data_dir)
    images = splits.train.images.contiguous()
    x_dim = images[0].numel()
    config = pyro_vae.load_config(None, {
        "model.z_dim": 50, "model.hidden_dim": 400, "model.num_layers": 1, "model.arch": "mlp",
        "train.batch_size": args.batch_size, "train.lr": 1e-3, "train.epochs": 1,
        "objective.elbo": "mc", "data.binarize": "dynamic",
    })
    torch.manual_seed(0)
    plain = PlainVAE(x_dim, 400, 50)
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3)

    svi_vae = pyro_vae.build_vae(config.model, splits.train.image_shape)
    pyro.clear_param_store()
    svi = SVI(svi_vae.model, svi_vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())

    generator = torch.Generator().manual_seed(0)
    times = {"plain PyTorch": [], "minimal Pyro SVI": [], "pyro_vae.fit": []}
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} threads, "
          f"{len(images)} images, batch {args.batch_size}")
    for round_ in range(args.rounds):
        times["plain PyTorch"].append(plain_epoch(plain, plain_optimizer, images, args.batch_size, generator))
        times["minimal Pyro SVI"].append(minimal_svi_epoch(svi, images, args.batch_size, generator))
        # The real training loop, one epoch; "seconds" is its training time without validation.
        result = pyro_vae.fit(config.replace(**{"train.seed": round_}), splits, progress=False)
        times["pyro_vae.fit"].append(result.history[0]["seconds"])
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)

    reference = statistics.median(times["plain PyTorch"])
    print(f"\n{'':18} {'median s/epoch':>15} {'ratio':>7}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:18} {median:15.3f} {median / reference:7.3f}")


if __name__ == "__main__":
    main()
