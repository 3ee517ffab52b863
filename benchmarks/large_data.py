"""Data of any size (issue #27): how soon training starts on a large array file, the anonymous
memory each process holds, an epoch over a file larger than the machine's memory, and the
default model's epoch.

Four measurements, each a set of fresh ``pyro-vae train`` processes started side by side in one run:

``startup``
    A 100,000-image RGB 64 x 64 ``uint8`` file (1.23 GB, made once under ``--work``) trained with
    the conv model and the continuous Bernoulli likelihood, as one process and as two torchrun
    ranks. For each: the seconds from launch to the end of the first step, and the peak
    anonymous (not file-backed) resident memory of each process (``RssAnon`` of
    ``/proc/PID/status``, sampled every 20 ms). The same command on a 1,000-image file of the
    same shape gives what the model and the libraries hold by themselves, so the difference is
    what the data costs. ``--baseline SRC`` runs the same commands with another checkout's
    ``pyro_vae`` (e.g. the commit before the data was memory-mapped) for the ratio. The epoch
    trains ``--train-limit`` images (then validates all 10,000), so each row takes a minute or two.

``larger-than-memory``
    A ``uint8`` file of ``--gigabytes`` (3 x 128 x 128 images), larger than the memory when
    above it, one epoch of a small conv network (``benchmarks/tiny_conv.py``, a plugin: one
    stride-8 convolution each way, so that reading the data, not the arithmetic, is measured),
    beside the same network on ``--in-memory`` images of the same shape read whole into memory
    (a ``.pt`` file). Reports images per second of each epoch and the peak anonymous memory.

``folder``
    ``--images`` RGB 64 x 64 PNG files (20,000 by default) decoded into the cache of
    :mod:`pyro_vae.folder_cache` by its worker processes and, for comparison, in one process;
    then a second read, which maps the cache. Seconds in all and per 1,000 images.

``default-speed``
    The default model's seconds per MNIST epoch (``configs/default.toml``) with this checkout and
    with ``--baseline``, alternating, and their ratio: MNIST is read as bytes and converted a
    batch at a time now, where it was converted whole before.

    python benchmarks/large_data.py startup --work /tmp/pyro-vae-large --baseline /tmp/old
    python benchmarks/large_data.py larger-than-memory --work /tmp/pyro-vae-large --gigabytes 30
    python benchmarks/large_data.py default-speed --baseline /tmp/old
    python benchmarks/large_data.py folder --images 20000

The files are written once and reused; delete ``--work`` afterwards (the 30 GB file is large).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
#: The command each row trains with (the issue's example), less --data and --out.
STARTUP_SETTINGS = ["--set", "model.arch=conv", "--set", "model.likelihood=continuous_bernoulli",
                    "--set", "data.binarize=none", "--epochs", "1"]
#: The child runs the CLI with the trainer's step wrapped to note when the first one ended.
CHILD = """
import sys, time
import pyro_vae.train as train
from pyro_vae.cli import main
step, marked = train._step, []
def first_step(*args, **kwargs):
    result = step(*args, **kwargs)
    if not marked:
        marked.append(time.time())
        with open(sys.argv[1], "a") as out:
            out.write(f"{marked[0]}\\n")
    return result
train._step = first_step
sys.exit(main(sys.argv[2:]))
"""


def make_array(path: Path, n: int, shape: tuple[int, ...], seed: int = 0) -> Path:
    """``n`` random ``uint8`` items of ``shape`` as an .npy file, written a block at a time
    (never held whole), unless it exists with that shape."""
    if path.exists():
        existing = np.load(path, mmap_mode="r")
        if existing.shape == (n, *shape) and existing.dtype == np.uint8:
            return path
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, *shape))
    rng = np.random.default_rng(seed)
    block = max(1, 2**28 // int(np.prod(shape)))  # 256 MB at a time
    pattern = rng.integers(0, 256, size=(block, *shape), dtype=np.uint8)
    for begin in range(0, n, block):
        end = min(n, begin + block)
        # a rolled random block: every item different, at the speed of a copy, not of a generator
        out[begin:end] = np.roll(pattern[: end - begin], begin % 9973)
    out.flush()
    del out
    return path


def _status_kib(pid: int, field: str = "RssAnon") -> int:
    """A memory field of ``/proc/PID/status`` in KiB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            children = []
        found += map(int, children)
        frontier += map(int, children)
    return found


def run_tracked(command: list[str], env: dict, cwd: Path, first_step_file: Path | None = None) -> dict:
    """Run ``command`` in ``cwd``; the peak RssAnon (MB) of each process that is a Python
    trainer, the seconds to the first step (if ``first_step_file`` is written) and in all.
    ``cwd`` must not hold a ``pyro_vae`` folder: ``python -c`` imports from the working
    folder before ``PYTHONPATH``, which would run that checkout instead of the one named."""
    started = time.time()
    # stderr to a file, not a pipe: a pipe that nobody reads until the end fills with the
    # progress bar and stops the process at a write
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    peaks: dict[int, int] = {}
    resident: dict[int, int] = {}
    while process.poll() is None:
        for pid in [process.pid, *_descendants(process.pid)]:
            peaks[pid] = max(peaks.get(pid, 0), _status_kib(pid))
            resident[pid] = max(resident.get(pid, 0), _status_kib(pid, "VmHWM"))  # the kernel's own peak
        time.sleep(0.02)
    log.seek(0)
    stderr = log.read()
    log.close()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-3000:]}")
    firsts = []
    if first_step_file is not None and first_step_file.exists():
        firsts = [float(line) for line in first_step_file.read_text().split()]
    return {"first_step_seconds": max(firsts) - started if firsts else None,
            "seconds": time.time() - started,
            # torchrun's launcher holds little; the trainers are the processes above 100 MB
            "peak_anon_mb": sorted((kib / 1024 for kib in peaks.values() if kib > 100 * 1024), reverse=True),
            "peak_rss_mb": max(resident.values(), default=0) / 1024}


def _train_command(python: str, ranks: int, marks: Path, data: Path, out: Path, extra: list[str]) -> list[str]:
    argv = ["train", "--data", str(data), "--out", str(out), "--device", "cpu", *STARTUP_SETTINGS, *extra]
    if ranks == 1:
        return [python, "-c", CHILD, str(marks), *argv]
    script = marks.with_suffix(".py")
    script.write_text(CHILD)
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", str(script),
            str(marks), *argv]


def startup(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    big = make_array(work / "faces.npy", 100_000, (3, 64, 64))
    small = make_array(work / "faces_small.npy", 1_000, (3, 64, 64))
    sources = {"this checkout": str(HERE.parent)}
    if args.baseline:
        sources["baseline"] = str(Path(args.baseline).resolve())
    print(f"{big}: {big.stat().st_size / 1e9:.2f} GB; epoch of {args.train_limit} training images, then validation")
    rows = []
    for name, source in sources.items():
        for ranks in (1, 2):
            for data in (small, big):
                with tempfile.TemporaryDirectory(dir=work) as scratch:
                    scratch = Path(scratch)
                    env = dict(os.environ, PYTHONPATH=source, OMP_NUM_THREADS=str(max(1, os.cpu_count() // ranks)))
                    limit = min(args.train_limit, 800) if data is small else args.train_limit
                    command = _train_command(sys.executable, ranks, scratch / "marks", data, scratch / "run",
                                             ["--set", f"data.train_limit={limit}"])
                    result = run_tracked(command, env, scratch, scratch / "marks")
                row = {"code": name, "ranks": ranks, "data": data.name, **result}
                rows.append(row)
                print(json.dumps(row))
    print("\ncode           ranks  start (s) big/small   anon MB big (per process)  - small  = the data's")
    for name in sources:
        for ranks in (1, 2):
            small_row, big_row = (next(r for r in rows if r["code"] == name and r["ranks"] == ranks and
                                       r["data"] == d.name) for d in (small, big))
            extra = [b - s for b, s in zip(big_row["peak_anon_mb"], small_row["peak_anon_mb"])]
            print(f"{name:14} {ranks:5}  {big_row['first_step_seconds']:6.1f} / {small_row['first_step_seconds']:4.1f}"
                  f"   {', '.join(f'{m:7.0f}' for m in big_row['peak_anon_mb'])}"
                  f"  - {', '.join(f'{m:5.0f}' for m in small_row['peak_anon_mb'])}"
                  f"  = {', '.join(f'{m:5.0f}' for m in extra)}")


def larger_than_memory(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shape = (3, 128, 128)
    n = int(args.gigabytes * 1e9) // int(np.prod(shape))
    free = shutil.disk_usage(work).free
    big = work / "large.npy"
    if not big.exists() and free < n * np.prod(shape) + 2e9:
        raise SystemExit(f"{work} has {free / 1e9:.1f} GB free; {args.gigabytes} GB are needed, and 2 GB to spare")
    started, existed = time.time(), big.exists()
    make_array(big, n, shape)
    made = "made before" if existed else f"made in {time.time() - started:.0f} s"
    print(f"{big}: {n:,} images of {shape}, {big.stat().st_size / 1e9:.1f} GB ({made}); "
          f"memory {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9:.1f} GB", flush=True)
    held = work / "held.pt"
    if not held.exists():
        import torch

        torch.save(torch.from_numpy(np.array(np.load(big, mmap_mode="r")[: args.in_memory])), held)
    settings = ["--plugin", str(HERE / "tiny_conv.py"), "--set", "model.arch=tiny_conv", "--set",
                "model.likelihood=gaussian", "--set", "data.binarize=none", "--set", "train.batch_size=256",
                "--set", "data.val_fraction=0.01", "--set", "data.test_fraction=0.01", "--epochs", "1"]
    for name, data in (("in memory (.pt, read whole)", held), ("memory-mapped (.npy)", big)):
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            out = Path(scratch) / "run"
            command = [sys.executable, "-m", "pyro_vae", "train", "--data", str(data), "--out", str(out),
                       "--device", "cpu", "--quiet", *settings]
            result = run_tracked(command, dict(os.environ, PYTHONPATH=str(HERE.parent)), Path(scratch))
            record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        print(json.dumps({"data": name, "images_per_second": record["images_per_second"],
                          "epoch_seconds": record["seconds"], **result}), flush=True)


def default_speed(args) -> None:
    """The default model's seconds per MNIST epoch, this checkout against ``--baseline``,
    alternating fresh runs so that both meet the same state of the machine."""
    sources = {"this checkout": str(HERE.parent), "baseline": str(Path(args.baseline).resolve())}
    config = str(HERE.parent / "configs" / "default.toml")
    seconds = {name: [] for name in sources}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for _ in range(args.repeats):
        for name, source in sources.items():
            with tempfile.TemporaryDirectory(dir=work) as scratch:
                out = Path(scratch) / "run"
                command = [sys.executable, "-m", "pyro_vae", "train", "--config", config, "--out", str(out),
                           "--epochs", str(args.epochs), "--quiet", "--device", "cpu"]
                run_tracked(command, dict(os.environ, PYTHONPATH=source), Path(scratch))
                epochs = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]
            seconds[name] += epochs
            print(json.dumps({"code": name, "epoch_seconds": epochs}), flush=True)
    medians = {name: float(np.median(values)) for name, values in seconds.items()}
    print(f"median seconds per epoch: this checkout {medians['this checkout']:.2f}, baseline "
          f"{medians['baseline']:.2f}; ratio {medians['this checkout'] / medians['baseline']:.3f}")


#: Each row of ``folder`` reads the folder in a fresh process and prints its seconds.
FOLDER_CHILD = """
import sys, time
import pyro_vae.folder_cache as cache
from pyro_vae.sources import read_folder
if sys.argv[3] == "in-process":
    cache.POOL_MIN_FILES = 10**9
started = time.perf_counter()
raw = read_folder(sys.argv[1], cache_dir=sys.argv[2])
print(time.perf_counter() - started, len(raw))
"""


def make_folder(folder: Path, n: int, size: int = 64) -> Path:
    """``n`` RGB PNGs of ``size`` x ``size``: smooth gradients plus noise, which compress like
    small photographs rather than like pure noise. Made once."""
    from PIL import Image

    if folder.is_dir() and len(list(folder.glob("*.png"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    for i in range(n):
        base = np.stack([x * rng.uniform(1, 4), y * rng.uniform(1, 4), (x + y) * rng.uniform(0.5, 2)], -1) % 256
        Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).save(
            folder / f"{i:06d}.png")
    return folder


def folder(args) -> None:
    """Decoding a folder of PNGs into the cache: with the worker processes, in this process, and
    the second read, which maps the cache and decodes nothing; each in a fresh process."""
    work = Path(args.work)
    images = make_folder(work / f"png{args.images}", args.images)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    for how, fresh in (("workers", True), ("in-process", True), ("second read", False)):
        cache = work / ("cache-workers" if how != "in-process" else "cache-in-process")
        if fresh:
            shutil.rmtree(cache, ignore_errors=True)
        out = subprocess.run([sys.executable, "-c", FOLDER_CHILD, str(images), str(cache), how], env=env, cwd=work,
                             capture_output=True, text=True, check=True).stdout.split()
        seconds, count = float(out[0]), int(out[1])
        print(json.dumps({"how": how, "images": count, "seconds": round(seconds, 3),
                          "seconds_per_1000": round(seconds / count * 1000, 3)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("startup")
    one.add_argument("--work", default="/tmp/pyro-vae-large")
    one.add_argument("--baseline", metavar="SRC", help="a checkout whose pyro_vae to run beside this one")
    one.add_argument("--train-limit", type=int, default=4000)
    two = commands.add_parser("larger-than-memory")
    two.add_argument("--work", default="/tmp/pyro-vae-large")
    two.add_argument("--gigabytes", type=float, default=30.0)
    two.add_argument("--in-memory", type=int, default=20_000, help="images of the in-memory comparison")
    three = commands.add_parser("default-speed")
    three.add_argument("--work", default="/tmp/pyro-vae-large")
    three.add_argument("--baseline", metavar="SRC", required=True)
    three.add_argument("--epochs", type=int, default=3)
    three.add_argument("--repeats", type=int, default=3)
    four = commands.add_parser("folder")
    four.add_argument("--work", default="/tmp/pyro-vae-large")
    four.add_argument("--images", type=int, default=20_000)
    args = parser.parse_args()
    {"startup": startup, "larger-than-memory": larger_than_memory, "default-speed": default_speed,
     "folder": folder}[args.command](args)


if __name__ == "__main__":
    main()
