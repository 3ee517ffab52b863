"""``pyro-vae``: a thin command line over config -> data -> fit -> evaluate -> plot.

The only module that reads ``sys.argv``, lays out run folders and exits with a status.
User errors (bad config, missing data, unusable checkpoint) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__
from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, load_run
from .config import ConfigError, from_dict, load_config, parse_override
from .data import DATA_ENV, DataNotFoundError, load_splits, prepare
from .compare import DEFAULT_ESTIMATORS
from .distributed import (DEVICES, DistributedError, is_communication_error, launched_world_size, resolve_device, setup,
                          teardown)
from .elbo import evaluate
from .train import METRICS_NAME, fit

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_LOST_RANK = 3


def _add_device(parser):
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the model and each batch go (default auto: CUDA if available, else CPU)")


def _add_data_dir(parser):
    parser.add_argument(
        "--data-dir", metavar="DIR",
        help=f"folder holding MNIST/raw/... (default: ${DATA_ENV}, else ./data, where it is downloaded if missing)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-vae", description="Train and evaluate variational autoencoders with Pyro.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a VAE from a config",
        description="Train a VAE; each epoch saves a checkpoint and a metrics line in the run folder. "
                    "Launched by torchrun (torchrun --nproc_per_node=N -m pyro_vae train ...), it trains "
                    "data-parallel on N processes.")
    train.add_argument("--config", metavar="FILE", help="TOML config (default: the built-in defaults, as in configs/default.toml)")
    train.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                       help="override one config key, e.g. --set model.z_dim=2 (repeatable; values are TOML literals or bare words)")
    train.add_argument("--epochs", type=int, metavar="N", help="shorthand for --set train.epochs=N; with --resume, the total to reach")
    train.add_argument("--seed", type=int, metavar="N", help="shorthand for --set train.seed=N")
    train.add_argument("--likelihood", metavar="NAME", help="shorthand for --set model.likelihood=NAME")
    train.add_argument("--prior", metavar="NAME", help="shorthand for --set model.prior=NAME")
    train.add_argument("--beta", type=float, metavar="B", help="shorthand for --set objective.beta=B")
    train.add_argument("--train-limit", type=int, metavar="N", help="train on the first N training images only (shorthand for --set data.train_limit=N)")
    train.add_argument("--out", metavar="RUN_DIR", help="run folder to create (default: runs/<config name>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    _add_device(train)
    _add_data_dir(train)

    ev = commands.add_parser("evaluate", help="test ELBO and importance-sampled log-likelihood of a run",
                             description="Print the test ELBO and log-likelihood (nats per image) as JSON and save it in the run folder.")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument("--num-samples", "-k", type=int, default=1000, metavar="K", help="importance samples per image (default 1000; papers use 5000)")
    ev.add_argument("--limit", type=int, default=0, metavar="N", help="evaluate the first N test images only (default: all)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the importance samples (default 0)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_device(ev)
    _add_data_dir(ev)

    ce = commands.add_parser(
        "compare-elbo", help="compare ELBO estimators on a run, or train once per estimator",
        description="With RUN_DIR: score each estimator on the run's test images (estimate, its noise across "
                    "repeats, gradient variance and SNR, time per step). With --train: train one config once per "
                    "estimator, same epochs and seed, and compare learning curves and test log-likelihoods.")
    ce.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a trained run (without --train)")
    ce.add_argument("--estimators", nargs="+", metavar="NAME[:K]", default=list(DEFAULT_ESTIMATORS),
                    help=f"estimators, with K particles for iwae (default: {' '.join(DEFAULT_ESTIMATORS)})")
    ce.add_argument("--repeats", type=int, default=5, metavar="R", help="passes over the test images per estimator (default 5)")
    ce.add_argument("--grad-samples", type=int, default=20, metavar="M", help="gradient draws for variance and SNR (default 20)")
    ce.add_argument("--limit", type=int, default=0, metavar="N", help="use the first N test images only (default: all)")
    ce.add_argument("--train", action="store_true", help="train --config once per estimator instead")
    ce.add_argument("--config", metavar="FILE", help="with --train: the config (default: built-in defaults)")
    ce.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], help="with --train: config overrides")
    ce.add_argument("--epochs", type=int, metavar="N", help="with --train: epochs of every run")
    ce.add_argument("--out", metavar="DIR", default="runs/compare-elbo", help="with --train: folder of the runs (default runs/compare-elbo)")
    ce.add_argument("--num-samples", "-k", type=int, default=1000, metavar="K", help="with --train: importance samples of the final evaluation")
    ce.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_data_dir(ce)

    plot = commands.add_parser("plot", help="write the figures of a run as PNG files", description="Reconstructions, prior samples, latent space, manifold (2-D z) and training curves, as PNG files in the run folder.")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    _add_data_dir(plot)
    return parser


def _shorthands(args):
    return (
        ("train.epochs", args.epochs), ("train.seed", args.seed), ("data.train_limit", args.train_limit),
        ("model.likelihood", args.likelihood), ("model.prior", args.prior), ("objective.beta", args.beta),
    )


def _overrides(args) -> dict:
    overrides = dict(parse_override(item) for item in args.set)
    for key, value in _shorthands(args):
        if value is not None:
            overrides[key] = value
    return overrides


def _train(args) -> int:
    try:
        runtime = setup(args.device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        return _train_on(runtime, args)
    finally:
        teardown()


def _train_on(runtime, args) -> int:
    checkpoint = None
    if args.resume:
        if args.config or args.out or any(v is not None for k, v in _shorthands(args) if k != "train.epochs") or args.set:
            raise ConfigError("--resume continues a run with its own config; only --epochs and --data-dir may be given with it")
        run_dir = Path(args.resume)
        checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
        config = from_dict(checkpoint["config"])
        if args.epochs is not None:
            config = config.replace(**{"train.epochs": args.epochs})
    else:
        config = load_config(args.config, _overrides(args))
        run_dir = Path(args.out) if args.out else Path("runs") / (Path(args.config).stem if args.config else "default")
        if (run_dir / CHECKPOINT_NAME).exists():
            raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
    splits = load_splits(config.data.dataset, args.data_dir, config.data.val_size, config.data.train_limit)
    try:
        result = fit(config, splits, run_dir, checkpoint=checkpoint, progress=not args.quiet, device=runtime.device)
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
    if not runtime.is_main:
        return 0 if result.completed else EXIT_INTERRUPTED
    if not result.completed:
        launcher = "torchrun --nproc_per_node=N -m pyro_vae" if runtime.distributed else "pyro-vae"
        print(f"stopped; the state is saved. Continue with: {launcher} train --resume {run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    last = result.history[-1] if result.history else {}
    print(json.dumps({"run_dir": str(run_dir), **last}))
    return 0


def _trained_and_test(args):
    """The run's VAE and the test images as it sees them (binarized once, seed 0, if binarized)."""
    vae = load_run(args.run_dir)
    config = vae.config
    splits = load_splits(config.data.dataset, args.data_dir, config.data.val_size)
    return vae, config, prepare(splits.test, config.data.binarize)


def _evaluate(args) -> int:
    import torch

    if launched_world_size() > 1:
        raise ConfigError("evaluate runs in one process; start it without torchrun")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    vae, config, test = _trained_and_test(args)
    vae.to(device)
    images = test.images[: args.limit] if args.limit else test.images
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    result = evaluate(vae, images, num_samples=args.num_samples, progress=not args.quiet)
    protocol = "grey values" if config.data.binarize == "none" else f"test images binarized once with seed 0 (training: {config.data.binarize} binarization)"
    result.update({
        "dataset": config.data.dataset,
        "likelihood": config.model.likelihood,
        "likelihood_options": config.model.likelihood_options,
        "prior": config.model.prior,
        "data_protocol": protocol,
        "seconds": time.perf_counter() - started,
        "seed": args.seed,
    })
    path = Path(args.run_dir) / f"evaluation_k{args.num_samples}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def _plot(args) -> int:
    from .plotting import make_figures

    vae, _, test = _trained_and_test(args)
    metrics = Path(args.run_dir) / METRICS_NAME
    history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    for name, figure in make_figures(vae, test.images, test.labels, history).items():
        path = Path(args.run_dir) / f"{name}.png"
        figure.savefig(path, dpi=110)
        print(path)
    return 0


def _write_records(records: list[dict], stem: Path) -> None:
    import csv

    stem.with_suffix(".json").write_text(json.dumps(records, indent=2) + "\n")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def _print_table(records: list[dict], columns: list[str]) -> None:
    print("  ".join(f"{c:>22}" for c in columns))
    for r in records:
        print("  ".join(f"{r[c]:>22.6g}" if isinstance(r[c], float) else f"{str(r[c]):>22}" for c in columns))


def _compare_elbo(args) -> int:
    from .compare import compare_estimators, parse_estimator, train_side_by_side
    from .plotting import plot_estimator_comparison, plot_learning_curves

    try:
        for spec in args.estimators:
            parse_estimator(spec)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if args.train:
        overrides = dict(parse_override(item) for item in args.set)
        if args.epochs is not None:
            overrides["train.epochs"] = args.epochs
        config = load_config(args.config, overrides)
        for spec in args.estimators:  # every variant must be a valid config before any trains
            name, k = parse_estimator(spec)
            config.replace(**{"objective.elbo": name, "objective.num_particles": k})
        splits = load_splits(config.data.dataset, args.data_dir, config.data.val_size, config.data.train_limit)
        out = Path(args.out)
        records, histories = train_side_by_side(config, splits, out, args.estimators, args.num_samples, progress=not args.quiet)
        _write_records(records, out / "training_comparison")
        plot_learning_curves(histories).savefig(out / "training_comparison.png", dpi=110)
        _print_table(records, ["estimator", "epochs", "test_elbo", "test_log_likelihood", "train_seconds"])
        return 0
    if not args.run_dir:
        raise ConfigError("compare-elbo needs RUN_DIR, or --train to train one run per estimator")
    vae, config, test = _trained_and_test(args)
    estimators = list(args.estimators)
    if not vae.prior_net.has_closed_form_kl and any(parse_estimator(e)[0] == "analytic" for e in estimators):
        print(f"note: prior {config.model.prior!r} has no closed-form KL; leaving out 'analytic'", file=sys.stderr)
        estimators = [e for e in estimators if parse_estimator(e)[0] != "analytic"]
    images = test.images[: args.limit] if args.limit else test.images
    records = compare_estimators(vae, images, estimators, repeats=args.repeats, grad_samples=args.grad_samples)
    stem = Path(args.run_dir) / "elbo_comparison"
    _write_records(records, stem)
    plot_estimator_comparison(records).savefig(stem.with_suffix(".png"), dpi=110)
    _print_table(records, ["estimator", "estimate", "estimate_std", "grad_snr_encoder", "grad_snr_decoder",
                           "seconds_per_step"])
    return 0


COMMANDS = {"train": _train, "evaluate": _evaluate, "plot": _plot, "compare-elbo": _compare_elbo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataNotFoundError, CheckpointError) as error:
        print(f"pyro-vae: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except DistributedError as error:
        print(f"pyro-vae: error: {error}", file=sys.stderr)
        return EXIT_LOST_RANK


if __name__ == "__main__":
    sys.exit(main())
