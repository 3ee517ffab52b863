"""Parts of one's own: registration and its contract, derived capabilities, the shape check of
build_vae, plugins, and a registered likelihood and prior trained by name."""

from __future__ import annotations

import math
import sys

import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_vae
from pyro_vae.components import (ComponentError, has_closed_form_kl, load_plugins, register_likelihood,
                                 register_networks, register_prior)
from pyro_vae.config import ConfigError, load_config
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.model import build_vae
from pyro_vae.networks import ARCHITECTURES, MLPEncoder
from pyro_vae.priors import PRIORS

from helpers import one_line
from parts import ShiftedNormal, StudentT, TinyDecoder, TinyEncoder, TwoBumps

pytestmark = pytest.mark.usefixtures("restore_registries")  # tests/conftest.py


# -- registration ----------------------------------------------------------------------------

def test_the_register_functions_are_public():
    for name in ("register_likelihood", "register_prior", "register_networks", "register_guide", "load_plugins",
                 "ComponentError", "has_closed_form_kl"):
        assert name in pyro_vae.__all__ and hasattr(pyro_vae, name)


def test_decorator_and_call_register_parts_that_configs_then_name():
    decorated = register_likelihood("student_t")(StudentT)
    assert decorated is StudentT and LIKELIHOODS["student_t"] is StudentT
    assert register_prior("shifted_normal", ShiftedNormal) is ShiftedNormal
    assert register_networks("tiny", TinyEncoder, TinyDecoder) == (TinyEncoder, TinyDecoder)
    config = load_config(None, {"model.likelihood": "student_t", "model.prior": "shifted_normal",
                                "model.arch": "tiny", "data.binarize": "none",
                                "model.likelihood_options": {"df": 3}, "model.prior_options.shift": 0.5})
    assert config.model.likelihood_options == {"df": 3.0}  # an int for a float option, read as a float
    vae = build_vae(config.model, (1, 4, 4))
    assert isinstance(vae.encoder, TinyEncoder) and vae.likelihood.df == 3.0
    torch.testing.assert_close(vae.prior().mean, torch.full((config.model.z_dim,), 0.5))


@pytest.mark.parametrize("overrides, words", [
    ({"model.likelihood_options.df": "many"}, ["model.likelihood_options.df", "'many'", "number"]),
    ({"model.likelihood_options.df": 0}, ["model.likelihood_options.df", "> 0"]),
    ({"model.likelihood_options.nu": 3.0}, ["not an option of likelihood 'student_t'", "df", "scale"]),
    ({"model.num_layers": 2, "model.arch": "tiny"}, ["model.num_layers", "'tiny'", "fixed depth", "mlp"]),
])
def test_options_of_a_registered_part_are_checked_like_built_in_ones(overrides, words):
    register_likelihood("student_t", StudentT)
    register_networks("tiny", TinyEncoder, TinyDecoder)
    with pytest.raises(ConfigError) as error:
        load_config(None, {"model.likelihood": "student_t", "data.binarize": "none", **overrides})
    one_line(error, *words)


def _class(base=nn.Module, init=None, forward=lambda self, features: features, **attributes):
    namespace = dict(attributes)
    if init is not None:
        namespace["__init__"] = init
    if forward is not None:
        namespace["forward"] = forward
    return type("Part", (base,), namespace)


def _init(signature: str):
    scope = {"nn": nn}
    exec(f"def __init__(self, {signature}):\n    nn.Module.__init__(self)", scope)  # a constructor of that signature
    return scope["__init__"]


GOOD_LIKELIHOOD = {"accepts": "real", "init": _init("image_shape, scale: float = 0.1")}


@pytest.mark.parametrize("register, part, words", [
    (register_likelihood, type("Plain", (), {"accepts": "real"}), ["not a torch.nn.Module subclass"]),
    (register_likelihood, lambda image_shape: None, ["not a torch.nn.Module subclass"]),
    (register_likelihood, _class(init=_init("image_shape")), ["accepts is None", "'binary'", "'real'"]),
    (register_likelihood, _class(accepts="counts", init=_init("image_shape")), ["accepts is 'counts'"]),
    (register_likelihood, _class(accepts="real", init=_init("shape")), ["must take", "image_shape"]),
    (register_likelihood, _class(accepts="real", init=_init("image_shape, scale")),
     ["'scale' has no default", "option"]),
    (register_likelihood, _class(accepts="real", init=_init("image_shape, scale=None")),
     ["option 'scale'", "None", "int, float, bool or str"]),
    (register_likelihood, _class(accepts="real", init=_init("image_shape, sizes=(1, 2)")),
     ["option 'sizes'", "tuple"]),
    (register_likelihood, _class(accepts="real", init=_init("image_shape, **options")), ["**options"]),
    (register_likelihood, _class(accepts="real", init=_init("image_shape, *args")), ["*args"]),
    (register_likelihood, _class(option_bounds={"rate": (0.0, False)}, **GOOD_LIKELIHOOD),
     ["option_bounds names 'rate'", "['scale']"]),
    (register_likelihood, _class(option_bounds={"scale": 0.0}, **GOOD_LIKELIHOOD),
     ["option_bounds['scale']", "(lower bound, inclusive)"]),
    (register_likelihood, _class(option_bounds=[("scale", 0.0)], **GOOD_LIKELIHOOD), ["expected a dict"]),
    (register_likelihood, _class(forward=None, **GOOD_LIKELIHOOD), ["defines no forward"]),
    (register_likelihood, _class(forward=lambda self: None, **GOOD_LIKELIHOOD), ["forward must take one argument"]),
    (register_prior, _class(init=_init("image_shape"), forward=lambda self: None), ["must take", "z_dim"]),
    (register_prior, _class(init=_init("z_dim"), forward=lambda self, z: None), ["forward must take no arguments"]),
    (register_prior, _class(init=_init("z_dim"), forward=lambda self: None, has_closed_form_kl="yes"),
     ["has_closed_form_kl is 'yes'", "True or False"]),
])
def test_a_part_that_breaks_the_contract_is_refused_when_registered(register, part, words):
    with pytest.raises(ComponentError) as error:
        register("mine", part)
    message = one_line(error)
    assert message.startswith(f"cannot register {'likelihood' if register is register_likelihood else 'prior'} 'mine'")
    for word in words:
        assert word in message, message
    assert "mine" not in LIKELIHOODS and "mine" not in PRIORS


@pytest.mark.parametrize("encoder, decoder, words", [
    (TinyEncoder, _class(init=_init("image_shape"), forward=lambda self, z: z), ["decoder Part", "z_dim"]),
    (TinyEncoder, _class(init=_init("image_shape, z_dim, width"), forward=lambda self, z: z),
     ["'width' has no default"]),
    (object, TinyDecoder, ["encoder object", "not a torch.nn.Module"]),
])
def test_networks_that_break_the_contract_are_refused(encoder, decoder, words):
    with pytest.raises(ComponentError) as error:
        register_networks("mine", encoder, decoder)
    one_line(error, *words)
    assert "mine" not in ARCHITECTURES


def test_init_output_bias_needs_networks_whose_decoder_has_an_output_bias():
    register_networks("tiny", TinyEncoder, TinyDecoder)
    with pytest.raises(ConfigError) as error:
        load_config(None, {"model.arch": "tiny", "model.init_output_bias": True})
    one_line(error, "model.arch = 'tiny' has no output_bias")

    class BiasedDecoder(TinyDecoder):
        @property
        def output_bias(self):
            return self.net.bias

    register_networks("biased", TinyEncoder, BiasedDecoder)
    config = load_config(None, {"model.arch": "biased", "model.init_output_bias": True, "model.z_dim": 2})
    vae = build_vae(config.model, (1, 2, 2))
    from pyro_vae.model import init_output_bias

    init_output_bias(vae, torch.full((3, 1, 2, 2), 0.5))
    torch.testing.assert_close(vae.decoder.net.bias, torch.zeros(4))


@pytest.mark.parametrize("name", ["my-part", "", "two words", 3, "café"])
def test_a_name_is_a_plain_identifier(name):
    with pytest.raises(ComponentError) as error:
        register_likelihood(name)
    one_line(error, "plain identifier")


def test_a_taken_name_is_refused_unless_replaced_and_the_same_class_again_is_no_conflict():
    with pytest.raises(ComponentError) as error:
        register_likelihood("gaussian", StudentT)
    one_line(error, "taken by pyro_vae.likelihoods.Gaussian", "replace=True")
    register_likelihood("student_t", StudentT)
    register_likelihood("student_t", StudentT)  # an import run twice

    # the same class defined again (a notebook cell run again): same module and name, no conflict
    class Again(StudentT):
        pass

    Again.__qualname__, Again.__module__ = StudentT.__qualname__, StudentT.__module__
    assert register_likelihood("student_t", Again) is Again and LIKELIHOODS["student_t"] is Again
    register_likelihood("gaussian", StudentT, replace=True)
    assert LIKELIHOODS["gaussian"] is StudentT


# -- capabilities derived from torch's KL registry ---------------------------------------------

@pytest.mark.parametrize("prior, expected", [
    (PRIORS["standard_normal"], True), (PRIORS["learned_gaussian"], True),
    (PRIORS["mixture"], False), (PRIORS["vamp"], False), (ShiftedNormal, True), (TwoBumps, False),
])
def test_closed_form_kl_is_derived_from_torchs_kl_registry(prior, expected):
    assert not hasattr(prior, "has_closed_form_kl")  # nothing declared
    state = torch.get_rng_state()
    assert has_closed_form_kl(prior) is expected
    assert torch.equal(state, torch.get_rng_state())  # built with a private random stream
    assert has_closed_form_kl(prior(**({"encoder": MLPEncoder((1, 4, 4), 2, 8), "image_shape": (1, 4, 4)}
                                       if prior is PRIORS["vamp"] else {}), z_dim=3)) is expected


def test_a_declared_has_closed_form_kl_overrides_the_derivation():
    class Declared(TwoBumps):
        has_closed_form_kl = True

    assert has_closed_form_kl(Declared) is True


def test_the_analytic_elbo_follows_the_derived_capability():
    register_prior("shifted_normal", ShiftedNormal)
    register_prior("two_bumps", TwoBumps)
    load_config(None, {"model.prior": "shifted_normal", "objective.elbo": "analytic"})
    with pytest.raises(ConfigError) as error:
        load_config(None, {"model.prior": "two_bumps", "objective.elbo": "analytic"})
    message = one_line(error)
    assert "'two_bumps' lacks" in message and "'shifted_normal'" in message and "'vamp'" not in message


def test_a_prior_that_cannot_be_built_is_one_line_when_its_kl_is_asked_for():
    @register_prior("broken")
    class Broken(nn.Module):
        def __init__(self, z_dim: int):
            super().__init__()
            raise RuntimeError("no GPU here\nsecond line")

        def forward(self):
            return None

    with pytest.raises(ConfigError) as error:
        load_config(None, {"model.prior": "broken", "objective.elbo": "analytic"})
    one_line(error, "model.prior = 'broken'", "RuntimeError: no GPU here second line")
    load_config(None, {"model.prior": "broken"})  # "mc" does not need to know


# -- shapes, checked once by build_vae on a datum of zeros ------------------------------------

class WrongLatent(TinyEncoder):
    def forward(self, x):
        loc, scale = super().forward(x)
        return loc[:, :1], scale[:, :1]


class LogScale(TinyEncoder):
    def forward(self, x):
        loc, scale = super().forward(x)
        return loc, -scale


class Flat(TinyDecoder):
    def forward(self, z):
        return self.net(z)


class NoEvent(StudentT):
    def forward(self, loc):
        return dist.StudentT(self.df, loc, self.scale)


class Batched(ShiftedNormal):
    def forward(self):
        return dist.Normal(self.loc, 1.0)


@pytest.mark.parametrize("parts, words", [
    ({"networks": (WrongLatent, TinyDecoder)}, ["encoder WrongLatent (model.arch = 'mine')", "z_loc of shape (2, 1)",
                                                "expected (2, z_dim = 3)"]),
    ({"networks": (LogScale, TinyDecoder)}, ["encoder LogScale", "z_scale that is not > 0"]),
    ({"networks": (TinyEncoder, Flat)}, ["decoder Flat", "(3, 2, 16)", "expected (3, 2, *image_shape) = (3, 2, 1, 4, 4)"]),
    ({"likelihood": NoEvent}, ["likelihood NoEvent (model.likelihood = 'mine')", "event shape ()",
                               "image_shape = (1, 4, 4)", ".to_event(3)"]),
    ({"prior": Batched}, ["prior Batched (model.prior = 'mine')", "batch shape (3,)", "event shape ()",
                          "expected () and (z_dim,) = (3,)"]),
])
def test_build_vae_checks_shapes_once_and_names_the_part(parts, words):
    overrides = {"model.z_dim": 3, "data.binarize": "none", "model.likelihood": "continuous_bernoulli"}
    if "networks" in parts:
        register_networks("mine", *parts["networks"])
        overrides["model.arch"] = "mine"
    if "likelihood" in parts:
        register_likelihood("mine", parts["likelihood"])
        overrides["model.likelihood"] = "mine"
    if "prior" in parts:
        register_prior("mine", parts["prior"])
        overrides["model.prior"] = "mine"
    with pytest.raises(ConfigError) as error:
        build_vae(load_config(None, overrides).model, (1, 4, 4))
    one_line(error, *words)


def test_the_shape_check_changes_nothing():
    """No draw from the global stream, no change of training mode or batch statistics."""
    config = load_config(None, {"model.z_dim": 2, "model.hidden_dim": 8})
    vae = build_vae(config.model, (5,))
    vae.decoder.train(False)
    norm = nn.BatchNorm1d(5)
    vae.encoder.body.insert(0, nn.Sequential(norm, nn.Dropout(0.5)))
    state = torch.get_rng_state()
    vae.check_shapes((5,), 2)
    assert torch.equal(state, torch.get_rng_state())
    assert vae.encoder.training and not vae.decoder.training and norm.num_batches_tracked == 0


def test_build_vae_gives_the_vamp_prior_the_data_domain_of_the_likelihood():
    base = {"model.prior": "vamp", "model.prior_options.num_components": 2, "model.z_dim": 2, "model.hidden_dim": 8,
            "data.binarize": "none"}
    real = build_vae(load_config(None, {**base, "model.likelihood": "gaussian"}).model, (4,))
    unit = build_vae(load_config(None, {**base, "model.likelihood": "continuous_bernoulli"}).model, (4,))
    assert real.prior_net.unconstrained and not unit.prior_net.unconstrained


# -- trained by name ---------------------------------------------------------------------------

def test_a_registered_likelihood_and_prior_train_by_name(splits, tiny_config):
    from pyro_vae.train import fit

    register_likelihood("student_t", StudentT)
    register_prior("shifted_normal", ShiftedNormal)
    config = tiny_config.replace(**{
        "model.likelihood": "student_t", "model.prior": "shifted_normal", "data.binarize": "none",
        "model.likelihood_options.df": 5.0, "objective.elbo": "analytic", "train.epochs": 1,
    })
    result = fit(config, splits, progress=False)
    assert isinstance(result.vae.likelihood, StudentT) and result.vae.likelihood.df == 5.0
    assert math.isfinite(result.history[-1]["train_loss"]) and math.isfinite(result.history[-1]["val_elbo"])


# -- plugins -----------------------------------------------------------------------------------

PLUGIN = '''
import pyro.distributions as dist
import torch
from torch import nn

import pyro_vae


@pyro_vae.register_likelihood("plugin_t")
class PluginT(nn.Module):
    accepts = "real"

    def __init__(self, image_shape, df: float = 4.0):
        super().__init__()
        self.event_dim, self.df = len(image_shape), df

    def forward(self, loc):
        return dist.StudentT(self.df, loc, 0.1).to_event(self.event_dim)


@pyro_vae.register_prior("plugin_normal")
class PluginNormal(nn.Module):
    def __init__(self, z_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(z_dim))

    def forward(self):
        return dist.Normal(self.loc, 1.0).to_event(1)
'''


def _registered_by_plugin() -> bool:
    return "plugin_t" in LIKELIHOODS and "plugin_normal" in PRIORS


def test_a_plugin_file_registers_its_parts_once(tmp_path):
    path = tmp_path / "my_parts.py"
    path.write_text(PLUGIN)
    assert load_plugins([str(path)]) == [str(path.resolve())]
    assert _registered_by_plugin()
    parts = LIKELIHOODS["plugin_t"], PRIORS["plugin_normal"]
    assert load_plugins([str(path), str(path)]) == [str(path.resolve())] * 2  # harmless
    assert (LIKELIHOODS["plugin_t"], PRIORS["plugin_normal"]) == parts
    load_config(None, {"model.likelihood": "plugin_t", "model.prior": "plugin_normal", "data.binarize": "none",
                       "objective.elbo": "analytic"})


def test_a_plugin_module_by_name_registers_its_parts(tmp_path, monkeypatch):
    (tmp_path / "pyro_vae_test_parts.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_plugins(["pyro_vae_test_parts"]) == ["pyro_vae_test_parts"]
    assert _registered_by_plugin()
    del sys.modules["pyro_vae_test_parts"]  # imported afresh: new classes of the same names, no conflict
    load_plugins(["pyro_vae_test_parts"])


def test_a_plugin_module_in_the_current_folder_is_found(tmp_path, monkeypatch):
    (tmp_path / "pyro_vae_test_parts_here.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    path = list(sys.path)
    load_plugins(["pyro_vae_test_parts_here"])
    assert _registered_by_plugin() and sys.path == path


@pytest.mark.parametrize("spec, text, words", [
    ("pyro_vae_test_parts_missing", None, ["plugin 'pyro_vae_test_parts_missing': no module named "
                                           "'pyro_vae_test_parts_missing'"]),
    ("pyro_vae_test_parts_missing.sub", None, ["no module named 'pyro_vae_test_parts_missing'"]),
    ("missing.py", None, ["plugin", "missing.py: no such file"]),
    ("not a module!", None, ["neither a module name", ".py file"]),
    ("raises.py", "raise RuntimeError('bad\\nthing')", ["raises.py: RuntimeError: bad thing"]),
    ("syntax.py", "def f(:\n", ["syntax.py: SyntaxError"]),
    ("imports.py", "import pyro_vae_test_parts_nowhere", ["ModuleNotFoundError", "pyro_vae_test_parts_nowhere"]),
    ("bad_part.py", "import pyro_vae\npyro_vae.register_likelihood('x', object)",
     ["bad_part.py: ComponentError: cannot register likelihood 'x'", "not a torch.nn.Module"]),
])
def test_a_plugin_that_cannot_be_loaded_is_one_line(tmp_path, monkeypatch, spec, text, words):
    monkeypatch.chdir(tmp_path)
    if text is not None:
        (tmp_path / spec).write_text(text)
    with pytest.raises(ConfigError) as error:
        load_plugins([spec])
    one_line(error, *words)


def test_a_failed_plugin_module_raises_again_when_loaded_again(tmp_path, monkeypatch):
    (tmp_path / "pyro_vae_test_parts_raise.py").write_text("raise ValueError('once')")
    monkeypatch.syspath_prepend(str(tmp_path))
    for _ in range(2):
        with pytest.raises(ConfigError, match="ValueError: once"):
            load_plugins(["pyro_vae_test_parts_raise"])
