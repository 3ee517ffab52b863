"""Watching a VAE learn: a small picture of every epoch kept in the run, and TensorBoard.

:class:`Monitor` is made once by :func:`~pyro_vae.train.fit` and shown each finished epoch's
metrics record. It keeps a *snapshot* of the epoch (reconstructions of a few fixed validation
images and decodings of a few fixed prior draws, as ``uint8``) that the checkpoint saves, so
that ``pyro-vae plot`` can animate the run (``training.gif``), and, with
``train.tensorboard = true``, writes the epoch's scalars and image grids to ``RUN/tensorboard``
with PyTorch's ``SummaryWriter``.

Nothing here draws from the training's random stream: reconstructions decode E[z|x], and the
prior draws and the validation terms draw inside :func:`~pyro_vae.seeding.seeded` (Pyro's
distributions take no generator argument), which forks torch's generators and restores them.
A run trains the same weights with or without the monitor's work, on any number of ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .callbacks import Callback
from .elbo import ACTIVE_UNIT_THRESHOLD
from .seeding import seeded

#: The folder of the run that holds the TensorBoard event files.
TENSORBOARD_NAME = "tensorboard"
#: How to get the optional TensorBoard dependency.
INSTALL_TENSORBOARD = "pip install 'pyro-vae[tensorboard]'"
#: Validation images each snapshot reconstructs, and prior draws it decodes: one row and two
#: rows of 8 in the animation, 24 images; 18.8 kB an epoch for MNIST as uint8.
SNAPSHOT_IMAGES = 8
SNAPSHOT_SAMPLES = 16
#: Images per batch when scoring the validation terms (as :func:`pyro_vae.elbo.mean_elbo`).
VALIDATION_BATCH = 1000
#: TensorBoard scalar tag -> the key of the epoch's metrics record (``metrics.jsonl``) it plots.
RECORD_SCALARS = {
    "train/loss": "train_loss",
    "validation/elbo": "val_elbo",
    "schedule/beta": "beta",
    "schedule/lr": "lr",
    "speed/images_per_second": "images_per_second",
}
#: Scalars of the records of some runs only: a labelled run's validation accuracy.
OPTIONAL_SCALARS = {
    "validation/accuracy": "val_accuracy",
}


class TensorBoardMissing(ImportError):
    """TensorBoard logging was asked for, and the ``tensorboard`` package is not installed."""


def require_tensorboard():
    """PyTorch's ``SummaryWriter`` class; :class:`TensorBoardMissing` (one line: how to install
    it) when the ``tensorboard`` package is missing. Imported here, not at module import: it
    is an optional dependency and takes a second to import."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TensorBoardMissing(
            f"train.tensorboard needs the tensorboard package, which is not installed: {INSTALL_TENSORBOARD}"
        ) from None
    return SummaryWriter


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as ``uint8`` on the CPU (values outside are clipped, as every figure
    shows them): a quarter of the float size, and the 256 grey levels a GIF holds anyway."""
    return (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@torch.no_grad()
def validation_terms(vae, images: torch.Tensor, seed: int, device: torch.device | str = "cpu") -> dict:
    """The validation ELBO's two terms and the active units, from one pass over ``images``.

    ``reconstruction`` = mean over images of log p(x|z) and ``kl`` = mean of
    log q(z|x) - log p(z), one ``z ~ q(z|x)`` per image drawn inside ``seeded(seed)`` (so the
    same weights give the same numbers, and the caller's random state is untouched); their
    difference is a one-sample ELBO, which agrees with the epoch's ``val_elbo`` up to Monte
    Carlo noise. ``active_units``: latent dimensions whose Var over images of E[z_d|x] exceeds
    :data:`~pyro_vae.elbo.ACTIVE_UNIT_THRESHOLD` (Burda et al. 2015).

    :param images: ``(N, *image_shape)`` as the model sees them, on any device.
    """
    reconstruction = kl = 0.0
    means = []
    # a labelled VAE's q(z|x,y) and p(x|z,y) are taken at each datum's most probable class
    predict = getattr(vae, "predict", None)
    # a model with several latent layers gives its own terms (the KL summed over them)
    own_terms = getattr(vae, "elbo_terms", None)
    with seeded(seed, device):
        prior = vae.prior()
        for start in range(0, len(images), VALIDATION_BATCH):
            x = images[start : start + VALIDATION_BATCH].to(device)
            if own_terms is not None:
                log_px_z, kl_terms, code = own_terms(x)
                reconstruction += log_px_z.sum().item()
                kl += kl_terms.sum().item()
                means.append(code)
                continue
            label = () if predict is None else (predict(x),)
            q = vae.encode(x, *label)
            z = q.sample()
            reconstruction += vae.decode(z, *label).log_prob(x).sum().item()
            kl += (q.log_prob(z) - prior.log_prob(z)).sum().item()
            means.append(_code(vae, x, q))
    activity = torch.cat(means).var(0)
    return {
        "reconstruction": reconstruction / len(images),
        "kl": kl / len(images),
        "active_units": int((activity > ACTIVE_UNIT_THRESHOLD).sum()),
    }


def _code(vae, x: torch.Tensor, q) -> torch.Tensor:
    """E[z|x] of each datum ``(B, z_dim)``: ``VAE.code`` where the VAE has it (a guide family
    without a mean, such as a flow, gives a representative code there), else q's mean."""
    code = getattr(vae, "code", None)
    return code(x) if code is not None else q.mean


class Monitor(Callback):
    """Each finished epoch of :func:`~pyro_vae.train.fit`: a snapshot, and TensorBoard if asked.

    A :class:`~pyro_vae.callbacks.Callback`, as the console is: a context manager around the
    training loop (it opens and closes the event files) whose :meth:`observe` sees each
    epoch's metrics record, while the VAE is in eval mode and before the checkpoint is saved;
    :attr:`snapshots` is what the checkpoint keeps. Its other hooks do nothing.

    :param val_images: the validation images ``(N, *image_shape)`` as the model sees them;
        the first :data:`SNAPSHOT_IMAGES` are the snapshots' inputs.
    :param seed: the run's seed, of the fixed prior draws and the validation terms' noise.
    :param device: where the VAE is.
    :param run_dir: the run folder, where this process writes (rank 0); ``None``: no files.
    :param tensorboard: write TensorBoard events under ``run_dir / "tensorboard"``. Checked
        here, before anything trains: :class:`TensorBoardMissing` if the package is missing.
    :param snapshots: the snapshots of the checkpoint being resumed (``None``: a new run, or a
        run saved before snapshots were kept, whose animation starts at the resumed epoch).
    :param start_epoch: the epochs already trained; TensorBoard events logged past them by an
        earlier, interrupted process are purged (``SummaryWriter(purge_step=...)``), so a
        resumed run continues the same event stream without duplicate steps.

    Vector data (``image_shape`` of length 1) get no snapshots and no image grids: both are
    pictures of images. The step of every event is the epoch number, as in ``metrics.jsonl``.
    """

    def __init__(self, val_images: torch.Tensor, seed: int, device: torch.device | str = "cpu", *,
                 run_dir: str | Path | None = None, tensorboard: bool = False, snapshots: dict | None = None,
                 start_epoch: int = 0):
        self.val_images = val_images
        self.seed = seed
        self.device = torch.device(device)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.start_epoch = start_epoch
        self._summary_writer = require_tensorboard() if tensorboard else None
        self._writer = None
        if len(val_images.shape) == 2:  # vectors (N, D), not images (N, C, H, W)
            self.snapshots = None
        elif snapshots is not None:
            self.snapshots = {"inputs": snapshots["inputs"], "frames": list(snapshots["frames"])}
        else:
            self.snapshots = {"inputs": to_uint8(val_images[:SNAPSHOT_IMAGES]), "frames": []}

    def __enter__(self) -> "Monitor":
        if self._summary_writer is not None and self.run_dir is not None:
            self._writer = self._summary_writer(log_dir=str(self.run_dir / TENSORBOARD_NAME),
                                                purge_step=self.start_epoch + 1)
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()  # writes what is queued: a full disk may fail here
            except OSError:
                if kind is None:
                    raise
                # keep the error that stopped training (often the same full disk)
        return False


    @torch.no_grad()
    def observe(self, vae, record: dict) -> None:
        """Keep the snapshot of the epoch ``record["epoch"]`` and write its TensorBoard events."""
        epoch = record["epoch"]
        if self.snapshots is not None:
            inputs = self.val_images[: len(self.snapshots["inputs"])].to(self.device)
            with seeded(self.seed, self.device):  # the same draws every epoch, from p(z) as it is now
                # (a labelled VAE's: from p(z|y), the classes in turn)
                samples = vae.sample_images(SNAPSHOT_SAMPLES)
            self.snapshots["frames"].append({
                "epoch": epoch,
                "reconstructions": to_uint8(vae.reconstruct(inputs)),
                "samples": to_uint8(samples),
            })
        if self._writer is not None:
            self._write_events(vae, record)

    def _write_events(self, vae, record: dict) -> None:
        from torchvision.utils import make_grid

        epoch, writer = record["epoch"], self._writer
        for tag, key in RECORD_SCALARS.items():
            writer.add_scalar(tag, record[key], epoch)
        for tag, key in OPTIONAL_SCALARS.items():
            if key in record:
                writer.add_scalar(tag, record[key], epoch)
        for name, value in validation_terms(vae, self.val_images, self.seed, self.device).items():
            writer.add_scalar(f"validation/{name}", value, epoch)
        if self.snapshots is not None:
            frame, inputs = self.snapshots["frames"][-1], self.snapshots["inputs"]
            # the inputs in the top row, their reconstructions below; the samples in rows as wide
            writer.add_image("images/reconstructions",
                             make_grid(torch.cat([inputs, frame["reconstructions"]]), nrow=len(inputs), pad_value=255),
                             epoch)
            writer.add_image("images/samples", make_grid(frame["samples"], nrow=len(inputs), pad_value=255), epoch)
        writer.flush()  # TensorBoard shows each epoch as it ends, not when the writer's queue fills
