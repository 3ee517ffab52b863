import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch import nn
from torch.distributions import kl_divergence

from pyro_vae.config import ConfigError, load_config
from pyro_vae.model import LATENT, OBSERVED, VAE, build_vae
from pyro_vae.networks import ARCHITECTURES
from pyro_vae.seeding import seeded

from helpers import one_line
from parts import ShiftedNormal, TinyDecoder, TinyEncoder

IMAGE_SHAPE = (1, 12, 10)  # deliberately not square nor a multiple of 4


def make_vae(arch="mlp", z_dim=4, image_shape=IMAGE_SHAPE, num_layers=1, name=None):
    config = load_config(None, {"model.arch": arch, "model.z_dim": z_dim, "model.hidden_dim": 16,
                                "model.num_layers": num_layers})
    return build_vae(config.model, image_shape, name=name)


def binary_batch(n=8, shape=IMAGE_SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *shape), 0.3), generator=g)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("shape", [IMAGE_SHAPE, (1, 28, 28), (3, 16, 16), (3, 5, 7)])
def test_shapes(arch, shape):
    vae = make_vae(arch, image_shape=shape)
    x = binary_batch(5, shape)
    q = vae.encode(x)
    assert q.batch_shape == (5,) and q.event_shape == (4,)
    p_x = vae.decode(q.rsample((3,)))  # extra sample dimension in front
    assert p_x.batch_shape == (3, 5) and p_x.event_shape == shape
    assert vae.prior().event_shape == (4,) and vae.prior().batch_shape == ()
    assert vae.sample_images(6).shape == (6, *shape)
    assert vae.reconstruct(x).shape == x.shape


@pytest.mark.parametrize("shape", [(7,), (1, 5)], ids=["vector", "2-d datum"])
def test_mlp_shapes_on_data_that_are_not_images(shape):
    vae = make_vae("mlp", image_shape=shape)
    x = binary_batch(5, shape)
    assert vae.encode(x).batch_shape == (5,)
    p_x = vae.decode(vae.encode(x).rsample((3,)))
    assert p_x.batch_shape == (3, 5) and p_x.event_shape == shape
    assert vae.sample_images(6).shape == (6, *shape) and vae.reconstruct(x).shape == x.shape


@pytest.mark.parametrize("shape, words", [
    ((7,), ["model.arch = 'conv' needs images (C, H, W)", "vectors of shape (7,)", "model.arch = 'mlp'"]),
    ((1, 3, 8), ["at least 4 x 4", "(1, 3, 8)"]),
])
def test_conv_refuses_what_it_cannot_take_with_one_line(shape, words):
    with pytest.raises(ConfigError) as error:
        make_vae("conv", image_shape=shape)
    one_line(error, *words)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_mlp_depth(num_layers):
    vae = make_vae(num_layers=num_layers)
    linear = [m for m in vae.encoder.body if isinstance(m, torch.nn.Linear)]
    assert len(linear) == num_layers


def test_model_and_guide_share_the_latent_site():
    vae = make_vae()
    x = binary_batch()
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    assert guide_trace.nodes[LATENT]["value"] is model_trace.nodes[LATENT]["value"]
    assert guide_trace.nodes[LATENT]["value"].shape == (8, 4)
    assert model_trace.nodes[OBSERVED]["is_observed"]
    for trace in (guide_trace, model_trace):
        frames = trace.nodes[LATENT]["cond_indep_stack"]
        assert [f.name for f in frames] == ["data"]


@pytest.mark.parametrize("elbo", [Trace_ELBO(), TraceMeanField_ELBO()], ids=["mc", "analytic"])
def test_elbo_is_finite_and_bodies_match_registered_programs(elbo):
    vae = make_vae()
    x = binary_batch()
    pyro.set_rng_seed(1)
    loss = elbo.differentiable_loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)
    body_loss = elbo.differentiable_loss(vae.model_body, vae.guide_body, x)
    assert torch.isfinite(loss)
    assert loss.item() == body_loss.item()


def test_same_seed_same_loss():
    vae = make_vae()
    x = binary_batch()
    losses = []
    for _ in range(2):
        pyro.set_rng_seed(7)
        losses.append(Trace_ELBO().loss(vae.model_body, vae.guide_body, x))
    assert losses[0] == losses[1]


@pytest.mark.parametrize("beta", [0.0, 0.5, 4.0])
def test_beta_scales_exactly_the_kl_term(beta):
    """With the analytic KL: loss(beta) - loss(1) = (beta - 1) * KL, for the same draw of z."""
    vae = make_vae()
    x = binary_batch()
    elbo = TraceMeanField_ELBO()
    losses = {}
    for b in (1.0, beta):
        pyro.set_rng_seed(3)
        losses[b] = elbo.differentiable_loss(vae.model_body, vae.guide_body, x, beta=b)
    kl = kl_divergence(vae.encode(x), vae.prior()).sum()
    torch.testing.assert_close(losses[beta] - losses[1.0], (beta - 1) * kl, rtol=1e-5, atol=1e-3)
    if beta == 0:
        pyro.set_rng_seed(3)
        z = vae.encode(x).rsample()
        torch.testing.assert_close(losses[0.0], -vae.decode(z).log_prob(x).sum(), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_reconstruction_weight_scales_exactly_the_reconstruction_term(weight):
    """loss(w) = -w * log p(x|z) + KL for the same draw of z (analytic KL)."""
    vae = make_vae()
    x = binary_batch()
    pyro.set_rng_seed(3)
    loss = TraceMeanField_ELBO().differentiable_loss(vae.model_body, vae.guide_body, x, reconstruction_weight=weight)
    pyro.set_rng_seed(3)
    q = vae.encode(x)
    z = q.rsample()
    expected = -weight * vae.decode(z).log_prob(x).sum() + kl_divergence(q, vae.prior()).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)


def test_beta_scales_both_estimators_alike():
    """Trace_ELBO's KL part (loss minus reconstruction, same z) also scales by beta."""
    vae = make_vae()
    x = binary_batch()

    def parts(beta):
        pyro.set_rng_seed(5)
        loss = Trace_ELBO().differentiable_loss(vae.model_body, vae.guide_body, x, beta=beta)
        pyro.set_rng_seed(5)
        q = vae.encode(x)
        z = q.rsample()
        return loss + vae.decode(z).log_prob(x).sum(), (q.log_prob(z) - vae.prior().log_prob(z)).sum()

    kl_term_4, sampled_kl = parts(4.0)
    kl_term_1, _ = parts(1.0)
    torch.testing.assert_close(kl_term_1, sampled_kl, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(kl_term_4, 4 * sampled_kl, rtol=1e-5, atol=1e-3)


def test_bernoulli_on_grey_pixels_is_refused_by_pyro_validation():
    vae = make_vae()
    grey = torch.full((4, *IMAGE_SHAPE), 0.5)
    with pytest.raises(ValueError, match="support|Expected value argument"):
        Trace_ELBO().loss(vae.model_body, vae.guide_body, grey)


@pytest.mark.statistical
def test_model_and_guide_train_with_pyro_svi(seed):
    """The contract: vae.model / vae.guide work with SVI and pyro.optim as they are.

    The seed draws the initial weights and the training noise. Over 100 seeds, the first 10
    losses summed exceeded the last 10 by 5165 +- 272 nats (smallest 4389): the assertion
    that they do is 19 standard deviations from failing (normal): false-failure rate below
    1e-20 per run.
    """
    pyro.clear_param_store()
    with seeded(seed):
        vae = make_vae(name="mine")
        x = binary_batch(64)
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        before = vae.decoder.out.weight.detach().clone()
        losses = [svi.step(x) for _ in range(60)]
    assert not torch.equal(before, vae.decoder.out.weight)
    names = set(pyro.get_param_store().keys())
    assert {"mine.encoder$$$loc.weight", "mine.decoder$$$out.weight"} <= names
    assert sum(losses[-10:]) < sum(losses[:10])
    pyro.clear_param_store()


class GaussianVectors(torch.nn.Module):
    """A user's own likelihood: unit-variance Gaussian vectors."""

    accepts = "real"

    def forward(self, loc):
        return dist.Normal(loc, 1.0).to_event(1)


@pytest.mark.parametrize("data", ["images", "vectors"])
def test_model_and_guide_in_a_users_own_svi_loop_on_their_own_tensors(data):
    """A hand-built VAE (vectors) or a config-built one (images), the user's own tensors, SVI."""
    pyro.clear_param_store()
    with seeded(0):
        if data == "vectors":
            vae = VAE(TinyEncoder((6,), 2), TinyDecoder((6,), 2), GaussianVectors(), ShiftedNormal(2))
            vae.check_shapes((6,))
            # two clusters in 6 dimensions
            x = torch.cat([torch.randn(32, 6) * 0.3 + 2, torch.randn(32, 6) * 0.3 - 2])
        else:
            vae = make_vae(z_dim=2)
            x = binary_batch(64)
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-2}), Trace_ELBO())
        losses = [svi.step(x) for _ in range(40)]
    assert all(map(math.isfinite, losses)) and sum(losses[-5:]) < sum(losses[:5])
    assert {f"{vae.name}.encoder", f"{vae.name}.decoder"} <= {k.split("$$$")[0] for k in pyro.get_param_store()}
    pyro.clear_param_store()


def test_default_names_are_distinct_in_creation_order():
    first, second = make_vae(), make_vae()
    number = lambda vae: 0 if vae.name == "vae" else int(vae.name.rsplit("_", 1)[1])  # noqa: E731
    assert first.name.startswith("vae") and number(second) == number(first) + 1


def test_two_vaes_trained_alternately_in_one_param_store_keep_their_own_parameters():
    """With fixed module names, pyro.module would load the first VAE's weights into the second."""
    pyro.clear_param_store()
    with seeded(0):
        a, b = make_vae(z_dim=2), make_vae(z_dim=2)
        x_a, x_b = binary_batch(16, seed=1), 1 - binary_batch(16, seed=2)
        svi_a = SVI(a.model, a.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        svi_b = SVI(b.model, b.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        for _ in range(5):
            svi_a.step(x_a)
            snapshot = {k: v.detach().clone() for k, v in a.state_dict().items()}
            svi_b.step(x_b)
            # b's step leaves every parameter of a as it was
            assert all(torch.equal(v, a.state_dict()[k]) for k, v in snapshot.items())
    store = pyro.get_param_store()
    for vae in (a, b):
        for part in ("encoder", "decoder"):
            for key, param in getattr(vae, part).named_parameters():
                assert store[f"{vae.name}.{part}$$${key}"] is param  # the store holds the VAE's own tensors
    assert not torch.equal(a.decoder.out.weight, b.decoder.out.weight)
    assert len(store.keys()) == len(list(a.parameters())) + len(list(b.parameters()))
    pyro.clear_param_store()


def test_prior_is_standard_normal():
    vae = make_vae(z_dim=3)
    prior = vae.prior()
    assert isinstance(prior.base_dist, dist.Normal)
    torch.testing.assert_close(prior.mean, torch.zeros(3))
    torch.testing.assert_close(prior.stddev, torch.ones(3))


# -- gated units, the output bias, the guide family in Pyro's param store --------------------------

def test_gated_dense_is_a_linear_response_times_a_sigmoid_gate():
    from pyro_vae.networks import GatedDense

    layer = GatedDense(3, 2)
    x = torch.randn(5, 3)
    expected = (x @ layer.linear.weight.T + layer.linear.bias) * torch.sigmoid(x @ layer.gate.weight.T + layer.gate.bias)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_gated_mlp_is_the_mlp_with_gated_units(num_layers):
    from pyro_vae.networks import GatedDense

    vae = make_vae("gated_mlp", num_layers=num_layers)
    for body in (vae.encoder.body, vae.decoder.body):
        assert [type(m) for m in body] == [GatedDense] * num_layers
    assert vae.decoder.output_bias is vae.decoder.out.bias
    x = binary_batch(5)
    assert vae.encode(x).batch_shape == (5,) and vae.reconstruct(x).shape == x.shape


@pytest.mark.parametrize("num_layers", [1, 2])
def test_mlp_bn_normalizes_each_hidden_layer_by_the_batch_in_training(num_layers):
    from pyro_vae.networks import FeatureBatchNorm

    vae = make_vae("mlp_bn", num_layers=num_layers).train()
    for body in (vae.encoder.body, vae.decoder.body):
        assert [type(m) for m in body] == [nn.Linear, FeatureBatchNorm, nn.ReLU] * num_layers
        assert all(m.bias is None for m in body if isinstance(m, nn.Linear))  # the shift replaces it
    # the normalized pre-activations of a training batch: mean 0 and variance 1 per unit, over
    # every leading dimension (here 3 particles x 5 items)
    z = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1)) * 4 + 2
    normalized = vae.decoder.body[:2](z).reshape(15, -1)
    torch.testing.assert_close(normalized.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalized.var(0, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)


def test_mlp_bn_in_eval_mode_scores_each_datum_alone():
    vae = make_vae("mlp_bn").train()
    x = binary_batch(8)
    for _ in range(3):  # running statistics away from their start
        vae.reconstruct(x)
    assert vae.encoder.body[1].num_batches_tracked == 3
    vae.eval()
    together = vae.reconstruct(x)
    alone = torch.cat([vae.reconstruct(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(together, alone)
    assert vae.encoder.body[1].num_batches_tracked == 3  # eval mode leaves the statistics as they are
    # in training the batch's statistics are used, so the same datum decodes differently
    vae.train()
    assert not torch.allclose(vae.reconstruct(x)[:1], vae.reconstruct(torch.cat([x[:1], 1 - x[:1]]))[:1])


def test_mlp_bn_trains_a_batch_of_one_on_its_running_statistics_and_refuses_batches_of_one():
    vae = make_vae("mlp_bn").train()
    x = binary_batch(8)
    vae.reconstruct(x)  # running statistics away from their start
    norm = vae.encoder.body[1]
    before = (norm.running_mean.clone(), norm.num_batches_tracked.item())
    one = vae.reconstruct(x[:1])  # the short last batch of an epoch
    assert torch.equal(norm.running_mean, before[0]) and norm.num_batches_tracked == before[1]
    torch.testing.assert_close(one, vae.eval().reconstruct(x[:1]))
    with pytest.raises(ConfigError) as error:
        load_config(None, {"model.arch": "mlp_bn", "train.batch_size": 1})
    one_line(error, "model.arch = 'mlp_bn' normalizes by the batch", "train.batch_size = 1")


def _images_with_constant_pixels(n=40, shape=(1, 3, 4)):
    """Grey images whose first pixel is always 0 and second always 1: the clip shows."""
    images = torch.rand(n, *shape, generator=torch.Generator().manual_seed(0))
    flat = images.view(n, -1)
    flat[:, 0], flat[:, 1] = 0.0, 1.0
    return images


def test_init_output_bias_is_the_logit_of_the_clipped_mean_pixel():
    from pyro_vae.model import OUTPUT_BIAS_CLIP, init_output_bias

    images = _images_with_constant_pixels()
    vae = make_vae(image_shape=images.shape[1:])
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    init_output_bias(vae, images)
    mean = images.double().mean(0).flatten().clamp(OUTPUT_BIAS_CLIP, 1 - OUTPUT_BIAS_CLIP)
    torch.testing.assert_close(vae.decoder.out.bias, torch.log(mean / (1 - mean)).float())
    assert math.isclose(vae.decoder.out.bias[0].item(), math.log(1e-3 / (1 - 1e-3)), rel_tol=1e-5)
    # the untrained decoder's mean at z = 0, with the weights shrunk away, is the mean image
    with torch.no_grad():
        vae.decoder.out.weight.zero_()
    torch.testing.assert_close(vae.decode(torch.zeros(1, 4)).mean[0, 0, 0, 2:], images.mean(0)[0, 0, 2:])
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in before.items() if k not in ("decoder.out.bias",
                                                                                         "decoder.out.weight"))


def test_init_output_bias_per_channel_for_conv_and_identity_for_gaussian_pixels():
    from pyro_vae.model import init_output_bias

    images = torch.rand(30, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1)
    conv = make_vae("conv", image_shape=(3, 8, 8))
    init_output_bias(conv, images)
    torch.testing.assert_close(conv.decoder.output_bias, torch.logit(images.double().mean((0, 2, 3))).float())
    config = load_config(None, {"model.likelihood": "gaussian", "data.binarize": "none", "model.z_dim": 2,
                                "model.hidden_dim": 8})
    gaussian = build_vae(config.model, (3, 8, 8))
    init_output_bias(gaussian, images)
    torch.testing.assert_close(gaussian.decoder.out.bias, images.mean(0).flatten())


@pytest.mark.parametrize("likelihood, link", [("bernoulli", "logit"), ("continuous_bernoulli", None),
                                              ("gaussian", "identity"), ("gaussian_learned", "identity"),
                                              ("laplace", "identity")])
def test_the_link_of_each_likelihood_is_derived(likelihood, link):
    from pyro_vae.likelihoods import make_likelihood
    from pyro_vae.model import likelihood_link

    assert likelihood_link(make_likelihood(likelihood, (1, 2, 3)), (1, 2, 3)) == link


@pytest.mark.parametrize("overrides, words", [
    ({"model.likelihood": "continuous_bernoulli", "data.binarize": "none"},
     ["model.init_output_bias = true", "sigmoid(features)", "'continuous_bernoulli' is neither", "leave it false"]),
])
def test_init_output_bias_is_refused_where_it_has_no_meaning(overrides, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, {"model.init_output_bias": True, **overrides})
    one_line(error, *words)


def test_fit_sets_the_output_bias_and_nothing_else(splits, tiny_config):
    """With the option on, the built VAE differs only in the output bias; off, fit never calls it."""
    from pyro_vae.model import init_output_bias
    from pyro_vae.train import fit

    config = tiny_config.replace(**{"train.epochs": 0})
    plain = fit(config, splits, progress=False).vae.state_dict()
    biased = fit(config.replace(**{"model.init_output_bias": True}), splits, progress=False).vae.state_dict()
    assert [k for k in plain if not torch.equal(plain[k], biased[k])] == ["decoder.out.bias"]
    expected = torch.logit(splits.train.images.double().mean(0).flatten().clamp(1e-3, 1 - 1e-3)).float()
    torch.testing.assert_close(biased["decoder.out.bias"], expected)
    vae = build_vae(config.model, splits.train.image_shape)
    init_output_bias(vae, splits.train.images)
    torch.testing.assert_close(vae.decoder.out.bias, expected)


def test_the_default_build_is_the_one_of_the_parts_alone():
    """The guide family and the new keys change nothing by default: the VAE built from the
    default config is, parameter for parameter, the one assembled from its four parts."""
    from pyro_vae.likelihoods import make_likelihood
    from pyro_vae.networks import make_networks
    from pyro_vae.priors import make_prior

    config = load_config(None, {"model.z_dim": 4, "model.hidden_dim": 16})
    with seeded(11):
        built = build_vae(config.model, IMAGE_SHAPE)
    with seeded(11):
        encoder, decoder = make_networks("mlp", IMAGE_SHAPE, 4, 16)
        by_hand = VAE(encoder, decoder, make_likelihood("bernoulli", IMAGE_SHAPE), make_prior("standard_normal", 4))
    assert list(built.state_dict()) == list(by_hand.state_dict())
    assert all(torch.equal(v, by_hand.state_dict()[k]) for k, v in built.state_dict().items())


def test_an_iaf_guide_registers_its_flows_with_pyro():
    pyro.clear_param_store()
    config = load_config(None, {"model.z_dim": 2, "model.hidden_dim": 8, "model.guide": "iaf"})
    vae = build_vae(config.model, IMAGE_SHAPE, name="flowing")
    with seeded(0):
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        before = [p.detach().clone() for p in vae.guide_net.parameters()]
        svi.step(binary_batch(16))
    store = pyro.get_param_store()
    for key, param in vae.guide_net.named_parameters():
        assert store[f"flowing.guide$$${key}"] is param
    assert any(not torch.equal(a, b) for a, b in zip(before, vae.guide_net.parameters()))
    pyro.clear_param_store()


def test_the_size_check_draws_nothing_and_names_the_costliest_key():
    from pyro_vae.model import check_model_fits

    config = load_config(None, {"model.arch": "conv", "model.hidden_dim": 10**9, "model.z_dim": 3})
    state = torch.get_rng_state()
    check_model_fits(load_config(None, {}).model, (1, 28, 28))  # the default model fits: no refusal
    assert torch.equal(torch.get_rng_state(), state)  # built on the meta device, in a private stream
    with pytest.raises(ConfigError) as error:
        build_vae(config.model, (1, 28, 28))
    one_line(error, "model.hidden_dim = 1000000000", "GB", "choose a smaller model.hidden_dim")
    assert torch.equal(torch.get_rng_state(), state)
