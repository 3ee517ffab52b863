"""Run configuration: four frozen dataclasses, read from TOML and overridden by ``--set``.

A config is data, not code: every choice a user can make (dataset, architecture, likelihood,
objective, schedule) is a name or a number here, checked once, before anything trains.
Every error is a :class:`ConfigError` whose message is one line naming the key, the value
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from .components import REGISTRIES, record
from .contract import ComponentError, ConfigError
from .datasets import DATASETS, check_dataset_config
from .elbo import ELBOS

#: ``model.labels`` and ``objective.labels_by`` (as :mod:`pyro_vae.labelled` names them; that
#: module builds the models, this one only checks the names)
LABEL_MODES = ("none", "conditional", "semi_supervised")
LABELS_BY = ("enumerate", "score_function", "gumbel_softmax")
#: ``model.inference``, the guide of a hierarchical model (as :mod:`pyro_vae.hierarchical` names them)
INFERENCES = ("ladder", "bottom_up")

# ConfigError is importable from here too, but documented where it lives: pyro_vae.contract
__all__ = ["Config", "DataConfig", "ModelConfig", "ObjectiveConfig", "TrainConfig", "load_config", "save_config",
           "from_dict", "apply_overrides", "parse_override", "validate", "MAX_SEED"]


@dataclass(frozen=True)
class DataConfig:
    #: A torchvision dataset by name ("mnist", ...), a folder of image files, or an array file
    #: (.npy, .npz, .pt); see :mod:`pyro_vae.data`.
    dataset: str = "mnist"
    #: "dynamic": a fresh Bernoulli draw of every pixel at every visit (Burda et al. 2015);
    #: "static": one seeded draw; "none": the values as they are.
    binarize: str = "dynamic"
    #: Use only the first ``train_limit`` training images (0: all of them).
    train_limit: int = 0
    #: Datasets with an official test split (torchvision): the last ``val_size`` images of
    #: the official training set form the validation split.
    val_size: int = 10_000
    #: Data without an official test split (folders, arrays): seeded random fractions of it
    #: form the validation and test splits (``split_seed``), the rest trains.
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    #: Image files are resized to ``image_size`` x ``image_size`` pixels (0: keep their size,
    #: which must then be the same for all).
    image_size: int = 0
    #: Real-valued data: subtract the training split's mean and divide by its standard
    #: deviation, feature by feature (for the Gaussian and Laplace likelihoods).
    standardize: bool = False
    #: Semi-supervised runs (``model.labels = "semi_supervised"``): keep the labels of this many
    #: training items, balanced across the classes and drawn by ``split_seed``; the others are
    #: unlabelled. 0: every training item keeps its label.
    labelled: int = 0
    #: Training batches only: translate each image by up to this many pixels in each axis, at
    #: random, zero-filled (:func:`~pyro_vae.data.shift_images`); 0: the images as they are.
    augment_shift: int = 0


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mlp"
    z_dim: int = 50
    hidden_dim: int = 400
    #: Hidden layers in each of the encoder and the decoder ("mlp" and "gated_mlp").
    num_layers: int = 1
    likelihood: str = "bernoulli"
    #: Keyword options of the likelihood, e.g. {scale = 0.1} for "gaussian".
    likelihood_options: dict = field(default_factory=dict)
    prior: str = "standard_normal"
    #: Keyword options of the prior, e.g. {num_components = 50} for "mixture" and "vamp".
    prior_options: dict = field(default_factory=dict)
    #: The family of q(z|x): "gaussian" (diagonal), or "iaf" (inverse autoregressive flows).
    guide: str = "gaussian"
    #: Keyword options of the guide family, e.g. {num_flows = 2, hidden_dim = 0} for "iaf".
    guide_options: dict = field(default_factory=dict)
    #: Start the decoder's output bias at the link of the mean training datum: the logit of
    #: the mean pixel for logit features (Burda et al. 2015); false: the default initialization.
    init_output_bias: bool = False
    #: "none"; "conditional": p(x|z,y) and q(z|x,y) with the label y of every item observed;
    #: "semi_supervised": the M2 model, y observed where labelled and latent elsewhere, with a
    #: classifier q(y|x) (:mod:`pyro_vae.labelled`).
    labels: str = "none"
    #: Semi-supervised runs: the networks of the classifier q(y|x), an architecture name as for
    #: ``arch`` ("": the same as ``arch``), e.g. "conv" beside an MLP VAE.
    classifier_arch: str = ""
    #: Labelled runs: learn p(z|y), one diagonal Gaussian per class (instead of ``prior``).
    class_prior: bool = False
    #: Hierarchical latents (:mod:`pyro_vae.hierarchical`): the size of each layer, bottom (next
    #: to x) first, e.g. [64, 32]; it replaces ``z_dim``. [] (or one size, the same as
    #: ``z_dim``): the one-layer VAE.
    z_dims: list = field(default_factory=list)
    #: A hierarchical model's guide: "ladder" (a deterministic bottom-up pass, then top-down
    #: draws whose Gaussians combine it with p(z_l|z_{l+1}): Sonderby et al. 2016) or
    #: "bottom_up" (q(z_1|x) q(z_2|z_1) ...: Burda et al. 2015).
    inference: str = "ladder"
    #: A hierarchical model's layer networks (p(z_l|z_{l+1}), and the guide's between layers):
    #: ``num_layers`` hidden layers of this width (0: ``hidden_dim``).
    layer_hidden_dim: int = 0


@dataclass(frozen=True)
class ObjectiveConfig:
    #: "mc": Trace_ELBO (sampled KL); "analytic": closed-form KL; "iwae"; "stl"; "iwae_dreg": see make_elbo.
    elbo: str = "mc"
    #: Weight of the KL term (a beta-VAE for beta != 1), applied with poutine.scale.
    beta: float = 1.0
    #: "constant"; "warmup": linear from 0 to beta over beta_epochs epochs; "cyclical": cycles
    #: of beta_epochs epochs, rising linearly for the first beta_ramp of each (Fu et al. 2019).
    #: Both start at beta = 0, where "stl" diverged in a run here ("iwae_dreg" has the same
    #: path-derivative term; docs/results.md, Quality, row Q9).
    beta_schedule: str = "constant"
    beta_epochs: int = 10
    beta_ramp: float = 0.5
    num_particles: int = 1
    #: A last phase of training under another estimator: the final ``final_epochs`` of the
    #: schedule (``train.lr_schedule_epochs``, else ``train.epochs``) take ``final_elbo`` with
    #: ``final_particles`` particles, e.g. "iwae_dreg" with 5, the importance-weighted bound
    #: that models are scored by, after the cheaper ELBO has trained the rest ("": none).
    final_elbo: str = ""
    final_epochs: int = 0
    final_particles: int = 1
    #: Weight of the reconstruction term log p(x|z) during training; 0 switches it off (the
    #: objective is then -KL alone, and q(z|x) collapses onto the prior). Evaluation uses 1.
    reconstruction_weight: float = 1.0
    #: Semi-supervised runs, how a latent label is handled: "enumerate" (summed out exactly,
    #: TraceEnum_ELBO), "score_function" (sampled, with a baseline: TraceGraph_ELBO) or
    #: "gumbel_softmax" (a relaxed one-hot draw at ``temperature``).
    labels_by: str = "enumerate"
    temperature: float = 0.5
    #: Semi-supervised runs: the weight of -log q(y|x) on each labelled item of a batch (the
    #: alpha of Kingma et al. 2014, eq. 9).
    classifier_weight: float = 1.0
    #: A hierarchical model: each layer's KL weight relative to ``beta`` (bottom first, one per
    #: entry of ``model.z_dims``; [] : all 1), so the beta schedule ramps every layer alike.
    betas: list = field(default_factory=list)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 60
    batch_size: int = 256
    lr: float = 1e-3
    #: "constant", or "cosine": decay from ``lr`` to ``lr * lr_final_ratio`` over the run.
    lr_schedule: str = "constant"
    lr_final_ratio: float = 0.1
    #: Epochs the schedule spans (0: ``epochs``); later epochs keep the final rate. Resuming
    #: with another ``epochs`` sets it to the run's original length, so no epoch's rate moves.
    lr_schedule_epochs: int = 0
    seed: int = 0
    #: Write each epoch's scalars and image grids for TensorBoard to RUN/tensorboard (needs the
    #: optional tensorboard package: pip install 'pyro-vae[tensorboard]'). Changes no number.
    tensorboard: bool = False
    #: Semi-supervised runs: labelled items in each batch (the few labelled items are drawn
    #: again and again, so that every step sees some; the unlabelled ones fill the rest).
    labelled_per_batch: int = 32

    @property
    def schedule_epochs(self) -> int:
        """The epochs the learning-rate schedule, and a final phase, span."""
        return self.lr_schedule_epochs or self.epochs


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **overrides) -> "Config":
        """A copy with ``{"section.key": value}`` overrides applied and validated."""
        return apply_overrides(self, overrides)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {
    "data": DataConfig,
    "model": ModelConfig,
    "objective": ObjectiveConfig,
    "train": TrainConfig,
}


def _choices() -> dict[str, list[str]]:
    # read at each validation, not once: a plugin may register a part after this module is imported
    return {
        "data.binarize": ["dynamic", "none", "static"],
        "model.arch": sorted(REGISTRIES["networks"]),
        "model.likelihood": sorted(REGISTRIES["likelihood"]),
        "model.prior": sorted(REGISTRIES["prior"]),
        "model.guide": sorted(REGISTRIES["guide"]),
        "objective.elbo": sorted(ELBOS),
        "objective.final_elbo": ["", *sorted(ELBOS)],
        "objective.beta_schedule": ["constant", "cyclical", "warmup"],
        "model.labels": list(LABEL_MODES),
        "model.classifier_arch": ["", *sorted(REGISTRIES["networks"])],
        "model.inference": list(INFERENCES),
        "objective.labels_by": list(LABELS_BY),
        "train.lr_schedule": ["constant", "cosine"],
    }


#: Seeds go to ``pyro.set_rng_seed``, which also seeds NumPy: 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1

# (lower bound, whether the bound itself is allowed)
_BOUNDS = {
    "data.train_limit": (0, True),
    "data.val_fraction": (0.0, True),
    "data.test_fraction": (0.0, True),
    "data.split_seed": (0, True),
    "data.image_size": (0, True),
    "data.val_size": (1, True),
    "data.labelled": (0, True),
    "data.augment_shift": (0, True),
    "objective.temperature": (0.0, False),
    "objective.classifier_weight": (0.0, True),
    "train.labelled_per_batch": (1, True),
    "model.z_dim": (1, True),
    "model.hidden_dim": (1, True),
    "model.num_layers": (1, True),
    "model.layer_hidden_dim": (0, True),
    "objective.beta": (0.0, True),
    "objective.num_particles": (1, True),
    "objective.final_epochs": (0, True),
    "objective.final_particles": (1, True),
    "objective.beta_epochs": (1, True),
    "objective.beta_ramp": (0.0, False),
    "objective.reconstruction_weight": (0.0, True),
    "train.epochs": (0, True),
    "train.batch_size": (1, True),
    "train.lr": (0.0, False),
    "train.lr_final_ratio": (0.0, True),
    "train.lr_schedule_epochs": (0, True),
    "train.seed": (0, True),
}
# (upper bound, whether the bound itself is allowed)
_UPPER_BOUNDS = {
    "data.val_fraction": (1.0, False),  # fractions of the data; their sum is checked by data.check_dataset_config
    "data.test_fraction": (1.0, False),
    "data.split_seed": (MAX_SEED, True),  # seeds a torch.Generator
    "objective.beta_ramp": (1.0, True),  # a fraction of each cycle
    "train.lr_final_ratio": (1.0, True),  # the cosine schedule decays
    "train.seed": (MAX_SEED, True),
}


def _check_type(key: str, value, expected):
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        try:
            number = float(value)
        except OverflowError:  # a TOML integer beyond a float's range
            number = math.inf
        if not math.isfinite(number):  # TOML reads nan and inf as floats; they would train NaNs
            raise ConfigError(f"{key} = {value!r}: expected a finite number")
        return number
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string")
        return value
    if expected is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected a list, e.g. [64, 32]")
        return list(value)
    if expected is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a table of options, e.g. {{scale = 0.1}}")
        return dict(value)
    raise TypeError(f"unsupported config type {expected} for {key}")  # a bug in this module


def _check_value(key: str, value, choices: dict[str, list[str]]):
    if key in choices and value not in choices[key]:
        raise ConfigError(f"{key} = {value!r}: choose one of {choices[key]}")
    if key in _BOUNDS:
        _check_bound(key, value, *_BOUNDS[key])
    if key in _UPPER_BOUNDS:
        high, inclusive = _UPPER_BOUNDS[key]
        if value > high or (value == high and not inclusive):
            raise ConfigError(f"{key} = {value!r}: must be {'<=' if inclusive else '<'} {high}")


def _check_bound(key: str, value, low, inclusive: bool) -> None:
    if value < low or (value == low and not inclusive):
        raise ConfigError(f"{key} = {value!r}: must be {'>=' if inclusive else '>'} {low}")


def from_dict(raw: dict, base: Config | None = None) -> Config:
    """Build a validated :class:`Config` from nested ``{section: {key: value}}``.

    Keys absent from ``raw`` keep their value in ``base`` (the defaults if ``None``).
    """
    base = base or Config()
    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a table of sections {sorted(SECTIONS)}, got {raw!r}")
    sections = {}
    for name, cls in _SECTION_CLASSES.items():
        given = raw.get(name, {})
        if not isinstance(given, dict):
            raise ConfigError(f"[{name}] must be a table of keys, got {given!r}")
        hints = typing.get_type_hints(cls)
        values = dataclasses.asdict(getattr(base, name))
        for key, value in given.items():
            key, _, option = key.partition(".")  # "prior_options.num_components" from --set
            if key not in hints or (option and hints[key] is not dict):
                raise ConfigError(
                    f"unknown key {name}.{key}{'.' + option if option else ''}; [{name}] has keys {sorted(hints)}"
                )
            if option:
                values[key] = {**values[key], option: value}
            else:
                values[key] = _check_type(f"{name}.{key}", value, hints[key])
        if name == "model":
            values = _one_layer_as_z_dim(values)
        if name == "objective":
            values["betas"] = _layer_betas(values["betas"])
        sections[name] = cls(**values)
    unknown = sorted(set(raw) - set(_SECTION_CLASSES))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]; sections are {sorted(SECTIONS)}")
    config = Config(**sections)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Check every value against its allowed choices and range; raise :class:`ConfigError`."""
    choices = _choices()
    for section, values in config.to_dict().items():
        for key, value in values.items():
            _check_value(f"{section}.{key}", value, choices)
    check_dataset_config(config.data)  # the name or path, and split sizes the data can give
    _check_components(config)
    _check_labels(config)
    _check_layers(config)
    _check_final_phase(config)


def _check_final_phase(config: Config) -> None:
    """``objective.final_elbo`` with ``final_epochs``: both or neither, within the run, and an
    estimator the model could train with as ``objective.elbo``."""
    objective = config.objective
    if bool(objective.final_elbo) != bool(objective.final_epochs):
        raise ConfigError(f"objective.final_elbo = {objective.final_elbo!r} with objective.final_epochs = "
                          f"{objective.final_epochs}: set both (e.g. 'iwae_dreg' for the last 20 epochs) or neither")
    if not objective.final_epochs:
        return
    if objective.final_epochs > config.train.schedule_epochs:  # the phase ends with the schedule
        key = "train.lr_schedule_epochs" if config.train.lr_schedule_epochs else "train.epochs"
        raise ConfigError(f"objective.final_epochs = {objective.final_epochs} is more than the run's {key} = "
                          f"{config.train.schedule_epochs}; choose at most that many, or none (objective.final_epochs = 0 with "
                          "objective.final_elbo = '')")
    if config.model.labels != "none":
        raise ConfigError(f"objective.final_elbo with model.labels = {config.model.labels!r}: a labelled model trains "
                          "with one estimator throughout; leave objective.final_elbo empty")
    # the checks objective.elbo passes, applied to the final estimator
    as_main = dataclasses.replace(config, objective=dataclasses.replace(objective, elbo=objective.final_elbo))
    try:
        _check_components(as_main)
        _check_layers(as_main)
    except ConfigError as error:
        raise ConfigError(str(error).replace("objective.elbo", "objective.final_elbo")) from None


def _one_layer_as_z_dim(model: dict) -> dict:
    """``model.z_dims`` checked (a list of integers >= 1); one size is ``z_dim`` itself, so that
    a one-layer model has one description, whichever key gave it."""
    sizes = model["z_dims"]
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"model.z_dims = {sizes!r}: each layer's size must be an integer >= 1")
    if len(sizes) == 1:
        return {**model, "z_dim": sizes[0], "z_dims": []}
    return model


def _layer_betas(betas: list) -> list:
    """``objective.betas`` as finite numbers >= 0."""
    checked = [_check_type("objective.betas", beta, float) for beta in betas]  # one line naming the key
    if any(beta < 0 for beta in checked):
        raise ConfigError(f"objective.betas = {betas!r}: each layer's weight must be >= 0")
    return checked


def _check_layers(config: Config) -> None:
    """The keys of hierarchical models against each other (:mod:`pyro_vae.hierarchical`)."""
    model, objective = config.model, config.objective
    layers = len(model.z_dims)
    if layers == 0:
        example = "set model.z_dims to two or more layer sizes, e.g. [64, 32]"
        if model.inference != "ladder":
            raise ConfigError(f"model.inference = {model.inference!r} chooses the guide of a hierarchical model; "
                              f"{example}, or leave it at 'ladder'")
        if model.layer_hidden_dim:
            raise ConfigError(f"model.layer_hidden_dim = {model.layer_hidden_dim} sizes the networks between the "
                              f"layers of a hierarchical model; {example}, or leave it at 0")
        if objective.betas:
            raise ConfigError(f"objective.betas = {objective.betas} weights the layers of a hierarchical model; "
                              f"{example}, or leave it empty (objective.beta weights the one layer)")
        return
    if model.labels != "none":
        raise ConfigError(f"model.z_dims = {model.z_dims} with model.labels = {model.labels!r}: a labelled model has "
                          "one latent layer for now; leave model.z_dims empty, or model.labels at 'none'")
    if objective.betas and len(objective.betas) != layers:
        raise ConfigError(f"objective.betas = {objective.betas}: one weight per layer of model.z_dims = "
                          f"{model.z_dims}, so {layers} of them (or none: all 1)")
    if objective.elbo == "analytic" and model.inference == "bottom_up":
        raise ConfigError("objective.elbo = 'analytic' with model.inference = 'bottom_up': q(z2|z1) is drawn after "
                          "z1, while TraceMeanField_ELBO takes KL(q(z1|x) || p(z1|z2)) at that later draw of z2, which "
                          "is not the ELBO; use model.inference = 'ladder' (its guide draws top-down, as the model), "
                          "or objective.elbo = 'mc' or 'stl'")
    guide = record("guide", model.guide)
    for size in model.z_dims:  # the guide family is built for every layer
        guide.check_options(size, model.guide_options)


def _check_labels(config: Config) -> None:
    """The keys of the labelled models against each other (:mod:`pyro_vae.labelled`)."""
    labels = config.model.labels
    if config.model.class_prior and labels == "none":
        raise ConfigError("model.class_prior = true learns p(z|y), which needs a label y; set model.labels to "
                          "'conditional' or 'semi_supervised', or leave it false")
    if config.model.class_prior and config.model.prior != "standard_normal":
        raise ConfigError(f"model.class_prior = true replaces model.prior = {config.model.prior!r} with one learned "
                          "Gaussian per class; leave model.prior at 'standard_normal'")
    if config.model.classifier_arch and labels != "semi_supervised":
        raise ConfigError(f"model.classifier_arch = {config.model.classifier_arch!r}: only a semi-supervised run has a "
                          "classifier q(y|x); set model.labels = 'semi_supervised', or leave it empty")
    if config.data.labelled and labels != "semi_supervised":
        raise ConfigError(f"data.labelled = {config.data.labelled}: only a semi-supervised run keeps some labels and "
                          f"not others; set model.labels = 'semi_supervised', or data.labelled = 0")
    if labels == "semi_supervised" and config.objective.elbo != "mc":
        raise ConfigError(f"objective.elbo = {config.objective.elbo!r} with model.labels = 'semi_supervised': a latent "
                          "label is summed out or sampled by objective.labels_by, with z drawn as for 'mc'; "
                          "set objective.elbo = 'mc'")
    if labels == "semi_supervised" and config.train.labelled_per_batch >= config.train.batch_size:
        raise ConfigError(f"train.labelled_per_batch = {config.train.labelled_per_batch} leaves no room for unlabelled "
                          f"items in batches of train.batch_size = {config.train.batch_size}; choose fewer")


def _check_components(config: Config) -> None:
    """The parts the model names (built-in or registered, see :mod:`pyro_vae.components`),
    read from their records without building them: their options, and what they need of the
    data and the objective."""
    model = config.model
    networks = record("networks", model.arch)
    if model.num_layers != 1 and not networks.takes("num_layers"):  # e.g. the conv networks have a fixed depth
        deep = sorted(name for name in REGISTRIES["networks"] if record("networks", name).takes("num_layers"))
        raise ConfigError(f"model.num_layers = {model.num_layers}: the networks of model.arch = {model.arch!r} have "
                          f"a fixed depth; leave it at 1, or choose an architecture among {deep}")
    if model.arch == "mlp_bn" and config.train.batch_size < 2:
        raise ConfigError("model.arch = 'mlp_bn' normalizes by the batch, and train.batch_size = 1 has none to "
                          "normalize by; use batches of 2 or more, or model.arch = 'mlp'")
    likelihood, prior, guide = (record("likelihood", model.likelihood), record("prior", model.prior),
                                record("guide", model.guide))
    for part, key in ((likelihood, "model.likelihood_options"), (prior, "model.prior_options"),
                      (guide, "model.guide_options")):
        _check_options(key, f"{part.kind} {part.name!r}", part.options, part.bounds, getattr(model, key[6:]))
    if not model.z_dims:  # a hierarchical model's layers are checked by _check_layers
        guide.check_options(model.z_dim, model.guide_options)  # what bounds cannot say: options against z_dim
    if model.init_output_bias:
        _check_output_bias(model, networks, likelihood)
    # Pyro's Bernoulli only accepts 0/1 observations, and the torchvision datasets are grey:
    # refusing here gives one clear line before anything is read. Data of one's own may be
    # binary already; its values are checked when it is read (pyro_vae.train.check_data).
    if likelihood.accepts == "binary" and config.data.binarize == "none" and config.data.dataset in DATASETS:
        raise ConfigError(
            f"model.likelihood = {model.likelihood!r} needs binary values but "
            "data.binarize = 'none' gives the values as they are; set data.binarize to 'dynamic' or "
            "'static', or choose a likelihood for grey data such as 'continuous_bernoulli'"
        )
    if config.objective.elbo == "analytic":
        _check_closed_form_kl(model, prior, guide)


def _check_closed_form_kl(model: ModelConfig, prior, guide) -> None:
    """``objective.elbo = "analytic"`` needs KL(q || p) in closed form, which the prior's and
    the guide family's records say (derived once per class from torch's KL registry)."""

    def closed(prior_record, guide_class=None, key: str | None = None) -> bool:
        try:
            return prior_record.closed_form_kl(guide_class)
        except ComponentError as error:
            if key is None:  # a part that cannot be built is not one to suggest
                return False
            raise ConfigError(f"{key}: {error}") from None

    if not closed(prior, key=f"model.prior = {model.prior!r}"):
        suggestions = sorted(name for name in REGISTRIES["prior"] if closed(record("prior", name)))
        raise ConfigError(
            f"objective.elbo = 'analytic' needs a closed-form KL, which model.prior = "
            f"{model.prior!r} lacks; use objective.elbo = 'mc', or a prior among {suggestions}"
        )
    if model.guide != "gaussian" and not closed(prior, guide.part, key=f"model.guide = {model.guide!r}"):
        suggestions = sorted(name for name, cls in REGISTRIES["guide"].items() if closed(prior, cls))
        raise ConfigError(
            f"objective.elbo = 'analytic' needs a closed-form KL, which model.guide = {model.guide!r} lacks "
            f"against model.prior = {model.prior!r}; use objective.elbo = 'mc' or 'iwae', or a guide among "
            f"{suggestions}"
        )


def _check_output_bias(model: ModelConfig, networks, likelihood) -> None:
    """``model.init_output_bias`` needs a decoder with an ``output_bias`` and a likelihood whose
    mean is the sigmoid of the features, or the features themselves (its record's link)."""
    if not networks.has_output_bias:
        raise ConfigError(f"model.init_output_bias = true: the decoder of model.arch = {model.arch!r} has no "
                          "output_bias to set; leave it false")
    if likelihood.link is None:
        raise ConfigError(f"model.init_output_bias = true needs a likelihood whose mean is sigmoid(features) "
                          f"(logits, as for 'bernoulli') or the features themselves (as for 'gaussian'); that of "
                          f"model.likelihood = {model.likelihood!r} is neither: leave it false")


def _check_options(key: str, owner: str, defaults: dict, bounds: dict, options: dict) -> None:
    """Options must be keyword arguments of the ``owner``'s constructor (``defaults``: option ->
    default), with the type of their default, and within ``bounds`` (option -> (lower bound,
    inclusive))."""
    for name, value in options.items():
        if name not in defaults:
            allowed = sorted(defaults) or "none"
            raise ConfigError(f"{key}.{name}: not an option of {owner}; its options are {allowed}")
        _check_type(f"{key}.{name}", value, type(defaults[name]))
        if name in bounds:
            _check_bound(f"{key}.{name}", value, *bounds[name])


def parse_override(text: str) -> tuple[str, object]:
    """Parse ``section.key=value``; the value is read as a TOML literal, else as a string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or key.count(".") not in (1, 2):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. model.z_dim=2")
    try:
        document = tomllib.loads(f"v = {value.strip()}")
    except tomllib.TOMLDecodeError:
        document = {}
    # a bare word such as conv or static; also a value with a line break that TOML reads as
    # more than one key, which must not be cut down to its first line
    parsed = document["v"] if list(document) == ["v"] else value.strip()
    return key, parsed


def apply_overrides(config: Config, overrides: dict[str, object]) -> Config:
    """Apply ``{"section.key": value}`` on top of ``config`` and validate the result."""
    raw: dict[str, dict] = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"unknown key {key}; sections are {sorted(SECTIONS)}")
        raw.setdefault(section, {})[name] = value
    return from_dict(raw, base=config)


def load_config(path: str | Path | None = None, overrides: dict[str, object] | None = None) -> Config:
    """Read a TOML config (defaults if ``path`` is None) and apply ``overrides``."""
    raw = {} if path is None else _read_toml(Path(path))
    config = from_dict(raw)
    return apply_overrides(config, overrides or {})


def _read_toml(path: Path) -> dict:
    """The table in the TOML file ``path``; :class:`ConfigError` if it cannot be read as one."""
    if not path.exists():  # also a symbolic link to nowhere
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a TOML file such as configs/default.toml")
    if not path.is_file():  # a FIFO or a device: reading could block, or never end
        raise ConfigError(f"config file {path} is not a regular file")
    try:
        text = path.read_bytes().decode("utf-8")  # TOML files are UTF-8, whatever the locale
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.object[error.start]:#04x} "
                          f"at offset {error.start}); TOML files are UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(tomli_w.dumps(config.to_dict()))
