"""Peak memory of the estimator comparison (``pyro-vae compare-elbo``) against the number of
images, for the Gaussian and the IAF guide of ``configs/mnist_best.toml``.

Each row is a fresh process that builds the model (untrained: memory depends on the shapes,
not on the weights), reads the first N binarized MNIST test images and runs
:func:`pyro_vae.compare.compare_estimators` with the default estimators (``analytic`` left out
for the IAF guide, which has no closed-form KL), one pass and two gradient draws: what a
``compare-elbo RUN --limit N`` holds at its peak. It prints the process's peak resident memory.
``--unchunked`` adds, at the smallest N only, the same run with every gradient draw in one
graph (as before ``compare.GRADIENT_CHUNK_ROWS``), to show what the chunks save; it is not run at
larger N, where it outgrew a 24 GB machine.

    python benchmarks/compare_memory.py --data-dir ../shared/data --images 100 1000 10000 --unchunked
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GUIDES = ("gaussian", "iaf")


def child(args) -> None:
    from pyro_vae.compare import DEFAULT_ESTIMATORS, GRADIENT_CHUNK_ROWS, compare_estimators
    from pyro_vae.config import load_config
    from pyro_vae.data import load_data, prepare
    from pyro_vae.model import build_vae
    from pyro_vae.seeding import seeded

    config = load_config("configs/mnist_best.toml", {"model.guide": args.guide})
    test = prepare(load_data(config.data, args.data_dir).test, config.data.binarize).images[: args.images]
    with seeded(0):
        vae = build_vae(config.model, test.shape[1:])
    estimators = [e for e in DEFAULT_ESTIMATORS if not (e == "analytic" and args.guide != "gaussian")]
    rows = 10**9 if args.unchunked else GRADIENT_CHUNK_ROWS
    started = time.perf_counter()
    compare_estimators(vae, test, estimators, repeats=1, grad_samples=2, grad_chunk_rows=rows)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"guide": args.guide, "images": len(test), "chunked": not args.unchunked,
                      "peak_rss_mb": round(peak_mb), "seconds": round(time.perf_counter() - started, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--images", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--guides", nargs="+", default=list(GUIDES), choices=GUIDES)
    parser.add_argument("--unchunked", action="store_true", help="also the unchunked form, at the smallest N")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--guide", default="gaussian", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.images = args.images[0]
        return child(args)
    runs = [(guide, n, False) for guide in args.guides for n in args.images]
    if args.unchunked:
        runs += [(guide, min(args.images), True) for guide in args.guides]
    print(f"{'guide':<9} {'images':>7} {'gradient graph':<16} {'peak RSS':>9} {'seconds':>8}")
    for guide, n, unchunked in runs:
        command = [sys.executable, __file__, "--child", "--guide", guide, "--images", str(n)]
        command += ["--data-dir", args.data_dir] if args.data_dir else []
        command += ["--unchunked"] if unchunked else []
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        how = "one per draw" if unchunked else "chunked"
        print(f"{guide:<9} {n:>7} {how:<16} {row['peak_rss_mb']:>6} MB {row['seconds']:>8}", flush=True)


if __name__ == "__main__":
    main()
