"""Peak memory of every command on the shipped configs: ``train``, ``evaluate``, ``compare-elbo``
and ``plot``, each a fresh ``pyro-vae`` process, on MNIST.

For each config in ``configs/``: ``train`` for one epoch of ``--train-limit`` images (the peak of
a training run is reached in its first epoch: the data, the model, the optimizer's state and
one batch's graph, none of which grows with the epochs), then ``evaluate`` (its default K =
1000), ``compare-elbo`` (one repeat and two gradient draws: its graphs hold one pass or one draw at
a time, so its defaults, 5 repeats and 50 draws, take longer and add only the draws' gradient
vectors, 4 bytes a weight each) and ``plot`` of that run. ``--limit`` bounds the test
images of ``evaluate`` and ``compare-elbo``: their memory is bounded by their chunk sizes, not
the images (``benchmarks/compare_memory.py`` shows it for ``compare-elbo``; ``--flat`` repeats the
first config's two commands with all 10,000 images to show it here). Each row is the peak
resident set (``VmHWM``, the kernel's high-water mark) and the peak anonymous memory
(``RssAnon``) of the process, sampled every 20 ms, and its seconds.

    python benchmarks/command_memory.py --data-dir ../shared/data --flat
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from large_data import run_tracked

from pyro_vae.config import load_config

HERE = Path(__file__).resolve().parent
CONFIGS = sorted((HERE.parent / "configs").glob("*.toml"))


def measure(argv: list[str], env: dict, cwd: Path) -> dict:
    result = run_tracked([sys.executable, "-m", "pyro_vae", *argv, *(["--quiet"] if argv[0] != "plot" else [])],
                         env, cwd)
    return {"peak_rss_mb": round(result["peak_rss_mb"]), "peak_anon_mb": round(max(result["peak_anon_mb"], default=0)),
            "seconds": round(result["seconds"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("PYRO_VAE_DATA", "data"))
    parser.add_argument("--configs", nargs="*", default=[c.stem for c in CONFIGS])
    parser.add_argument("--train-limit", type=int, default=5000)
    parser.add_argument("--limit", type=int, default=1000, help="test images of evaluate and compare-elbo")
    parser.add_argument("--flat", action="store_true", help="also evaluate and compare the first config on all images")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), PYRO_VAE_DATA=str(Path(args.data_dir).resolve()))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for index, name in enumerate(args.configs):
            run = scratch / name
            config = str(HERE.parent / "configs" / f"{name}.toml")
            commands = {
                "train": ["train", "--config", config, "--out", str(run), "--epochs", "1",
                          "--set", f"data.train_limit={args.train_limit}"],
                "evaluate": ["evaluate", str(run), "--limit", str(args.limit)],
                "compare-elbo": ["compare-elbo", str(run), "--limit", str(args.limit), "--repeats", "1",
                                 "--grad-samples", "2"],
                "plot": ["plot", str(run)],
            }
            if load_config(config).model.labels == "conditional":
                # compare-elbo compares the ways of handling a latent label; a conditional
                # model observes every label, so the command refuses it (exit 2)
                del commands["compare-elbo"]
            if args.flat and index == 0:
                commands["evaluate (all 10,000)"] = ["evaluate", str(run)]
                commands["compare-elbo (all 10,000)"] = ["compare-elbo", str(run)]
            for command, argv in commands.items():
                row = {"config": name, "command": command, **measure(argv, env, scratch)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| config | command | peak RSS (MB) | peak anonymous (MB) | seconds |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['config']} | {row['command']} | {row['peak_rss_mb']:,} | {row['peak_anon_mb']:,} | "
              f"{row['seconds']} |")


if __name__ == "__main__":
    main()
