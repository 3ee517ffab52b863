"""The run folder of :func:`~pyro_vae.train.fit`, with one owner: :class:`RunFolder`.

A run folder holds ``config.toml`` (the resolved config), ``metrics.jsonl`` (one record per
finished epoch) and ``checkpoint.pt`` (everything needed to resume). Whole files are replaced
atomically (a temporary file, then a rename); an epoch's metrics line is appended, after its
checkpoint, and the metrics are rewritten from the checkpoint whenever a run starts. Every
write goes through one disk guard, so that a full disk is always the same one-line
:class:`~pyro_vae.checkpoint.DiskFullError`, naming the checkpoint that survived.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

from .checkpoint import (CHECKPOINT_NAME, DiskFullError, RunExistsError, is_disk_full, remove_stale_temporaries,
                         save_checkpoint)
from .config import Config, save_config

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.toml"


def position(epoch: int, step: int) -> str:
    """Where a saved state stands, in words: after a whole epoch, or inside one.

    >>> position(3, 0), position(3, 7)
    ('epoch 3', 'step 7 of epoch 4')
    """
    return f"epoch {epoch}" if step == 0 else f"step {step} of epoch {epoch + 1}"


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write, renamed over ``path`` when the block ends, so
    that ``path`` is always whole: the old file or the new one.

    Named as :func:`~pyro_vae.checkpoint.remove_stale_temporaries` expects (``.NAME.*.tmp``), so
    that the next start removes what a killed process left; created by ``open``, so that the
    file gets the usual permissions. One process writes a run folder, so the pid makes it unique.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class RunFolder:
    """The files of one run, and what the last checkpoint on disk holds.

    :param path: the run folder; ``None`` where this process writes nothing (no folder was
        given, or a rank other than 0): then every write is skipped, and only the messages
        (:meth:`kept`, :meth:`guard`) remain.
    :param checkpoint: the state being resumed (``None`` for a new run): the checkpoint
        already on disk, which a failed run leaves intact.
    """

    def __init__(self, path: Path | None, checkpoint: dict | None = None):
        self.path = path
        #: where the checkpoint on disk stands, in words (``None``: none written yet)
        self.saved_at = None if checkpoint is None else position(checkpoint["epoch"], checkpoint["step"])

    @property
    def writes(self) -> bool:
        return self.path is not None

    def start(self, config: Config, history: list[dict], resuming: bool) -> None:
        """Make the folder and write the config and the metrics of ``history``.

        :raises RunExistsError: a new run (``resuming`` false) in a folder that holds a checkpoint.
        """
        if not self.writes:
            return
        if not resuming and (self.path / CHECKPOINT_NAME).exists():
            raise RunExistsError(f"{self.path} already holds a run; continue it from its checkpoint or choose another folder")
        with self.guard():
            self.path.mkdir(parents=True, exist_ok=True)
            for name in (CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME):
                remove_stale_temporaries(self.path, name)
            with _replacing(self.path / CONFIG_NAME) as temporary:
                save_config(config, temporary)
            # Rewritten from the checkpoint's history, so metrics never run ahead of the state.
            with _replacing(self.path / METRICS_NAME) as temporary:
                temporary.write_text("".join(json.dumps(r) + "\n" for r in history))

    def save_checkpoint(self, state: dict) -> None:
        """Replace the checkpoint with ``state`` (atomically: the previous one stays whole until then)."""
        if not self.writes:
            return
        with self.guard():
            save_checkpoint(state, self.path / CHECKPOINT_NAME)
        self.saved_at = position(state["epoch"], state["step"])

    def save_epoch(self, state: dict, record: dict) -> None:
        """Save the state at an epoch's end, then append the epoch's metrics ``record``.

        The checkpoint first: metrics that lag the state are rewritten from it on resume
        (:meth:`start`), metrics ahead of it would not be.
        """
        if not self.writes:
            return
        self.save_checkpoint(state)
        with self.guard(), open(self.path / METRICS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")

    def kept(self) -> str:
        """What of the run is on disk, in words, for the message of a run that failed."""
        if not self.writes:
            return "nothing was saved"
        if self.saved_at is None:
            return f"no checkpoint had been written to {self.path} yet"
        return f"the checkpoint of {self.saved_at} in {self.path} is intact"

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn "no space left" while writing the run into one :class:`DiskFullError` that says
        which checkpoint survived (the atomic save leaves the previous one whole)."""
        try:
            yield
        except OSError as error:
            if not is_disk_full(error):
                raise
            kept = ("no checkpoint had been written yet" if self.saved_at is None
                    else f"the checkpoint of {self.saved_at} is intact: free some space, then continue with "
                         f"--resume {self.path}")
            raise DiskFullError(error.errno, f"the disk holding {self.path} is full; {kept}") from None
