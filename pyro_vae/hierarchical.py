"""Hierarchical VAEs: several layers of latents, z_1 (next to x) up to z_L (the top).

The model draws top-down, every layer its own Pyro sample site (:func:`latent_site`: ``"z1"``,
..., ``"zL"``) inside the data plate:

    z_L ~ p(z_L)  (any prior, built for the top layer's size)
    z_l ~ N(mu_l(z_{l+1}), sigma_l(z_{l+1}))  for l = L-1, ..., 1
    x   ~ p(x | z_1)  (any networks and likelihood, the decoder built for z_1)

The guide is one of two (``model.inference``):

- ``"bottom_up"`` (Burda et al. 2015): q(z_1|x) from the model's encoder, then
  q(z_{l+1}|z_l), each a Gaussian from a small network of the draw below.
- ``"ladder"`` (the LVAE of Sønderby et al. 2016): a deterministic bottom-up pass gives each
  layer a Gaussian estimate ``N(m_l, s_l)`` of x alone (the encoder's output for layer 1, then
  a network of ``[m_l, log s_l]`` for the next); the guide then draws top-down, z_L from the
  top estimate and each z_l from the precision-weighted combination of its estimate with the
  model's own p(z_l|z_{l+1}) at the draw above. It shares the model's top-down networks, and
  draws its sites in the model's order, so ``TraceMeanField_ELBO``'s per-site KL (taken at the
  draws above it) is the ELBO's.

Either way each layer's Gaussian parameters go through the guide family (``model.guide``,
built once per layer), so an IAF can follow every layer. The estimators of
:mod:`pyro_vae.estimators` need nothing more than reparameterized sites; a layer's KL weight
is ``beta`` times its entry of ``layer_betas``, a ``poutine.scale`` on its site in model and
guide alike (:func:`~pyro_vae.model.latent_weight`), so warm-up ramps every layer.

The decoder reads z_1 only, as in the IWAE and LVAE models; Tomczak & Welling's hierarchical
VampPrior VAE reads ``[z_1, z_2]`` (a skip connection not offered here).

References:
    Burda, Grosse & Salakhutdinov (2015), Importance Weighted Autoencoders (two stochastic
    layers; bottom-up inference; active units).
    Sønderby, Raiko, Maaløe, Sønderby & Winther (2016), Ladder Variational Autoencoders
    (precision-weighted top-down inference; KL warm-up).
    Tomczak & Welling (2018), VAE with a VampPrior (the prior at the top layer).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from tqdm.auto import tqdm

from .components import has_closed_form_kl
from .config import INFERENCES
from .contract import ConfigError
from .elbo import ACTIVE_UNIT_THRESHOLD, BOUND_KS, MAX_CHUNK_ELEMENTS, Estimates, _device_of, make_elbo
from .guides import make_guide, representative_code
from .likelihoods import fused_log_prob, make_likelihood
from .model import OBSERVED, PLATE, _default_name, check_model_fits, latent_weight, site_weight
from .networks import _mlp, _positive, make_networks
from .priors import StandardNormal, make_prior
from .seeding import probing, seeded
from .shapes import evaluation_mode

__all__ = ["INFERENCES", "GaussianLayer", "HierarchicalVAE", "LayerEstimates", "LayerTerms", "build_hierarchical_vae",
           "check_hierarchical_shapes", "evaluate_hierarchical", "importance_sampled_layers", "latent_site",
           "layer_betas", "precision_weighted"]


def latent_site(layer: int) -> str:
    """The sample site of layer ``layer`` (0-based, 0 next to x): ``"z1"``, ``"z2"``, ..."""
    return f"z{layer + 1}"


def layer_betas(objective, num_layers: int) -> tuple[float, ...]:
    """Each layer's KL weight relative to ``objective.beta`` (``objective.betas``; all 1 when empty)."""
    return tuple(objective.betas) if objective.betas else (1.0,) * num_layers


class GaussianLayer(nn.Module):
    """``(loc, scale)`` of a diagonal Gaussian over ``out_dim`` from an input ``(..., in_dim)``:
    ``num_layers`` hidden layers of ``hidden_dim`` built by ``layers`` (dense ReLU layers by
    default; a gated MLP's units where ``model.arch`` is one), then a linear head each; the
    scale through a softplus, as the encoders' (:mod:`pyro_vae.networks`)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, num_layers: int = 1,
                 layers: Callable[[list[int]], nn.Module] = _mlp):
        super().__init__()
        self.body = layers([in_dim] + [hidden_dim] * num_layers)
        self.loc = nn.Linear(hidden_dim, out_dim)
        self.scale = nn.Linear(hidden_dim, out_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(h)
        return self.loc(hidden), _positive(self.scale(hidden))


def precision_weighted(loc_a: torch.Tensor, scale_a: torch.Tensor, loc_b: torch.Tensor, scale_b: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized product of two diagonal Gaussians: precisions add, locations are averaged
    by precision (Sønderby et al. 2016, eq. 18-19). Shapes broadcast."""
    precision_a, precision_b = scale_a.pow(-2), scale_b.pow(-2)
    variance = 1 / (precision_a + precision_b)
    return (loc_a * precision_a + loc_b * precision_b) * variance, variance.sqrt()


class HierarchicalVAE(nn.Module):
    """A VAE with latent layers z_1 ... z_L (see the module's docstring).

    :param encoder: maps ``x`` ``(B, *image_shape)`` to ``(loc, scale)`` of layer 1, each
        ``(B, z_dims[0])`` (any registered encoder built for ``z_dims[0]``).
    :param decoder: maps ``z_1`` ``(..., z_dims[0])`` to features ``(..., *image_shape)``.
    :param likelihood: decoder features to p(x|z_1).
    :param prior: ``forward()`` returns p(z_L), event shape ``(z_dims[-1],)``.
    :param top_down: L - 1 modules; ``top_down[l]`` maps ``z_{l+2}`` to ``(loc, scale)`` of
        p(z_{l+1}|z_{l+2}) (0-based ``l``: layer ``l`` from layer ``l + 1``).
    :param up: L - 1 modules of the guide; ``up[l]`` maps to ``(loc, scale)`` of layer ``l + 1``:
        from the draw of layer ``l`` (``bottom_up``), or from ``[loc, log scale]`` of layer
        ``l``'s bottom-up estimate (``ladder``).
    :param guides: L guide families, ``guides[l]`` over layer ``l`` (``(loc, scale)`` to a
        reparameterized distribution, batch shape that of ``loc``, event ``(z_dims[l],)``).
    :param z_dims: the layers' sizes, bottom first.
    :param inference: ``"ladder"`` or ``"bottom_up"``.
    :param name: the prefix of the parts in Pyro's param store (see :class:`~pyro_vae.model.VAE`).

    ``model(x)`` and ``guide(x)`` register their parts with ``pyro.module`` and run in stock
    ``pyro.infer.SVI``; :func:`pyro_vae.fit` uses ``model_body`` / ``guide_body``. Both take
    ``beta``, ``reconstruction_weight`` and ``layer_betas`` (L weights, default all 1): layer
    ``l``'s site is weighted ``beta * layer_betas[l]``.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: nn.Module, prior: nn.Module,
                 top_down: list[nn.Module], up: list[nn.Module], guides: list[nn.Module], *, z_dims,
                 inference: str = "ladder", name: str | None = None):
        super().__init__()
        if inference not in INFERENCES:
            raise ValueError(f"inference = {inference!r}: choose one of {list(INFERENCES)}")
        if not len(top_down) == len(up) == len(guides) - 1 == len(z_dims) - 1 >= 1:
            raise ValueError(f"a hierarchical VAE of {len(z_dims)} layers needs {len(z_dims) - 1} top_down and up "
                             f"modules and {len(z_dims)} guides, got {len(top_down)}, {len(up)} and {len(guides)}")
        self.z_dims = tuple(int(size) for size in z_dims)
        self.encoder, self.decoder, self.likelihood, self.prior_net = encoder, decoder, likelihood, prior
        self.top_down = nn.ModuleList(top_down)
        self.up = nn.ModuleList(up)
        self.guide_nets = nn.ModuleList(guides)
        self.inference = inference
        self.name = _default_name() if name is None else name

    @property
    def num_layers(self) -> int:
        return len(self.guide_nets)

    @property
    def latent_sites(self) -> tuple[str, ...]:
        """The latent sites, bottom first: what :class:`~pyro_vae.distributed.SharedNoise` shares."""
        return tuple(latent_site(layer) for layer in range(self.num_layers))

    # -- the densities ------------------------------------------------------------------------
    def prior(self) -> dist.TorchDistribution:
        """p(z_L): event shape ``(z_dims[-1],)``."""
        return self.prior_net()

    def conditional(self, layer: int, above: torch.Tensor) -> dist.TorchDistribution:
        """p(z_layer | z_{layer+1} = ``above``) (0-based ``layer`` < L - 1), batch shape ``above``'s."""
        loc, scale = self.top_down[layer](above)
        return dist.Normal(loc, scale).to_event(1)

    def decode(self, z1: torch.Tensor) -> dist.TorchDistribution:
        """p(x|z_1) for ``z1`` of shape ``(..., z_dims[0])``: batch shape ``(...)``."""
        return self.likelihood(self.decoder(z1))

    def generate(self, draw: Callable) -> list[torch.Tensor]:
        """The model's latents top-down: ``draw(layer, p)`` gives layer ``layer``'s value from
        its distribution ``p`` (a sample site, a draw, a mean). Returns them bottom first."""
        z = [None] * self.num_layers
        top = self.num_layers - 1
        z[top] = draw(top, self.prior())
        for layer in reversed(range(top)):
            z[layer] = draw(layer, self.conditional(layer, z[layer + 1]))
        return z

    def infer(self, x: torch.Tensor, draw: Callable) -> list[torch.Tensor]:
        """The guide's latents in its order (bottom-up or top-down): ``draw(layer, q)`` gives
        layer ``layer``'s value from q of it given x and the layers drawn before. Bottom first."""
        z = [None] * self.num_layers
        loc, scale = self.encoder(x)
        if self.inference == "bottom_up":
            for layer in range(self.num_layers):
                if layer > 0:
                    loc, scale = self.up[layer - 1](z[layer - 1])
                z[layer] = draw(layer, self.guide_nets[layer](loc, scale))
            return z
        estimates = [(loc, scale)]  # the deterministic bottom-up pass
        for up in self.up:
            loc, scale = up(torch.cat([loc, scale.log()], -1))
            estimates.append((loc, scale))
        for layer in reversed(range(self.num_layers)):
            loc, scale = estimates[layer]
            if layer < self.num_layers - 1:
                p_loc, p_scale = self.top_down[layer](z[layer + 1])
                loc, scale = precision_weighted(loc, scale, p_loc, p_scale)
            z[layer] = draw(layer, self.guide_nets[layer](loc, scale))
        return z

    # -- the Pyro programs --------------------------------------------------------------------
    def model(self, x: torch.Tensor, beta: float = 1.0, reconstruction_weight: float = 1.0,
              layer_betas=None) -> list[torch.Tensor]:
        """p(z_L) prod p(z_l|z_{l+1}) p(x|z_1) for a batch ``x`` ``(B, *image_shape)``."""
        for part in ("decoder", "likelihood", "top_down"):
            pyro.module(f"{self.name}.{part}", getattr(self, part))
        pyro.module(f"{self.name}.prior", self.prior_net)
        return self.model_body(x, beta, reconstruction_weight, layer_betas)

    def guide(self, x: torch.Tensor, beta: float = 1.0, reconstruction_weight: float = 1.0,
              layer_betas=None) -> list[torch.Tensor]:
        """q(z_1..z_L|x) for a batch ``x``; the same arguments as the model."""
        for part in ("encoder", "up", "top_down"):  # the ladder's guide uses the model's top-down networks
            pyro.module(f"{self.name}.{part}", getattr(self, part))
        pyro.module(f"{self.name}.guide", self.guide_nets)
        return self.guide_body(x, beta, reconstruction_weight, layer_betas)

    def _site(self, beta: float, layer_betas) -> Callable:
        weights = layer_betas or (1.0,) * self.num_layers

        def draw(layer: int, fn):
            with latent_weight(beta * weights[layer]):
                return pyro.sample(latent_site(layer), fn)

        return draw

    def model_body(self, x: torch.Tensor, beta: float = 1.0, reconstruction_weight: float = 1.0,
                   layer_betas=None) -> list[torch.Tensor]:
        with pyro.plate(PLATE, x.shape[0]):
            z = self.generate(self._site(beta, layer_betas))
            with site_weight(reconstruction_weight):
                pyro.sample(OBSERVED, self.decode(z[0]), obs=x)
        return z

    # reconstruction_weight is the model's business; the guide takes it because SVI hands both
    # programs the same arguments
    def guide_body(self, x: torch.Tensor, beta: float = 1.0, reconstruction_weight: float = 1.0,
                   layer_betas=None) -> list[torch.Tensor]:
        with pyro.plate(PLATE, x.shape[0]):
            return self.infer(x, self._site(beta, layer_betas))

    # -- scoring without Pyro (evaluation) ------------------------------------------------------
    def draw_terms(self, x: torch.Tensor, num_samples: int) -> "LayerTerms":
        """``num_samples`` joint draws of the guide for each item of ``x`` and their log
        densities, each ``(num_samples, B)``; see :class:`LayerTerms`."""
        log_q = [None] * self.num_layers
        codes = [None] * self.num_layers

        def draw(layer: int, q):
            # the first layer the guide draws depends on x alone (batch (B,)); the others on it
            z = q.rsample((num_samples,)) if len(q.batch_shape) == 1 else q.rsample()
            log_q[layer] = q.log_prob(z)  # right after the draw: a flow scores it from its cache
            codes[layer] = representative_code(q).expand_as(z)  # E[z_l | layers before], for activity
            return z

        z = self.infer(x, draw)
        log_p = [None] * self.num_layers

        def score(layer: int, p):
            log_p[layer] = p.log_prob(z[layer])
            return z[layer]

        self.generate(score)
        return LayerTerms(self.decode(z[0]).log_prob(x), torch.stack(log_q), torch.stack(log_p), codes)

    @torch.no_grad()
    def elbo_per_image(self, x: torch.Tensor) -> torch.Tensor:
        """One-draw ELBO of each item ``(B,)``: log p(x|z_1) + sum_l [log p(z_l|.) - log q(z_l|.)]."""
        terms = self.draw_terms(x, 1)
        return (terms.log_px_z + (terms.log_p - terms.log_q).sum(0))[0]

    @torch.no_grad()
    def elbo_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One draw's ``(log p(x|z_1), KL summed over the layers, codes of every layer side by
        side)``, ``(B,)``, ``(B,)``, ``(B, sum z_dims)``: the validation terms of
        :func:`pyro_vae.monitor.validation_terms`."""
        terms = self.draw_terms(x, 1)
        return terms.log_px_z[0], (terms.log_q - terms.log_p).sum(0)[0], torch.cat(self.codes(x), -1)

    def evaluate(self, images, **options) -> dict:
        """:func:`evaluate_hierarchical` of this model: what :func:`pyro_vae.evaluate` gives for it."""
        return evaluate_hierarchical(self, images, **options)

    def why_no_closed_form_kl(self) -> str | None:
        """Why ``TraceMeanField_ELBO`` (``"analytic"``) cannot score this model, or ``None``.

        The bottom-up guide draws z_1 before z_2, and Pyro's per-site KL of z_1 would be taken at
        a z_2 drawn from q(z_2|z_1): not the ELBO (the mean-field order Pyro warns about). The
        ladder draws in the model's order; then every layer's family needs a closed-form KL
        against its Gaussian p(z_l|z_{l+1}), and the top layer's against the prior.
        """
        if self.inference == "bottom_up":
            return "the bottom-up guide draws z1 before z2, so a per-site KL at the later draw is not the ELBO"
        families = {type(guide) for guide in self.guide_nets[:-1]}
        if not all(has_closed_form_kl(StandardNormal, family) for family in families):
            return "the guide family has no closed-form KL against the Gaussian p(z_l|z_{l+1})"
        if not has_closed_form_kl(self.prior_net, self.guide_nets[-1]):
            return "the top layer's guide family and prior have no closed-form KL"
        return None

    def parameter_groups(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The guide's own networks and the model's (the ladder's guide also reads the model's
        top-down ones): the "encoder" and "decoder" of :func:`pyro_vae.compare.compare_estimators`."""
        return [self.encoder, self.up, self.guide_nets], [self.decoder, self.likelihood, self.top_down, self.prior_net]

    def check_shapes(self, image_shape, *_) -> None:
        """Run the programs once on two data of zeros (:func:`check_hierarchical_shapes`)."""
        check_hierarchical_shapes(self, image_shape, f"the {type(self).__name__}")

    # -- using a trained model ------------------------------------------------------------------
    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """A deterministic code of every layer, bottom first, each ``(B, z_dims[l])``: the guide
        run on the codes of the layers it draws first (the means, for Gaussians)."""
        return self.infer(x, lambda layer, q: representative_code(q))

    @torch.no_grad()
    def code(self, x: torch.Tensor) -> torch.Tensor:
        """The top layer's code ``(B, z_dims[-1])``: the space of the prior, for the latent-space figure."""
        return self.codes(x)[-1]

    @torch.no_grad()
    def reconstruct_from(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """The mean of p(x|z_1) where ``x`` is encoded up to ``layer`` (its code) and decoded
        down by the model's means: what layer ``layer`` alone keeps of ``x``. Shape of ``x``."""
        z = self.codes(x)[layer]
        for below in reversed(range(layer)):
            z = self.conditional(below, z).mean
        return self.decode(z).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z_1) at the code of z_1, shape of ``x``."""
        return self.reconstruct_from(x, 0)

    @torch.no_grad()
    def sample_images(self, num_samples: int) -> torch.Tensor:
        """Means of p(x|z_1) for latents drawn top-down from the model: ``(num_samples, *image_shape)``."""
        z = self.generate(lambda layer, p: p.sample((num_samples,)) if layer == self.num_layers - 1 else p.sample())
        return self.decode(z[0]).mean

    @torch.no_grad()
    def vary_each_layer(self, num_columns: int) -> torch.Tensor:
        """Decoded means with one layer varied at a time: ``(L, num_columns, *image_shape)``.

        Row ``l`` (layer ``l``, 0-based) keeps one draw of every other layer and takes
        ``num_columns`` draws of layer ``l``: its noise ``eps`` for a Gaussian layer
        (``z_l = mu + sigma eps``, the layers below it following through their fixed noise),
        fresh draws of the prior for the top layer.
        """
        top = self.num_layers - 1
        fixed_top = self.prior().sample((1,))
        fixed_noise = [torch.randn(1, self.z_dims[layer], device=fixed_top.device)
                       if layer < top else None for layer in range(self.num_layers)]
        rows = []
        for varied in range(self.num_layers):
            def draw(layer: int, p, varied=varied):
                if layer == top:
                    return self.prior().sample((num_columns,)) if varied == top else fixed_top.expand(num_columns, -1)
                noise = torch.randn_like(p.mean) if layer == varied else fixed_noise[layer].expand_as(p.mean)
                return p.mean + p.stddev * noise

            rows.append(self.decode(self.generate(draw)[0]).mean)
        return torch.stack(rows)


class LayerTerms(NamedTuple):
    """Joint draws of a hierarchical guide, K per item, and their log densities.

    ``log_px_z``: log p(x|z_1), ``(K, B)``; ``log_q``, ``log_p``: ``(L, K, B)``, layer by layer,
    log q(z_l | x, layers drawn before) and log p(z_l | z_{l+1}) (the prior for the top);
    ``codes``: per layer ``(K, B, z_dims[l])``, the code of q(z_l | ...) at each draw (its mean
    for a Gaussian), whose mean over draws estimates E_q[z_l | x].
    """

    log_px_z: torch.Tensor
    log_q: torch.Tensor
    log_p: torch.Tensor
    codes: list


class LayerEstimates(NamedTuple):
    """:class:`~pyro_vae.elbo.Estimates` of every item, with the KL split by layer ``(L, B)``
    (E_q[log q(z_l|.) - log p(z_l|.)], which sum to ``estimates.kl``) and the estimates of
    E_q[z_l|x] (per layer ``(B, z_dims[l])``)."""

    estimates: Estimates
    kl_per_layer: torch.Tensor
    means: list


def _chunk(vae: HierarchicalVAE, x: torch.Tensor, num_samples: int, ks: list[int]) -> int:
    """Samples per chunk: under :data:`~pyro_vae.elbo.MAX_CHUNK_ELEMENTS` decoded values and
    latents, a multiple of every K in ``ks``, at least one group (as :mod:`pyro_vae.elbo`)."""
    group = math.lcm(*ks) if ks else 1
    mixture = getattr(vae.prior(), "mixture_distribution", None)  # every component at every z
    components = mixture.logits.shape[-1] if mixture is not None else 1
    per_sample = x.shape[0] * (x[0].numel() + sum(vae.z_dims) + components * vae.z_dims[-1])
    chunk = max(1, min(num_samples, MAX_CHUNK_ELEMENTS // per_sample))
    return max(group, chunk - chunk % group)


@torch.no_grad()
def importance_sampled_layers(vae: HierarchicalVAE, x: torch.Tensor, num_samples: int,
                              bound_ks=BOUND_KS) -> LayerEstimates:
    """:func:`pyro_vae.elbo.importance_sampled` over every layer: log weights ``log p(x|z_1) +
    sum_l log p(z_l|z_{l+1}) - sum_l log q(z_l|.)`` of joint draws of the guide, in chunks that
    bound the memory whatever K; with the KL by layer and E_q[z_l|x] (:class:`LayerEstimates`)."""
    ks = [k for k in bound_ks if k <= num_samples]
    chunk = _chunk(vae, x, num_samples, ks)
    zeros = x.new_zeros(x.shape[:1])
    log_sum = torch.full(x.shape[:1], -math.inf, device=x.device, dtype=x.dtype)
    reconstruction = zeros.clone()
    kl_layers = x.new_zeros(vae.num_layers, x.shape[0])
    means = None
    bound_sums, bound_groups = {k: zeros.clone() for k in ks}, {k: 0 for k in ks}
    for start in range(0, num_samples, chunk):
        terms = vae.draw_terms(x, min(chunk, num_samples - start))
        log_ratio = terms.log_q - terms.log_p  # (L, k, B)
        log_w = terms.log_px_z - log_ratio.sum(0)
        log_sum = torch.logaddexp(log_sum, log_w.logsumexp(0))
        reconstruction += terms.log_px_z.sum(0)
        kl_layers += log_ratio.sum(1)
        sums = [code.sum(0) for code in terms.codes]
        means = sums if means is None else [m + s for m, s in zip(means, sums)]
        for k in ks:
            groups = len(log_w) // k
            grouped = log_w[: groups * k].reshape(groups, k, log_w.shape[-1])
            bound_sums[k] += (grouped.logsumexp(1) - math.log(k)).sum(0)
            bound_groups[k] += groups
    reconstruction /= num_samples
    kl_layers /= num_samples
    kl = kl_layers.sum(0)
    bounds = {k: bound_sums[k] / bound_groups[k] for k in ks if bound_groups[k]}
    estimates = Estimates(log_sum - math.log(num_samples), reconstruction - kl, reconstruction, kl, bounds)
    return LayerEstimates(estimates, kl_layers, [m / num_samples for m in means])


@torch.no_grad()
def evaluate_hierarchical(vae: HierarchicalVAE, images, num_samples: int = 1000, batch_size: int = 100,
                          progress: bool = False, seed: int = 0, compiled: bool | None = None) -> dict:
    """:func:`pyro_vae.elbo.evaluate` of a hierarchical VAE: the same keys, importance-sampled
    over every layer (:func:`importance_sampled_layers`), and by layer (bottom first):
    ``kl_per_layer`` (nats, summing to ``test_kl``) and ``active_units_per_layer``, the
    dimensions whose Cov_x(E_q[z_l|x]) exceeds :data:`~pyro_vae.elbo.ACTIVE_UNIT_THRESHOLD`
    (Burda et al. 2015; E_q[z_l|x] is the mean over the K draws of q(z_l|.)'s own mean, exact
    for the layer the guide draws first). ``active_units`` is their sum; ``kl_per_dimension``
    is ``None`` (a layer's KL does not split over its dimensions). Seeded as ``evaluate``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples = {num_samples}: must be >= 1")
    device = _device_of(vae)
    if compiled is None:  # the rule of pyro_vae.elbo.evaluate
        from .elbo import FUSE_MIN_ELEMENTS

        compiled = device.type == "cpu" and num_samples * math.prod(images.shape) >= FUSE_MIN_ELEMENTS
    parts = []
    bar = tqdm(total=len(images), desc=f"evaluate K={num_samples}", unit="img", disable=not progress)
    with seeded(seed, device), fused_log_prob(compiled):
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            parts.append(importance_sampled_layers(vae, x, num_samples))
            bar.update(len(x))
    bar.close()
    mean = {field: torch.cat([getattr(p.estimates, field) for p in parts]).mean().item()
            for field in Estimates._fields[:4]}
    bounds = {str(k): torch.cat([p.estimates.bounds[k] for p in parts]).mean().item() for k in parts[0].estimates.bounds}
    bounds[str(num_samples)] = mean["log_likelihood"]
    active = [int((torch.cat([p.means[layer] for p in parts]).var(0) > ACTIVE_UNIT_THRESHOLD).sum())
              for layer in range(vae.num_layers)]
    return {
        "test_elbo": mean["elbo"],
        "test_log_likelihood": mean["log_likelihood"],
        "test_reconstruction": mean["reconstruction"],
        "test_kl": mean["kl"],
        "kl_per_layer": torch.cat([p.kl_per_layer for p in parts], 1).mean(1).tolist(),
        "kl_per_dimension": None,
        "closed_form_terms": [],
        "active_units": sum(active),
        "active_units_per_layer": active,
        "z_dims": list(vae.z_dims),
        "iwae_bounds": bounds,
        "num_samples": num_samples,
        "num_images": len(images),
    }


# -- building ---------------------------------------------------------------------------------

def build_hierarchical_vae(model_config, image_shape, name: str | None = None) -> HierarchicalVAE:
    """A :class:`HierarchicalVAE` from a :class:`~pyro_vae.config.ModelConfig` with two or more
    ``z_dims``: the encoder and decoder that ``model.arch`` names, built for layer 1; the prior
    for the top layer; the layer networks ``model.num_layers`` hidden layers of
    ``model.layer_hidden_dim`` (0: ``hidden_dim``) of the encoder's units; the guide family once
    per layer.

    :raises ConfigError: the parts do not fit the data or each other (one line, checked once
        on two data of zeros).
    """
    image_shape = tuple(image_shape)
    config = model_config
    sizes = list(config.z_dims)
    if len(sizes) < 2:
        raise ValueError(f"model.z_dims = {sizes}: a hierarchical VAE has two or more layers")
    check_model_fits(_bottom_layer(config), image_shape)  # the networks next to x hold most of the weights
    encoder, decoder = make_networks(config.arch, image_shape, sizes[0], config.hidden_dim, config.num_layers)
    likelihood = make_likelihood(config.likelihood, image_shape, **config.likelihood_options)
    width = config.layer_hidden_dim or config.hidden_dim
    units = getattr(type(encoder), "layers", _mlp)  # the gated MLP's units where model.arch has them
    top_down = [GaussianLayer(sizes[layer + 1], sizes[layer], width, config.num_layers, units)
                for layer in range(len(sizes) - 1)]
    ladder = config.inference == "ladder"
    up = [GaussianLayer((2 if ladder else 1) * sizes[layer], sizes[layer + 1], width, config.num_layers, units)
          for layer in range(len(sizes) - 1)]
    # a VampPrior scores pseudo-inputs with q(z_L|x): the ladder's top estimate, or the
    # bottom-up chain of means (any encoder of x into z_L makes a valid mixture prior)
    prior = make_prior(config.prior, sizes[-1], encoder=_TopEncoder(encoder, up, ladder), image_shape=image_shape,
                       data_domain=likelihood.accepts, **config.prior_options)
    guides = [_layer_guide(config, size) for size in sizes]  # last: their draws leave the others' as they were
    vae = HierarchicalVAE(encoder, decoder, likelihood, prior, top_down, up, guides, z_dims=sizes,
                          inference=config.inference, name=name)
    check_hierarchical_shapes(vae, image_shape, f"model.z_dims = {sizes} with model.arch = {config.arch!r}, "
                                                f"model.prior = {config.prior!r}, model.guide = {config.guide!r}")
    return vae


def _bottom_layer(model_config):
    import dataclasses

    return dataclasses.replace(model_config, z_dim=model_config.z_dims[0], z_dims=[])


def _layer_guide(model_config, size: int) -> nn.Module:
    try:
        return make_guide(model_config.guide, size, **model_config.guide_options)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"model.guide = {model_config.guide!r} with model.guide_options = "
                          f"{model_config.guide_options} for a layer of {size}: building it raised "
                          f"{type(error).__name__}: {' '.join(str(error).split())}") from None


class _TopEncoder(nn.Module):
    """x to ``(loc, scale)`` of the top layer along the guide's deterministic path, for a
    VampPrior. Holds the encoder and the up networks without registering them (the VAE owns
    them once), as the VampPrior holds its encoder."""

    def __init__(self, encoder: nn.Module, up: list[nn.Module], ladder: bool):
        super().__init__()
        self._parts = [encoder, up]
        self.ladder = ladder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoder, up = self._parts
        loc, scale = encoder(x)
        for layer in up:
            loc, scale = layer(torch.cat([loc, scale.log()], -1) if self.ladder else loc)
        return loc, scale


def check_hierarchical_shapes(vae: HierarchicalVAE, image_shape, what: str) -> None:
    """Run the model and guide once on two data of zeros: one line naming ``what`` where the
    parts do not fit together. Changes no weight, no batch statistic and no random state."""
    tensors = [t for t in vae.parameters() if t.is_floating_point()]
    like = tensors[0] if tensors else torch.zeros(())
    x = torch.zeros(2, *image_shape, dtype=like.dtype, device=like.device)
    try:
        with evaluation_mode(vae), probing(like), torch.no_grad():
            make_elbo("mc").loss(vae.model_body, vae.guide_body, x)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(f"{what}: the parts do not fit together ({' '.join(str(error).split())[:300]})") from None
