"""Training throughput (images per second) with 1 and N processes, each launched by torchrun.

Every setting trains the same config with ``torchrun --standalone --nproc_per_node=P -m
pyro_vae train`` and reads the images per second of the training loop (validation and
start-up excluded) from the run's ``metrics.jsonl``: the median over the epochs after the
first. Settings run alternately, so a change in the machine's load hits all of them, and
the script prints the medians side by side, with the ratio to one process.

    python benchmarks/distributed.py --data-dir ../shared/data --epochs 4 --rounds 3
    python benchmarks/distributed.py --data-dir ../shared/data --set train.batch_size=1024

The settings on a machine with C cores: one process with C threads (what ``pyro-vae
train`` does alone), one process with C / P threads, and P processes with C / P threads
each. The last two show how the data-parallel run scales per process; on 2 CPU cores no
run can be more than 2x faster than the first setting. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train_once(processes: int, threads: int, args, out: Path) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", "pyro_vae", "train", "--config", args.config, "--epochs", str(args.epochs), "--out", str(out),
        "--quiet", "--device", "cpu",
    ]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    for item in args.set:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "images_per_second": statistics.median(r["images_per_second"] for r in records[1:] or records),
        "wall_seconds": wall,
        "final_val_elbo": records[-1]["val_elbo"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2, help="P, the number of processes to compare with one")
    parser.add_argument("--data-dir")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config overrides for every run, e.g. --set train.batch_size=1024")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    per_process = max(1, cores // args.processes)
    settings = [
        (f"1 process x {cores} threads", 1, cores),
        (f"1 process x {per_process} threads", 1, per_process),
        (f"{args.processes} processes x {per_process} threads", args.processes, per_process),
    ]
    results = {name: [] for name, _, _ in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for i, (name, processes, threads) in enumerate(settings):
                out = Path(tmp) / f"round{round_}-{i}"
                results[name].append(train_once(processes, threads, args, out))
                print(f"round {round_ + 1}: {name}: {results[name][-1]['images_per_second']:.0f} img/s", flush=True)

    print(f"\n{args.config} {' '.join(args.set)}, {args.epochs} epochs per run, {args.rounds} rounds, {cores} CPU cores")
    print(f"{'setting':<30} {'images/s':>10} {'ratio':>7} {'wall s':>8} {'val ELBO':>10}")
    baseline = statistics.median(r["images_per_second"] for r in results[settings[0][0]])
    for name, _, _ in settings:
        speed = statistics.median(r["images_per_second"] for r in results[name])
        wall = statistics.median(r["wall_seconds"] for r in results[name])
        elbo = results[name][-1]["final_val_elbo"]
        print(f"{name:<30} {speed:>10.0f} {speed / baseline:>7.2f} {wall:>8.1f} {elbo:>10.2f}")


if __name__ == "__main__":
    main()
