"""Where the time of ``pyro-vae evaluate --num-samples 5000`` goes, and what its chunk size costs.

The importance-sampled log-likelihood decodes K samples of z for every test image: for the
default 784-400-50 MLP and K = 5000 that is 5 x 10^7 decoder passes over the 10,000 test
images, whose matrix products are the arithmetic floor. Everything else (the elementwise passes
of log p(x|z), Pyro's checks of the logits) reads and writes the decoded chunk again, and costs
little only while that chunk stays in the CPU's caches: the chunk size is the lever.

The script times ``pyro_vae.elbo.evaluate`` on the same images and weights with each chunk
size in turn (alternating, so a change in the machine's load hits all of them), prints the
median seconds, the ratio to the package's setting and the extrapolation to 10,000 images, then
a torch profiler table of one setting. A trained run is not needed: the cost does not depend
on the weights.

    python benchmarks/evaluate.py --data-dir ../shared/data --images 200 --rounds 3

Run it on an otherwise idle machine: with 2 cores, anything else running skews the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pyro_vae import elbo, load_config, load_splits
from pyro_vae.data import prepare
from pyro_vae.model import build_vae

#: Chunk sizes compared (elements of one decoded chunk: samples x images x (pixels + z_dim)).
CHUNKS = {"2**25 (before)": 2**25, "2**23": 2**23, "2**22 (package)": elbo.MAX_CHUNK_ELEMENTS, "2**21": 2**21}


def time_evaluate(vae, images, num_samples: int, batch_size: int, max_elements: int) -> float:
    elbo.MAX_CHUNK_ELEMENTS = max_elements
    started = time.perf_counter()
    elbo.evaluate(vae, images, num_samples=num_samples, batch_size=batch_size)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: $PYRO_VAE_DATA)")
    parser.add_argument("--images", type=int, default=200, help="test images timed (default 200)")
    parser.add_argument("--num-samples", type=int, default=5000, help="K (default 5000)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per evaluate batch (its default: 100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true", help="skip the profiler table")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = load_config(None)
    splits = load_splits(config.data.dataset, args.data_dir)
    images = prepare(splits.test, config.data.binarize).images[: args.images]
    vae = build_vae(config.model, images.shape[1:]).eval()
    package_setting = elbo.MAX_CHUNK_ELEMENTS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; default MLP VAE, K = {args.num_samples}, "
          f"{len(images)} test images, batches of {args.batch_size}")
    time_evaluate(vae, images[: args.batch_size], 50, args.batch_size, package_setting)  # warm-up
    seconds = {name: [] for name in CHUNKS}
    for _ in range(args.rounds):
        for name, elements in CHUNKS.items():
            seconds[name].append(time_evaluate(vae, images, args.num_samples, args.batch_size, elements))
    elbo.MAX_CHUNK_ELEMENTS = package_setting
    reference = statistics.median(seconds["2**22 (package)"])
    print(f"{'max chunk elements':>20} {'median s':>9} {'ratio':>6} {'10,000 images':>14}")
    for name, values in seconds.items():
        median = statistics.median(values)
        minutes = median * 10_000 / len(images) / 60
        print(f"{name:>20} {median:9.2f} {median / reference:6.2f} {minutes:11.1f} min")
    if not args.no_profile:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            time_evaluate(vae, images[: args.batch_size], args.num_samples, args.batch_size, package_setting)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
