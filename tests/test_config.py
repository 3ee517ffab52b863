from pathlib import Path

import pytest

from pyro_vae.config import Config, ConfigError, load_config, parse_override, save_config

from helpers import one_line

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_default_config_file_matches_built_in_defaults():
    assert load_config(CONFIGS / "default.toml") == Config()


def test_default_config_file_lists_every_key():
    from pyro_vae.config import tomllib  # tomli on Python 3.10

    written = tomllib.loads((CONFIGS / "default.toml").read_text())
    assert {section: sorted(keys) for section, keys in written.items()} == \
        {section: sorted(keys) for section, keys in Config().to_dict().items()}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


def test_save_load_round_trip(tmp_path):
    config = load_config(None, {"model.z_dim": 2, "objective.beta": 4.0, "data.binarize": "static"})
    save_config(config, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == config


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model.z_dim=2", ("model.z_dim", 2)),
        ("train.lr=3e-4", ("train.lr", 3e-4)),
        ("model.arch=conv", ("model.arch", "conv")),
        ('model.arch="conv"', ("model.arch", "conv")),
        ("objective.beta=4", ("objective.beta", 4)),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_int_accepted_for_float():
    assert load_config(None, {"objective.beta": 4}).objective.beta == 4.0


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"model.zdim": 2}, ["model.zdim", "z_dim"]),
        ({"modle.z_dim": 2}, ["modle.z_dim", "sections"]),
        ({"model.z_dim": "two"}, ["model.z_dim", "'two'", "integer"]),
        ({"model.z_dim": 2.5}, ["model.z_dim", "integer"]),
        ({"model.z_dim": 0}, ["model.z_dim", ">= 1"]),
        ({"train.lr": 0}, ["train.lr", "> 0"]),
        ({"objective.beta": -1}, ["objective.beta", ">= 0"]),
        ({"model.arch": "transformer"}, ["model.arch", "'transformer'", "conv", "mlp"]),
        ({"objective.elbo": "renyi"}, ["objective.elbo", "analytic", "iwae", "mc"]),
        ({"data.binarize": "yes"}, ["data.binarize", "dynamic", "static", "none"]),
        ({"data.dataset": "cifar"}, ["data.dataset", "mnist"]),
        ({"objective.num_particles": True}, ["objective.num_particles", "integer"]),
        ({"data.binarize": "none"}, ["bernoulli", "binary", "data.binarize"]),
    ],
)
def test_invalid_values_name_key_value_and_choices(overrides, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    one_line(error, *words)


def test_bad_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model\nz_dim = 2")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_unknown_section_in_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optimizer]\nlr = 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown section \[optimizer\]"):
        load_config(path)


def test_options_from_set_and_file(tmp_path):
    config = load_config(None, {"model.prior": "mixture", "model.prior_options.num_components": 50})
    assert config.model.prior_options == {"num_components": 50}
    path = tmp_path / "c.toml"
    save_config(config, path)
    assert "[model.prior_options]" in path.read_text()
    assert load_config(path) == config
    assert parse_override("model.prior_options.num_components=50") == ("model.prior_options.num_components", 50)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"model.likelihood": "poisson"}, ["model.likelihood", "'poisson'", "bernoulli", "gaussian"]),
        ({"model.prior": "flow"}, ["model.prior", "'flow'", "vamp"]),
        ({"model.likelihood": "gaussian", "data.binarize": "none", "model.likelihood_options.scale": 0},
         ["model.likelihood_options.scale", "> 0"]),
        ({"model.likelihood": "gaussian", "model.likelihood_options.scale": -1.5}, ["scale", "-1.5", "> 0"]),
        ({"model.prior": "mixture", "model.prior_options.num_components": 0}, ["num_components", "0", ">= 1"]),
        ({"model.prior": "vamp", "model.prior_options.num_components": 2.5}, ["num_components", "integer"]),
        ({"model.prior_options.num_components": 10}, ["num_components", "not an option of prior 'standard_normal'", "none"]),
        ({"model.likelihood_options.scale": 0.1}, ["not an option of likelihood 'bernoulli'"]),
        ({"model.likelihood": "laplace", "model.likelihood_options.learn": True}, ["learn", "learned", "per_pixel", "scale"]),
        ({"model.prior_options": 3}, ["model.prior_options", "table"]),
        ({"objective.beta_schedule": "exponential"}, ["objective.beta_schedule", "warmup", "cyclical"]),
        ({"objective.beta_epochs": -5}, ["objective.beta_epochs", "-5", ">= 1"]),
        ({"objective.beta_ramp": 0}, ["objective.beta_ramp", "> 0"]),
        ({"model.prior": "vamp", "objective.elbo": "analytic"}, ["analytic", "'vamp'", "closed-form", "mc"]),
        ({"model.likelihood": "continuous_bernoulli", "data.binarize": "none", "objective.beta": -0.5},
         ["objective.beta", "-0.5"]),
    ],
)
def test_invalid_swaps(overrides, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    one_line(error, *words)


def test_grey_data_likelihoods_accept_binarize_none():
    for name in ("continuous_bernoulli", "gaussian", "gaussian_learned", "laplace"):
        load_config(None, {"model.likelihood": name, "data.binarize": "none"})


def _float_keys() -> list[str]:
    """Every float config key, and every float option of a registered likelihood or prior."""
    import dataclasses
    import inspect
    import typing

    from pyro_vae.likelihoods import LIKELIHOODS
    from pyro_vae.priors import PRIORS

    keys = [f"{section.name}.{name}" for section in dataclasses.fields(Config)
            for name, hint in typing.get_type_hints(type(getattr(Config(), section.name))).items() if hint is float]
    for kind, registry in (("likelihood", LIKELIHOODS), ("prior", PRIORS)):
        for name, cls in registry.items():
            for option, parameter in inspect.signature(cls.__init__).parameters.items():
                if isinstance(parameter.default, float):
                    keys.append(f"model.{kind}={name} model.{kind}_options.{option}")
    return keys


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", _float_keys())
def test_non_finite_numbers_are_refused(key, value):
    *owner, key = key.split(" ")
    overrides = {key: value, "data.binarize": "none", "model.likelihood": "continuous_bernoulli"}
    for item in owner:  # a likelihood or prior whose option this is
        overrides.update([item.split("=")])
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert f"{key} = {value!r}: expected a finite number" == str(error.value)


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"data.val_size": 60_000}, ["data.val_size", "60000", "59999", "mnist"]),
        ({"data.train_limit": 50_001}, ["data.train_limit", "50001", "50000"]),
        ({"data.val_size": 59_000, "data.train_limit": 1_001}, ["data.train_limit", "1000"]),
        ({"train.seed": -1}, ["train.seed", ">= 0"]),
        ({"train.seed": 2**32}, ["train.seed", "<= 4294967295"]),
        ({"train.lr_final_ratio": 1.5}, ["train.lr_final_ratio", "<= 1.0"]),
        ({"objective.beta_ramp": 1.5}, ["objective.beta_ramp", "<= 1.0"]),
        ({"train.lr": 10**400}, ["train.lr", "finite"]),
        ({"model.arch": "conv", "model.num_layers": 2}, ["model.num_layers", "conv", "mlp"]),
    ],
)
def test_ranges_that_depend_on_the_data_or_on_other_keys(overrides, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_limits_at_the_edge_are_accepted():
    config = load_config(None, {"data.val_size": 59_000, "data.train_limit": 1_000, "train.seed": 2**32 - 1,
                                "train.lr_final_ratio": 1, "objective.beta_ramp": 1})
    assert config.data.train_limit == 1_000 and config.train.seed == 2**32 - 1


@pytest.mark.parametrize("make, words", [
    (lambda p: p.mkdir(), ["is a folder"]),
    (lambda p: p.write_bytes("# café\n".encode("latin-1")), ["not UTF-8", "0xe9"]),
    (lambda p: __import__("os").mkfifo(p), ["not a regular file"]),
    (lambda p: p.symlink_to(p.parent / "nothing"), ["does not exist"]),
], ids=["folder", "latin-1", "fifo", "broken-link"])
def test_config_paths_that_are_not_a_readable_toml_file(tmp_path, make, words):
    path = tmp_path / "c.toml"
    make(path)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    for word in ["c.toml", *words]:
        assert word in str(error.value)


def test_a_set_value_with_a_line_break_is_not_cut_short():
    assert parse_override("model.z_dim=2\nmodel = 3") == ("model.z_dim", "2\nmodel = 3")


def test_one_layer_size_is_z_dim_and_layer_keys_round_trip(tmp_path):
    """model.z_dims of one size is the one-layer model with that z_dim (one description of it);
    the lists of a hierarchical config survive save and load."""
    assert load_config(None, {"model.z_dims": [7]}) == load_config(None, {"model.z_dim": 7})
    config = load_config(None, {"model.z_dims": [64, 32], "objective.betas": [1, 0.5], "model.inference": "bottom_up"})
    assert config.objective.betas == [1.0, 0.5]
    save_config(config, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == config
