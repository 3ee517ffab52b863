"""``pyro-vae``: a thin command line over config -> data -> fit -> evaluate -> plot.

Commands: ``train``, ``evaluate``, ``plot``, ``sample`` (generated items of a run, as a PNG grid
or an ``.npy`` array), ``compare-elbo RUN_DIR`` (the ELBO estimators on a trained run) and
``compare-training`` (one run per estimator). Each is built by one ``_add_...``
function and run by its handler in :data:`COMMANDS`; the flags that stand for a ``--set`` are
declared once, in :data:`SHORTHANDS`.

The only module that reads ``sys.argv``, lays out run folders and exits with a status.
User errors (bad config, missing data, unusable checkpoint) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
# compare's functions are called through their module, so that a test that replaces one there
# (tests/test_bad_inputs.py traps compare_estimators and train_side_by_side) replaces it here too.
from . import compare
from .checkpoint import (CHECKPOINT_NAME, CheckpointError, DiskFullError, RunExistsError, is_disk_full, load_checkpoint,
                         load_run)
from .config import LABELS_BY, MAX_SEED, Config, ConfigError, from_dict, load_config, parse_override
from .components import has_closed_form_kl, load_plugins
from .compare import DEFAULT_ESTIMATORS, DEFAULT_TRAINING_ESTIMATORS
from .data import DATA_ENV, DataError, DataNotFoundError, check_source, load_data, prepare
from .datasets import DATASETS
from .distributed import (DEVICES, DistributedError, is_communication_error, launched_world_size, resolve_device, setup,
                          teardown)
from .elbo import evaluate
from .folder_cache import BESIDE_DATA, CACHE_ENV
from .guides import GUIDES
from .labelled import LabelledVAE, evaluate_labelled
from .model import check_model_fits, physical_memory
from .monitor import TensorBoardMissing, require_tensorboard
from .priors import PRIORS
from .seeding import seeded
from .train import METRICS_NAME, TrainingDiverged, check_data, fit, resumed_config

# Exit statuses (README, "Command line"): each says what happened without reading stderr.
EXIT_USAGE = 2  # bad input: config, flag, data folder, checkpoint
EXIT_LOST_RANK = 3  # a process of a torchrun group died or lost contact
EXIT_DIVERGED = 4  # a NaN or infinite loss, gradient or parameter: the last checkpoint is kept
EXIT_DISK_FULL = 5  # the run folder's disk is full: the last checkpoint is kept
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: the state is saved, --resume continues

#: What ``evaluate --split`` scores: the test images, or the validation images a recipe is chosen on.
EVALUATION_SPLITS = ("test", "validation")


def _integer(low: int, high: int | None = None, why: str = ""):
    """An argparse type: an integer from ``low`` to ``high``; its error names the value and the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"{text!r}: must be {allowed}{why}")
        return value

    return parse


_seed = _integer(0, MAX_SEED, " (seeds go to torch and NumPy)")


def _finite_float(text: str) -> float:
    """An argparse type: a finite number (``float()`` alone also takes nan and inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number")
    return value


def _output_folder(text: str) -> str:
    """An argparse type: a folder that exists, or can be created (no file in the way)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a folder name")
    path = Path(text)
    if path.is_symlink() and not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r} is a symbolic link to nothing; expected a folder")
    for folder in (path, *path.parents):
        if folder.exists():
            if folder == path and not folder.is_dir():
                raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a folder (new or existing)")
            if not folder.is_dir():
                raise argparse.ArgumentTypeError(f"{text!r}: {str(folder)!r} is a file, so no folder can be made in it")
            break
    return text


def _output_file(text: str) -> str:
    """An argparse type: a file that can be written: not a folder, with no file where a folder
    above it must be (missing folders are made when it is written)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a file name")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; expected a file")
    for folder in path.parents:
        if folder.exists():
            if not folder.is_dir():
                raise argparse.ArgumentTypeError(f"{text!r}: {str(folder)!r} is a file, so no file can be made in it")
            break
    return text


@dataclass(frozen=True)
class Shorthand:
    """A flag that stands for one ``--set``: ``--epochs 5`` is ``--set train.epochs=5``.

    :param flag: the flag; its value is ``args.<flag without the dashes, - as _>``.
    :param key: the config key it sets, ``"section.key"``.
    :param what: what it does: its help, before ``(shorthand for --set KEY=VALUE)``.
    :param options: its argparse options (``type``, ``metavar``, ``action``, ...).
    """

    flag: str
    key: str
    what: str
    options: dict = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser, more: str = "", hidden: bool = False) -> None:
        """Add the flag to ``parser``, ``more`` at the end of its help; ``hidden``: not in ``--help``."""
        value = self.options.get("metavar", "true")
        shown = f"{self.what} (shorthand for --set {self.key}={value}){more}"
        parser.add_argument(self.flag, help=argparse.SUPPRESS if hidden else shown, **self.options)


#: The shorthand flags, declared once: a command's builder adds those it takes, and
#: :func:`_overrides` reads back each one the command has. Each defaults to None: not given.
SHORTHANDS = {shorthand.flag: shorthand for shorthand in [
    Shorthand("--epochs", "train.epochs", "epochs to train", {"type": _integer(0), "metavar": "N"}),
    Shorthand("--seed", "train.seed", f"seed of the run, 0 to {MAX_SEED}", {"type": _seed, "metavar": "N"}),
    Shorthand("--likelihood", "model.likelihood", "p(x | z) by name", {"metavar": "NAME"}),
    Shorthand("--prior", "model.prior", "p(z) by name", {"metavar": "NAME"}),
    Shorthand("--beta", "objective.beta", "weight of the KL term", {"type": _finite_float, "metavar": "B"}),
    Shorthand("--train-limit", "data.train_limit", "train on the first N training images only",
              {"type": _integer(0), "metavar": "N"}),
    Shorthand("--tensorboard", "train.tensorboard", "write each epoch's scalars and images to RUN_DIR/tensorboard, "
              "which needs pip install 'pyro-vae[tensorboard]'", {"action": "store_true", "default": None}),
    Shorthand("--data", "data.dataset", "the data: a torchvision name (mnist, fashion_mnist, ...), a folder of "
              "images or a .npy/.npz/.pt file", {"metavar": "NAME_OR_PATH"}),
]}


def _add_device(parser) -> None:
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the model and each batch go (default auto: CUDA if available, else CPU)")


def _add_data_options(parser, data_help: str | None = None) -> None:
    """--data-dir, --cache-dir, --plugin and, with ``data_help``, --data (without: the command adds --data as a
    shorthand)."""
    parser.add_argument(
        "--data-dir", metavar="DIR",
        help=f"folder holding the torchvision datasets, e.g. MNIST/raw/... (default: ${DATA_ENV}, else ./data, where "
             "they are downloaded if missing)",
    )
    parser.add_argument(
        "--cache-dir", metavar="DIR", type=_output_folder,
        help=f"folder where a folder of images is cached, decoded, for the next runs (default: ${CACHE_ENV}, else "
             f"{BESIDE_DATA}/ inside the image folder)",
    )
    if data_help is not None:
        parser.add_argument("--data", metavar="NAME_OR_PATH", help=data_help)
    _add_plugin(parser)


def _add_plugin(parser) -> None:
    parser.add_argument("--plugin", metavar="MODULE_OR_FILE", action="append", default=[],
                        help="import a module (a name or a .py file) that registers likelihoods, priors or networks "
                             "(repeatable); a run records its plugins and loads them again")


def _add_config_options(parser, hidden: bool = False) -> None:
    """--config and --set; ``hidden``: not in ``--help``, and None unless given (compare-elbo's old form)."""
    def shown(text: str) -> str:
        return argparse.SUPPRESS if hidden else text

    parser.add_argument("--config", metavar="FILE",
                        help=shown("TOML config (default: the built-in defaults, as in configs/default.toml)"))
    parser.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=None if hidden else [],
                        help=shown("override one config key, e.g. --set model.z_dim=2 (repeatable; values are TOML "
                                   "literals or bare words)"))


_RUN_DATA_HELP = ("where the run's data is now, if its file or folder moved (it must be the same data: its "
                  "fingerprint is checked)")


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-vae`` parser: one subcommand per builder below, in the order ``--help`` lists them."""
    parser = argparse.ArgumentParser(prog="pyro-vae", description="Train and evaluate variational autoencoders with Pyro.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (_add_train, _add_evaluate, _add_compare_elbo, _add_compare_training, _add_plot, _add_sample):
        add_command(commands)
    return parser


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train", help="train a VAE from a config",
        description="Train a VAE; each epoch saves a checkpoint and a metrics line in the run folder. "
                    "Launched by torchrun (torchrun --nproc_per_node=N -m pyro_vae train ...), it trains "
                    "data-parallel on N processes.")
    _add_config_options(train)
    SHORTHANDS["--epochs"].add_to(train, "; with --resume, the total to reach")
    for flag in ("--seed", "--likelihood", "--prior", "--beta", "--train-limit", "--tensorboard"):
        SHORTHANDS[flag].add_to(train)
    SHORTHANDS["--data"].add_to(train, "; with --resume, where the run's data is now")
    train.add_argument("--out", type=_output_folder, metavar="RUN_DIR", help="run folder to create (default: runs/<config name>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    _add_device(train)
    _add_data_options(train)


def _add_evaluate(commands) -> None:
    ev = commands.add_parser("evaluate", help="test ELBO and importance-sampled log-likelihood of a run",
                             description="Print the test ELBO and log-likelihood (nats per image) as JSON and save it in the run folder.")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument("--num-samples", "-k", type=_integer(1), default=1000, metavar="K", help="importance samples per image (default 1000; papers use 5000)")
    ev.add_argument("--limit", type=_integer(0), default=0, metavar="N", help="evaluate the first N images only (default 0: all)")
    ev.add_argument("--split", choices=EVALUATION_SPLITS, default="test",
                    help="the images scored: test (default), or validation, the held-out training images a recipe "
                         "is chosen on (saved as evaluation_validation_k{K}.json)")
    ev.add_argument("--seed", type=_seed, default=0, help=f"seed of the importance samples (0 to {MAX_SEED}; default 0)")
    ev.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="score Bernoulli pixels by one compiled kernel (torch.compile; a few seconds to compile, "
                         "then faster); auto (default): on a CPU from K x images x pixels >= 2**32")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_device(ev)
    _add_data_options(ev, _RUN_DATA_HELP)


def _add_estimators(parser, defaults: tuple[str, ...]) -> None:
    # None when not given: the training comparison leaves 'analytic' out of its defaults only
    parser.add_argument("--estimators", nargs="+", metavar="NAME[:K]",
                        help=f"estimators, with K particles for iwae and iwae_dreg (default: {' '.join(defaults)})")


#: compare-elbo's defaults. Its flags default to None, so that its old form (--train) can refuse one given.
_RUN_COMPARISON_DEFAULTS = {"repeats": 5, "grad_samples": 20, "limit": 0}
#: compare-training's defaults, also filled in for compare-elbo's old form, whose copies default to None.
_TRAINING_COMPARISON_DEFAULTS = {"config": None, "set": (), "epochs": None, "out": "runs/compare-elbo",
                                 "num_samples": 1000}


def _add_compare_elbo(commands) -> None:
    ce = commands.add_parser(
        "compare-elbo", help="compare ELBO estimators on a trained run", usage="%(prog)s RUN_DIR [options]",
        description="Score each estimator on the run's test images: the estimate, its noise across repeats, "
                    "gradient variance and SNR, time per step. To train one run per estimator and compare those: "
                    "compare-training.")
    # RUN_DIR is optional to the parser only: the old form, compare-elbo --train, has none
    ce.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a trained run")
    _add_estimators(ce, DEFAULT_ESTIMATORS)
    defaults = _RUN_COMPARISON_DEFAULTS
    ce.add_argument("--repeats", type=_integer(1), metavar="R",
                    help=f"passes over the test images per estimator (default {defaults['repeats']})")
    ce.add_argument("--grad-samples", type=_integer(2, why=" (a variance needs two draws)"), metavar="M",
                    help=f"gradient draws for variance and SNR (default {defaults['grad_samples']})")
    ce.add_argument("--limit", type=_integer(0), metavar="N",
                    help=f"use the first N test images only (default {defaults['limit']}: all)")
    ce.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_data_options(ce, _RUN_DATA_HELP)
    # The old form of compare-training, still read, no longer shown; its --data is the one above.
    ce.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    _add_training_comparison_options(ce, hidden=True)


def _add_compare_training(commands) -> None:
    training = commands.add_parser(
        "compare-training", help="train a config once per estimator and compare the runs",
        description="Train one config once per estimator, with the same epochs and seed, and compare learning "
                    "curves and test log-likelihoods; each estimator trains every epoch (a config's final "
                    "phase, objective.final_elbo, is left out). It replaces compare-elbo --train.")
    _add_estimators(training, DEFAULT_TRAINING_ESTIMATORS)
    _add_training_comparison_options(training)
    SHORTHANDS["--data"].add_to(training)
    training.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_data_options(training)


def _add_training_comparison_options(parser, hidden: bool = False) -> None:
    """compare-training's own options; ``hidden``: compare-elbo's copies for its old form, not in
    ``--help``, and None unless given, so that one given without --train is refused."""
    defaults = dict.fromkeys(_TRAINING_COMPARISON_DEFAULTS) if hidden else _TRAINING_COMPARISON_DEFAULTS
    _add_config_options(parser, hidden)
    SHORTHANDS["--epochs"].add_to(parser, ", the same for every run", hidden)
    parser.add_argument("--out", type=_output_folder, metavar="DIR", default=defaults["out"],
                        help=argparse.SUPPRESS if hidden else
                        f"folder of the runs, one per estimator (default {_TRAINING_COMPARISON_DEFAULTS['out']})")
    parser.add_argument("--num-samples", "-k", type=_integer(1), metavar="K", default=defaults["num_samples"],
                        help=argparse.SUPPRESS if hidden else "importance samples of each run's final evaluation "
                        f"(default {_TRAINING_COMPARISON_DEFAULTS['num_samples']})")


def _add_plot(commands) -> None:
    plot = commands.add_parser(
        "plot", help="write the figures of a run as PNG files",
        description="Reconstructions, prior samples, latent space, manifold (2-D z), latent traversals (images) "
                    "and training curves, as PNG files in the run folder, and training.gif (images): one frame "
                    "per epoch of reconstructions and samples.")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("--embedding", choices=["pca", "tsne"], default="pca",
                      help="how a latent space of more than 2 dimensions is drawn: pca (default, fast) or tsne "
                           "(t-SNE, needs scikit-learn)")
    _add_data_options(plot, _RUN_DATA_HELP)


#: What ``sample --out`` can write, by suffix: a grid image of the items, or their array.
SAMPLE_FORMATS = {".png": "a grid image of the means", ".npy": "the float32 array (N, *image_shape)"}
#: The channel counts a PNG grid is drawn for: grey and RGB.
PNG_CHANNELS = (1, 3)


def _add_sample(commands) -> None:
    sample = commands.add_parser(
        "sample", help="write items generated by a run, as a PNG grid or an .npy array",
        description="Draw N items from a trained run: the means of p(x|z) (labelled runs: p(x|z,y)) for z from the "
                    "prior, seeded; FILE.png is a grid of them, FILE.npy their float32 array. Reads no data.")
    sample.add_argument("run_dir", metavar="RUN_DIR")
    sample.add_argument("--num", type=_integer(1), required=True, metavar="N", help="how many items to draw")
    sample.add_argument("--label", type=_integer(0), metavar="L",
                        help="a labelled run: draw every item of class L (default: the classes in turn)")
    sample.add_argument("--out", type=_output_file, required=True, metavar="FILE",
                        help="where to write them: " + "; ".join(f"{suffix}: {what}"
                                                                for suffix, what in SAMPLE_FORMATS.items()))
    sample.add_argument("--seed", type=_seed, default=0, help=f"seed of the draws (0 to {MAX_SEED}; default 0)")
    sample.add_argument("--quiet", action="store_true", help="do not print the path written")
    _add_device(sample)
    _add_plugin(sample)


def _overrides(args) -> dict:
    """``--set`` items and the shorthand flags given, as ``{"section.key": value}``.

    A key given twice with different values is refused: keeping either one would drop the
    other without a word (and without checking it).
    """
    items = [(*parse_override(item), f"--set {item}") for item in args.set]
    # train and compare-training (and compare-elbo --train) call this: each flag of theirs named like
    # a shorthand is that shorthand. evaluate's --seed is not, and never comes here.
    items += [(shorthand.key, value, f"{shorthand.flag} {value}") for shorthand in SHORTHANDS.values()
              if (value := getattr(args, shorthand.dest, None)) is not None]
    overrides, given_by = {}, {}
    for key, value, flag in items:
        if key in overrides and overrides[key] != value:
            raise ConfigError(f"{key} is given twice, by {given_by[key]} and by {flag}; give it once")
        overrides[key], given_by[key] = value, flag
    return overrides


def _first(test, limit: int, flag: str, dataset: str, split: str = "test"):
    """The first ``limit`` items of a split (all for 0), still unread (an ``ImageData``: each
    command reads them a batch at a time); more than there are is refused, not clipped."""
    if limit > len(test):
        raise ConfigError(f"{flag} {limit}: the {split} split of {dataset} has only {len(test)} images (0: all)")
    return test.head(limit) if limit else test


def _train(args) -> int:
    try:
        runtime = setup(args.device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    finished = False
    try:
        status = _train_on(runtime, args)
        finished = True
        return status
    finally:
        teardown(finished)


def _train_on(runtime, args) -> int:
    run_dir, config, checkpoint, plugins = _resumed_run(args) if args.resume else _new_run(args)
    if config.train.tensorboard:
        require_tensorboard()  # one line before the data is read, not after
    if (args.data or config.data.dataset) not in DATASETS:
        _import_while_reading("torch._dynamo")
    splits = _run_data(config, args, checkpoint)
    check_data(config, splits)  # a mismatch is one line before a model is even built
    check_model_fits(config.model, splits.train.image_shape)  # and so is a model too large for memory
    result = _fit_or_lost_contact(runtime, args, config, splits, run_dir, checkpoint, plugins)
    if not runtime.is_main:
        return 0 if result.completed else EXIT_INTERRUPTED
    if not result.completed:
        launcher = "torchrun --nproc_per_node=N -m pyro_vae" if runtime.distributed else "pyro-vae"
        print(f"stopped; the state is saved. Continue with: {launcher} train --resume {run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    last = result.history[-1] if result.history else {}
    print(json.dumps({"run_dir": str(run_dir), **last}))
    return 0


def _import_while_reading(module: str) -> None:
    """Import ``module`` on another thread while this one reads the data.

    A torch optimizer imports ``torch._dynamo`` when the first one is made: 2 s here, a third
    of the time to the first step. Fingerprinting a large file takes as long, and hashing and
    NumPy release the GIL, so on two cores the two overlap (the start of a 1.2 GB file went
    from 5.4 to about 4 s: docs/results.md). Only for files and folders: reading them imports
    nothing that imports torch, where two threads importing the same modules in another order
    could deadlock; reading a torchvision data set imports torchvision, so it is not done then.
    A failure here is left for the import that needs the module to raise."""
    def run():
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - raised again, in the main thread, where it is needed
            pass

    threading.Thread(target=run, name=f"import {module}", daemon=True).start()


def _new_run(args) -> tuple[Path, Config, None, list[str]]:
    """``train`` without --resume: the run folder, the config, no checkpoint, the plugins."""
    plugins = load_plugins(args.plugin)  # before the config: it may name what they register
    config = load_config(args.config, _overrides(args))
    run_dir = Path(args.out) if args.out else Path("runs") / (Path(args.config).stem if args.config else "default")
    if (run_dir / CHECKPOINT_NAME).exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
    _refuse_out_in_data(run_dir, config)
    return run_dir, config, None, plugins


def _refuse_out_in_data(out: Path, config: Config) -> None:
    """A run folder inside a folder of images would mix the run's files (its figures are PNGs)
    with the data: the next read of the folder would take them for images, or refuse it."""
    data = Path(config.data.dataset).expanduser()
    if config.data.dataset in DATASETS or not data.is_dir():  # a torchvision name is read under --data-dir
        return
    data, where = data.resolve(), out.expanduser().resolve()
    if where == data or data in where.parents:
        raise ConfigError(f"--out {out}: inside the data folder {config.data.dataset} (data.dataset), where the run's "
                          "files would mix with the images; choose an --out outside it")


def _resumed_run(args) -> tuple[Path, Config, dict, list[str]]:
    """``train --resume RUN_DIR``: the run folder, its config (with --epochs: the new total), its
    checkpoint, its plugins. The run keeps its config: a flag that would change it is refused."""
    changed = [s.flag for s in SHORTHANDS.values() if s.flag not in ("--epochs", "--data")
               and getattr(args, s.dest) is not None]
    if args.config or args.out or args.set or changed:
        raise ConfigError("--resume continues a run with its own config; only --epochs, --data, --data-dir, "
                          "--cache-dir and --plugin may be given with it")
    run_dir = Path(args.resume)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    plugins = _load_run_plugins(checkpoint, args)
    config = from_dict(checkpoint["config"])
    if args.epochs is not None:
        if args.epochs <= checkpoint["epoch"]:
            raise ConfigError(f"--epochs {args.epochs}: {run_dir} has already trained {checkpoint['epoch']} epochs; "
                              "give a larger total")
        config = resumed_config(config, args.epochs)
    return run_dir, config, checkpoint, plugins


def _fit_or_lost_contact(runtime, args, config, splits, run_dir: Path, checkpoint, plugins):
    """:func:`~pyro_vae.train.fit`; where another process of a torchrun group is gone, one
    :class:`DistributedError` that says so (and whether a checkpoint is there to resume)."""
    try:
        return fit(config, splits, run_dir, checkpoint=checkpoint, progress=not args.quiet, device=runtime.device,
                   plugins=plugins)
    except RuntimeError as error:
        if not (runtime.distributed and is_communication_error(error)):
            raise
        # A collective failed: another rank died or the network went. Say so in one line;
        # the traceback of a gloo/NCCL socket error tells a user nothing more.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        saved = (f"the last checkpoint in {run_dir} is intact: continue with --resume {run_dir}"
                 if (run_dir / CHECKPOINT_NAME).exists() else "no checkpoint had been written yet")
        raise DistributedError(
            f"rank {runtime.rank} of {runtime.world_size} lost contact with the other processes ({reason}); {saved}"
        ) from None


def _load_run_plugins(checkpoint: dict, args) -> list[str]:
    """Import the plugins a run recorded (or, if its files moved, the ``--plugin`` given instead)."""
    return load_plugins(args.plugin or checkpoint.get("plugins", []))


def _run_data(config, args, checkpoint: dict | None = None):
    """The data of ``config``, read from ``--data`` / ``--data-dir`` where given; for an
    existing run, checked to be the very data it trained on (its recorded fingerprint)."""
    recorded = checkpoint.get("data") if checkpoint is not None else None
    if recorded is not None and recorded.get("kind") == "tensors":
        raise DataError("this run trained on tensors handed to fit() in Python, which no command can read again; "
                        "evaluate, plot or resume it in Python (pyro_vae.evaluate, pyro_vae.fit), or train from a "
                        "file or folder (--data)")
    splits = load_data(config.data, args.data_dir, dataset=args.data, cache_dir=args.cache_dir)
    if recorded is not None:
        check_source(recorded, splits)
    return splits


def _trained_and_test(args, split: str = "test"):
    """The run's VAE and its test split (or ``split``) as it sees them (binarized once, seed 0,
    if binarized), on exactly the data the run trained on."""
    checkpoint = load_checkpoint(Path(args.run_dir) / CHECKPOINT_NAME)
    _load_run_plugins(checkpoint, args)
    vae = load_run(args.run_dir)
    config = vae.config
    splits = _run_data(config, args, checkpoint)
    return vae, config, prepare(splits.test if split == "test" else splits.val, config.data.binarize)


def _evaluate(args) -> int:
    if launched_world_size() > 1:
        raise ConfigError("evaluate runs in one process; start it without torchrun")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    vae, config, test = _trained_and_test(args, args.split)
    vae.to(device)
    images = _first(test, args.limit, "--limit", config.data.dataset, args.split)
    started = time.perf_counter()
    compiled = {"auto": None, "on": True, "off": False}[args.compile]
    if isinstance(vae, LabelledVAE):  # accuracy, and log p(x) summed over the classes
        result = evaluate_labelled(vae, images, images.labels, num_samples=args.num_samples, progress=not args.quiet,
                                   seed=args.seed)
    else:
        result = evaluate(vae, images, num_samples=args.num_samples, progress=not args.quiet, seed=args.seed,
                          compiled=compiled)
    result.update(_evaluated_how(config, args, seconds=time.perf_counter() - started))
    if args.split != "test":  # the keys keep their names, so a script reads either file alike
        result["split"] = args.split
    path = Path(args.run_dir) / f"evaluation{'' if args.split == 'test' else '_' + args.split}_k{args.num_samples}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def _evaluated_how(config, args, seconds: float) -> dict:
    """What an evaluation's numbers depend on, saved beside them: the data, the model, the seed."""
    protocol = ("grey values" if config.data.binarize == "none"
                else f"{args.split} images binarized once with seed 0 (training: {config.data.binarize} binarization)")
    return {
        "dataset": config.data.dataset,
        "likelihood": config.model.likelihood,
        "likelihood_options": config.model.likelihood_options,
        # a class prior replaces model.prior (validation keeps that at its default)
        "prior": "class_prior: a learned Gaussian p(z|y) per class" if config.model.class_prior else config.model.prior,
        "data_protocol": protocol,
        "seconds": seconds,
        "seed": args.seed,
        "compile": args.compile,
    }


def _sample(args) -> int:
    """``sample RUN_DIR``: N generated items written as a PNG grid or an .npy array; the run's
    data is never read (generation needs only the model)."""
    out = Path(args.out)
    if out.suffix.lower() not in SAMPLE_FORMATS:
        raise ConfigError(f"--out {args.out}: write a {' or a '.join(SAMPLE_FORMATS)} file (got "
                          f"{out.suffix or 'no suffix'!r})")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    checkpoint = load_checkpoint(Path(args.run_dir) / CHECKPOINT_NAME)
    _load_run_plugins(checkpoint, args)
    _refuse_png_of_non_images(out, tuple(checkpoint["image_shape"]), args.run_dir)
    _refuse_more_than_memory(args.num, tuple(checkpoint["image_shape"]))
    # building the VAE draws initial weights (the checkpoint's then replace them): from a
    # forked stream, so that a caller of main() finds its random state as it was
    with torch.random.fork_rng(devices=[]):
        vae = load_run(args.run_dir).to(device)
    labels = _sample_labels(vae, args)
    with seeded(args.seed, device):
        if labels is None:
            items = vae.sample_images(args.num)
        else:
            items = vae.sample_images(args.num, labels=labels.to(device))
    _write_samples(items.float().cpu(), out, _grid_columns(vae, args))
    if not args.quiet:
        print(out)
    return 0


#: The share of the machine's memory that ``sample``'s items may take (they are drawn at once,
#: and the decoder's activations and the file's copy need room beside them).
SAMPLE_MEMORY_SHARE = 0.25


def _refuse_more_than_memory(num: int, image_shape: tuple[int, ...]) -> None:
    """One line, rather than the allocator's traceback or the kernel's kill, for ``--num N``
    items whose float32 values alone would take more than :data:`SAMPLE_MEMORY_SHARE` of memory."""
    needed, memory = num * math.prod(image_shape) * 4, physical_memory()
    if memory and needed > SAMPLE_MEMORY_SHARE * memory:
        raise ConfigError(f"--num {num}: the items alone would take {needed / 1e9:,.1f} GB, more than a quarter of this "
                          f"machine's {memory / 1e9:,.1f} GB; draw fewer at a time (with other --seed values)")


def _refuse_png_of_non_images(out: Path, image_shape: tuple[int, ...], run_dir: str) -> None:
    """A PNG holds grey or RGB images: vectors, or images of other channel counts, go to .npy."""
    if out.suffix.lower() != ".png":
        return
    if len(image_shape) == 1:
        raise ConfigError(f"--out {out}: {run_dir} generates vectors of {image_shape[0]} features, not images; "
                          "write them as .npy")
    if image_shape[0] not in PNG_CHANNELS:
        raise ConfigError(f"--out {out}: {run_dir} generates images of {image_shape[0]} channels, which a PNG of "
                          "grey or RGB pixels cannot hold; write them as .npy")


def _sample_labels(vae, args):
    """``--label L`` as the class of every item ``(N,)``; ``None`` without it (the classes in
    turn, for a labelled run). Refused for a run without labels or a class it does not have."""
    if args.label is None:
        return None
    if not isinstance(vae, LabelledVAE):
        raise ConfigError(f"--label {args.label}: {args.run_dir} is a model.labels = {vae.config.model.labels!r} "
                          "run, whose items have no class")
    if args.label >= vae.num_classes:
        raise ConfigError(f"--label {args.label}: {args.run_dir} has {vae.num_classes} classes, 0 to "
                          f"{vae.num_classes - 1}")
    return torch.full((args.num,), args.label, dtype=torch.long)


def _grid_columns(vae, args) -> int:
    """Columns of the PNG grid: one per class where a labelled run cycles them (each column is
    then one class), else a square grid."""
    if isinstance(vae, LabelledVAE) and args.label is None:
        return min(args.num, vae.num_classes)
    return math.ceil(math.sqrt(args.num))


def _write_samples(items, out: Path, num_columns: int) -> None:
    """``items`` ``(N, *image_shape)`` to ``out``: ``.npy``, their float32 array; ``.png``, a
    grid of them, one pixel per pixel, values clipped to [0, 1] (grey or RGB images)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npy":
        np.save(out, items.numpy().astype(np.float32))
        return
    from matplotlib.image import imsave  # matplotlib: slow to import (see _plot)

    from .plotting import tile_images

    imsave(out, tile_images(items, num_columns).numpy(), cmap="gray", vmin=0, vmax=1)


# The figures come from .plotting, imported where they are drawn: it imports matplotlib, which is
# slow to import, and only plot and the two comparisons draw.


def _plot(args) -> int:
    from .plotting import LATENT_POINTS, make_figures

    vae, _, test = _trained_and_test(args)
    metrics = Path(args.run_dir) / METRICS_NAME
    history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    try:
        shown = test.head(LATENT_POINTS)  # the most any figure reads: only these are read
        figures = make_figures(vae, shown.images, shown.labels, history, embedding=args.embedding)
    except ImportError as error:  # t-SNE without scikit-learn
        raise ConfigError(f"--embedding {args.embedding}: {error}") from None
    for name, figure in figures.items():
        path = Path(args.run_dir) / f"{name}.png"
        figure.savefig(path, dpi=110)
        print(path)
    _write_training_gif(Path(args.run_dir))
    return 0


#: The animation of a run, one frame per epoch, that ``plot`` writes beside the figures.
TRAINING_GIF = "training.gif"
#: 4 frames a second: a 60-epoch run plays in 15 s, slow enough to follow one digit.
GIF_FRAMES_PER_SECOND = 4


def _write_training_gif(run_dir: Path) -> None:
    """``training.gif`` from the snapshots in the run's checkpoint, or a one-line note why not."""
    from matplotlib.animation import PillowWriter  # matplotlib: slow to import (see _plot)

    from .plotting import animate_training

    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    snapshots = state.get("snapshots")
    if snapshots is None or not snapshots["frames"]:
        why = ("its data are vectors, and the animation draws images" if len(state["image_shape"]) == 1
               else "no epoch has finished" if snapshots is not None
               else "it was trained before runs kept a snapshot of each epoch")
        print(f"note: no {TRAINING_GIF}: {why}", file=sys.stderr)
        return
    path = run_dir / TRAINING_GIF
    animate_training(snapshots, state["history"]).save(path, writer=PillowWriter(fps=GIF_FRAMES_PER_SECOND))
    print(path)


def _write_records(records: list[dict], stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(records, indent=2) + "\n")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def _print_table(records: list[dict], columns: list[str]) -> None:
    print("  ".join(f"{c:>22}" for c in columns))
    for r in records:
        print("  ".join(f"{r[c]:>22.6g}" if isinstance(r[c], float) else f"{str(r[c]):>22}" for c in columns))


def _checked_estimators(given: list[str] | None, defaults: tuple[str, ...]) -> list[str]:
    """The estimators given (None: ``defaults``); unknown or repeated ones are refused."""
    estimators = list(defaults if given is None else given)
    seen = {}
    for spec in estimators:
        try:
            parsed = compare.parse_estimator(spec)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if parsed in seen:
            raise ConfigError(f"--estimators: {spec!r} repeats {seen[parsed]!r}; give each estimator once")
        seen[parsed] = spec
    return estimators


def _without_analytic(estimators: list[str]) -> list[str]:
    return [spec for spec in estimators if compare.parse_estimator(spec)[0] != "analytic"]


def _compare_elbo(args) -> int:
    """``compare-elbo RUN_DIR``: each estimator scored on the run's test images (or the old form)."""
    from .plotting import plot_estimator_comparison  # matplotlib: slow to import (see _plot)

    if args.train:
        return _compare_elbo_old_form(args)
    _refuse_flags_of_other_form(args, _TRAINING_COMPARISON_DEFAULTS, "compare-training (or compare-elbo --train)")
    _fill_defaults(args, _RUN_COMPARISON_DEFAULTS)
    estimators = _checked_estimators(args.estimators, DEFAULT_ESTIMATORS)
    if not args.run_dir:
        raise ConfigError("compare-elbo needs RUN_DIR, a trained run; compare-training trains one run per estimator")
    vae, config, test = _trained_and_test(args)
    if isinstance(vae, LabelledVAE):
        return _compare_label_handling(args, vae, config, test)
    estimators = _usable_on(vae, config, estimators)
    images = _first(test, args.limit, "--limit", config.data.dataset)
    records = compare.compare_estimators(vae, images, estimators, repeats=args.repeats, grad_samples=args.grad_samples)
    stem = Path(args.run_dir) / "elbo_comparison"
    _write_records(records, stem)
    plot_estimator_comparison(records).savefig(stem.with_suffix(".png"), dpi=110)
    _print_table(records, ["estimator", "estimate", "estimate_std", "grad_snr_encoder", "grad_snr_decoder",
                           "seconds_per_step"])
    return 0


def _compare_label_handling(args, vae, config, test) -> int:
    """``compare-elbo`` on a semi-supervised run: the label summed out against sampled, side by
    side (:func:`~pyro_vae.compare.compare_label_estimators`); the test images as unlabelled."""
    from .plotting import plot_estimator_comparison  # matplotlib: slow to import (see _plot)

    if not vae.semi_supervised:
        raise ConfigError(f"compare-elbo: {args.run_dir} is a conditional run, whose label is observed for every item: "
                          "there is no latent label to sum out or sample")
    if args.estimators:
        raise ConfigError("--estimators: a semi-supervised run compares the ways of handling its label "
                          f"({', '.join(LABELS_BY)}), all of them; leave --estimators out")
    images = _first(test, args.limit, "--limit", config.data.dataset)
    records = compare.compare_label_estimators(vae, images, repeats=args.repeats, grad_samples=args.grad_samples,
                                               temperature=config.objective.temperature)
    stem = Path(args.run_dir) / "label_comparison"
    _write_records(records, stem)
    plot_estimator_comparison(records, snr_parts=("classifier", "decoder")).savefig(stem.with_suffix(".png"), dpi=110)
    _print_table(records, ["estimator", "estimate", "estimate_std", "grad_snr_classifier", "grad_snr_decoder",
                           "seconds_per_step"])
    return 0


def _usable_on(vae, config, estimators: list[str]) -> list[str]:
    """``estimators`` less 'analytic' where the run has no closed-form KL, with a note: its guide
    and prior, or (a model of several latent layers) whatever the model says."""
    usable = _without_analytic(estimators)
    if usable == estimators:
        return estimators
    own = getattr(vae, "why_no_closed_form_kl", None)
    if own is not None:
        why = own()
        if why is None:
            return estimators
        lack = f"model.z_dims = {config.model.z_dims} with model.inference = {config.model.inference!r}: {why}"
        if not usable:
            raise ConfigError(f"--estimators: nothing left to compare without 'analytic'; {lack}")
        print(f"note: leaving out 'analytic'; {lack}", file=sys.stderr)
        return usable
    if has_closed_form_kl(vae.prior_net, vae.guide_net):
        return estimators
    pair = f"guide {config.model.guide!r} and prior {config.model.prior!r}"
    if not usable:
        raise ConfigError(f"--estimators: nothing left to compare without 'analytic', which {pair} lack")
    print(f"note: {pair} have no closed-form KL; leaving out 'analytic'", file=sys.stderr)
    return usable


def _compare_training(args) -> int:
    """``compare-training``: one config trained once per estimator, then the runs compared."""
    return _run_training_comparison(args, *_training_comparison_inputs(args))


#: What ``compare-elbo --train`` says, on stderr, before it runs compare-training.
OLD_FORM_NOTE = "note: compare-elbo --train is now compare-training (the same flags); running that"


def _compare_elbo_old_form(args) -> int:
    """``compare-elbo --train``: compare-training, as before it split off, with one line that says so."""
    if args.run_dir:
        raise ConfigError(f"compare-elbo takes RUN_DIR or --train, not both (got RUN_DIR {args.run_dir} and --train)")
    _refuse_flags_of_other_form(args, _RUN_COMPARISON_DEFAULTS, "RUN_DIR (without --train)")
    _fill_defaults(args, _TRAINING_COMPARISON_DEFAULTS)
    inputs = _training_comparison_inputs(args)
    # said once the inputs are accepted, so that a refusal is still one line
    print(OLD_FORM_NOTE, file=sys.stderr)
    return _run_training_comparison(args, *inputs)


def _refuse_flags_of_other_form(args, flags: dict, form: str) -> None:
    """Refuse a compare-elbo flag (None unless given) that only its other form reads."""
    for dest in flags:
        if getattr(args, dest) is not None:
            raise ConfigError(f"compare-elbo --{dest.replace('_', '-')} is only used with {form}")


def _fill_defaults(args, defaults: dict) -> None:
    for dest, value in defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)


def _training_comparison_inputs(args):
    """The config, its data, the estimators and the plugins of a training comparison, each checked
    (every estimator's variant of the config too) before anything trains."""
    estimators = _checked_estimators(args.estimators, DEFAULT_TRAINING_ESTIMATORS)
    plugins = load_plugins(args.plugin)  # before the config: it may name what they register
    # each estimator trains throughout: a final phase under another would blur the comparison
    config = load_config(args.config, {**_overrides(args), "objective.final_elbo": "", "objective.final_epochs": 0})
    if args.estimators is None and not has_closed_form_kl(PRIORS[config.model.prior], GUIDES[config.model.guide]):
        estimators = _without_analytic(estimators)
        print(f"note: guide {config.model.guide!r} and prior {config.model.prior!r} have no closed-form KL; "
              "leaving out 'analytic'", file=sys.stderr)
    elif args.estimators is None and config.model.z_dims and config.model.inference == "bottom_up":
        estimators = _without_analytic(estimators)
        print("note: model.inference = 'bottom_up' draws z1 before z2, so a per-site KL at the later draw is not the "
              "ELBO; leaving out 'analytic'", file=sys.stderr)
    for spec in estimators:  # every variant must be a valid config before any trains
        name, k = compare.parse_estimator(spec)
        config.replace(**{"objective.elbo": name, "objective.num_particles": k})
    _refuse_out_in_data(Path(args.out), config)
    splits = _run_data(config, args)
    check_data(config, splits)
    return config, splits, estimators, plugins


def _run_training_comparison(args, config, splits, estimators: list[str], plugins: list[str]) -> int:
    from .plotting import plot_learning_curves  # matplotlib: slow to import (see _plot)

    out = Path(args.out)
    records, histories = compare.train_side_by_side(config, splits, out, estimators, args.num_samples,
                                                    progress=not args.quiet, plugins=plugins)
    _write_records(records, out / "training_comparison")
    plot_learning_curves(histories).savefig(out / "training_comparison.png", dpi=110)
    _print_table(records, ["estimator", "epochs", "test_elbo", "test_log_likelihood", "train_seconds"])
    return 0


COMMANDS = {"train": _train, "evaluate": _evaluate, "plot": _plot, "sample": _sample,
            "compare-elbo": _compare_elbo, "compare-training": _compare_training}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, DataNotFoundError, CheckpointError, RunExistsError, TensorBoardMissing) as error:
        print(f"pyro-vae: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as error:
        print(f"pyro-vae: error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except DiskFullError as error:
        print(f"pyro-vae: error: {error.strerror}", file=sys.stderr)
        return EXIT_DISK_FULL
    except OSError as error:  # a full disk while writing an evaluation, a figure or a table
        if not is_disk_full(error):
            raise
        where = f" writing {error.filename}" if error.filename else ""
        print(f"pyro-vae: error: no space left on the disk{where}", file=sys.stderr)
        return EXIT_DISK_FULL
    except DistributedError as error:
        print(f"pyro-vae: error: {error}", file=sys.stderr)
        return EXIT_LOST_RANK


if __name__ == "__main__":
    sys.exit(main())
