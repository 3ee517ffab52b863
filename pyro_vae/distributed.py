"""Data-parallel training with PyTorch's own engine: ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc_per_node=N -m pyro_vae train ...`` starts N copies of the command line;
each joins the process group with :func:`setup` and calls the same :func:`pyro_vae.fit`,
which then trains data-parallel:

* every rank draws the same seeded permutation of the epoch and takes its shard of each
  global batch (``train.batch_size`` images in all, split as evenly as possible);
* the ELBO is a module (:class:`ELBOLoss`) wrapped in ``DistributedDataParallel``, which
  averages the gradients across ranks during ``backward``; the torch optimizer then takes
  the same step on every rank;
* the latent noise of each image is the one a single process would draw for it
  (:class:`SharedNoise`), so N processes take the same steps as one, up to floating-point
  rounding, and a checkpoint written by N processes resumes in any number of processes.

Backends: ``gloo`` on CPU, ``nccl`` on CUDA. Several machines use torchrun's usual flags
(``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``); the run folder must then be on a file
system every node sees, since all ranks read the checkpoint on ``--resume``.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger
from torch import nn

#: Choices of ``--device``.
DEVICES = ("auto", "cpu", "cuda")


class DistributedError(RuntimeError):
    """A rank lost contact with the others (it died, or the network failed)."""


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: its device, its rank and the number of ranks."""

    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and figures and shows the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` comes from a collective whose peers went away, not from a bug.

    torch raises ``DistError`` subclasses for some failures, and a plain ``RuntimeError``
    naming the backend for others (gloo: "Connection reset by peer", "Connection closed").
    """
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and any(word in message for word in ("gloo", "NCCL", "Connection"))


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """``"cpu"``, ``"cuda"`` (the GPU of this local rank) or ``"auto"`` (CUDA if available)."""
    if isinstance(name, torch.device):
        return name
    if name not in DEVICES:
        raise ValueError(f"device {name!r}: choose one of {list(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda': no CUDA device is available here (torch.cuda.is_available() is False)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_world_size() -> int:
    """The number of processes torchrun started (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str | torch.device = "auto") -> Runtime:
    """Join the process group that torchrun describes in the environment, if there is one.

    torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; without them this is a single process and nothing is initialized.
    """
    device = resolve_device(device, _local_rank())
    if launched_world_size() == 1:
        return Runtime(device)
    if device.type == "cuda":
        # NCCL refuses two ranks on one GPU ("invalid usage"), and only once every rank has
        # joined: a message that reads like a lost connection. Say what is wrong before that.
        processes, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
        if processes > gpus:
            raise ValueError(f"device 'cuda': {processes} processes on this machine but {gpus} GPU(s), and NCCL "
                             f"needs one GPU per process; start torchrun with --nproc_per_node={gpus}, or train "
                             "with --device cpu (gloo)")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, dist.get_rank(), dist.get_world_size())


def current_runtime(device: str | torch.device = "cpu") -> Runtime:
    """The runtime of an already initialized process group (or a single process) on ``device``."""
    if dist.is_available() and dist.is_initialized():
        return Runtime(resolve_device(device, _local_rank()), dist.get_rank(),
                       dist.get_world_size())
    return Runtime(resolve_device(device))


def teardown(finished: bool = True) -> None:
    """Leave the process group; after a run that ``finished``, once the objects using it are gone.

    ``DistributedDataParallel`` keeps a reference to the group (and to gloo's pending work)
    in reference cycles, which only the garbage collector frees: left to the interpreter's
    shutdown, that happens after parts of torch are torn down, and a CI run once saw a rank
    abort there ("terminate called without an active exception"). Collecting them first
    frees them while everything they need is alive. Not after a failure: another rank may be
    gone, and the launcher stops this one soon, so the error line comes first.
    """
    if dist.is_available() and dist.is_initialized():
        if finished:
            gc.collect()
        dist.destroy_process_group()


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows ``[begin, end)`` of a global batch of ``size`` that ``rank`` takes.

    Shards differ in size by at most one image; the first ``size % world_size`` ranks get
    the extra one. A rank's shard is empty when the batch has fewer images than ranks.
    """
    base, extra = divmod(size, world_size)
    begin = rank * base + min(rank, extra)
    return begin, begin + base + (rank < extra)


class SharedNoise(Messenger):
    """Reparameterized draws of latent sites taken from the global batch's noise.

    A single process draws the noise of the whole batch, ``eps`` of shape
    ``(..., batch_size, z_dim)``, from the torch random stream. Every rank has the same
    stream (same seed, same draws), so each draws that same ``eps`` and keeps its own rows
    ``[begin, end)``; ``z = loc + eps * scale`` is then, image by image, the single
    process's ``z``. Drawing the whole batch's noise costs each rank
    ``batch_size * z_dim`` normal draws a step, nothing next to the networks.

    ``sites``: one site's name, or several (the layers of a hierarchical VAE): each draws its
    whole batch's noise in the order the guide reaches it, as a single process does.

    Only the guide's draw is replaced: the model's latent site is replayed from the guide.
    Each site must be a (possibly independent-wrapped) Normal inside the data plate, the
    rightmost batch dimension, or a ``TransformedDistribution`` of one (a flow guide): its
    base's noise is drawn so, and pushed through the transforms as its ``rsample`` does (which
    also leaves each transform's cache holding the draw, so scoring it needs no inversion).
    """

    def __init__(self, sites: str | tuple[str, ...], begin: int, end: int, total: int):
        super().__init__()
        self.sites = (sites,) if isinstance(sites, str) else tuple(sites)
        self.begin, self.end, self.total = begin, end, total

    def _pyro_sample(self, msg):
        if msg["name"] not in self.sites or msg["is_observed"] or msg["value"] is not None:
            return
        fn = msg["fn"]
        # the data plate is the rightmost batch dimension of the site; a base distribution may
        # hold more of its dimensions as batch, but the leading ones are the same
        data_dim = len(fn.batch_shape) - 1
        transforms = []
        # flows nest: the base of a TransformedDistribution may be one too; rsample applies the
        # innermost transforms first
        while isinstance(fn, torch.distributions.TransformedDistribution):
            transforms = list(fn.transforms) + transforms
            fn = fn.base_dist
        shape = list(fn.batch_shape + fn.event_shape)
        shape[data_dim] = self.total
        eps = torch.empty(shape, dtype=fn.mean.dtype, device=fn.mean.device).normal_()
        # the same arithmetic as torch's Normal.rsample, so the values match bit for bit
        value = fn.mean + eps.narrow(data_dim, self.begin, self.end - self.begin) * fn.stddev
        for transform in transforms:
            value = transform(value)
        msg["value"] = value


class ELBOLoss(nn.Module):
    """The negative ELBO of a batch as a module, so ``DistributedDataParallel`` can wrap it.

    ``forward(x, **kwargs)`` is ``estimator.differentiable_loss(vae.model_body,
    vae.guide_body, x, **options, **kwargs)``: ``options`` are keyword arguments of both
    programs fixed for the run (a hierarchical VAE's ``layer_betas``). With ``shard=(begin,
    end, total)``, ``x`` is the items ``[begin, end)`` of a batch of ``total`` and the draws of
    ``vae.latent_sites`` are their rows of the whole batch's noise (:class:`SharedNoise`), as
    every loss module of :func:`pyro_vae.fit` takes its rank's part of a batch.
    """

    def __init__(self, vae: nn.Module, estimator, **options):
        super().__init__()
        self.vae = vae
        self.estimator = estimator
        self.options = options

    def forward(self, x: torch.Tensor, shard: tuple[int, int, int] | None = None, **kwargs) -> torch.Tensor:
        if self.options:
            kwargs = {**self.options, **kwargs}
        with shared_noise(self.vae.latent_sites, shard):
            return self.estimator.differentiable_loss(self.vae.model_body, self.vae.guide_body, x, **kwargs)


def shared_noise(sites: str | tuple[str, ...], shard: tuple[int, int, int] | None):
    """:class:`SharedNoise` for the part ``shard = (begin, end, total)`` of a batch; nothing to
    do for a whole batch (``None``)."""
    return contextlib.nullcontext() if shard is None else SharedNoise(sites, *shard)


def local_part(size: int, runtime: Runtime) -> tuple[int, int, float]:
    """The rows ``[begin, end)`` of a global batch this rank scores, and the weight of its loss.

    The weight is the number of ranks: DDP averages gradients over ranks, and each shard's
    loss is a sum over its images, so the reduced gradient is then that of the whole
    batch's loss, the gradient one process takes. A rank whose shard of a short last batch
    is empty scores the batch's first image with weight 0: it still draws the batch's noise
    (staying in step with the others' random stream) and joins the gradient reduction.
    """
    begin, end = shard_bounds(size, runtime.rank, runtime.world_size)
    if begin == end:
        return 0, 1, 0.0
    return begin, end, float(runtime.world_size)


def data_parallel(loss: ELBOLoss, runtime: Runtime, may_mask: bool = False) -> nn.Module:
    """``loss`` wrapped in ``DistributedDataParallel`` when there are several ranks.

    :param may_mask: whether a site may be masked in some step (``beta = 0``, as in the
        first epoch of a warm-up, or ``reconstruction_weight = 0``). A masked site leaves
        some parameters out of the graph, which DDP must then look for in every step
        (``find_unused_parameters``, an extra pass over the graph).
    """
    if not runtime.distributed:
        return loss
    device_ids = [runtime.device] if runtime.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(loss, device_ids=device_ids, find_unused_parameters=may_mask)


def all_reduce_sum(values: list[float], runtime: Runtime) -> list[float]:
    """Sums of ``values`` over ranks (the values themselves in a single process)."""
    if not runtime.distributed:
        return values
    # gloo reduces CPU tensors, nccl CUDA ones
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()
