"""A VAE's parts checked against each other, once, on a batch of two data of zeros.

Registration (:mod:`pyro_vae.components`) checks what a part's class says; shapes need data,
so they are checked here, when the VAE is built (:func:`pyro_vae.build_vae`), and a part that
breaks its contract is refused with one line naming it, instead of failing deep inside a
training step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .contract import ConfigError
from .guides import representative_code
from .seeding import probing

__all__ = ["check_shapes"]

#: The attribute of a VAE that holds each part, where it is not the part's own name.
_ATTRIBUTES = {"prior": "prior_net", "guide": "guide_net"}


def check_shapes(vae: nn.Module, image_shape, z_dim: int | None = None, labels: dict[str, str] | None = None) -> None:
    """Check ``vae``'s parts against their contracts on a batch of two data of zeros.

    The encoder must return ``(z_loc, z_scale)``, each ``(B, z_dim)``, ``z_scale > 0``; the
    guide family a reparameterized distribution with batch shape ``(B,)`` and event shape
    ``(z_dim,)`` whose samples it scores and which gives a code ``(B, z_dim)``; the decoder
    features ``(..., *image_shape)`` for ``z`` of shape ``(..., z_dim)``; the likelihood a
    distribution with event shape ``image_shape`` and batch shape ``(...)``; the prior one with
    event shape ``(z_dim,)`` and no batch shape. Modules run in eval mode (restored after) and
    with a private random stream, so the check changes nothing.

    :param vae: a :class:`~pyro_vae.model.VAE`.
    :param image_shape: the shape of one datum: ``(C, H, W)`` or ``(D,)``.
    :param z_dim: the expected latent size; ``None``: the encoder's output gives it.
    :param labels: how to name a part in the message, e.g. ``{"encoder": "model.arch = 'mlp'"}``.
    :raises ConfigError: one line naming the part and the shapes expected and got.
    """
    image_shape, labels = tuple(image_shape), labels or {}

    def fail(part: str, message: str):
        module = getattr(vae, _ATTRIBUTES.get(part, part))
        label = f" ({labels[part]})" if part in labels else ""
        raise ConfigError(f"{part} {type(module).__qualname__}{label}: {message}")

    tensors = [t for t in (*vae.parameters(), *vae.buffers()) if t.is_floating_point()]
    like = tensors[0] if tensors else torch.zeros(())
    with evaluation_mode(vae), probing(like):
        x = torch.zeros(2, *image_shape, dtype=like.dtype, device=like.device)
        z_loc, z_scale = _check_encoder(vae.encoder, x, z_dim, fail)
        _check_guide(vae.guide_net, z_loc, z_scale, fail)
        _check_decoder_and_likelihood(vae, z_loc, image_shape, fail)
        _check_prior(vae.prior(), z_loc.shape[-1], fail)


@contextlib.contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the block (dropout or batch norm would draw noise or update statistics);
    each submodule's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check_encoder(encoder, x: torch.Tensor, z_dim: int | None, fail) -> tuple[torch.Tensor, torch.Tensor]:
    out = encoder(x)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(torch.is_tensor(t) for t in out)):
        fail("encoder", f"for x of shape {tuple(x.shape)} it returned {type(out).__name__}; "
                        "expected a pair of tensors (z_loc, z_scale)")
    z_loc, z_scale = out
    z_dim = z_loc.shape[-1] if z_dim is None and z_loc.dim() == 2 else z_dim
    for tensor, what in ((z_loc, "z_loc"), (z_scale, "z_scale")):
        if z_dim is None or tuple(tensor.shape) != (2, z_dim):
            fail("encoder", f"for x of shape {tuple(x.shape)} it returned {what} of shape "
                            f"{tuple(tensor.shape)}; expected (2, z_dim = {z_dim if z_dim else 'z_dim'})")
    if not bool((z_scale > 0).all()):
        fail("encoder", "returned a z_scale that is not > 0 (a standard deviation, not its logarithm)")
    return z_loc, z_scale


def _check_guide(guide, z_loc: torch.Tensor, z_scale: torch.Tensor, fail) -> None:
    q = guide(z_loc, z_scale)
    if not isinstance(q, torch.distributions.Distribution):
        fail("guide", f"returned {type(q).__name__}; expected a pyro.distributions distribution")
    expected = (tuple(z_loc.shape[:1]), tuple(z_loc.shape[1:]))
    if (tuple(q.batch_shape), tuple(q.event_shape)) != expected:
        fail("guide", f"for z_loc of shape {tuple(z_loc.shape)} it returned a distribution with batch shape "
                      f"{tuple(q.batch_shape)} and event shape {tuple(q.event_shape)}; expected {expected[0]} "
                      f"and (z_dim,) = {expected[1]}")
    if not q.has_rsample:
        fail("guide", f"returned {type(q).__name__}, which has no reparameterized sampler (rsample); "
                      "training differentiates through the draws")
    log_q = q.log_prob(q.rsample())
    if tuple(log_q.shape) != expected[0]:
        fail("guide", f"log_prob of its own sample has shape {tuple(log_q.shape)}; expected {expected[0]}")
    try:
        code = representative_code(q)
    except NotImplementedError:
        code = None
    if not torch.is_tensor(code) or tuple(code.shape) != tuple(z_loc.shape):
        fail("guide", f"returned {type(q).__name__}, which gives no code of shape {tuple(z_loc.shape)}: "
                      "it needs a mean, or to be a TransformedDistribution of a distribution with one")


def _check_decoder_and_likelihood(vae, z_loc: torch.Tensor, image_shape: tuple, fail) -> None:
    z_dim = z_loc.shape[-1]
    z = z_loc.expand(3, 2, z_dim)  # a leading sample dimension, as importance sampling adds
    features = vae.decoder(z)
    if not torch.is_tensor(features) or tuple(features.shape) != (3, 2, *image_shape):
        got = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
        fail("decoder", f"for z of shape (3, 2, {z_dim}) it returned {got}; "
                        f"expected (3, 2, *image_shape) = {(3, 2, *image_shape)}")
    p_x = vae.likelihood(features)
    if not isinstance(p_x, torch.distributions.Distribution):
        fail("likelihood", f"returned {type(p_x).__name__}; expected a pyro.distributions distribution")
    if tuple(p_x.event_shape) != image_shape or tuple(p_x.batch_shape) != (3, 2):
        fail("likelihood", f"for features of shape {(3, 2, *image_shape)} it returned a distribution with "
                           f"batch shape {tuple(p_x.batch_shape)} and event shape {tuple(p_x.event_shape)}; "
                           f"expected (3, 2) and image_shape = {image_shape} (.to_event({len(image_shape)}))")


def _check_prior(p_z, z_dim: int, fail) -> None:
    if not isinstance(p_z, torch.distributions.Distribution):
        fail("prior", f"returned {type(p_z).__name__}; expected a pyro.distributions distribution")
    if tuple(p_z.event_shape) != (z_dim,) or tuple(p_z.batch_shape) != ():
        fail("prior", f"returned a distribution with batch shape {tuple(p_z.batch_shape)} and event shape "
                      f"{tuple(p_z.event_shape)}; expected () and (z_dim,) = ({z_dim},)")
