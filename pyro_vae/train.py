"""``fit()``: the one training loop, shared by the CLI, the notebooks and the tests.

SVI maximizes the ELBO: Pyro's estimator turns ``model``/``guide`` into a differentiable loss
(``elbo.differentiable_loss``), and a torch Adam steps all parameters of the VAE at once.
This is the same objective and update as ``SVI(model, guide, pyro.optim.Adam, elbo)``, with
less per-step overhead: one fused optimizer instead of one per parameter, and no detour
through the global parameter store.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pyro
import torch
from tqdm.auto import tqdm

from .checkpoint import (BUILT_BY_HAND, BUILT_FROM_CONFIG, CHECKPOINT_NAME, DiskFullError, RunExistsError,
                         is_disk_full, remove_stale_temporaries, save_checkpoint, training_state)
from .config import Config, from_dict, save_config
from .data import Splits, binarize_once, check_likelihood_range, iterate_batches, prepare
from .distributed import (ELBOLoss, Runtime, SharedNoise, all_reduce_sum, current_runtime, data_parallel, local_part,
                          shard_bounds)
from .elbo import make_elbo, mean_elbo
from .likelihoods import LIKELIHOODS
from .model import LATENT, VAE, build_vae, init_output_bias
from .monitor import Monitor
from .seeding import preserved

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.toml"


class TrainingDiverged(FloatingPointError):
    """The loss, a gradient or a weight became NaN or infinite; nothing of the step was saved."""


def learning_rate(config, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based) under ``config.train``'s schedule.

    The schedule spans ``train.lr_schedule_epochs`` epochs (``train.epochs`` when 0); epochs
    after it keep the final rate.
    """
    train = config.train
    span = train.lr_schedule_epochs or train.epochs
    if train.lr_schedule == "constant" or span <= 1:
        return train.lr
    # cosine: lr at epoch 0, lr * lr_final_ratio at the schedule's last epoch
    progress = epoch / (span - 1)
    final = train.lr * train.lr_final_ratio
    return final + 0.5 * (train.lr - final) * (1 + math.cos(math.pi * min(progress, 1.0)))


def resumed_config(saved: Config, epochs: int) -> Config:
    """The config that continues a run saved with ``saved`` up to ``epochs`` epochs in all.

    Only the length changes. A learning-rate schedule keeps the span it was planned over
    (``train.lr_schedule_epochs`` is pinned to the run's original ``train.epochs``): resuming
    never changes the rate of an epoch, and epochs added beyond the plan keep its final rate.
    """
    overrides = {"train.epochs": epochs}
    train = saved.train
    if epochs != train.epochs and train.lr_schedule != "constant" and train.lr_schedule_epochs == 0:
        overrides["train.lr_schedule_epochs"] = train.epochs
    return saved.replace(**overrides)


def beta_at(objective, epoch: int) -> float:
    """The KL weight of ``epoch`` (0-based) under ``objective``'s beta schedule.

    "warmup": ``beta * min(1, epoch / beta_epochs)``, so 0 in the first epoch and ``beta``
    from epoch ``beta_epochs`` on. "cyclical" (Fu et al. 2019, Cyclical Annealing Schedule):
    cycles of ``beta_epochs`` epochs, each rising linearly from 0 to ``beta`` over its first
    ``beta_ramp`` fraction, then holding ``beta``.
    """
    if objective.beta_schedule == "warmup":
        return objective.beta * min(1.0, epoch / objective.beta_epochs)
    if objective.beta_schedule == "cyclical":
        position = (epoch % objective.beta_epochs) / objective.beta_epochs
        return objective.beta * min(1.0, position / objective.beta_ramp)
    return objective.beta


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    # The fused kernel saved about 0.5 ms of a 6 ms step of the default MLP VAE here (torch
    # 2.14, 2 CPU cores) against the default implementation; torch < 2.4 lacks it on CPU.
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


@dataclass
class FitResult:
    vae: VAE
    config: Config
    history: list[dict] = field(default_factory=list)
    run_dir: Path | None = None
    #: False when training stopped early on Ctrl-C (the state is saved; resume continues it).
    completed: bool = True


def _training_images(config: Config, splits: Splits) -> torch.Tensor:
    train = splits.train.head(config.data.train_limit) if config.data.train_limit else splits.train
    if config.data.binarize == "static":
        return binarize_once(train, seed=config.train.seed).images
    return train.images


def fit(
    config: Config,
    splits: Splits,
    run_dir: str | Path | None = None,
    checkpoint: dict | None = None,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    device: str | torch.device = "cpu",
    vae: VAE | None = None,
    plugins: Sequence[str] = (),
) -> FitResult:
    """Train a VAE on ``splits.train``; score ``splits.val`` each epoch.

    The loop knows nothing of where the model and the data came from: the VAE is built from
    ``config.model`` unless one is given (``vae``, built by hand from any encoder, decoder,
    likelihood and prior modules), and the data is any :class:`~pyro_vae.data.Splits`.

    :param config: a validated :class:`~pyro_vae.config.Config`.
    :param splits: the data, images ``(N, C, H, W)`` in [0, 1]; the test split is not used.
        They stay where they are (CPU); each batch is moved to ``device``. With
        ``config.data.train_limit = n > 0`` only the first ``n`` training images are used.
    :param run_dir: if given, each epoch appends to ``metrics.jsonl`` and rewrites
        ``checkpoint.pt`` there; ``config.toml`` holds the resolved config. A folder that
        already holds a checkpoint is refused (:class:`~pyro_vae.checkpoint.RunExistsError`)
        unless ``checkpoint`` continues it.
    :param checkpoint: a state from :func:`~pyro_vae.checkpoint.load_checkpoint` to continue
        from (same config, except possibly ``train.epochs``: see :func:`resumed_config`, which
        gives the config actually used). The result equals that of an uninterrupted run with
        the same seed, whatever the number of processes of either.
    :param progress: show a progress bar.
    :param callback: called with each epoch's metrics record (the dict appended to
        ``history``) after it is saved, e.g. to redraw a live loss plot in a notebook.
    :param device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a ``torch.device``.
    :param vae: a :class:`~pyro_vae.model.VAE` to train instead of the one ``config.model``
        describes (then only ``config``'s data, objective and train sections apply). Its
        weights are trained in place; to resume its run, pass the same kind of VAE again.
    :param plugins: the modules or files that registered the run's components, recorded in
        the checkpoint so that ``pyro-vae evaluate``, ``plot`` and ``--resume`` load them again.

    In a process group (``torchrun``, see :mod:`pyro_vae.distributed`) every rank calls
    ``fit`` with the same arguments and trains its shard of each batch; only rank 0 writes
    to ``run_dir``, shows progress and calls ``callback``.

    Ctrl-C (or SIGTERM) stops after the current step, saves the state (mid-epoch, so nothing
    is lost) and returns with ``completed=False``; in a process group, all ranks stop after
    the same step.

    :raises TrainingDiverged: a step's loss, gradient or resulting weights are NaN or infinite.
        The step is not taken (or, for weights, not saved), so the last checkpoint stays intact.
    :raises DiskFullError: a file of ``run_dir`` could not be written for lack of space; the
        checkpoint of the last epoch saved before stays intact and resumable.

    Training draws from torch's global generator (Pyro takes no generator argument), seeded
    with ``config.train.seed``; the caller's random state (torch, ``random``, NumPy) is
    restored when ``fit`` returns, as if it had drawn nothing.
    """
    with preserved():
        return _fit(config, splits, run_dir, checkpoint, progress, callback, device, vae, plugins)


def _fit(config, splits, run_dir, checkpoint, progress, callback, device, vae, plugins) -> FitResult:
    built = BUILT_FROM_CONFIG if vae is None else BUILT_BY_HAND
    if checkpoint is not None:
        if checkpoint.get("built", BUILT_FROM_CONFIG) != built:
            raise ValueError("the checkpoint's VAE was built by hand: pass the same VAE again, fit(..., vae=...)"
                             if built == BUILT_FROM_CONFIG else
                             "the checkpoint's VAE was built from its config: resume without vae=")
        saved = from_dict(checkpoint["config"])
        continued = resumed_config(saved, config.train.epochs)
        given = config
        if given.train.lr_schedule_epochs == 0:  # unset by the caller: the run's own span
            given = given.replace(**{"train.lr_schedule_epochs": continued.train.lr_schedule_epochs})
        if given != continued:
            raise ValueError("the checkpoint was written with another config; only train.epochs may change on resume")
        config = continued
    runtime = current_runtime(device)
    device = runtime.device
    pyro.set_rng_seed(config.train.seed)
    if vae is None:
        vae = build_vae(config.model, splits.train.image_shape)  # checks its parts' shapes
    else:  # a user's modules: the same check, one clear line instead of a shape error mid-step
        vae.check_shapes(splits.train.image_shape)
    check_data(config, splits, vae.likelihood)  # before binarization draws from values it cannot take
    images = _training_images(config, splits)
    if built == BUILT_FROM_CONFIG and config.model.init_output_bias:
        init_output_bias(vae, images)  # from the data it trains on (Burda et al. 2015); draws nothing
    val_images = prepare(splits.val, config.data.binarize).images
    vae = vae.to(device)
    optimizer = make_optimizer(vae.parameters(), config.train.lr)
    estimator = make_elbo(config.objective.elbo, config.objective.num_particles)
    objective = data_parallel(ELBOLoss(vae, estimator), runtime, may_mask=_may_mask(config.objective))
    generator = torch.Generator().manual_seed(config.train.seed)
    dynamic = config.data.binarize == "dynamic"
    recon_weight = config.objective.reconstruction_weight
    writes = run_dir is not None and runtime.is_main
    show = progress and runtime.is_main

    history: list[dict] = []
    epoch, step, order, partial = 0, 0, None, {"loss": 0.0, "images": 0, "seconds": 0.0}
    if checkpoint is not None:
        vae.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        _set_rng_state(checkpoint["rng"], generator, device)
        epoch, step, history = checkpoint["epoch"], checkpoint["step"], list(checkpoint["history"])
        order = checkpoint.get("order")
        partial = dict(checkpoint.get("partial") or partial)
    # every rank checks for TensorBoard before anything trains; only the writing one writes
    monitor = Monitor(val_images, config.train.seed, device, run_dir=run_dir if writes else None,
                      tensorboard=config.train.tensorboard and run_dir is not None, start_epoch=epoch,
                      snapshots=checkpoint.get("snapshots") if checkpoint is not None else None)

    # where the checkpoint on disk stands, for the messages of a failed run
    saved_at = _position(checkpoint["epoch"], checkpoint["step"]) if checkpoint is not None else None
    if writes:
        run_dir = Path(run_dir)
        if checkpoint is None and (run_dir / CHECKPOINT_NAME).exists():
            raise RunExistsError(f"{run_dir} already holds a run; continue it from its checkpoint or choose another folder")
        with _disk_space_guard(run_dir, saved_at):
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(run_dir)
            save_config(config, run_dir / CONFIG_NAME)
            # Rewritten from the checkpoint's history, so metrics never run ahead of the state.
            (run_dir / METRICS_NAME).write_text("".join(json.dumps(r) + "\n" for r in history))

    # Splits built by hand have no source: say so, so that no command reads other data for it
    source = splits.source or {"dataset": None, "kind": "tensors", "path": None, "fingerprint": None}

    def state(order_now=None, partial_now=None):
        return training_state(
            config=config.to_dict(), image_shape=splits.train.image_shape, model=vae.state_dict(),
            optimizer=optimizer.state_dict(), rng=_rng_state(generator, device), epoch=epoch, step=step,
            order=order_now, partial=partial_now, history=history, data=source,
            plugins=plugins, built=built, snapshots=monitor.snapshots,
        )

    def diverged(problem: str, index: int) -> TrainingDiverged:
        return _diverged(problem, epoch, index, config, run_dir if writes else None, saved_at)

    num_steps = math.ceil(len(images) / config.train.batch_size)
    vae.train()
    with _StopRequest(announce=runtime.is_main) as stop, _frozen_heap(), monitor:
        while epoch < config.train.epochs:
            lr = learning_rate(config, epoch)
            beta = beta_at(config.objective, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if order is None:
                order = torch.randperm(len(images), generator=generator)
            bar = tqdm(total=num_steps, initial=step, desc=f"epoch {epoch + 1}/{config.train.epochs}",
                       disable=not show, leave=False, dynamic_ncols=True)
            started = time.perf_counter()
            stopping = False
            for index, batch in iterate_batches(images, config.train.batch_size, generator, dynamic, order, step):
                try:
                    if runtime.distributed:
                        begin, end, weight = local_part(len(batch), runtime)
                        with SharedNoise(LATENT, begin, end, len(batch)):
                            loss = objective(batch[begin:end].to(device, non_blocking=True), beta=beta,
                                             reconstruction_weight=recon_weight) * weight
                    else:
                        loss = objective(batch.to(device, non_blocking=True), beta=beta,
                                         reconstruction_weight=recon_weight)
                except ValueError as error:
                    # Pyro validates each distribution's parameters: NaN or infinite ones mean
                    # the weights or activations have blown up, not a bug in the model
                    if "found invalid values" not in str(error):
                        raise
                    raise diverged("a parameter of q(z|x) or p(x|z) is NaN or infinite", index) from None
                # one reduction a step: the batch's loss for the logs and the divergence
                # check, and whether any rank was asked to stop, so that all ranks stop
                # after the same step
                batch_loss, stops = all_reduce_sum([loss.item() / runtime.world_size, float(stop.requested)], runtime)
                if not math.isfinite(batch_loss):
                    raise diverged(f"the loss is {batch_loss}", index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # DDP has averaged the gradients, so every rank sees the same ones and decides alike
                if not math.isfinite(_gradient_sum(vae)):
                    raise diverged("a gradient entry is NaN or infinite", index)
                optimizer.step()
                partial["loss"] += batch_loss
                partial["images"] += len(batch)
                step = index + 1  # steps completed in this epoch
                if show:
                    bar.update()
                    bar.set_postfix(loss=f"{partial['loss'] / partial['images']:.2f}", refresh=False)
                if stops:
                    stopping = True
                    break
            bar.close()
            partial["seconds"] += time.perf_counter() - started
            # the last step's update is the one no loss has checked yet: never save it if it broke
            if not _parameters_finite(vae):
                raise diverged("a weight of the VAE is NaN or infinite", step - 1)
            if step < num_steps:  # stopped mid-epoch: keep the epoch's order and sums
                if writes:
                    with _disk_space_guard(run_dir, saved_at):
                        save_checkpoint(state(order, partial), run_dir / CHECKPOINT_NAME)
                return FitResult(vae.eval(), config, history, run_dir, completed=False)
            vae.eval()
            record = {
                "epoch": epoch + 1,
                "train_loss": partial["loss"] / partial["images"],
                "val_elbo": _validation_elbo(vae, val_images, runtime),
                "beta": beta,
                "lr": lr,
                "seconds": partial["seconds"],
                "images_per_second": partial["images"] / partial["seconds"],
                "peak_memory_mb": peak_memory_mb(),
            }
            with _disk_space_guard(run_dir, saved_at):  # TensorBoard writes to the run's disk
                monitor.observe(vae, record)  # in eval mode, and before the checkpoint (TensorBoard purges past it)
            vae.train()
            history.append(record)
            epoch, step, order, partial = epoch + 1, 0, None, {"loss": 0.0, "images": 0, "seconds": 0.0}
            if writes:
                with _disk_space_guard(run_dir, saved_at):
                    save_checkpoint(state(), run_dir / CHECKPOINT_NAME)
                    saved_at = _position(epoch, 0)
                    with open(run_dir / METRICS_NAME, "a") as f:
                        f.write(json.dumps(record) + "\n")
            if callback is not None and runtime.is_main:
                callback(record)
            if show:
                tqdm.write(
                    f"epoch {record['epoch']:>4}  train_loss {record['train_loss']:8.3f}  "
                    f"val_elbo {record['val_elbo']:9.3f}  {record['seconds']:6.1f}s  "
                    f"{record['images_per_second']:7.0f} img/s"
                )
            if stopping:
                return FitResult(vae.eval(), config, history, run_dir, completed=epoch >= config.train.epochs)
    return FitResult(vae.eval(), config, history, run_dir, completed=True)


def check_data(config: Config, splits: Splits, likelihood=None) -> None:
    """Refuse (:class:`~pyro_vae.data.DataError`, one line), before anything trains, training
    data outside what the likelihood is defined on. ``likelihood``: the VAE's head; by default
    the one ``config.model`` names. A head of one's own without ``accepts`` is taken at its word.
    """
    named = LIKELIHOODS.get(config.model.likelihood)
    cls = named if likelihood is None else type(likelihood)
    name = config.model.likelihood if cls is named else cls.__name__
    accepts = getattr(cls if likelihood is None else likelihood, "accepts", None)
    if accepts is not None:
        check_likelihood_range(splits.train.images, accepts, config.data.binarize, name)


def _position(epoch: int, step: int) -> str:
    """Where a saved state stands, in words: after a whole epoch, or inside one."""
    return f"epoch {epoch}" if step == 0 else f"step {step} of epoch {epoch + 1}"


def _gradient_sum(vae: VAE) -> float:
    """The sum of every gradient entry: finite exactly when all of them are (a sum that
    overflows needs entries near 1e33, a divergence all the same). One pass over the
    gradients, about 0.1 ms for the default model against a step of several ms."""
    sums = [p.grad.sum() for p in vae.parameters() if p.grad is not None]
    return torch.stack(sums).sum().item() if sums else 0.0


@torch.no_grad()
def _parameters_finite(vae: VAE) -> bool:
    """Whether every weight is finite (by the same sum as :func:`_gradient_sum`)."""
    sums = [p.sum() for p in vae.parameters()]
    return not sums or math.isfinite(torch.stack(sums).sum().item())


def _diverged(problem: str, epoch: int, index: int, config: Config, run_dir: Path | None,
              saved_at: str | None) -> TrainingDiverged:
    """The one-line explanation of a non-finite step, with what was kept and what to change."""
    if run_dir is None:
        kept = "nothing was saved"
    elif saved_at is None:
        kept = f"no checkpoint had been written to {run_dir} yet"
    else:
        kept = f"the checkpoint of {saved_at} in {run_dir} is intact"
    return TrainingDiverged(
        f"training diverged at epoch {epoch + 1}, step {index + 1}: {problem}; {kept}. "
        f"Lower train.lr (now {config.train.lr:g}, e.g. --set train.lr={config.train.lr / 3:.2g}) and train again"
    )


@contextlib.contextmanager
def _disk_space_guard(run_dir: Path, saved_at: str | None):
    """Turn "no space left" while writing the run into one :class:`DiskFullError` that says
    which checkpoint survived (the atomic save leaves the previous one whole)."""
    try:
        yield
    except OSError as error:
        if not is_disk_full(error):
            raise
        kept = ("no checkpoint had been written yet" if saved_at is None
                else f"the checkpoint of {saved_at} is intact: free some space, then continue with "
                     f"--resume {run_dir}")
        raise DiskFullError(error.errno, f"the disk holding {run_dir} is full; {kept}") from None


def _may_mask(objective) -> bool:
    """Whether some step may mask a site, leaving parameters without a gradient."""
    return objective.reconstruction_weight == 0 or objective.beta == 0 or objective.beta_schedule != "constant"


def _validation_elbo(vae: VAE, images: torch.Tensor, runtime: Runtime) -> float:
    """The mean one-sample ELBO of the validation images, each rank scoring its shard.

    The noise comes from a fork of the random stream, so validation never changes the
    training's draws: the run takes the same steps whatever the number of ranks that share
    the validation work.
    """
    begin, end = shard_bounds(len(images), runtime.rank, runtime.world_size)
    forked = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        total = mean_elbo(vae, images[begin:end]) * (end - begin) if end > begin else 0.0
    total, count = all_reduce_sum([total, float(end - begin)], runtime)
    return total / count


def _rng_state(generator: torch.Generator, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if device.type == "cuda":  # the latent noise is drawn on the GPU
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def _frozen_heap():
    """Exempt the objects alive now (torch, Pyro, the data, the model) from garbage collection.

    Every SVI step allocates many small Python objects (traces, messages, distributions), so
    the collector runs often, and each full collection scanned every long-lived object again:
    freezing them cut the per-step time of the default VAE by about 5 % here (1.165x -> 1.106x
    plain PyTorch in an interleaved micro-benchmark). Garbage made during training is still
    collected; the frozen objects return to the collector on exit.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _StopRequest:
    """Turn Ctrl-C (SIGINT) and SIGTERM into a request to stop after the current step.

    Stopping between steps keeps parameters, optimizer and random state consistent, so the
    saved state resumes exactly. A second Ctrl-C interrupts at once, unless it comes within
    a second of the first: under torchrun one Ctrl-C reaches each rank twice, from the
    terminal and again from the launcher, which forwards it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_SECONDS = 1.0

    def __init__(self, announce: bool = True):
        self.announce = announce

    def __enter__(self):
        self.requested = False
        self._first = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signals only go there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested:
            if now - self._first > self.REPEAT_SECONDS:
                raise KeyboardInterrupt
            return
        self.requested, self._first = True, now
        if self.announce:
            tqdm.write("stopping after this step and saving (Ctrl-C again to abort at once)")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
