"""Atomic save and safe load of a training state.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)``: opening a checkpoint never runs code from the file.
It is written to a temporary file in the same folder and renamed over the old one, so a
crash while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"
#: Keys every checkpoint written by :func:`pyro_vae.fit` has.
REQUIRED_KEYS = ("config", "image_shape", "model", "optimizer", "rng", "epoch", "step", "history")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted or not a pyro-vae checkpoint."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`; :class:`CheckpointError` if unusable."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, pickle and EOF errors all mean an unreadable file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({reason})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a pyro-vae checkpoint (expected keys {list(REQUIRED_KEYS)})")
    return state


def load_run(run_dir: str | Path):
    """The trained VAE of a run folder, in eval mode, with its config as ``vae.config``.

    ``vae.model(x)`` and ``vae.guide(x)`` work with Pyro's ``SVI``; ``vae.encode(x)`` is
    q(z|x), ``vae.decode(z)`` is p(x|z), ``vae.prior()`` is p(z).
    """
    from .config import from_dict
    from .model import build_vae

    state = load_checkpoint(Path(run_dir) / CHECKPOINT_NAME)
    config = from_dict(state["config"])
    vae = build_vae(config.model, tuple(state["image_shape"]))
    vae.load_state_dict(state["model"])
    vae.config = config
    return vae.eval()
