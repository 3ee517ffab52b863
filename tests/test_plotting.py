import io

import pytest
import torch
from matplotlib.figure import Figure

from pyro_vae.config import load_config
from pyro_vae.model import build_vae
from pyro_vae.plotting import (
    make_figures,
    plot_estimator_comparison,
    plot_image_panels,
    plot_interpolations,
    plot_iwae_bounds,
    plot_latent_dimensions,
    plot_latent_scatter,
    plot_learning_curves,
    plot_manifold,
    plot_rate_distortion,
    plot_training_curves,
    plot_class_grid,
    plot_confusion_matrix,
    principal_components,
    tile_images,
)
from pyro_vae.plotting import embed_latents, informative_dimensions, plot_latent_traversals


@pytest.mark.parametrize("z_dim, expected", [
    (2, {"reconstructions", "samples", "latent_space", "manifold", "latent_traversals", "training_curves"}),
    (5, {"reconstructions", "samples", "latent_space", "latent_traversals", "training_curves"}),
])
def test_make_figures(splits, z_dim, expected):
    vae = build_vae(load_config(None, {"model.z_dim": z_dim, "model.hidden_dim": 8}).model, (1, 8, 8))
    history = [{"epoch": 1, "train_loss": 50.0, "val_elbo": -48.0}, {"epoch": 2, "train_loss": 40.0, "val_elbo": -41.0}]
    figures = make_figures(vae, splits.test.images, splits.test.labels, history)
    assert set(figures) == expected
    for figure in figures.values():
        assert isinstance(figure, Figure)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_figures_draws_its_samples_from_the_seed_and_leaves_the_global_state(splits):
    vae = build_vae(load_config(None, {"model.z_dim": 2, "model.hidden_dim": 8}).model, (1, 8, 8))

    def samples(**kwargs):
        figure = make_figures(vae, splits.test.images, splits.test.labels, [], **kwargs)["samples"]
        return figure.axes[0].images[0].get_array()

    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = samples()
    assert torch.equal(torch.get_rng_state(), before)
    assert (samples(seed=0) == first).all()
    assert not (samples(seed=1) == first).all()


@pytest.mark.parametrize("prior", ["standard_normal", "learned_gaussian", "mixture", "vamp"])
def test_figures_for_every_prior(splits, prior):
    options = {"model.prior_options": {"num_components": 3}} if prior in ("mixture", "vamp") else {}
    config = load_config(None, {"model.z_dim": 2, "model.hidden_dim": 8, "model.prior": prior, **options})
    figures = make_figures(build_vae(config.model, (1, 8, 8)), splits.test.images, splits.test.labels, [])
    assert {"samples", "manifold", "latent_space"} <= set(figures)


def test_manifold_needs_two_latent_dimensions():
    vae = build_vae(load_config(None, {"model.z_dim": 3, "model.hidden_dim": 8}).model, (1, 8, 8))
    with pytest.raises(ValueError, match="2-D"):
        plot_manifold(vae)


def test_tile_layout():
    images = torch.rand(5, 1, 4, 3)
    canvas = tile_images(images, ncol=2)  # 3 rows of 2, 1-pixel gutters
    assert canvas.shape == (3 * 5 - 1, 2 * 4 - 1)
    assert torch.equal(canvas[:4, :3], images[0, 0])
    assert tile_images(torch.rand(2, 3, 4, 4), 2).shape == (4, 9, 3)


def test_principal_components_find_the_dominant_direction():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 4, generator=g) * torch.tensor([5.0, 1.0, 0.5, 0.1])
    projected, share = principal_components(z)
    assert projected.shape == (2000, 2)
    assert share[0] > 0.9
    assert abs(torch.corrcoef(torch.stack([projected[:, 0], z[:, 0]]))[0, 1]) > 0.99


def test_image_panels_side_by_side():
    figure = plot_image_panels({"a": torch.rand(6, 1, 4, 4), "b": torch.rand(6, 1, 4, 4)}, ncol=3)
    assert [ax.get_title() for ax in figure.axes] == ["a", "b"]


def test_comparison_figures():
    records = [
        {"estimator": "mc", "estimate": -99.0, "estimate_std": 0.1, "grad_snr_encoder": 0.7, "grad_snr_decoder": 1.8, "seconds_per_step": 0.007},
        {"estimator": "iwae:5", "estimate": -96.0, "estimate_std": 0.05, "grad_snr_encoder": None, "grad_snr_decoder": 2.2, "seconds_per_step": 0.02},
    ]
    assert len(plot_estimator_comparison(records).axes) == 3
    curves = plot_learning_curves({"mc": [{"epoch": 1, "val_elbo": -120.0}], "iwae:5": [{"epoch": 1, "val_elbo": -118.0}]})
    assert [line.get_label() for line in curves.axes[0].get_lines()] == ["mc", "iwae:5"]
    assert curves.axes[0].get_legend().get_title().get_text() == "trained with"
    guides = plot_learning_curves({"gaussian": [{"epoch": 1, "val_elbo": -120.0}]}, legend_title="guide family")
    assert guides.axes[0].get_legend().get_title().get_text() == "guide family"


def test_interpolations_put_the_ends_around_each_path():
    paths, ends = torch.rand(3, 5, 1, 4, 4), torch.rand(3, 2, 1, 4, 4)
    image = plot_interpolations(paths, ends).axes[0].get_images()[0].get_array()
    assert image.shape == (3 * 5 - 1, 7 * 5 - 1)  # 3 rows of 5 + 2 images, 1-pixel gutters
    torch.testing.assert_close(torch.as_tensor(image[:4, :4]), ends[0, 0, 0])
    torch.testing.assert_close(torch.as_tensor(image[:4, 5:9]), paths[0, 0, 0])
    torch.testing.assert_close(torch.as_tensor(image[5:9, -4:]), ends[1, 1, 0])
    assert plot_interpolations(paths).axes[0].get_images()[0].get_array().shape == (14, 24)


def test_rate_distortion_points_and_equal_elbo_lines():
    figure = plot_rate_distortion([48.0, 29.6, 9.3], [56.7, 69.6, 109.0], ["0.5", "1", "4"])
    points, *diagonals = figure.axes[0].get_lines()
    assert list(points.get_xdata()) == [48.0, 29.6, 9.3]
    assert [t.get_text() for t in figure.axes[0].texts] == ["0.5", "1", "4"]
    assert len(diagonals) == 3
    for line, total in zip(diagonals, [104.7, 99.2, 118.3]):  # rate + distortion is constant on each
        x, y = line.get_xdata(), line.get_ydata()
        assert x[0] + y[0] == pytest.approx(total) and x[1] + y[1] == pytest.approx(total)


def test_latent_dimensions_sorted_by_kl_and_coloured_by_activity():
    kl, activity = torch.tensor([0.1, 5.0, 2.0]), torch.tensor([0.001, 1.0, 0.5])
    figure = plot_latent_dimensions(kl, activity, threshold=0.01)
    top, bottom = figure.axes
    assert [bar.get_height() for bar in top.patches] == pytest.approx([5.0, 2.0, 0.1])
    assert [bar.get_height() for bar in bottom.patches] == pytest.approx([1.0, 0.5, 0.001])
    assert "2 of 3 active" in top.get_title()


def test_iwae_bounds_sorted_by_k_with_the_exact_value():
    figure = plot_iwae_bounds({"50": -93.5, "1": -98.3, "5": -95.3}, exact=-92.0)
    bound, exact = figure.axes[0].get_lines()
    assert list(bound.get_xdata()) == [1, 5, 50] and list(bound.get_ydata()) == [-98.3, -95.3, -93.5]
    assert list(exact.get_ydata()) == [-92.0, -92.0]


def test_make_figures_without_labels(splits):
    vae = build_vae(load_config(None, {"model.z_dim": 2, "model.hidden_dim": 8}).model, (1, 8, 8))
    figure = make_figures(vae, splits.test.images, None, [])["latent_space"]
    assert len(figure.axes) == 1  # no colorbar
    assert len(set(map(tuple, figure.axes[0].collections[0].get_facecolors().round(6).tolist()))) == 1


@pytest.mark.parametrize("num_classes, colorbar", [(4, True), (20, True), (37, False), (100, False)])
def test_latent_scatter_gives_every_class_its_own_colour(num_classes, colorbar):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3 * num_classes) % num_classes * 7  # any integer labels, not only 0..K-1
    figure = plot_latent_scatter(torch.randn(len(labels), 2, generator=g), labels, "z")
    scatter = figure.axes[0].collections[0]
    colours = scatter.to_rgba(scatter.get_array())  # the colours the points are drawn with
    assert len(set(map(tuple, colours.round(6).tolist()))) == num_classes
    assert (len(figure.axes) == 2) == colorbar
    if colorbar:
        ticks = [t.get_text() for t in figure.axes[1].get_yticklabels()]
        assert ticks == [str(7 * k) for k in range(num_classes)]
    else:
        assert f"{num_classes} classes" in figure.axes[0].get_title()


def test_latent_scatter_names_the_classes():
    figure = plot_latent_scatter(torch.zeros(3, 2), torch.tensor([2, 0, 2]), "z", class_names=["a", "b", "c"])
    assert [t.get_text() for t in figure.axes[1].get_yticklabels()] == ["a", "c"]


def test_latent_traversals_vary_one_dimension_per_row_most_informative_first(splits):
    torch.manual_seed(0)
    vae = build_vae(load_config(None, {"model.z_dim": 4, "model.hidden_dim": 8}).model, (1, 8, 8))
    with torch.no_grad():  # make dimension 2 carry the most information, dimension 0 the least
        vae.encoder.loc.weight.mul_(torch.tensor([0.01, 1.0, 30.0, 3.0]).unsqueeze(1))
    order, scores, what = informative_dimensions(vae, splits.test.images)
    assert what == "KL" and order.tolist()[:2] == [2, 3]
    assert (scores[order[:-1]] >= scores[order[1:]]).all()
    figure = plot_latent_traversals(vae, splits.test.images[0], order[:3], scores, what, steps=5)
    image = figure.axes[0].images[0].get_array()
    assert image.shape == (3 * 9 - 1, 5 * 9 - 1)  # 3 rows of 5 images of 8 x 8, 1-pixel gutters
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert labels[0].startswith("z3 (KL") and labels[1].startswith("z4 (KL")
    # in each row only that dimension moves: the first row's images differ from each other
    first_row = torch.as_tensor(image[:8])
    assert not torch.equal(first_row[:, :8], first_row[:, -8:])


@pytest.mark.parametrize("method, title", [("pca", "principal components"), ("tsne", "t-SNE")])
def test_latent_space_embeddings_name_themselves(splits, method, title):
    vae = build_vae(load_config(None, {"model.z_dim": 5, "model.hidden_dim": 8}).model, (1, 8, 8))
    figure = make_figures(vae, splits.test.images, splits.test.labels, [], embedding=method)["latent_space"]
    assert title in figure.axes[0].get_title()
    points, _, _ = embed_latents(torch.randn(40, 5), method)
    assert points.shape == (40, 2)


def test_tsne_without_scikit_learn_is_one_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        embed_latents(torch.randn(10, 3), "tsne")


def test_training_animation_has_one_frame_per_epoch_titled_with_its_elbo(tmp_path):
    from matplotlib.animation import PillowWriter
    from PIL import Image

    from pyro_vae.plotting import animate_training

    g = torch.Generator().manual_seed(0)

    def images(n):  # as a checkpoint keeps them: uint8, (n, C, H, W)
        return (torch.rand(n, 1, 6, 5, generator=g) * 255).to(torch.uint8)

    frames = [{"epoch": epoch, "reconstructions": images(4), "samples": images(8)} for epoch in (3, 4, 5)]
    history = [{"epoch": epoch, "val_elbo": -100.0 + epoch} for epoch in range(1, 6)]
    animation = animate_training({"inputs": images(4), "frames": frames}, history)
    path, dpi = tmp_path / "training.gif", 50
    animation.save(path, writer=PillowWriter(fps=4), dpi=dpi)
    figure = animation._fig
    with Image.open(path) as gif:
        assert gif.n_frames == len(frames)
        assert gif.size == tuple(round(inches * dpi) for inches in figure.get_size_inches())
    # the figure shows the last frame: its epoch, its ELBO, its images (inputs, reconstructions, samples)
    assert figure._suptitle.get_text() == "epoch 5, validation ELBO -95.0"
    shown = [ax.images[0].get_array() for ax in figure.axes]
    assert torch.equal(torch.as_tensor(shown[1]), tile_images(frames[-1]["reconstructions"].float() / 255, 4))
    assert tuple(shown[2].shape) == (2 * 6 + 1, 4 * 5 + 3)  # 8 samples in rows of 4, 1-pixel gutters

    with pytest.raises(ValueError, match="no frames"):
        animate_training({"inputs": images(4), "frames": []}, history)


def test_the_training_curve_names_the_objective_it_shows():
    constant = [{"epoch": 1, "train_loss": 50.0, "val_elbo": -48.0, "beta": 1.0},
                {"epoch": 2, "train_loss": 40.0, "val_elbo": -41.0, "beta": 1.0}]
    warmup = [dict(record, beta=beta) for record, beta in zip(constant, (0.0, 1.0))]

    def label(history, **overrides):
        objective = None if overrides.get("unknown") else load_config(None, overrides).objective
        axes = plot_training_curves(history, objective).axes[0]
        return axes.get_legend_handles_labels()[1][0]

    assert label(constant) == "train ELBO (-loss, running mean)"
    assert label(constant, **{"objective.elbo": "stl"}) == "train ELBO (-loss, running mean)"
    assert label(constant, **{"objective.elbo": "iwae_dreg", "objective.num_particles": 5}).startswith(
        "train IWAE bound, K = 5 ")
    assert "beta" in label(warmup) and "ELBO" in label(warmup)
    assert "reconstruction weighted 0.5" in label(constant, **{"objective.reconstruction_weight": 0.5})
    assert label(constant, unknown=True) == "train objective (-loss, running mean)"


# -- labelled runs: the class grid and the confusion matrix --------------------------------------------

def _labelled_vae(labels: str = "conditional", image_shape=(1, 8, 8), num_classes: int = 4):
    from pyro_vae.labelled import build_labelled_vae

    torch.manual_seed(0)
    config = load_config(None, {"model.labels": labels, "model.z_dim": 2, "model.hidden_dim": 8})
    return build_labelled_vae(config.model, image_shape, num_classes).eval()


@pytest.mark.parametrize("labels", ["conditional", "semi_supervised"])
def test_make_figures_of_a_labelled_vae_adds_the_class_grid_and_the_confusion_matrix(splits, labels):
    binary = (splits.test.images > 0.5).float()  # Bernoulli pixels, which a conditional VAE's prediction scores
    figures = make_figures(_labelled_vae(labels), binary, splits.test.labels, [])
    assert {"class_grid", "confusion_matrix"} <= set(figures)
    title = figures["confusion_matrix"].axes[0].get_title()
    assert f"of {len(binary)} test items" in title
    assert "class_grid" in make_figures(_labelled_vae(labels), binary, None, [])
    assert "confusion_matrix" not in make_figures(_labelled_vae(labels), binary, None, [])


def test_make_figures_of_labelled_vectors_has_no_class_grid():
    config = load_config(None, {"model.labels": "conditional", "model.z_dim": 2, "model.hidden_dim": 8,
                                "model.likelihood": "gaussian", "data.binarize": "none"})
    from pyro_vae.labelled import build_labelled_vae

    vae = build_labelled_vae(config.model, (5,), 3).eval()
    figures = make_figures(vae, torch.randn(12, 5), torch.arange(12) % 3, [])
    assert "confusion_matrix" in figures and "class_grid" not in figures


def test_make_figures_of_a_vae_without_labels_has_neither(splits):
    vae = build_vae(load_config(None, {"model.z_dim": 2, "model.hidden_dim": 8}).model, (1, 8, 8))
    figures = make_figures(vae, splits.test.images, splits.test.labels, [])
    assert not {"class_grid", "confusion_matrix"} & set(figures)


def test_class_grid_rows_are_classes_and_columns_share_one_z(monkeypatch):
    vae = _labelled_vae(num_classes=3)
    decoded = {}
    decode = vae.decode

    def spy(z, y):
        decoded["z"], decoded["y"] = z, y
        return decode(z, y)
    monkeypatch.setattr(vae, "decode", spy)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    figure = plot_class_grid(vae, num_columns=5, seed=7, class_names=["a", "b", "c"])
    assert torch.equal(torch.get_rng_state(), before)
    z, y = decoded["z"].reshape(3, 5, -1), decoded["y"].reshape(3, 5)
    assert all(torch.equal(z[0], z[row]) for row in range(3)) and not torch.equal(z[0, 0], z[0, 1])
    assert y.tolist() == [[c] * 5 for c in range(3)]
    ax = figure.axes[0]
    assert ax.images[0].get_array().shape == (3 * 9 - 1, 5 * 9 - 1)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    first = ax.images[0].get_array()
    assert (plot_class_grid(vae, num_columns=5, seed=7).axes[0].images[0].get_array() == first).all()
    assert not (plot_class_grid(vae, num_columns=5, seed=8).axes[0].images[0].get_array() == first).all()


def test_class_grid_with_a_class_prior_places_one_noise_draw_in_each_class_gaussian(monkeypatch):
    from pyro_vae.labelled import build_labelled_vae

    torch.manual_seed(0)
    config = load_config(None, {"model.labels": "conditional", "model.z_dim": 2, "model.hidden_dim": 8,
                                "model.class_prior": True})
    vae = build_labelled_vae(config.model, (1, 8, 8), 3).eval()
    with torch.no_grad():  # classes far apart, with scales of their own
        vae.prior_net.locs.copy_(torch.tensor([[-5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]))
        vae.prior_net.raw_scales.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0], [-2.0, 0.5]]))
    decoded = {}
    decode = vae.decode

    def spy(z, y):
        decoded["z"] = z
        return decode(z, y)
    monkeypatch.setattr(vae, "decode", spy)
    plot_class_grid(vae, num_columns=4, seed=7)
    z = decoded["z"].reshape(3, 4, 2)
    locs, scales = vae.prior_net.locs.detach(), vae.prior_net.scales().detach()
    eps = (z - locs[:, None]) / scales[:, None]  # each row's draw, standardized by its own class
    assert all(torch.allclose(eps[0], eps[row], atol=1e-5) for row in range(3))
    assert not torch.allclose(z[0], z[2])


def test_class_grid_refuses_vectors():
    config = load_config(None, {"model.labels": "conditional", "model.z_dim": 2, "model.hidden_dim": 8,
                                "model.likelihood": "gaussian", "data.binarize": "none"})
    from pyro_vae.labelled import build_labelled_vae

    with pytest.raises(ValueError, match="images"):
        plot_class_grid(build_labelled_vae(config.model, (5,), 3))


def test_confusion_matrix_counts_by_true_row_and_predicted_column():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    figure = plot_confusion_matrix(predicted, labels, 3, class_names=["x", "y", "z"])
    ax = figure.axes[0]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): int(t.get_text()) for t in ax.texts}
    assert cells == {(0, 0): 3, (0, 1): 1, (0, 2): 0, (1, 0): 0, (1, 1): 1, (1, 2): 1, (2, 0): 0, (2, 1): 0, (2, 2): 1}
    shares = ax.images[0].get_array()
    assert shares[0].tolist() == [0.75, 0.25, 0.0] and shares[2].tolist() == [0.0, 0.0, 1.0]  # per row
    assert "accuracy 71.4% of 7" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"]


def test_confusion_matrix_refuses_a_class_out_of_range():
    with pytest.raises(ValueError, match="0..2"):
        plot_confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
