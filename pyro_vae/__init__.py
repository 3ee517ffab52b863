"""pyro-vae: variational autoencoders in Pyro that are correct, fast and easy to bend.

The public API::

    from pyro_vae import load_config, load_splits, fit, evaluate, load_run

    config = load_config("configs/default.toml", {"train.epochs": 5})
    splits = load_splits(config.data.dataset, val_size=config.data.val_size)
    result = fit(config, splits, run_dir="runs/demo")
    vae = load_run("runs/demo")          # vae.model / vae.guide work with pyro.infer.SVI

Parts of one's own (see :mod:`pyro_vae.components` for the contracts)::

    @register_likelihood("poisson")
    class Poisson(torch.nn.Module): ...  # then model.likelihood = "poisson" in a config

Guide families q(z|x) likewise (``register_guide``, ``model.guide``): ``"gaussian"`` or ``"iaf"``.
"""

from .checkpoint import CheckpointError, load_checkpoint, load_run, save_checkpoint
from .components import (ComponentError, has_closed_form_kl, load_plugins, register_guide, register_likelihood,
                         register_networks, register_prior)
from .config import Config, ConfigError, load_config, save_config
from .data import DataError, DataNotFoundError, ImageData, Splits, check_source, from_tensors, load_data, load_splits
from .elbo import evaluate, importance_sampled, make_elbo, mean_elbo
from .model import LATENT, OBSERVED, PLATE, VAE, build_vae
from .train import FitResult, fit

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ComponentError",
    "Config",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "FitResult",
    "ImageData",
    "LATENT",
    "OBSERVED",
    "PLATE",
    "Splits",
    "VAE",
    "build_vae",
    "evaluate",
    "fit",
    "has_closed_form_kl",
    "importance_sampled",
    "load_checkpoint",
    "load_config",
    "load_plugins",
    "load_run",
    "load_data",
    "load_splits",
    "check_source",
    "from_tensors",
    "make_elbo",
    "mean_elbo",
    "register_guide",
    "register_likelihood",
    "register_networks",
    "register_prior",
    "save_checkpoint",
    "save_config",
]
