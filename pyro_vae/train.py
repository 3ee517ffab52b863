"""``fit()``: the one training loop, shared by the CLI, the notebooks and the tests.

SVI maximizes the ELBO: Pyro's estimator turns ``model``/``guide`` into a differentiable loss
(``elbo.differentiable_loss``), and a torch Adam steps all parameters of the VAE at once.
This is the same objective and update as ``SVI(model, guide, pyro.optim.Adam, elbo)``, with
less per-step overhead: one fused optimizer instead of one per parameter, and no detour
through the global parameter store.

The trainer in steps, each with one job (as pythae's trainer, and nanoGPT's labelled loop):
:func:`reconciled_config` (a resumed run's config), :func:`_prepare` (the model, data,
optimizer and loss), :func:`_restore` (a checkpoint's state), then per epoch the schedules,
:func:`_train_epoch` (one :func:`_step` a batch), and :func:`_end_epoch` (validation, callbacks, the
checkpoint). The run folder has one owner, :class:`~pyro_vae.run_folder.RunFolder`; the
console and TensorBoard are callbacks (:mod:`pyro_vae.callbacks`).
"""

from __future__ import annotations

import contextlib
import gc
import math
import resource
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pyro
import torch
from tqdm.auto import tqdm

from .callbacks import CallbackList, Console, RecordCallback
from .checkpoint import BUILT_BY_HAND, BUILT_FROM_CONFIG, training_state
from .config import Config, from_dict
from .data import ImageData, Splits, binarize_once, check_likelihood_range, check_shift, iterate_batches, prepare
from .distributed import Runtime, all_reduce_sum, current_runtime, data_parallel, local_part, shard_bounds
from .elbo import make_elbo, mean_elbo
from .labelled import (LabelledVAE, accuracy, build_model, check_labels, labelled_epoch_items, labelled_order,
                       make_training_loss, training_labels)
from .likelihoods import LIKELIHOODS
from .model import VAE, init_output_bias
from .monitor import Monitor
from .run_folder import METRICS_NAME, RunFolder
from .seeding import preserved, probing

__all__ = ["METRICS_NAME", "FitResult", "TrainingDiverged", "beta_at", "check_data", "fit", "learning_rate",
           "make_optimizer", "peak_memory_mb", "reconciled_config", "resumed_config", "training_images"]


class TrainingDiverged(FloatingPointError):
    """The loss, a gradient or a weight became NaN or infinite; nothing of the step was saved."""


def learning_rate(config, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based) under ``config.train``'s schedule.

    The schedule spans ``train.lr_schedule_epochs`` epochs (``train.epochs`` when 0); epochs
    after it keep the final rate.
    """
    train = config.train
    span = train.schedule_epochs
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


def reconciled_config(config: Config, checkpoint: dict, built: str) -> Config:
    """The config that continues ``checkpoint``'s run when the caller asks for ``config``.

    :param config: the caller's config. Only ``train.epochs`` may differ from the run's
        (:func:`resumed_config`); ``train.lr_schedule_epochs`` left unset (0) means the run's own.
    :param checkpoint: a state from :func:`~pyro_vae.checkpoint.load_checkpoint`.
    :param built: how the VAE to train was made (:data:`~pyro_vae.checkpoint.BUILT_FROM_CONFIG`
        or :data:`~pyro_vae.checkpoint.BUILT_BY_HAND`), which must be how the run's was.
    :raises ValueError: the VAE was made the other way, or another setting differs.
    """
    if checkpoint.get("built", BUILT_FROM_CONFIG) != built:
        raise ValueError("the checkpoint's VAE was built by hand: pass the same VAE again, fit(..., vae=...)"
                         if built == BUILT_FROM_CONFIG else
                         "the checkpoint's VAE was built from its config: resume without vae=")
    continued = resumed_config(from_dict(checkpoint["config"]), config.train.epochs)
    given = config
    if given.train.lr_schedule_epochs == 0:  # unset by the caller: the run's own span
        given = given.replace(**{"train.lr_schedule_epochs": continued.train.lr_schedule_epochs})
    if given != continued:
        raise ValueError("the checkpoint was written with another config; only train.epochs may change on resume")
    return continued


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


def training_images(config: Config, splits: Splits) -> ImageData:
    """The items a run of ``config`` trains on: ``data.train_limit`` of them, binarized once
    for ``data.binarize = "static"`` (a dynamic run draws each batch's bits as it goes)."""
    train = splits.train.head(config.data.train_limit) if config.data.train_limit else splits.train
    if config.data.binarize == "static":
        return binarize_once(train, seed=config.train.seed)
    return train


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
    """:func:`fit`'s steps in order: reconcile a resume, prepare, restore, open the run folder, train."""
    built = BUILT_FROM_CONFIG if vae is None else BUILT_BY_HAND
    if checkpoint is not None:
        config = reconciled_config(config, checkpoint, built)
    parts = _prepare(config, splits, device, vae, built, plugins)
    loop = _restore(parts, checkpoint)
    written = Path(run_dir) if run_dir is not None and parts.runtime.is_main else None  # rank 0 writes
    # every rank checks for TensorBoard before anything trains; only the writing one writes
    monitor = Monitor(parts.val_images, config.train.seed, parts.runtime.device, run_dir=written,
                      tensorboard=config.train.tensorboard and run_dir is not None, start_epoch=loop.epoch,
                      snapshots=checkpoint.get("snapshots") if checkpoint is not None else None)
    folder = RunFolder(written, checkpoint)
    folder.start(config, loop.history, resuming=checkpoint is not None)
    callbacks = _callbacks(parts, monitor, callback, progress)
    parts.vae.train()
    try:
        with _StopRequest(announce=parts.runtime.is_main) as stop, _frozen_heap(), callbacks:
            completed = _train(parts, loop, folder, callbacks, stop, monitor)
    except _NonFinite as error:
        raise _diverged(error, loop.epoch, config, folder) from None
    return FitResult(parts.vae.eval(), config, loop.history, written or run_dir, completed=completed)


@dataclass
class _Parts:
    """What the loop trains with, made once by :func:`_prepare`, and what the run records of it."""

    config: Config
    runtime: Runtime
    vae: VAE
    #: the batch's negative ELBO (:func:`~pyro_vae.labelled.make_training_loss`)
    loss: torch.nn.Module
    #: ``loss``, wrapped in ``DistributedDataParallel`` in a process group
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    #: the data's stream: each epoch's order of the images, and their dynamic binarization
    generator: torch.Generator
    #: the training and validation items, read a batch at a time
    images: ImageData
    val_images: ImageData
    image_shape: tuple
    #: where the data came from, as the checkpoint records it
    source: dict
    built: str
    plugins: Sequence[str]
    #: a labelled run's training labels (``-1``: an item whose label is not used), else None
    labels: torch.Tensor | None = None
    #: the number of classes of a labelled run (0 otherwise)
    num_classes: int = 0
    #: ``loss``'s estimator, and that of its last ``objective.final_epochs`` epochs (or None)
    estimator: object = None
    final_estimator: object = None

    def estimator_at(self, epoch: int):
        """The estimator that trains epoch ``epoch`` (0-based): ``objective.final_elbo``'s in the
        last ``objective.final_epochs`` of the schedule's epochs (and any after them),
        ``objective.elbo``'s before. The schedule's length, as the learning rate's, is
        ``train.lr_schedule_epochs`` or else ``train.epochs``: resuming with more epochs moves neither."""
        final = self.final_estimator is not None and \
            epoch >= self.config.train.schedule_epochs - self.config.objective.final_epochs
        return self.final_estimator if final else self.estimator

    @property
    def epoch_items(self) -> int:
        """The items of one epoch: every training item once, and a semi-supervised run's
        labelled ones as often as its batches draw them (:func:`epoch_order`)."""
        if self.labels is None or self.config.model.labels != "semi_supervised":
            return len(self.images)
        return labelled_epoch_items(self.labels, self.config.train.batch_size, self.config.train.labelled_per_batch)

    @property
    def num_steps(self) -> int:
        """The steps of one epoch (the last batch may be short)."""
        return math.ceil(self.epoch_items / self.config.train.batch_size)

    def epoch_order(self) -> torch.Tensor:
        """The order of an epoch's items, from the data's stream: a permutation (the labelled
        items repeated among the unlabelled ones for a semi-supervised run)."""
        if self.labels is None or self.config.model.labels != "semi_supervised":
            return torch.randperm(len(self.images), generator=self.generator)
        return labelled_order(self.labels, self.config.train.batch_size, self.config.train.labelled_per_batch,
                              self.generator)


def _fresh_sums() -> dict:
    return {"loss": 0.0, "images": 0, "seconds": 0.0}


@dataclass
class _Loop:
    """Where training stands: what a checkpoint keeps of the loop.

    ``step`` steps of epoch ``epoch`` (0-based) are done, in the permutation ``order`` of the
    training images, with running sums ``partial``; ``history`` holds a metrics record for each
    finished epoch.
    """

    epoch: int = 0
    step: int = 0
    order: torch.Tensor | None = None
    partial: dict = field(default_factory=_fresh_sums)
    history: list[dict] = field(default_factory=list)

    def finish_epoch(self, record: dict) -> None:
        self.history.append(record)
        self.epoch, self.step, self.order, self.partial = self.epoch + 1, 0, None, _fresh_sums()


class _NonFinite(Exception):
    """A step met a NaN or an infinity. :func:`_fit` turns it into :class:`TrainingDiverged`,
    whose message also says which epoch it was and what the run folder kept.

    :param problem: what was not finite, in words.
    :param index: the step (0-based) in the running epoch.
    """

    def __init__(self, problem: str, index: int):
        super().__init__(problem)
        self.problem = problem
        self.index = index


def _prepare(config: Config, splits: Splits, device, vae: VAE | None, built: str, plugins) -> _Parts:
    """Seed; build the VAE (or check the one given); check and prepare the data; make the
    optimizer and the loss. In this order: it is the order of the draws from the seeded stream."""
    runtime = current_runtime(device)
    labels, num_classes = training_labels(config, splits)  # one line if the data cannot give them
    if labels is not None and runtime.distributed and config.model.labels == "semi_supervised" \
            and config.objective.labels_by != "enumerate":
        raise ValueError(f"objective.labels_by = {config.objective.labels_by!r} trains in one process: its draws of "
                         "y are not shared across ranks as those of z are; run it without torchrun, or enumerate")
    pyro.set_rng_seed(config.train.seed)
    if vae is None:
        vae = build_model(config.model, splits.train.image_shape, num_classes)  # checks its parts' shapes
    elif isinstance(vae, LabelledVAE):
        num_classes = vae.num_classes
    else:  # a user's modules: the same check, one clear line instead of a shape error mid-step
        vae.check_shapes(splits.train.image_shape)
    check_data(config, splits, vae.likelihood)  # before binarization draws from values it cannot take
    images = training_images(config, splits)
    if built == BUILT_FROM_CONFIG and config.model.init_output_bias:
        init_output_bias(vae, images)  # from the data it trains on (Burda et al. 2015); draws nothing
    val_images = prepare(splits.val, config.data.binarize)
    vae = vae.to(runtime.device)
    optimizer = make_optimizer(vae.parameters(), config.train.lr)
    loss = make_training_loss(vae, config.objective)
    objective_config = config.objective
    final_estimator = (make_elbo(objective_config.final_elbo, objective_config.final_particles)
                       if objective_config.final_epochs else None)
    objective = data_parallel(loss, runtime, may_mask=_may_mask(config))
    # Splits built by hand have no source: say so, so that no command reads other data for it
    source = splits.source or {"dataset": None, "kind": "tensors", "path": None, "fingerprint": None}
    return _Parts(config=config, runtime=runtime, vae=vae, loss=loss, objective=objective, optimizer=optimizer,
                  generator=torch.Generator().manual_seed(config.train.seed), images=images, val_images=val_images,
                  image_shape=splits.train.image_shape, source=source, built=built, plugins=plugins,
                  labels=labels, num_classes=num_classes, estimator=getattr(loss, "estimator", None),
                  final_estimator=final_estimator)


def _restore(parts: _Parts, checkpoint: dict | None) -> _Loop:
    """Load a resumed run's weights, optimizer and random state into ``parts``; where its loop stood."""
    if checkpoint is None:
        return _Loop()
    parts.vae.load_state_dict(checkpoint["model"])
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    _set_rng_state(checkpoint["rng"], parts.generator, parts.runtime.device)
    return _Loop(epoch=checkpoint["epoch"], step=checkpoint["step"], order=checkpoint.get("order"),
                 partial=dict(checkpoint.get("partial") or _fresh_sums()), history=list(checkpoint["history"]))


def _callbacks(parts: _Parts, monitor: Monitor, callback, progress: bool) -> CallbackList:
    """The monitor on every rank; the caller's callback and the console on rank 0 only."""
    callbacks = [monitor]
    if parts.runtime.is_main:
        if callback is not None:
            callbacks.append(RecordCallback(callback))
        if progress:
            callbacks.append(Console(parts.config.train.epochs, parts.num_steps))
    return CallbackList(callbacks)


def _train(parts: _Parts, loop: _Loop, folder: RunFolder, callbacks: CallbackList, stop: _StopRequest,
           monitor: Monitor) -> bool:
    """Train from where ``loop`` stands to ``train.epochs`` epochs.

    :returns: whether every epoch is trained (false when a stop request ended the run early).
    :raises _NonFinite: a loss, gradient or weight is NaN or infinite.
    """
    config = parts.config
    while loop.epoch < config.train.epochs:
        # the epoch's learning rate and KL weight
        lr, beta = learning_rate(config, loop.epoch), beta_at(config.objective, loop.epoch)
        for group in parts.optimizer.param_groups:
            group["lr"] = lr
        if parts.final_estimator is not None:  # the loss module stays, so DDP's wrapper of it does
            parts.loss.estimator = parts.estimator_at(loop.epoch)
        # the steps
        stopping = _train_epoch(parts, loop, beta, callbacks, stop)
        # the last step's update is the one no loss has checked yet: never save it if it broke
        if not _parameters_finite(parts.vae):
            raise _NonFinite("a weight of the VAE is NaN or infinite", loop.step - 1)
        if loop.step < parts.num_steps:  # stopped mid-epoch: keep the epoch's order and sums
            folder.save_checkpoint(_state(parts, loop, monitor.snapshots))
            return False
        # evaluation, checkpoint and logging
        _end_epoch(parts, loop, lr, beta, folder, callbacks, monitor)
        if stopping:
            return loop.epoch >= config.train.epochs
    return True


def _train_epoch(parts: _Parts, loop: _Loop, beta: float, callbacks: CallbackList, stop: _StopRequest) -> bool:
    """Take the steps of epoch ``loop.epoch`` from step ``loop.step`` on.

    :returns: whether a stop was requested (on any rank): the epoch then ends after the step
        that saw it.
    """
    if loop.order is None:
        loop.order = parts.epoch_order()
    callbacks.epoch_begins(loop.epoch, loop.step)
    started = time.perf_counter()
    stopping = False
    dynamic = parts.config.data.binarize == "dynamic"
    batch_size, runtime = parts.config.train.batch_size, parts.runtime
    batches = iterate_batches(parts.images, batch_size, parts.generator, dynamic, loop.order, loop.step,
                              shard=lambda size: local_part(size, runtime)[:2],  # each rank reads its part
                              max_shift=parts.config.data.augment_shift)
    for index, batch in batches:
        size = min(batch_size, len(loop.order) - index * batch_size)  # the batch's items on all ranks
        if parts.labels is not None:  # a labelled run's model takes the batch's labels beside it
            batch = (batch, parts.labels[loop.order[index * batch_size : index * batch_size + size]])
        batch_loss, stopping = _step(parts, batch, size, beta, stop, index)
        loop.partial["loss"] += batch_loss
        loop.partial["images"] += size
        loop.step = index + 1  # steps completed in this epoch
        callbacks.step_ends(loop.step, loop.partial["loss"] / loop.partial["images"])
        if stopping:
            break
    callbacks.steps_end()
    loop.partial["seconds"] += time.perf_counter() - started
    return stopping


def _step(parts: _Parts, batch: torch.Tensor, size: int, beta: float, stop: _StopRequest, index: int
          ) -> tuple[float, bool]:
    """One SVI step on a batch of ``size`` items, the ``index``-th (0-based) of its epoch: loss,
    gradient, update. ``batch`` is this rank's part of it (all of it in one process).

    :returns: the batch's loss (summed over ranks) and whether any rank was asked to stop.
    :raises _NonFinite: the loss or a gradient is NaN or infinite; the update is not taken.
    """
    runtime = parts.runtime
    loss = _checked_loss(parts, batch, size, beta, index)
    # one reduction a step: the batch's loss for the logs and the divergence check, and
    # whether any rank was asked to stop, so that all ranks stop after the same step
    batch_loss, stops = all_reduce_sum([loss.item() / runtime.world_size, float(stop.requested)], runtime)
    if not math.isfinite(batch_loss):
        raise _NonFinite(f"the loss is {batch_loss}", index)
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # DDP has averaged the gradients, so every rank sees the same ones and decides alike
    if not math.isfinite(_gradient_sum(parts.vae)):
        raise _NonFinite("a gradient entry is NaN or infinite", index)
    parts.optimizer.step()
    return batch_loss, bool(stops)


def _checked_loss(parts: _Parts, batch: torch.Tensor, size: int, beta: float, index: int) -> torch.Tensor:
    """This rank's loss of ``batch`` (its part of ``size`` items), Pyro validating every
    distribution's parameters.

    :raises _NonFinite: a distribution was refused because the numbers blew up
        (:func:`_numbers_blew_up`); any other failure is raised as it is.
    """
    try:
        return _batch_loss(parts.objective, parts, batch, size, beta)
    except ValueError:
        # Pyro refuses NaN parameters with a ValueError, the type of any invalid argument:
        # whether this one is a divergence, the numbers decide, not the message
        if not _numbers_blew_up(parts, batch, size, beta):
            raise
    # raised outside the handler: Pyro's refusal would only repeat the message at length
    raise _NonFinite("a parameter of q(z|x) or p(x|z) is NaN or infinite", index)


def _batch_loss(module: torch.nn.Module, parts: _Parts, batch: torch.Tensor | tuple, size: int, beta: float
                ) -> torch.Tensor:
    """The negative ELBO of ``batch``, this rank's part of a batch of ``size`` items, computed
    by ``module`` (the loss, or its DDP wrapper), weighted so that the gradients reduced over
    ranks are the whole batch's."""
    runtime, weight = parts.runtime, parts.config.objective.reconstruction_weight
    # the items, and a labelled run's labels beside them
    inputs = [t.to(runtime.device, non_blocking=True) for t in (batch if isinstance(batch, tuple) else (batch,))]
    if not runtime.distributed:
        return module(*inputs, beta=beta, reconstruction_weight=weight)
    begin, end, scale = local_part(size, runtime)
    # the loss draws the latent sites of its part from the whole batch's noise (SharedNoise)
    return module(*inputs, beta=beta, reconstruction_weight=weight, shard=(begin, end, size)) * scale


def _numbers_blew_up(parts: _Parts, batch: torch.Tensor, size: int, beta: float) -> bool:
    """Whether a failed loss failed for its numbers, not its code: a weight is NaN or infinite,
    or the same loss computed with Pyro's validation off is.

    Only called once a loss has failed, so a healthy step never pays for the second forward
    pass. That pass draws from a fork of the random stream, calls the loss itself rather
    than its DDP wrapper (which would wait for the other ranks), and silences the warnings of
    the NaN it looks for (Pyro warns of a NaN loss).
    """
    if not _parameters_finite(parts.vae):
        return True
    with probing(parts.runtime.device), pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            loss = _batch_loss(parts.loss, parts, batch, size, beta)
        except Exception:  # it fails without validation too: the code is at fault, whatever the error
            return False
    return not math.isfinite(loss.item())


def _end_epoch(parts: _Parts, loop: _Loop, lr: float, beta: float, folder: RunFolder, callbacks: CallbackList,
               monitor: Monitor) -> None:
    """Score the epoch just trained, show it to the callbacks, and save it."""
    parts.vae.eval()
    record = _epoch_record(parts, loop, lr, beta)
    with folder.guard():  # TensorBoard writes to the run's disk
        callbacks.observe(parts.vae, record)  # in eval mode, and before the checkpoint (TensorBoard purges past it)
    parts.vae.train()
    loop.finish_epoch(record)
    folder.save_epoch(_state(parts, loop, monitor.snapshots), record)
    callbacks.epoch_ends(record)


def _epoch_record(parts: _Parts, loop: _Loop, lr: float, beta: float) -> dict:
    """The metrics record of the epoch ``loop`` has just trained: a line of ``metrics.jsonl``."""
    partial = loop.partial
    record = {
        "epoch": loop.epoch + 1,
        "train_loss": partial["loss"] / partial["images"],
        "val_elbo": _validation_elbo(parts.vae, parts.val_images, parts.runtime),
        "beta": beta,
        "lr": lr,
        "seconds": partial["seconds"],
        "images_per_second": partial["images"] / partial["seconds"],
        "peak_memory_mb": peak_memory_mb(),
    }
    if parts.final_estimator is not None:  # train_loss is then this estimator's bound
        objective = parts.config.objective
        final = parts.estimator_at(loop.epoch) is parts.final_estimator
        record["elbo"] = objective.final_elbo if final else objective.elbo
    if isinstance(parts.vae, LabelledVAE) and parts.val_images.labels is not None:
        # what a semi-supervised recipe is chosen on: never the test split
        with probing(parts.runtime.device):
            record["val_accuracy"] = accuracy(parts.vae, parts.val_images, parts.val_images.labels)
    return record


def _state(parts: _Parts, loop: _Loop, snapshots: dict | None) -> dict:
    """The checkpoint of the run as it stands: after an epoch, or inside one with the epoch's
    order and running sums."""
    inside = loop.step > 0
    return training_state(
        config=parts.config.to_dict(), image_shape=parts.image_shape, model=parts.vae.state_dict(),
        optimizer=parts.optimizer.state_dict(), rng=_rng_state(parts.generator, parts.runtime.device),
        epoch=loop.epoch, step=loop.step, order=loop.order if inside else None,
        partial=loop.partial if inside else None, history=loop.history, data=parts.source,
        plugins=parts.plugins, built=parts.built, snapshots=snapshots, num_classes=parts.num_classes,
    )


def _diverged(error: _NonFinite, epoch: int, config: Config, folder: RunFolder) -> TrainingDiverged:
    """The one-line explanation of a non-finite step, with what was kept and what to change."""
    return TrainingDiverged(
        f"training diverged at epoch {epoch + 1}, step {error.index + 1}: {error.problem}; {folder.kept()}. "
        f"Lower train.lr (now {config.train.lr:g}, e.g. --set train.lr={config.train.lr / 3:.2g}) and train again"
    )

def check_data(config: Config, splits: Splits, likelihood=None) -> None:
    """Refuse (:class:`~pyro_vae.data.DataError`, one line), before anything trains, labels a
    labelled run cannot use (:func:`~pyro_vae.labelled.check_labels`) and training data outside
    what the likelihood is defined on. ``likelihood``: the VAE's head; by default the one
    ``config.model`` names. A head of one's own without ``accepts`` is taken at its word.
    """
    check_labels(config, splits)
    named = LIKELIHOODS.get(config.model.likelihood)
    cls = named if likelihood is None else type(likelihood)
    name = config.model.likelihood if cls is named else cls.__name__
    accepts = getattr(cls if likelihood is None else likelihood, "accepts", None)
    if accepts is not None:
        check_likelihood_range(splits.train, accepts, config.data.binarize, name)
    check_shift(config.data.augment_shift, tuple(splits.train.shape[1:]))


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


def _may_mask(config: Config) -> bool:
    """Whether some step may leave parameters without a gradient: a masked site (a layer's
    weight of 0 too), or a semi-supervised model's score-function baseline, which only that way
    of handling y trains."""
    objective = config.objective
    return (objective.reconstruction_weight == 0 or objective.beta == 0 or objective.beta_schedule != "constant"
            or 0 in objective.betas
            or (config.model.labels == "semi_supervised" and objective.labels_by != "score_function"))


def _validation_elbo(vae: VAE, images: ImageData, runtime: Runtime) -> float:
    """The mean one-sample ELBO of the validation images, each rank scoring its shard.

    The noise comes from a fork of the random stream, so validation never changes the
    training's draws: the run takes the same steps whatever the number of ranks that share
    the validation work.
    """
    begin, end = shard_bounds(len(images), runtime.rank, runtime.world_size)
    with probing(runtime.device):
        total = mean_elbo(vae, images.part(begin, end)) * (end - begin) if end > begin else 0.0
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
