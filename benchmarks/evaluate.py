"""Where the time of ``pyro-vae evaluate --num-samples 5000`` goes, and what the chunk size and
the form of the Bernoulli log-probability cost.

The importance-sampled log-likelihood decodes K samples of z for every test image: for the
default 784-400-50 MLP and K = 5000 that is 5 x 10^7 decoder passes over the 10,000 test
images, whose matrix products are the arithmetic floor. Everything else (the elementwise passes
of log p(x|z), Pyro's checks of the logits) reads and writes the decoded chunk again, and costs
little only while that chunk stays in the CPU's caches (the chunk size is one lever) and
depends on how the log-probability is written (the other).

The script times ``pyro_vae.elbo.evaluate`` on the same images and weights in each setting in
turn (alternating, so a change in the machine's load hits all of them): the chunk size, and the
log-probability as it was before #12 (``-softplus((1 - 2x) l)`` with Pyro's elementwise NaN
check of the logits), with torch's one ``logsigmoid`` kernel, as eager torch has it in the
package (the log sigmoid written out of ``exp`` and ``log1p`` in place; these two with a
one-reduction NaN check of the same verdict), or as a large evaluation has it in the package:
one compiled kernel for the sign, the log sigmoid and the sum over the pixels
(``pyro_vae.likelihoods.fused_log_prob``). It first prints the package's first call, whose
compile is a one-off cost; then the median seconds, the ratio to the package's setting and the
extrapolation to 10,000 images; then the floor: the decoder's forward pass alone over the same
number of samples; then a torch profiler table of the package's setting. A trained run is not
needed: the cost does not depend on the weights.

    python benchmarks/evaluate.py --data-dir ../shared/data --images 200 --rounds 3

Run it on an otherwise idle machine: with 2 cores, anything else running skews the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.distributions import constraints
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from pyro_vae import elbo, load_config, load_splits
from pyro_vae.data import prepare
from pyro_vae.likelihoods import BernoulliLogits
from pyro_vae.model import build_vae

PACKAGE = "2**22, compiled kernel (package)"
#: name -> (elements of one decoded chunk: samples x images x (pixels + z_dim), log-prob form)
SETTINGS = {
    "2**25, softplus (before #12)": (2**25, "softplus"),
    "2**22, softplus": (2**22, "softplus"),
    "2**22, torch logsigmoid": (2**22, "logsigmoid"),
    "2**22, exp and log1p written out": (elbo.MAX_CHUNK_ELEMENTS, "eager"),
    PACKAGE: (elbo.MAX_CHUNK_ELEMENTS, "compiled"),
}


def _evaluation_form(score):
    """A ``BernoulliLogits.log_prob`` that scores without gradients by ``score(signed logits)``
    (the sign ``2x - 1`` times the logits); validation and the training path as the package's."""

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        if torch.is_grad_enabled():
            return -F.binary_cross_entropy_with_logits(self.logits, value.expand_as(self.logits), reduction="none")
        return score((2 * value - 1) * self.logits)

    return log_prob


#: torch's one ``logsigmoid`` kernel in place of the package's chain of in-place passes
_logsigmoid_log_prob = _evaluation_form(F.logsigmoid)
#: the evaluation path before #12: torch's softplus of the signed logits
_softplus_log_prob = _evaluation_form(lambda signed: -F.softplus(-signed))


@contextlib.contextmanager
def log_prob_form(form: str):
    """BernoulliLogits as the package has it, or with another form of its log-prob (softplus with
    Pyro's NaN check, as before #12; torch's logsigmoid)."""
    saved = BernoulliLogits.log_prob, BernoulliLogits.arg_constraints
    if form == "logsigmoid":
        BernoulliLogits.log_prob = _logsigmoid_log_prob
    if form == "softplus":
        BernoulliLogits.log_prob = _softplus_log_prob
        BernoulliLogits.arg_constraints = {"probs": constraints.unit_interval, "logits": constraints.real}
    try:
        yield
    finally:
        BernoulliLogits.log_prob, BernoulliLogits.arg_constraints = saved


def time_evaluate(vae, images, num_samples: int, batch_size: int, setting: tuple[int, str]) -> float:
    max_elements, form = setting
    package_chunk = elbo.MAX_CHUNK_ELEMENTS
    elbo.MAX_CHUNK_ELEMENTS = max_elements
    try:
        with log_prob_form(form):
            started = time.perf_counter()
            elbo.evaluate(vae, images, num_samples=num_samples, batch_size=batch_size, compiled=form == "compiled")
            return time.perf_counter() - started
    finally:
        elbo.MAX_CHUNK_ELEMENTS = package_chunk


@torch.no_grad()
def time_decoder_alone(vae, images, num_samples: int, batch_size: int) -> float:
    """The decoder's forward pass over as many z as ``evaluate`` decodes, in the package's chunks."""
    prior = vae.prior()
    ks = [k for k in elbo.BOUND_KS if k <= num_samples]
    chunk = elbo._chunk_size(prior, images[:batch_size], num_samples, ks)
    z = torch.randn(chunk, batch_size, prior.event_shape[-1])
    started = time.perf_counter()
    for _ in range(len(images) // batch_size):
        for start in range(0, num_samples, chunk):
            vae.decoder(z[: min(chunk, num_samples - start)])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: $PYRO_VAE_DATA)")
    parser.add_argument("--images", type=int, default=200, help="test images timed (default 200)")
    parser.add_argument("--num-samples", type=int, default=5000, help="K (default 5000)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per evaluate batch (its default: 100)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true", help="skip the profiler table")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = load_config(None)
    splits = load_splits(config.data.dataset, args.data_dir)
    images = prepare(splits.test, config.data.binarize).images[: args.images]
    vae = build_vae(config.model, images.shape[1:]).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; default MLP VAE, K = {args.num_samples}, "
          f"{len(images)} test images, batches of {args.batch_size}")
    # warm-up; the package's first call compiles its kernel for the chunk shapes (a cache on disk
    # makes later processes' compiles shorter): the one-off cost of the compiled setting
    first = time_evaluate(vae, images[: args.batch_size], args.num_samples, args.batch_size, SETTINGS[PACKAGE])
    again = time_evaluate(vae, images[: args.batch_size], args.num_samples, args.batch_size, SETTINGS[PACKAGE])
    print(f"first {args.batch_size} images, package: {first:.2f} s with the compile, {again:.2f} s again")
    for name, setting in SETTINGS.items():
        if name != PACKAGE:
            time_evaluate(vae, images[: args.batch_size], 50, args.batch_size, setting)
    seconds = {name: [] for name in SETTINGS}
    floor = []
    for _ in range(args.rounds):
        for name, setting in SETTINGS.items():
            seconds[name].append(time_evaluate(vae, images, args.num_samples, args.batch_size, setting))
        floor.append(time_decoder_alone(vae, images, args.num_samples, args.batch_size))
    reference = statistics.median(seconds[PACKAGE])
    print(f"{'setting':>32} {'median s':>9} {'ratio':>6} {'10,000 images':>14}")
    rows = {**{name: statistics.median(values) for name, values in seconds.items()},
            "decoder forward alone (floor)": statistics.median(floor)}
    for name, median in rows.items():
        minutes = median * 10_000 / len(images) / 60
        print(f"{name:>32} {median:9.2f} {median / reference:6.2f} {minutes:11.1f} min")
    if not args.no_profile:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            time_evaluate(vae, images[: args.batch_size], args.num_samples, args.batch_size, SETTINGS[PACKAGE])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
