"""Each likelihood's log-density against an independent formula, written out here."""

import math

import pytest
import torch

from pyro_vae.likelihoods import LIKELIHOODS, BernoulliLogits, make_likelihood

SHAPE = (1, 3, 4)


def features_and_data(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 5, *SHAPE, generator=g, dtype=torch.float64) * 2
    if kind == "binary":
        x = torch.bernoulli(torch.full((5, *SHAPE), 0.4, dtype=torch.float64), generator=g)
    else:
        x = torch.rand(5, *SHAPE, generator=g, dtype=torch.float64)
    return features, x


def per_image(values):
    return values.flatten(-3).sum(-1)


def test_bernoulli():
    logits, x = features_and_data("binary")
    p = torch.sigmoid(logits)
    expected = per_image(x * p.log() + (1 - x) * (1 - p).log())
    torch.testing.assert_close(make_likelihood("bernoulli", SHAPE)(logits).log_prob(x), expected)


@pytest.mark.parametrize("grad", [True, False], ids=["training path", "evaluation path"])
def test_bernoulli_saturated_logits_stay_finite_and_match_torch(grad):
    logits = torch.tensor([[60.0, -60.0, 0.0, 15.0], [-3.0, 2.0, 80.0, -80.0]])
    x = torch.tensor([1.0, 0.0, 1.0, 0.0])  # broadcast against the two rows of logits
    with torch.set_grad_enabled(grad):
        ours = BernoulliLogits(logits=logits).log_prob(x)
    torch.testing.assert_close(ours, torch.distributions.Bernoulli(logits=logits).log_prob(x))
    with pytest.raises(ValueError):  # Pyro's validation still refuses grey pixels
        BernoulliLogits(logits=logits).log_prob(torch.full((4,), 0.5))
    # without validation a grey value is scored as torch scores it, not by the binary-only identity
    grey = torch.full((4,), 0.25)
    with torch.set_grad_enabled(grad):
        unchecked = BernoulliLogits(logits=logits, validate_args=False).log_prob(grey)
    torch.testing.assert_close(unchecked, torch.distributions.Bernoulli(logits=logits, validate_args=False).log_prob(grey))


def test_bernoulli_evaluation_path_matches_torch_over_the_whole_range():
    """The written-out log sigmoid agrees with torch's at every magnitude, and is exact at +-inf."""
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(4000) * 3, torch.randn(4000) * 40, torch.linspace(-100, 100, 2001)])
    x = (torch.rand_like(logits) < 0.5).float()
    with torch.no_grad():
        ours = BernoulliLogits(logits=logits).log_prob(x)
    reference = torch.distributions.Bernoulli(logits=logits.double()).log_prob(x.double()).float()
    torch.testing.assert_close(ours, reference, rtol=2e-6, atol=1e-7)
    infinite = torch.tensor([math.inf, -math.inf, math.inf, -math.inf])
    with torch.no_grad():
        limits = BernoulliLogits(logits=infinite).log_prob(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert limits.tolist() == [0.0, 0.0, -math.inf, -math.inf]


@pytest.mark.parametrize(
    "values, has_nan",
    [
        ([0.5, -2.0, 7.0], False),
        ([0.5, math.nan, 7.0], True),
        ([math.inf, -2.0], False),  # infinities are real values: allowed, as torch's real allows them
        ([math.inf, -math.inf, 1.0], False),  # a NaN sum without a NaN element
        ([3e38, 3e38, -1.0], False),  # the sum overflows; the elements are finite
        ([3e38, 3e38, math.nan], True),
    ],
)
def test_fast_real_constraint_gives_torchs_verdict(values, has_nan):
    from torch.distributions import constraints

    from pyro_vae.likelihoods import _Real

    value = torch.tensor(values)
    assert bool(_Real().check(value).all()) == bool(constraints.real.check(value).all()) == (not has_nan)
    for grad in (True, False):  # validation refuses NaN logits on both paths, as Pyro's check does
        with torch.set_grad_enabled(grad):
            if has_nan:
                with pytest.raises(ValueError, match="found invalid values"):
                    BernoulliLogits(logits=value)
            else:
                BernoulliLogits(logits=value)


def test_continuous_bernoulli_includes_its_normalizing_constant():
    logits, x = features_and_data("grey")
    lam = torch.sigmoid(logits)
    # C(lam) = 2 atanh(1 - 2 lam) / (1 - 2 lam)   (Loaiza-Ganem & Cunningham 2019, eq. 7)
    log_c = (2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam)).log()
    expected = per_image(x * lam.log() + (1 - x) * (1 - lam).log() + log_c)
    ours = make_likelihood("continuous_bernoulli", SHAPE)(logits).log_prob(x)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def gaussian_formula(x, loc, scale):
    return per_image(-0.5 * ((x - loc) / scale) ** 2 - math.log(math.sqrt(2 * math.pi)) - torch.log(scale))


def test_gaussian_fixed_scale():
    loc, x = features_and_data("grey")
    head = make_likelihood("gaussian", SHAPE, scale=0.3)
    assert not list(head.parameters())
    torch.testing.assert_close(head(loc).log_prob(x), gaussian_formula(x, loc, torch.tensor(0.3, dtype=torch.float64)))


@pytest.mark.parametrize("per_pixel", [False, True])
def test_gaussian_learned_scale(per_pixel):
    loc, x = features_and_data("grey")
    head = make_likelihood("gaussian_learned", SHAPE, scale=0.2, per_pixel=per_pixel).double()
    (raw,) = head.parameters()
    assert raw.shape == (SHAPE if per_pixel else ())
    torch.testing.assert_close(head.scale(), torch.full(raw.shape, 0.2, dtype=torch.float64))
    with torch.no_grad():
        raw.add_(torch.linspace(-1, 1, raw.numel(), dtype=torch.float64).reshape(raw.shape))
    scale = 1e-3 + torch.nn.functional.softplus(raw)
    torch.testing.assert_close(head(loc).log_prob(x), gaussian_formula(x, loc, scale))


@pytest.mark.parametrize("learned", [False, True])
def test_laplace(learned):
    loc, x = features_and_data("grey")
    head = make_likelihood("laplace", SHAPE, scale=0.25, learned=learned).double()
    assert len(list(head.parameters())) == int(learned)
    expected = per_image(-(x - loc).abs() / 0.25 - math.log(2 * 0.25))
    torch.testing.assert_close(head(loc).log_prob(x), expected)


@pytest.mark.parametrize("shape", [SHAPE, (3, 5, 4), (6,)], ids=["grey image", "RGB image", "vector"])
@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_one_event_per_datum(name, shape):
    p = make_likelihood(name, shape)(torch.zeros(2, 7, *shape))
    assert p.batch_shape == (2, 7) and p.event_shape == shape
    assert p.mean.shape == (2, 7, *shape)
    assert p.log_prob(torch.zeros(7, *shape)).shape == (2, 7)


@pytest.mark.parametrize("per_pixel", [False, True])
def test_gaussian_learned_on_vectors_sums_over_the_vector(per_pixel):
    g = torch.Generator().manual_seed(1)
    loc, x = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    head = make_likelihood("gaussian_learned", (6,), scale=0.5, per_pixel=per_pixel).double()
    assert head.raw_scale.shape == ((6,) if per_pixel else ())
    expected = (-0.5 * ((x - loc) / 0.5) ** 2 - math.log(math.sqrt(2 * math.pi) * 0.5)).sum(-1)
    torch.testing.assert_close(head(loc).log_prob(x), expected)


def test_every_likelihood_declares_its_data():
    for cls in LIKELIHOODS.values():
        assert cls.accepts in {"binary", "unit_interval", "real"}
    with pytest.raises(ValueError, match="choose one of"):
        make_likelihood("poisson")
    with pytest.raises(ValueError, match="image_shape"):
        make_likelihood("bernoulli")


# --- the compiled kernel of the evaluation (likelihoods.fused_log_prob) ------------------------------

@pytest.mark.parametrize("n", [1, 15, 16, 35, 64, 65, 784, 1024, 1025, 3072])
def test_log_sigmoid_sum_by_groups_is_the_sum_of_log_sigmoids(n):
    """The grouping (one log per product of up to 64 factors, in lanes of 16, padded with 1) is
    exact algebra: in float64 it agrees with torch's logsigmoid summed to 1e-10, from logits of
    every size (one block of rows up to 1,024 values, several above)."""
    from pyro_vae.likelihoods import _log_sigmoid_sum

    g = torch.Generator().manual_seed(n)
    logits = torch.randn(3, 4, n, generator=g, dtype=torch.float64) * torch.tensor([0.5, 5.0, 50.0]).view(3, 1, 1)
    sign = torch.randint(0, 2, (4, n), generator=g).double() * 2 - 1
    expected = torch.nn.functional.logsigmoid(logits * sign).sum(-1)
    torch.testing.assert_close(_log_sigmoid_sum(logits, sign), expected, rtol=0, atol=1e-10)


def test_log_sigmoid_sum_in_float32_stays_within_its_rounding_bound():
    """In float32, against the float64 sum: each value loses at most 2**-23 nats to the grouping,
    and a float32 sum of n terms of one sign errs by at most (n - 1) * 2**-24 times its magnitude."""
    from pyro_vae.likelihoods import _log_sigmoid_sum

    g = torch.Generator().manual_seed(0)
    n = 784
    logits = torch.randn(50, n, generator=g) * 4
    logits[:, :100] *= 10  # saturated values, whose exp(-|y|) is below float32's resolution next to 1
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    expected = torch.nn.functional.logsigmoid((logits * sign).double()).sum(-1)
    error = (_log_sigmoid_sum(logits, sign).double() - expected).abs()
    bound = n * 2**-23 + (n - 1) * 2**-24 * expected.abs()
    assert (error <= bound).all(), (error - bound).max()


def test_compiled_log_prob_agrees_with_eager_keeps_validation_and_is_exact_at_infinity():
    import warnings

    from pyro_vae.likelihoods import _compiled_log_sigmoid_sum, fused_log_prob

    head = make_likelihood("bernoulli", (1, 28, 28))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 1, 28, 28, generator=g) * 5
    logits[0, 0, 0, 0, :4] = torch.tensor([math.inf, -math.inf, math.inf, -math.inf])
    x = torch.bernoulli(torch.full((5, 1, 28, 28), 0.3), generator=g)
    x[0, 0, 0, :4] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # scores 0, 0, -inf, -inf: image 0 of row 0 is -inf
    with torch.no_grad():
        eager = head(logits).log_prob(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed compile would warn and fall back: not here
            with fused_log_prob():
                fused = head(logits).log_prob(x)
                again = head(logits).log_prob(x)
    assert _compiled_log_sigmoid_sum.compiled is not None and not _compiled_log_sigmoid_sum.failed
    assert eager[0, 0] == fused[0, 0] == -math.inf
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-4)
    assert torch.equal(fused, again)  # the same computation repeated: bit for bit
    # torch's compiler switches off torch.distributions' validation for the process; the package restores it
    assert torch.distributions.Distribution._validate_args
    with torch.no_grad(), fused_log_prob(), pytest.raises(ValueError):
        head(logits).log_prob(torch.full_like(x, 0.5))
    with pytest.raises(ValueError):
        head(torch.full_like(logits, math.nan))


def test_a_failed_compile_warns_once_and_scores_in_eager_torch(monkeypatch):
    from pyro_vae import likelihoods
    from pyro_vae.likelihoods import fused_log_prob

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(likelihoods, "_compiled_log_sigmoid_sum", likelihoods._CompiledKernel())
    head = make_likelihood("bernoulli", SHAPE)
    logits, x = features_and_data("binary")
    with torch.no_grad():
        eager = head(logits).log_prob(x)
        with fused_log_prob(), pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
            first = head(logits).log_prob(x)
        with fused_log_prob():
            second = head(logits).log_prob(x)  # no second warning: the fall-back is remembered
    assert likelihoods._compiled_log_sigmoid_sum.failed
    assert torch.equal(first, eager) and torch.equal(second, eager)
