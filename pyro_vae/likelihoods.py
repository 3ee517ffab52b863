"""Likelihood heads p(x|z): decoder features in, a Pyro distribution over one datum out.

A datum is an image ``(C, H, W)`` or a vector ``(D,)``; ``image_shape`` is its shape. Each
head is an ``nn.Module`` whose ``forward(features)`` takes the decoder's output of shape
``(..., *image_shape)`` and returns a distribution whose event is the whole datum, so
``log_prob`` gives one number per datum, with every normalizing constant included: numbers
from different likelihoods on the same data are comparable. ``accepts`` names the data the
head is defined on; configs and data are checked against it before anything trains:

- ``"binary"``: values in {0, 1} (binarized data);
- ``"unit_interval"``: values in [0, 1] (grey or binary);
- ``"real"``: any real values.

Options (``model.likelihood_options`` in a config) are the keyword arguments of a head's
constructor other than ``image_shape``; ``option_bounds`` states the allowed range of the
numeric ones. A head of one's own is added with :func:`pyro_vae.register_likelihood`, whose
docstring is the contract.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import warnings

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints
from torch.nn import functional as F

from .seeding import probing

#: Event dimensions of an image (C, H, W). The heads here take theirs from ``image_shape``
#: (one for vectors); this constant remains for code written for images only.
IMAGE_EVENT_DIM = 3


class _Real(constraints._Real):
    """The constraint ``real`` (no NaN; infinities allowed) with a cheaper check.

    ``real.check`` compares every element with itself and the distribution then reduces that
    boolean tensor: two passes over a decoded chunk, 11 % of a K = 5000 evaluation here. A
    finite sum has no NaN in it, so one reduction settles almost every call; a sum that is not
    finite (a NaN, an infinity, or an overflow) falls back to the elementwise check, so the
    verdict is the same as ``real``'s.
    """

    def check(self, value):
        if torch.isfinite(value.sum()):
            return torch.ones((), dtype=torch.bool, device=value.device)
        return value == value


class BernoulliLogits(dist.Bernoulli):
    """``pyro.distributions.Bernoulli`` with a ``log_prob`` tuned for each use.

    With gradients (training): ``-binary_cross_entropy_with_logits``, whose fused backward
    kernel is the fastest here. Without (evaluation, where K = 5000 importance samples spend
    most of their time in this function): for x in {0, 1}, ``x * l - softplus(l)`` equals
    ``log sigmoid((2x - 1) * l)`` (the sign ``2x - 1`` has the shape of ``x``, not of the
    chunk), computed by :func:`_log_sigmoid_` with vectorized kernels. Both are stable for
    saturated logits; validation is untouched (grey values are refused before this, NaN logits
    by :class:`_Real`, the same verdict as Pyro's check for less work).
    """

    arg_constraints = {"probs": constraints.unit_interval, "logits": _Real()}

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        logits = self.logits
        if torch.is_grad_enabled():
            return -F.binary_cross_entropy_with_logits(logits, value.expand_as(logits), reduction="none")
        if not self._validate_args:  # unchecked values may be grey, where the identity fails
            return value * logits - F.softplus(logits)
        return _log_sigmoid_((2 * value - 1) * logits)


def _log_sigmoid_(y: torch.Tensor) -> torch.Tensor:
    """``log sigmoid(y) = min(y, 0) - log1p(exp(-|y|))`` in place on ``y`` (no gradient).

    Written out of in-place passes: in the whole K = 5000 evaluation timed side by side by
    ``benchmarks/evaluate.py``, torch's one ``logsigmoid`` kernel took longer than this form
    (docs/results.md), although on one chunk alone it is as fast (why it loses inside the
    evaluation, cache or allocation, is not measured apart). Exact for infinite ``y``; NaN
    stays NaN.
    """
    tail = y.abs().neg_().exp_().log1p_()
    return y.clamp_(max=0).sub_(tail)


#: Whether :class:`_BernoulliDatum` sums log p(x|z) by the compiled kernel (see :func:`fused_log_prob`).
_FUSED = contextvars.ContextVar("pyro_vae_fused_log_prob", default=False)

#: Factors ``1 + exp(-|y|)`` lie in (1, 2], so the product of this many stays under 2**64, far
#: inside float32's range (2**128): one log per product replaces one log1p per element.
_GROUP = 64

#: Products taken side by side: a datum's values are laid out in rows of this many, and each
#: column is multiplied down the rows, so the products run in the vector lanes (16 float32 values
#: fill an AVX-512 register, two AVX2 ones). Products along rows of 61 instead (the first form)
#: were slower on AVX-512 cores (docs/results.md).
_LANES = 16


@contextlib.contextmanager
def fused_log_prob(enabled: bool = True):
    """Inside, the Bernoulli head's ``log_prob`` without gradients is one compiled kernel.

    An importance-sampled evaluation spends its time decoding z and scoring the decoded chunk
    (``benchmarks/evaluate.py``). Written in eager torch, the score is a chain of passes over the
    chunk; compiled (``torch.compile``), the sign, the log sigmoid and the sum over the datum run
    in one loop over it. It also takes one ``log`` per up to 64 values instead of one ``log1p`` per
    value (:func:`_log_sigmoid_sum`). Each new chunk shape compiles once (a few seconds), which
    pays only over a long evaluation: :func:`pyro_vae.evaluate` turns this on by itself for large
    ones on a CPU. Where torch cannot compile (no C++ compiler, an unsupported platform), it warns
    once and scores in eager torch as outside.
    """
    token = _FUSED.set(enabled)
    try:
        yield
    finally:
        _FUSED.reset(token)


def _log_sigmoid_sum(logits: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``sum_d log sigmoid(sign_d * logits_d)`` over the last dimension (broadcast), no gradient.

    ``log sigmoid(y) = min(y, 0) - log(1 + exp(-|y|))``, and a sum of logs is the log of the
    product: the n factors are laid out in blocks of at most :data:`_GROUP` rows of
    :data:`_LANES` (padded with 1), each column of a block is multiplied down its rows and each
    product logged once (784 MNIST pixels: one block of 49 rows, 16 logs). Against ``log1p`` per
    value this loses at most 2**-23 nats a value (a factor rounds to 1 when ``exp(-|y|) < 2**-24``;
    a product's rounding is relative), 784 * 2**-23 ~ 1e-4 nats for an MNIST image, below the
    float32 rounding of the sum itself. Exact for infinite logits.
    """
    y = logits * sign
    n = y.shape[-1]
    all_rows = -(-n // _LANES)
    blocks = -(-all_rows // _GROUP)
    rows = -(-all_rows // blocks)  # rows per block, at most _GROUP: the least padding
    factors = F.pad(torch.exp(-y.abs()) + 1, (0, blocks * rows * _LANES - n), value=1.0)
    products = factors.unflatten(-1, (blocks, rows, _LANES)).prod(-2)
    return y.clamp(max=0).sum(-1) - products.log().sum((-2, -1))


class _CompiledKernel:
    """:func:`_log_sigmoid_sum` compiled on first use (static shapes: a compile per chunk shape,
    which keeps the kernel fastest here); ``None`` from :meth:`__call__` once compiling failed."""

    def __init__(self):
        self.compiled = None
        self.failed = False

    def __call__(self, logits, sign):
        if self.failed:
            return None
        # torch's compiler switches off the validation of every torch distribution, for the whole
        # process, when first used (torch._dynamo.eval_frame.TorchPatcher); Pyro's checks stay on here
        validate = torch.distributions.Distribution._validate_args
        cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_extension_log.level
        cpp_extension_log.setLevel(logging.ERROR)  # "No CUDA runtime is found": true, and no matter on a CPU
        try:
            if self.compiled is None:
                self.compiled = torch.compile(_log_sigmoid_sum, dynamic=False)
            return self.compiled(logits, sign)
        except Exception as error:  # no compiler, an unsupported backend: torch's own errors vary
            self.failed = True
            warnings.warn(f"pyro_vae: torch.compile of the Bernoulli log-likelihood failed ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); scoring in eager torch instead, "
                          f"correct but slower", RuntimeWarning, stacklevel=3)
            return None
        finally:
            cpp_extension_log.setLevel(level)
            torch.distributions.Distribution.set_default_validate_args(validate)


_compiled_log_sigmoid_sum = _CompiledKernel()


class _BernoulliDatum(dist.Independent):
    """:class:`BernoulliLogits` over a whole datum (``.to_event``), whose ``log_prob`` without
    gradients is :func:`_log_sigmoid_sum` compiled, inside :func:`fused_log_prob`. Validation
    stays as outside: the values are checked first, NaN logits were refused at construction."""

    def log_prob(self, value):
        base = self.base_dist
        if torch.is_grad_enabled() or not _FUSED.get() or not base._validate_args:  # unchecked may be grey
            return super().log_prob(value)
        base._validate_sample(value)
        n = self.reinterpreted_batch_ndims
        scores = _compiled_log_sigmoid_sum(base.logits.flatten(-n), (2 * value - 1).flatten(-n))
        return super().log_prob(value) if scores is None else scores


class Bernoulli(nn.Module):
    """Independent Bernoulli values parametrized by logits (stable for saturated logits).

    :param image_shape: the shape of one datum: ``(C, H, W)`` or ``(D,)``.
    """

    accepts = "binary"
    option_bounds: dict = {}

    def __init__(self, image_shape):
        super().__init__()
        self.event_dim = len(image_shape)

    def forward(self, logits):
        return _BernoulliDatum(BernoulliLogits(logits=logits), self.event_dim)


class ContinuousBernoulli(nn.Module):
    """Continuous Bernoulli pixels on [0, 1], normalizing constant included.

    The Bernoulli likelihood applied to grey values is not a density (it lacks the constant
    C(lambda)); the continuous Bernoulli is its normalized form.

    Reference: Loaiza-Ganem & Cunningham (2019), The continuous Bernoulli: fixing a pervasive
    error in variational autoencoders.
    """

    accepts = "unit_interval"
    option_bounds: dict = {}

    def __init__(self, image_shape):
        super().__init__()
        self.event_dim = len(image_shape)

    def forward(self, logits):
        return dist.ContinuousBernoulli(logits=logits).to_event(self.event_dim)


def _scale_parameter(image_shape, per_pixel: bool, init_scale: float, min_scale: float) -> nn.Parameter:
    shape = tuple(image_shape) if per_pixel else ()
    # inverse softplus, so that min_scale + softplus(raw) starts at init_scale exactly
    above_floor = max(float(init_scale) - min_scale, 1e-6)
    return nn.Parameter(torch.full(shape, above_floor).expm1().log())


class _LocationScale(nn.Module):
    """Shared code of the Gaussian and Laplace heads: the decoder gives the location; the
    scale is fixed, or learned (one value, or one per pixel or vector entry when ``per_pixel``)."""

    accepts = "real"
    family = None
    option_bounds = {"scale": (0.0, False), "min_scale": (0.0, False)}

    def __init__(self, image_shape, scale: float, learned: bool, per_pixel: bool = False, min_scale: float = 1e-3):
        super().__init__()
        self.event_dim = len(image_shape)
        self.learned = learned
        self.min_scale = min_scale
        if learned:
            self.raw_scale = _scale_parameter(image_shape, per_pixel, scale, min_scale)
        else:
            self.register_buffer("fixed_scale", torch.tensor(float(scale)))

    def scale(self) -> torch.Tensor:
        if self.learned:
            # a floor keeps the density bounded: background pixels that are always 0 would
            # otherwise drive their scale, and the log-likelihood, to infinity
            return self.min_scale + F.softplus(self.raw_scale)
        return self.fixed_scale

    def forward(self, loc):
        return self.family(loc, self.scale().expand_as(loc)).to_event(self.event_dim)


class Gaussian(_LocationScale):
    """Gaussian pixels N(x; decoder(z), scale^2) with a fixed ``scale`` (default 0.1)."""

    family = dist.Normal
    option_bounds = {"scale": (0.0, False)}

    def __init__(self, image_shape, scale: float = 0.1):
        super().__init__(image_shape, scale, learned=False)


class GaussianLearned(_LocationScale):
    """Gaussian pixels with a learned scale (initially ``scale``, never below ``min_scale``):
    one value shared by all pixels, or one per pixel with ``per_pixel = true``."""

    family = dist.Normal

    def __init__(self, image_shape, scale: float = 0.1, per_pixel: bool = False, min_scale: float = 1e-3):
        super().__init__(image_shape, scale, learned=True, per_pixel=per_pixel, min_scale=min_scale)


class Laplace(_LocationScale):
    """Laplace pixels located at decoder(z), with a fixed ``scale`` (default 0.1) or, with
    ``learned = true``, a learned one (shared, or ``per_pixel``)."""

    family = dist.Laplace

    def __init__(self, image_shape, scale: float = 0.1, learned: bool = False, per_pixel: bool = False,
                 min_scale: float = 1e-3):
        super().__init__(image_shape, scale, learned=learned, per_pixel=per_pixel, min_scale=min_scale)


#: likelihood name -> class; add one with :func:`pyro_vae.register_likelihood`.
LIKELIHOODS = {
    "bernoulli": Bernoulli,
    "continuous_bernoulli": ContinuousBernoulli,
    "gaussian": Gaussian,
    "gaussian_learned": GaussianLearned,
    "laplace": Laplace,
}


def make_likelihood(name: str, image_shape=None, **options) -> nn.Module:
    """The likelihood head ``name`` for data of ``image_shape`` (``(C, H, W)`` or ``(D,)``),
    with its ``options``."""
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}")
    if image_shape is None:
        raise ValueError(f"likelihood {name!r} needs image_shape, the shape of one datum: (C, H, W) or (D,)")
    return LIKELIHOODS[name](image_shape=tuple(image_shape), **options)


@torch.no_grad()
def likelihood_link(likelihood: nn.Module, image_shape) -> str | None:
    """How a likelihood's mean follows from the decoder's features, derived on a grid of
    features rather than declared: ``"logit"`` where the mean is ``sigmoid(features)``
    (Bernoulli: the features are logits), ``"identity"`` where it is the features themselves
    (Gaussian, Laplace), else ``None`` (e.g. the continuous Bernoulli, whose mean is not the
    sigmoid of its logits).

    :param likelihood: a likelihood module built for data of ``image_shape``.
    :param image_shape: the shape of one datum: ``(C, H, W)`` or ``(D,)``.

    >>> from pyro_vae.likelihoods import Bernoulli, ContinuousBernoulli, Gaussian
    >>> [likelihood_link(cls((1, 2, 2)), (1, 2, 2)) for cls in (Bernoulli, Gaussian, ContinuousBernoulli)]
    ['logit', 'identity', None]
    """
    image_shape = tuple(image_shape)
    features = torch.linspace(-4.0, 4.0, 9 * math.prod(image_shape)).reshape(9, *image_shape)
    tensors = [t for t in (*likelihood.parameters(), *likelihood.buffers()) if t.is_floating_point()]
    if tensors:
        features = features.to(tensors[0])
    try:
        with probing(features):
            mean = likelihood(features).mean
    except Exception:  # a part of one's own may raise anything; its link is then unknown
        return None
    if not torch.is_tensor(mean) or mean.shape != features.shape:
        return None
    if torch.allclose(mean, torch.sigmoid(features), atol=1e-5):
        return "logit"
    if torch.allclose(mean, features, atol=1e-5):
        return "identity"
    return None
