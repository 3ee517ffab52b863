"""Figures: tensors in, ``matplotlib.figure.Figure`` out. No files, no training, no pyplot state.

Figures are built with ``Figure()`` directly rather than ``pyplot``, so making them in a
loop, a test or a headless job leaks nothing and needs no display backend.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from .elbo import IWAE_BOUNDS, kl_per_dimension
from .hierarchical import HierarchicalVAE
from .labelled import ClassPrior, LabelledVAE
from .seeding import seeded

#: Colours of classes: up to 10 or 20 classes get distinct qualitative colours; more classes
#: get evenly spaced colours of a perceptually ordered map (neighbours look alike, but any two
#: classes far apart in label order stay distinguishable).
_QUALITATIVE = (("tab10", 10), ("tab20", 20))
_MANY_CLASSES = "turbo"
#: Up to this many classes, a colorbar with one tick per class stays readable.
MAX_LABELLED_CLASSES = 20


def tile_images(images: torch.Tensor, ncol: int) -> torch.Tensor:
    """Images side by side on one canvas, row by row, with 1-pixel white gutters.

    :param images: ``(N, C, H, W)`` with ``C`` 1 (grey) or 3 (RGB); values are clipped to [0, 1].
    :param ncol: images per row; the last row is padded with white.
    :returns: ``(rows*(H+1)-1, ncol*(W+1)-1)`` for grey images, with a last axis of 3 for RGB.
    """
    n, c, h, w = images.shape
    nrow = math.ceil(n / ncol)
    canvas = torch.ones(c, nrow * (h + 1) - 1, ncol * (w + 1) - 1)
    for i, image in enumerate(images.detach().cpu().clamp(0, 1)):
        r, q = divmod(i, ncol)
        canvas[:, r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = image
    return canvas[0] if c == 1 else canvas.permute(1, 2, 0)


def _show(ax, canvas: torch.Tensor, title: str | None = None):
    ax.imshow(canvas.numpy(), cmap="gray" if canvas.dim() == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)


def plot_image_grid(images: torch.Tensor, title: str = "", ncol: int = 8) -> Figure:
    """A grid of images ``(N, C, H, W)`` with values in [0, 1]."""
    nrow = math.ceil(len(images) / ncol)
    fig = Figure(figsize=(ncol * 0.8, nrow * 0.8 + 0.4), layout="constrained")
    _show(fig.add_subplot(), tile_images(images, ncol), title)
    return fig


def plot_image_panels(panels: dict[str, torch.Tensor], ncol: int = 8) -> Figure:
    """Grids of images side by side, one panel per ``{title: images (N, C, H, W)}``."""
    fig = Figure(figsize=(5 * len(panels), 5.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, images) in zip(axes, panels.items()):
        _show(ax, tile_images(images, ncol), title)
    return fig


def plot_reconstructions(inputs: torch.Tensor, reconstructions: torch.Tensor) -> Figure:
    """Inputs (top row) above their reconstructions (bottom row); both ``(N, C, H, W)``."""
    n = len(inputs)
    fig = Figure(figsize=(n * 0.8, 2.2), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    _show(top, tile_images(inputs, n), "inputs")
    _show(bottom, tile_images(reconstructions, n), "reconstructions (mean of p(x|z) at z = E[z|x])")
    return fig


def plot_vector_reconstructions(inputs: torch.Tensor, reconstructions: torch.Tensor, ncol: int = 3) -> Figure:
    """Vector data ``(N, D)``: each datum (solid) and its reconstruction (dashed) against the
    feature index, one small panel each; the picture images get as a grid."""
    n = len(inputs)
    nrow = math.ceil(n / ncol)
    fig = Figure(figsize=(3.2 * ncol, 2.0 * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False, sharex=True)
    features = np.arange(inputs.shape[-1])
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        ax.plot(features, inputs[i].cpu().numpy(), "-o", markersize=2, label="datum")
        ax.plot(features, reconstructions[i].cpu().numpy(), "--", label="reconstruction")
    axes.flat[0].legend(fontsize="small")
    fig.supxlabel("feature")
    fig.suptitle("test data (solid) and the mean of p(x|z) at z = E[z|x] (dashed)")
    return fig


def plot_vector_samples(samples: torch.Tensor, title: str = "") -> Figure:
    """Vector samples ``(N, D)`` as a heat map: one row per sample, one column per feature."""
    fig = Figure(figsize=(max(4.0, 0.35 * samples.shape[-1] + 2), 5), layout="constrained")
    ax = fig.subplots()
    shown = ax.imshow(samples.cpu().numpy(), aspect="auto", cmap="coolwarm", interpolation="nearest")
    fig.colorbar(shown, ax=ax)
    ax.set(xlabel="feature", ylabel="sample", title=title)
    return fig


def _class_colormap(num_classes: int) -> ListedColormap:
    """``num_classes`` colours, one per class index."""
    for name, size in _QUALITATIVE:
        if num_classes <= size:
            return ListedColormap(colormaps[name].colors[:num_classes])
    return ListedColormap(colormaps[_MANY_CLASSES](np.linspace(0, 1, num_classes)))


def plot_latent_scatter(points: torch.Tensor, labels: torch.Tensor | None, title: str, axis_labels=("z1", "z2"),
                        class_names=None) -> Figure:
    """Latent codes ``(N, 2)``, coloured by class label ``(N,)`` when there are labels.

    Any number of classes, with any integer labels: colours go by the rank of a label among
    the labels present. A colorbar names the classes (``class_names[label]`` where given, else
    the label) when there are at most :data:`MAX_LABELLED_CLASSES`; beyond that it would be
    unreadable, and the title gives the number of classes instead. ``labels=None``: one colour.
    """
    fig = Figure(figsize=(6, 5.2), layout="constrained")
    ax = fig.add_subplot()
    points = points.detach().cpu()
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.7, color="C0")
    else:
        present, index = torch.unique(labels.cpu(), return_inverse=True)
        k = len(present)
        scatter = ax.scatter(points[:, 0], points[:, 1], c=index, cmap=_class_colormap(k), s=3, alpha=0.7,
                             vmin=-0.5, vmax=k - 0.5)
        if k <= MAX_LABELLED_CLASSES:
            colorbar = fig.colorbar(scatter, ax=ax, ticks=range(k), label="label")
            names = present.tolist() if class_names is None else [class_names[i] for i in present.tolist()]
            colorbar.set_ticklabels([str(name) for name in names])
        else:
            title = f"{title} (colour: {k} classes)"
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title)
    return fig


def training_objective_label(objective, history: list[dict]) -> str:
    """What minus the training loss is: the ELBO only for an ELBO estimator at beta = 1 with
    the reconstruction term at full weight; the K-sample bound for ``iwae`` and ``iwae_dreg``.

    :param objective: the run's :class:`~pyro_vae.config.ObjectiveConfig`; ``None``: unknown.
    :param history: the ``metrics.jsonl`` records, whose ``beta`` says where a schedule had beta < 1.
    """
    if objective is None:
        return "train objective (-loss, running mean)"
    if objective.elbo in IWAE_BOUNDS:
        what = f"train IWAE bound, K = {objective.num_particles}"
    else:
        what = "train ELBO"
    if objective.reconstruction_weight != 1:
        what += f", reconstruction weighted {objective.reconstruction_weight:g}"
    if any(r.get("beta", objective.beta) != 1 for r in history):
        what += ", KL weighted by beta where beta != 1"
    return what + " (-loss, running mean)"


def plot_training_curves(history: list[dict], objective=None) -> Figure:
    """Minus the training loss and the validation ELBO per epoch, from ``metrics.jsonl``
    records; ``objective`` (the run's :class:`~pyro_vae.config.ObjectiveConfig`) names the
    first (:func:`training_objective_label`), which is not the ELBO for every objective."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    epochs = [r["epoch"] for r in history]
    train, val = [-r["train_loss"] for r in history], [r["val_elbo"] for r in history]
    ax.plot(epochs, train, marker=".", label=training_objective_label(objective, history))
    ax.plot(epochs, val, marker=".", label="validation ELBO")
    if len(history) >= 10:  # the first epochs are far below the rest: zoom on the last 90 %
        tail = train[len(train) // 10 :] + val[len(val) // 10 :]
        low, high = min(tail), max(tail)
        ax.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("training curves")
    return fig


def principal_components(z: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection of ``z`` ``(N, D)`` on its first ``k`` principal components, and their variance share."""
    centered = z - z.mean(0)
    _, s, v = torch.linalg.svd(centered, full_matrices=False)
    share = s.pow(2) / s.pow(2).sum()
    return centered @ v[:k].T, share[:k]


#: How a latent space of more than two dimensions is drawn in the plane.
EMBEDDINGS = ("pca", "tsne")


def embed_latents(z: torch.Tensor, method: str = "pca", seed: int = 0) -> tuple[torch.Tensor, str, tuple[str, str]]:
    """Two-dimensional coordinates of latent means ``z`` ``(N, z_dim)``, a title naming the
    method, and axis labels.

    ``"pca"``: the first two principal components (fast; linear, so clusters that differ in
    other directions overlap). ``"tsne"``: a t-SNE embedding (van der Maaten & Hinton 2008, as
    Pyro's VAE example draws), which keeps neighbourhoods rather than distances; it needs
    scikit-learn and takes seconds for a few thousand points.
    """
    if method == "pca":
        projected, share = principal_components(z)
        return (projected, f"first two principal components of {z.shape[1]}",
                (f"PC1 ({share[0]:.0%} of variance)", f"PC2 ({share[1]:.0%})"))
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise ImportError("the t-SNE embedding needs scikit-learn: pip install scikit-learn") from None
        points = z.detach().cpu().double().numpy()
        tsne = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30.0, (len(points) - 1) / 3))
        return (torch.as_tensor(tsne.fit_transform(points), dtype=torch.float32),
                f"t-SNE embedding of {z.shape[1]} dimensions", ("t-SNE 1", "t-SNE 2"))
    raise ValueError(f"unknown embedding {method!r}; choose one of {list(EMBEDDINGS)}")


@torch.no_grad()
def informative_dimensions(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Latent dimensions ordered from the most informative: ``(order, score, what the score is)``.

    The score is the mean KL(q(z_d|x) || p(z_d)) over ``images`` where it splits over
    dimensions (diagonal Gaussian posterior and prior), else the variance of E[z_d|x] across
    the images (the activity of Burda et al. 2015).
    """
    q = vae.encode(images)
    kl = kl_per_dimension(q, vae.prior())
    score, what = (kl.mean(0), "KL") if kl is not None else (vae.code(images).var(0), "Var E[z|x]")
    return score.argsort(descending=True), score, what


@torch.no_grad()
def plot_latent_traversals(vae, image: torch.Tensor, dims, scores=None, what: str = "KL", steps: int = 9,
                           span: float = 3.0) -> Figure:
    """Decoded means as one latent dimension at a time moves around the encoding of ``image``
    (``(C, H, W)``) while the others stay fixed: row ``i`` varies ``dims[i]`` over
    ``E[z_d|x] + t * std_p(z_d)`` for ``t`` from ``-span`` to ``span``, the picture of
    beta-VAE papers (Higgins et al. 2017; Burgess et al. 2018). ``scores`` label the rows.
    """
    dims = [int(d) for d in dims]
    z0 = vae.code(image.unsqueeze(0))[0]
    scale = vae.prior().stddev.reshape(-1)
    offsets = torch.linspace(-span, span, steps, device=z0.device)
    z = z0.repeat(len(dims), steps, 1)
    for row, d in enumerate(dims):
        z[row, :, d] = z0[d] + offsets * scale[d]
    decoded = vae.decode(z.reshape(-1, z0.shape[-1])).mean
    fig = Figure(figsize=(steps * 0.7 + 1.6, len(dims) * 0.7 + 0.8), layout="constrained")
    ax = fig.add_subplot()
    _show(ax, tile_images(decoded, steps))
    ax.set_axis_on()
    height = image.shape[-2] + 1
    ax.set_yticks([row * height + (height - 1) / 2 for row in range(len(dims))])
    ax.set_yticklabels([f"z{d + 1}" + ("" if scores is None else f" ({what} {float(scores[d]):.2g})") for d in dims])
    ax.set_xticks([col * (image.shape[-1] + 1) + image.shape[-1] / 2 for col in range(steps)])
    ax.set_xticklabels([f"{t:+.1f}" for t in offsets.tolist()])
    ax.set_xlabel("E[z_d|x] + t x prior std (others fixed)")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title("latent traversals around one test image, most informative dimensions first")
    return fig


def _device_of(module: torch.nn.Module) -> torch.device:
    """Where a model's weights are: where its draws must be made."""
    return next(module.parameters()).device


def _label_rows(ax, names, row_height: int) -> None:
    """Name each row of a tiled canvas, rows ``row_height`` pixels apart (gutter included)."""
    ax.set_axis_on()
    ax.set_yticks([row * row_height + (row_height - 1) / 2 for row in range(len(names))])
    ax.set_yticklabels([str(name) for name in names])
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


@torch.no_grad()
def plot_class_grid(vae, num_columns: int = 10, seed: int = 0, class_names=None) -> Figure:
    """Analogies of a labelled VAE: one row per class, one column per draw of z from the prior
    (with a learned p(z|y), ``model.class_prior``: one draw of the standard noise, placed in each
    class's Gaussian).

    Every image of a column decodes the same z with another class y, so what a column shares
    (slant, thickness) is what z holds and what a row shares is the class: the picture of
    Kingma et al. 2014, Semi-Supervised Learning with Deep Generative Models, Fig. 1.

    :param vae: a :class:`~pyro_vae.labelled.LabelledVAE` of images ``(C, H, W)``.
    :param num_columns: the draws of z, one column each.
    :param seed: the seed of the draws (:func:`~pyro_vae.seeding.seeded`): the same seed draws
        the same columns, and the caller's random state is left as it was.
    :param class_names: a name per class index for the row labels; ``None``: the indices.
    """
    classes = torch.arange(vae.num_classes, device=_device_of(vae))
    y_rows = classes[:, None].expand(vae.num_classes, num_columns)
    with seeded(seed, _device_of(vae)), torch.no_grad():
        if isinstance(vae.prior_net, ClassPrior):
            # a learned p(z|y), a Gaussian per class: a column shares the standardized draw, so
            # it keeps its place in each class's Gaussian (z = loc_y + scale_y * eps)
            eps = torch.randn(num_columns, vae.prior_net.locs.shape[-1], device=classes.device)
            z_rows = vae.prior_net.locs[:, None] + vae.prior_net.scales()[:, None] * eps  # (classes, columns, z_dim)
        else:  # p(z) alone: a column shares z itself
            z = vae.prior().sample((num_columns,))  # (num_columns, z_dim)
            z_rows = z.expand(vae.num_classes, *z.shape)
    decoded = vae.decode(z_rows.reshape(-1, z_rows.shape[-1]), y_rows.reshape(-1)).mean
    if decoded.dim() != 4:
        raise ValueError(f"the class grid draws images (C, H, W); this VAE decodes items of shape "
                         f"{tuple(decoded.shape[1:])}")
    fig = Figure(figsize=(num_columns * 0.7 + 1.2, vae.num_classes * 0.7 + 0.8), layout="constrained")
    ax = fig.add_subplot()
    _show(ax, tile_images(decoded, num_columns), "each column: one draw of z, decoded with each class y")
    _label_rows(ax, classes.tolist() if class_names is None else class_names, decoded.shape[-2] + 1)
    ax.set_ylabel("class y")
    return fig


#: A normalized share above this is a dark cell, whose count is written in white.
_DARK_CELL = 0.5


def confusion_counts(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts ``(num_classes, num_classes)``: row = true class, column = predicted class.

    :param predicted: ``(N,)`` predicted class indices in ``0..num_classes-1``.
    :param labels: ``(N,)`` true class indices in the same range.
    """
    predicted, labels = predicted.detach().cpu().long(), labels.detach().cpu().long()
    for name, values in (("predicted", predicted), ("labels", labels)):
        if len(values) and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name}: class indices must lie in 0..{num_classes - 1}, got {values.min().item()}.."
                             f"{values.max().item()}")
    pairs = labels * num_classes + predicted
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def plot_confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          class_names=None) -> Figure:
    """The confusion matrix of a classifier (:func:`confusion_counts`): row = true class,
    column = predicted, each cell coloured by its share of its row (so a rare class is as
    readable as a common one) and holding its count; the title gives the accuracy.

    :param predicted: ``(N,)`` predicted class indices.
    :param labels: ``(N,)`` true class indices.
    :param num_classes: the number of classes C.
    :param class_names: a name per class index for the ticks; ``None``: the indices. Counts are
        written in the cells up to :data:`MAX_LABELLED_CLASSES` classes (beyond, they would overlap).
    """
    counts = confusion_counts(predicted, labels, num_classes)
    shares = counts / counts.sum(1, keepdim=True).clamp_min(1)  # an absent class: a blank row
    size = max(4.0, 0.45 * num_classes + 2)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.add_subplot()
    shown = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, label="share of the true class")
    if num_classes <= MAX_LABELLED_CLASSES:
        names = [str(name) for name in (range(num_classes) if class_names is None else class_names)]
        ax.set_xticks(range(num_classes), names)
        ax.set_yticks(range(num_classes), names)
        for (row, col), count in np.ndenumerate(counts.numpy()):
            colour = "white" if shares[row, col] > _DARK_CELL else "black"
            ax.text(col, row, str(count), ha="center", va="center", color=colour, fontsize="small")
    total = int(counts.sum())
    accuracy = counts.trace().item() / total if total else float("nan")
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"confusion matrix: accuracy {accuracy:.1%} of {total} test items")
    return fig


#: Items classified at once for the confusion matrix: memory bounded whatever the test split.
PREDICT_CHUNK = 1000


def predict_classes(vae, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``vae.predict`` over ``images`` in chunks of :data:`PREDICT_CHUNK`, without gradients;
    seeded, since a conditional VAE's prediction scores a draw of z for every class.

    :returns: ``(N,)`` class indices, on ``images``' device.
    """
    with torch.no_grad(), seeded(seed, images.device):
        return torch.cat([vae.predict(images[start : start + PREDICT_CHUNK])
                          for start in range(0, len(images), PREDICT_CHUNK)])


#: Held-out items the latent-space figure encodes at most: a dense scatter, in a second or two.
LATENT_POINTS = 5000


@torch.no_grad()
def make_figures(vae, images: torch.Tensor, labels: torch.Tensor | None, history: list[dict],
                 seed: int = 0, embedding: str = "pca", traversal_dims: int = 10, objective=None) -> dict[str, Figure]:
    """All figures of a run, by file stem: reconstructions, samples, latent space, manifold
    (when z is 2-D and the data are images), latent traversals (images) and training curves;
    for a :class:`~pyro_vae.labelled.LabelledVAE`, also the class grid (images,
    :func:`plot_class_grid`) and, when there are ``labels``, the confusion matrix of its
    predictions on ``images`` (:func:`plot_confusion_matrix`).
    ``images`` are held-out data as the model sees them, ``(N, C, H, W)`` or vectors
    ``(N, D)``, on ``vae``'s device; ``labels`` ``(N,)`` colour the latent space (``None``:
    no labels). ``embedding`` (:func:`embed_latents`) draws a latent space of more than two
    dimensions; ``traversal_dims``: the rows of the traversal figure (the most informative).
    For a :class:`~pyro_vae.hierarchical.HierarchicalVAE` the latent space is the top layer's,
    and the layer figures (images, :func:`plot_layer_reconstructions` and
    :func:`plot_layer_samples`) take the place of the manifold and the traversals, which
    decode one z.
    ``objective`` names the training curve (:func:`plot_training_curves`); by default that of
    ``vae.config`` where the VAE has one (:func:`~pyro_vae.checkpoint.load_run` sets it; after
    :func:`~pyro_vae.train.fit`, pass ``objective=result.config.objective``).

    The samples are drawn from torch's generators seeded with ``seed`` inside
    :func:`~pyro_vae.seeding.seeded`: the same seed draws the same samples, and the caller's
    random state is left as it was.
    """
    with seeded(seed, images.device):
        samples = vae.sample_images(64)
    if images.dim() == 2:  # vectors (N, D): no image grids
        figures = {
            "reconstructions": plot_vector_reconstructions(images[:6], vae.reconstruct(images[:6])),
            "samples": plot_vector_samples(samples[:32], "samples: mean of p(x|z), z ~ p(z)"),
        }
    else:
        figures = {
            "reconstructions": plot_reconstructions(images[:12], vae.reconstruct(images[:12])),
            "samples": plot_image_grid(samples, "samples: mean of p(x|z), z ~ p(z)"),
        }
    layered = isinstance(vae, HierarchicalVAE)
    z_loc = torch.cat([vae.code(images[i : i + 1000]) for i in range(0, min(len(images), LATENT_POINTS), 1000)])
    shown = None if labels is None else labels[: len(z_loc)]
    means = f"top layer z{vae.num_layers} codes" if layered else "latent means E[z|x]"
    if z_loc.shape[1] == 2:
        figures["latent_space"] = plot_latent_scatter(z_loc, shown, f"{means} of test images")
        if images.dim() > 2 and not layered:  # a grid of decoded images
            figures["manifold"] = plot_manifold(vae)
    else:
        embedded = z_loc[:2000] if embedding == "tsne" else z_loc  # t-SNE grows faster than linearly
        projected, what, axes = embed_latents(embedded, embedding, seed)
        figures["latent_space"] = plot_latent_scatter(
            projected, None if shown is None else shown[: len(projected)], f"{means}, {what}", axes)
    if images.dim() > 2 and layered:
        figures["layer_reconstructions"] = plot_layer_reconstructions(
            images[:12], [vae.reconstruct_from(images[:12], layer) for layer in range(vae.num_layers)])
        with seeded(seed, images.device):
            figures["layer_samples"] = plot_layer_samples(vae.vary_each_layer(LAYER_SAMPLE_COLUMNS))
    elif images.dim() > 2:
        order, scores, what = informative_dimensions(vae, images[:1000])
        figures["latent_traversals"] = plot_latent_traversals(vae, images[0], order[:traversal_dims], scores, what)
    if isinstance(vae, LabelledVAE):
        figures.update(_class_figures(vae, images, labels, seed))
    if history:
        if objective is None:  # a VAE built by hand may have no config, or a config of its own
            objective = getattr(getattr(vae, "config", None), "objective", None)
        figures["training_curves"] = plot_training_curves(history, objective)
    return figures


def _class_figures(vae, images: torch.Tensor, labels: torch.Tensor | None, seed: int) -> dict[str, Figure]:
    """A labelled VAE's own figures: the class grid (images only, as every image grid) and,
    where the shown items have labels, the confusion matrix of its predictions on them."""
    figures = {}
    if images.dim() > 2:
        figures["class_grid"] = plot_class_grid(vae, seed=seed)
    if labels is not None:
        known = labels >= 0  # a label of -1 marks an item without one
        predicted = predict_classes(vae, images[known.to(images.device)], seed)
        figures["confusion_matrix"] = plot_confusion_matrix(predicted, labels[known], vae.num_classes)
    return figures


#: Draws of the varied layer in each row of :func:`plot_layer_samples`.
LAYER_SAMPLE_COLUMNS = 10


def plot_layer_reconstructions(inputs: torch.Tensor, reconstructions: list[torch.Tensor]) -> Figure:
    """Inputs (top row) above their reconstructions through each layer of a hierarchical VAE:
    row ``l`` encodes up to layer ``l`` and decodes down by the model's means
    (:meth:`~pyro_vae.hierarchical.HierarchicalVAE.reconstruct_from`), so it shows what that
    layer alone keeps of the input. Images ``(N, C, H, W)``; ``reconstructions`` bottom first."""
    n = len(inputs)
    rows = [("inputs", inputs)] + [(f"through z{layer + 1}", images) for layer, images in enumerate(reconstructions)]
    fig = Figure(figsize=(n * 0.8 + 1.2, len(rows) * 0.9 + 0.6), layout="constrained")
    ax = fig.add_subplot()
    _show(ax, tile_images(torch.cat([images for _, images in rows]), n),
          "reconstructions through each layer: encode to z_l, decode down by the means of p(z_{l-1}|z_l)")
    _label_rows(ax, [name for name, _ in rows], inputs.shape[-2] + 1)
    return fig


def plot_layer_samples(rows: torch.Tensor) -> Figure:
    """Samples of a hierarchical VAE varying one layer at a time: ``rows`` ``(L, N, C, H, W)``
    from :meth:`~pyro_vae.hierarchical.HierarchicalVAE.vary_each_layer`, row ``l`` drawing
    layer ``l`` afresh in each column while every other layer keeps one draw (its noise)."""
    num_layers, num_columns = rows.shape[:2]
    fig = Figure(figsize=(num_columns * 0.8 + 1.6, num_layers * 0.9 + 0.6), layout="constrained")
    ax = fig.add_subplot()
    _show(ax, tile_images(rows.flatten(0, 1), num_columns), "samples varying one layer (others fixed)")
    _label_rows(ax, [f"z{layer + 1} varies" for layer in range(num_layers)], rows.shape[-2] + 1)
    return fig


@torch.no_grad()
def plot_manifold(vae, n: int = 15) -> Figure:
    """Decoded means on an ``n x n`` grid of a 2-D latent space, at prior quantiles 5%..95%
    (the grid follows the prior's probability mass, as in Kingma & Welling 2014, fig. 4).
    """
    prior = vae.prior()
    if prior.event_shape != (2,):
        raise ValueError(f"the manifold plot needs a 2-D latent space, got event shape {tuple(prior.event_shape)}")
    quantiles = torch.linspace(0.05, 0.95, n)
    grid = torch.distributions.Normal(0.0, 1.0).icdf(quantiles)
    # rows go down the second latent, columns along the first
    z = torch.stack(torch.meshgrid(grid, grid.flip(0), indexing="xy"), -1).reshape(-1, 2)
    z = prior.mean + prior.stddev * z
    images = vae.decode(z).mean
    fig = Figure(figsize=(7, 7), layout="constrained")
    _show(fig.add_subplot(), tile_images(images, n), "latent manifold: mean of p(x|z) on a grid of z")
    return fig


def plot_estimator_comparison(records: list[dict], snr_parts: tuple[str, str] = ("encoder", "decoder")) -> Figure:
    """Estimate +- its spread across repeats, gradient SNR of two parts (the records'
    ``grad_snr_<part>``: the encoder and the decoder, or the classifier and the decoder) and
    time per step."""
    names = [r["estimator"] for r in records]
    fig = Figure(figsize=(13, 4), layout="constrained")
    estimate, snr, cost = fig.subplots(1, 3)
    estimate.errorbar(names, [r["estimate"] for r in records], yerr=[r["estimate_std"] for r in records],
                      fmt="o", capsize=4)
    estimate.set_title("estimate (nats / image), +- std over repeats")
    positions = torch.arange(len(names), dtype=torch.float32)
    for offset, part in zip((-0.2, 0.2), snr_parts):
        snr.bar(positions + offset, [r[f"grad_snr_{part}"] or 0 for r in records], 0.4, label=part)
    snr.set_xticks(positions.tolist(), names)
    snr.set_yscale("log")
    snr.set_title("gradient SNR |E g| / std g (mean over parameters)")
    snr.legend()
    cost.bar(names, [1000 * r["seconds_per_step"] for r in records])
    cost.set_title("ms per step (forward + backward)")
    for ax in (estimate, snr, cost):
        ax.grid(alpha=0.3)
    return fig


def plot_learning_curves(histories: dict[str, list[dict]], legend_title: str = "trained with") -> Figure:
    """Validation ELBO per epoch of several runs, one line each (e.g. one per estimator), under
    ``legend_title`` (what tells the runs apart)."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, history in histories.items():
        ax.plot([r["epoch"] for r in history], [r["val_elbo"] for r in history], marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation ELBO (nats per image)")
    ax.grid(alpha=0.3)
    ax.legend(title=legend_title)
    return fig


def plot_interpolations(paths: torch.Tensor, ends: torch.Tensor | None = None) -> Figure:
    """Rows of images along latent paths: ``paths`` ``(R, S, C, H, W)``, S steps per row.

    With ``ends`` ``(R, 2, C, H, W)`` (e.g. the two inputs whose codes a row joins), each row
    starts with ``ends[:, 0]`` and finishes with ``ends[:, 1]``.
    """
    rows = paths if ends is None else torch.cat([ends[:, :1], paths, ends[:, 1:]], dim=1)
    num_rows, num_cols = rows.shape[:2]
    fig = Figure(figsize=(num_cols * 0.7, num_rows * 0.7 + 0.5), layout="constrained")
    title = "mean of p(x|z) along a straight line between two codes"
    if ends is not None:
        title += " (the inputs at both ends)"
    _show(fig.add_subplot(), tile_images(rows.flatten(0, 1), num_cols), title)
    return fig


def plot_rate_distortion(rates, distortions, labels, title: str = "rate-distortion") -> Figure:
    """Models as points in the rate-distortion plane (Alemi et al. 2018, Fixing a Broken ELBO).

    ``rates``: KL(q(z|x) || p(z)) per image, ``distortions``: -E_q[log p(x|z)] per image, one
    number per model (length N each), ``labels``: N names. The dashed lines are of constant
    ELBO (``-(rate + distortion)``), one through each point.
    """
    rates, distortions = [float(r) for r in rates], [float(d) for d in distortions]
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(rates, distortions, "o-", color="C0")
    margin = 0.15 * (max(rates) - min(rates) + 1)
    left, right = min(rates) - margin, max(rates) + margin
    for rate, distortion, label in zip(rates, distortions, labels):
        ax.annotate(label, (rate, distortion), textcoords="offset points", xytext=(6, 6))
        total = rate + distortion
        ax.plot([left, right], [total - left, total - right], "--", color="0.6", lw=0.8)
    ax.set_xlim(left, right)
    spread = max(distortions) - min(distortions) + 1
    ax.set_ylim(min(distortions) - 0.15 * spread, max(distortions) + 0.15 * spread)
    ax.set_xlabel("rate: KL(q(z|x) || p(z)) (nats per image)")
    ax.set_ylabel("distortion: -E_q[log p(x|z)] (nats per image)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{title} (dashed: equal ELBO)")
    return fig


def plot_latent_dimensions(kl_per_dimension, activity, threshold: float = 0.01) -> Figure:
    """KL per latent dimension and its activity, dimensions sorted by KL.

    ``kl_per_dimension``: ``(z_dim,)`` mean KL(q(z_d|x) || p(z_d)) over images; ``activity``:
    ``(z_dim,)`` Cov_x(E[z_d|x]); a dimension is active above ``threshold`` (Burda et al. 2015).
    """
    kl, activity = torch.as_tensor(kl_per_dimension).cpu(), torch.as_tensor(activity).cpu()
    order = kl.argsort(descending=True)
    active = activity[order] > threshold
    colors = ["C0" if a else "C7" for a in active.tolist()]
    positions = list(range(len(kl)))
    fig = Figure(figsize=(10, 5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.bar(positions, kl[order].tolist(), color=colors)
    top.set_ylabel("KL (nats per image)")
    top.set_title(f"latent dimensions, sorted by KL: {int(active.sum())} of {len(kl)} active (blue)")
    bottom.bar(positions, activity[order].clamp_min(1e-6).tolist(), color=colors)
    bottom.axhline(threshold, color="k", ls="--", lw=0.8, label=f"threshold {threshold}")
    bottom.set_yscale("log")
    bottom.set_ylabel("activity Cov_x(E[z_d|x])")
    bottom.set_xlabel("latent dimensions, by decreasing KL")
    bottom.legend()
    for ax in (top, bottom):
        ax.grid(alpha=0.3, axis="y")
    return fig


def plot_iwae_bounds(bounds: dict, exact: float | None = None,
                     title: str = "importance-weighted bounds tighten with K") -> Figure:
    """The K-sample importance-weighted bound against K (log scale): ``{K: nats per image}``,
    e.g. ``evaluate(...)["iwae_bounds"]`` (keys may be strings). ``exact``: log p(x) if known.
    """
    ks = sorted(int(k) for k in bounds)
    values = [float(bounds[k] if k in bounds else bounds[str(k)]) for k in ks]
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(ks, values, "o-", label="K-sample bound (K = 1: the ELBO)")
    if exact is not None:
        ax.axhline(exact, color="k", ls="--", lw=1, label="exact log p(x)")
    ax.set_xscale("log")
    ax.set_xlabel("K, importance samples per image")
    ax.set_ylabel("nats per image")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return fig


def animate_training(snapshots: dict, history: list[dict], image_inches: float = 0.6):
    """An animation of a run learning, one frame per epoch: fixed validation images, their
    reconstructions (mean of p(x|z) at z = E[z|x]) and the decodings of fixed draws from p(z),
    titled with the epoch and its validation ELBO. Save it with, e.g.,
    ``animate_training(...).save("training.gif", writer=matplotlib.animation.PillowWriter(fps=4))``.

    :param snapshots: ``{"inputs": (n, C, H, W), "frames": [{"epoch", "reconstructions": (n, C,
        H, W), "samples": (m, C, H, W)}, ...]}``, images as ``uint8`` (0..255) or in [0, 1], as
        a checkpoint keeps them (:class:`pyro_vae.monitor.Monitor`); at least one frame.
    :param history: the run's metrics records; the frame of epoch ``e`` shows the ELBO of the
        record with ``"epoch" == e`` (none if there is no such record).
    :param image_inches: the size of one image in the figure.
    :returns: a ``matplotlib.animation.FuncAnimation`` of a ``Figure`` made without pyplot.
    """
    from matplotlib.animation import FuncAnimation

    def unit(images: torch.Tensor) -> torch.Tensor:
        return images.float() / 255 if images.dtype == torch.uint8 else images.float()

    frames = snapshots["frames"]
    if not frames:
        raise ValueError("no frames to animate: the run has no snapshot of a finished epoch")
    inputs = unit(snapshots["inputs"])
    ncol = len(inputs)
    sample_rows = math.ceil(len(frames[0]["samples"]) / ncol)
    elbo = {r["epoch"]: r["val_elbo"] for r in history}
    # a fixed size and layout, so that every frame of the GIF has the same pixels around the images
    fig = Figure(figsize=(ncol * image_inches + 0.3, (2 + sample_rows) * image_inches + 1.2), layout="constrained")
    top, middle, bottom = fig.subplots(3, 1, height_ratios=[1, 1, sample_rows])
    _show(top, tile_images(inputs, ncol))
    _show(middle, tile_images(unit(frames[0]["reconstructions"]), ncol))
    _show(bottom, tile_images(unit(frames[0]["samples"]), ncol))
    for ax, title in ((top, "validation images"), (middle, "reconstructions, z = E[z|x]"),
                      (bottom, "decoded fixed draws z ~ p(z)")):
        ax.set_title(title, fontsize="small")
    heading = fig.suptitle("")

    def draw(index: int):
        frame = frames[index]
        middle.images[0].set_data(tile_images(unit(frame["reconstructions"]), ncol).numpy())
        bottom.images[0].set_data(tile_images(unit(frame["samples"]), ncol).numpy())
        score = elbo.get(frame["epoch"])
        heading.set_text(f"epoch {frame['epoch']}" + ("" if score is None else f", validation ELBO {score:.1f}"))

    return FuncAnimation(fig, draw, frames=len(frames), cache_frame_data=False)
