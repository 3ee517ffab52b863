"""What :func:`~pyro_vae.train.fit` shows while it trains, as callbacks at fixed points of the loop.

A callback is a context manager around the training loop with five hooks (:class:`Callback`),
as Keras' and pythae's trainers call theirs. :class:`~pyro_vae.monitor.Monitor` (snapshots and
TensorBoard) is one; :class:`Console` (a progress bar and a line per epoch) and
:class:`RecordCallback` (a function of the epoch's metrics record) are the others. The loop
calls them all through one :class:`CallbackList`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

from tqdm.auto import tqdm


class Callback:
    """The points of :func:`~pyro_vae.train.fit`'s loop a callback is called at, in order; each
    hook does nothing here, so a callback defines only those it uses (as Keras' ``Callback``).

    Entered before the first epoch, exited when the loop ends, also on an error. Hooks
    must not draw from the training's random stream: a run trains the same weights with or
    without them.
    """

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        return False

    def epoch_begins(self, epoch: int, step: int) -> None:
        """Epoch ``epoch`` (0-based) begins, or resumes after ``step`` steps already taken."""

    def step_ends(self, step: int, loss: float) -> None:
        """Step ``step`` (1-based, in the epoch) is taken; ``loss``: the epoch's mean loss per image so far."""

    def steps_end(self) -> None:
        """The epoch's steps are over: all of them, or those before a request to stop."""

    def observe(self, vae, record: dict) -> None:
        """The epoch is scored (``record``) and the VAE is in eval mode; the checkpoint is not yet saved."""

    def epoch_ends(self, record: dict) -> None:
        """The epoch's checkpoint and metrics are saved."""


class CallbackList:
    """Several callbacks called as one, in the order given (and exited in reverse).

    :param callbacks: objects with the hooks of :class:`Callback`.
    """

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)
        self._stack = None

    def __enter__(self) -> "CallbackList":
        with contextlib.ExitStack() as stack:
            for callback in self.callbacks:
                stack.enter_context(callback)
            self._stack = stack.pop_all()  # entered all, or (on an error) exited those entered
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        stack, self._stack = self._stack, None
        return stack.__exit__(kind, error, traceback)

    def epoch_begins(self, epoch: int, step: int) -> None:
        for callback in self.callbacks:
            callback.epoch_begins(epoch, step)

    def step_ends(self, step: int, loss: float) -> None:
        for callback in self.callbacks:
            callback.step_ends(step, loss)

    def steps_end(self) -> None:
        for callback in self.callbacks:
            callback.steps_end()

    def observe(self, vae, record: dict) -> None:
        for callback in self.callbacks:
            callback.observe(vae, record)

    def epoch_ends(self, record: dict) -> None:
        for callback in self.callbacks:
            callback.epoch_ends(record)


class Console(Callback):
    """Training on the terminal: a progress bar over each epoch's steps, one line per epoch.

    :param num_epochs: the epochs of the run, for the bar's title.
    :param num_steps: the steps of one epoch.
    """

    def __init__(self, num_epochs: int, num_steps: int):
        self.num_epochs = num_epochs
        self.num_steps = num_steps
        self._bar = None

    def __exit__(self, kind, error, traceback) -> bool:
        self.steps_end()  # an error mid-epoch: the bar goes, the error's message stays alone
        return False

    def epoch_begins(self, epoch: int, step: int) -> None:
        self._bar = tqdm(total=self.num_steps, initial=step, desc=f"epoch {epoch + 1}/{self.num_epochs}",
                         leave=False, dynamic_ncols=True)

    def step_ends(self, step: int, loss: float) -> None:
        self._bar.update()
        self._bar.set_postfix(loss=f"{loss:.2f}", refresh=False)

    def steps_end(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()

    def epoch_ends(self, record: dict) -> None:
        tqdm.write(
            f"epoch {record['epoch']:>4}  train_loss {record['train_loss']:8.3f}  "
            f"val_elbo {record['val_elbo']:9.3f}  {record['seconds']:6.1f}s  "
            f"{record['images_per_second']:7.0f} img/s"
        )


class RecordCallback(Callback):
    """A function of each finished epoch's metrics record, called once the epoch is saved
    (``fit(..., callback=...)``, e.g. to redraw a live loss plot in a notebook).

    :param function: called with the record, the dict appended to the run's history.
    """

    def __init__(self, function: Callable[[dict], None]):
        self.function = function

    def epoch_ends(self, record: dict) -> None:
        self.function(record)
