"""Atomic save and safe load of a training state.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)``: opening a checkpoint never runs code from the file.
It is written to a temporary file in the same folder and renamed over the old one, so a
crash while saving leaves the previous checkpoint intact; the file and then the folder are
fsync'ed around the rename, so a power cut cannot leave the new name pointing at lost data.
A process killed while writing leaves its temporary file behind: :func:`remove_stale_temporaries`
deletes them when the next run starts in that folder.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import tempfile
import warnings
from pathlib import Path

import torch

from .config import from_dict
from .labelled import build_model

CHECKPOINT_NAME = "checkpoint.pt"
#: Keys every checkpoint written by :func:`pyro_vae.fit` has.
REQUIRED_KEYS = ("config", "image_shape", "model", "optimizer", "rng", "epoch", "step", "history")
#: How the run's VAE was made: from ``config.model`` (``load_run`` rebuilds it), or by hand
#: (``load_run(run_dir, vae=...)`` needs the same modules again).
BUILT_FROM_CONFIG, BUILT_BY_HAND = "config", "hand"


def training_state(*, config: dict, image_shape, model: dict, optimizer: dict, rng: dict, epoch: int, step: int,
                   history: list, order=None, partial=None, data: dict | None = None, plugins=(),
                   built: str = BUILT_FROM_CONFIG, snapshots: dict | None = None, num_classes: int = 0) -> dict:
    """The checkpoint's layout, in one place: everything needed to resume or reload a run.

    :param config: the run's config as a dict (``Config.to_dict()``).
    :param image_shape: the shape of one datum, ``(C, H, W)`` or ``(D,)``.
    :param model: the VAE's ``state_dict()``; ``optimizer``: the optimizer's.
    :param rng: the random states (torch's, the data order's, CUDA's on a GPU).
    :param epoch: epochs finished; ``step``: steps finished in the running one (0 at an
        epoch's end), with its permutation ``order`` and running sums ``partial``.
    :param history: one metrics record per finished epoch.
    :param data: where the data came from (``Splits.source``: the dataset, its kind, path and
        fingerprint), so that evaluation and resume read exactly that data; ``None`` for
        tensors handed to ``fit`` without a source.
    :param plugins: the ``--plugin`` modules or files that registered the run's components.
    :param built: :data:`BUILT_FROM_CONFIG` or :data:`BUILT_BY_HAND`.
    :param snapshots: a small picture of each finished epoch, for ``pyro-vae plot``'s
        ``training.gif`` (:class:`pyro_vae.monitor.Monitor`): ``{"inputs": uint8 images,
        "frames": [{"epoch", "reconstructions", "samples"}, ...]}``; ``None`` for vector data.
        Kept here, not in a file beside, so that it always matches the weights: a resumed run
        ends with the snapshots of an uninterrupted one. Checkpoints written before it lack it.
    :param num_classes: a labelled model's number of classes (0 for a VAE without labels).
    """
    return {
        "config": config, "image_shape": list(image_shape), "model": model, "optimizer": optimizer, "rng": rng,
        "epoch": epoch, "step": step, "order": order, "partial": partial, "history": history,
        "data": data, "plugins": list(plugins), "built": built, "snapshots": snapshots, "num_classes": num_classes,
    }


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted or not a pyro-vae checkpoint."""


class RunExistsError(FileExistsError):
    """A run folder already holds a checkpoint, and the call would start a new run over it."""


class DiskFullError(OSError):
    """A file of a run could not be written because its file system is full (or over quota)."""


#: errno values that mean "no room left" rather than a bug or a permission problem
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in NO_SPACE


def _temporary_prefix(name: str) -> str:
    return f".{name}."


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename, fsync of the folder).

    The state is serialized in memory first and then written with one ``write``: a full disk
    is then an ``OSError`` with ``errno.ENOSPC`` (raised as :class:`DiskFullError`), not an
    error from inside torch's zip writer. The temporary file is removed on any failure.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path.name), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(error):
            raise DiskFullError(error.errno, f"no space left to write {path}") from None
        raise


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename still happened
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | Path, name: str = CHECKPOINT_NAME) -> list[Path]:
    """Delete the temporary files that a process killed while saving ``name`` left in ``folder``.

    Only call this when no other process is writing to the folder. Returns the removed paths.
    """
    stale = sorted(Path(folder).glob(f"{_temporary_prefix(name)}*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _unreadable_reason(error: Exception) -> str:
    # torch's own messages advise re-running torch.load with weights_only=False, which is the
    # wrong advice about a file of unknown origin: say what the file is, in our words.
    if isinstance(error, EOFError):
        return "the file is empty or ends early"
    return "not a whole file as torch.save writes it"


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`; :class:`CheckpointError` if unusable.

    Never runs code from the file: a file holding arbitrary Python objects is refused.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():
            # files pickled by other tools draw a protocol warning before they are refused
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # not a pickle of objects: not a torch.save file
            raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({_unreadable_reason(error)})") from None
        raise CheckpointError(
            f"{path} is not a pyro-vae checkpoint: it holds Python objects other than tensors, numbers and "
            "strings, and is not opened"
        ) from None
    except PermissionError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror}") from None
    except Exception as error:  # zip, pickle and EOF errors all mean an unreadable file
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({_unreadable_reason(error)})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a pyro-vae checkpoint (expected keys {list(REQUIRED_KEYS)})")
    return state


def load_run(run_dir: str | Path, vae=None):
    """The trained VAE of a run folder, in eval mode, with its config as ``vae.config``.

    A VAE built from the config (registered components included: load the plugins that
    registered them first) is rebuilt; pass ``vae`` to load the weights into a VAE built by
    hand, which must have the same modules as the one that trained (its ``state_dict`` keys
    and shapes are checked).

    ``vae.model(x)`` and ``vae.guide(x)`` work with Pyro's ``SVI``; ``vae.encode(x)`` is
    q(z|x), ``vae.decode(z)`` is p(x|z), ``vae.prior()`` is p(z). A labelled run gives a
    :class:`~pyro_vae.labelled.LabelledVAE`, whose programs and densities also take ``y``.
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    state = load_checkpoint(path)
    config = from_dict(state["config"])
    if vae is None:
        if state.get("built", BUILT_FROM_CONFIG) == BUILT_BY_HAND:
            raise CheckpointError(f"{run_dir} was trained on a VAE built by hand, which its config does not "
                                  "describe: build the same VAE and pass it, load_run(run_dir, vae=...)")
        vae = build_model(config.model, tuple(state["image_shape"]), state.get("num_classes", 0))
    try:
        vae.load_state_dict(state["model"])
    except RuntimeError as error:  # missing, unexpected or differently shaped weights
        reason = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise CheckpointError(f"the VAE given does not match the one {run_dir} trained ({reason})") from None
    vae.config = config
    vae.data_source = state.get("data")
    vae.plugins = state.get("plugins", [])
    return vae.eval()
