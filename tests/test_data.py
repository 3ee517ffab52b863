import pytest
import torch

from pyro_vae.data import (
    DATA_ENV,
    DataNotFoundError,
    ImageData,
    binarize,
    binarize_fast,
    binarize_once,
    iterate_batches,
    load_splits,
    prepare,
    resolve_data_dir,
    shift_images,
)

from helpers import one_line


def test_data_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "flag") == (tmp_path / "flag", False)
    assert resolve_data_dir(None) == (tmp_path / "env", False)
    monkeypatch.delenv(DATA_ENV)
    root, download = resolve_data_dir(None)
    assert str(root) == "data" and download


def test_missing_files_name_the_folder_and_files(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        load_splits("mnist", tmp_path)
    one_line(error, str(tmp_path / "MNIST" / "raw"), "train-images-idx3-ubyte")


@pytest.mark.statistical
@pytest.mark.parametrize("draw", [binarize, binarize_fast])
def test_binarize_is_binary_with_the_grey_value_as_mean(draw, seed):
    """The mean of 12,800 independent Bernoulli draws is within 5 of its standard errors,
    sqrt(sum p (1 - p)) / n, of the mean grey value (normal, two-sided), and so is the mean
    over the pixels of each fifth of the grey range, where each p is close to the others:
    false-failure rate 6 x 5.7e-7 = 3.4e-6 per run (each of the two draws)."""
    # grey values that no seed draws: a generator seeded like the test's would binarize u by u
    grey = torch.linspace(0, 1, 200 * 64).reshape(200, 1, 8, 8)
    bits = draw(grey, torch.Generator().manual_seed(seed))
    assert bits.dtype == grey.dtype and bits.shape == grey.shape
    assert set(bits.unique().tolist()) <= {0.0, 1.0}
    for part in [slice(None)] + [slice(40 * i, 40 * (i + 1)) for i in range(5)]:  # all, then 5 bands of grey
        p, b = grey[part], bits[part]
        se = (p * (1 - p)).sum().sqrt().item() / p.numel()  # 0.0036 for all
        assert abs(b.mean().item() - p.mean().item()) < 5 * se


def test_binarize_fast_keeps_black_and_white():
    ends = torch.tensor([0.0, 1.0]).repeat(5000)
    assert torch.equal(binarize_fast(ends, torch.Generator().manual_seed(0)), ends)


def test_static_binarization_is_seeded():
    data = ImageData(torch.rand(10, 1, 4, 4), torch.zeros(10))
    assert torch.equal(binarize_once(data, 3).images, binarize_once(data, 3).images)
    assert not torch.equal(binarize_once(data, 3).images, binarize_once(data, 4).images)
    assert prepare(data, "none") is data
    assert torch.equal(prepare(data, "dynamic").images, binarize_once(data).images)


def test_batches_visit_every_image_once_and_resume_mid_epoch():
    images = torch.arange(10.0).reshape(10, 1, 1, 1) / 10
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(10, generator=g)
    batches = list(iterate_batches(images, 4, g, dynamic=False, order=order))
    assert [step for step, _ in batches] == [0, 1, 2]
    assert [len(b) for _, b in batches] == [4, 4, 2]
    seen = torch.cat([b.flatten() for _, b in batches])
    assert sorted((seen * 10).round().tolist()) == list(range(10))
    resumed = list(iterate_batches(images, 4, g, dynamic=False, order=order, start=2))
    assert len(resumed) == 1 and resumed[0][0] == 2 and torch.equal(resumed[0][1], batches[2][1])


def test_dynamic_batches_are_fresh_draws():
    images = torch.full((64, 1, 4, 4), 0.5)
    g = torch.Generator().manual_seed(0)
    order = torch.arange(64)
    first = next(iterate_batches(images, 64, g, dynamic=True, order=order))[1]
    second = next(iterate_batches(images, 64, g, dynamic=True, order=order))[1]
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first, second)


def test_labels_are_optional():
    data = ImageData(torch.rand(6, 3))  # vectors, no labels
    assert data.labels is None and data.image_shape == (3,)
    assert data.head(2).labels is None and data.take(torch.tensor([4, 1])).labels is None
    assert torch.equal(data.take(torch.tensor([4, 1])).images, data.images[[4, 1]])
    assert binarize_once(data).labels is None and prepare(data, "static").images.shape == (6, 3)


@pytest.mark.mnist
def test_mnist_splits(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (50_000, 10_000, 10_000)
    assert mnist.train.image_shape == (1, 28, 28)
    assert mnist.train.images.dtype == torch.float32
    assert mnist.train.images.min() >= 0 and mnist.train.images.max() <= 1
    assert set(mnist.test.labels.unique().tolist()) == set(range(10))
    source = mnist.source
    assert (source["dataset"], source["kind"], source["path"]) == ("mnist", "torchvision", None)
    assert source["num_items"] == 70_000 and source["data_shape"] == [1, 28, 28] and source["has_labels"]
    assert len(source["fingerprint"]) == 64 and len(source["classes"]) == 10


@pytest.mark.mnist
def test_train_limit_takes_the_first_images(mnist_dir, mnist):
    limited = load_splits("mnist", mnist_dir, train_limit=2000)
    assert len(limited.train) == 2000
    assert torch.equal(limited.train.images, mnist.train.images[:2000])
    assert torch.equal(limited.val.images, mnist.val.images)


def _moved(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``images`` (N, C, H, W) translated by (dy, dx) pixels, zero-filled: written out with slices."""
    out = torch.zeros_like(images)
    height, width = images.shape[-2:]
    out[..., max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = \
        images[..., max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)]
    return out


def test_shift_images_translates_each_image_by_uniform_offsets_within_the_bound():
    """Every output is its input moved by exactly one offset pair in -2..2 (the images are
    random, so no two offsets give the same output), and the 25 pairs are drawn uniformly: over
    5,000 images each count is Binomial(5000, 1/25), mean 200 and standard deviation 13.9; the
    bound of 200 +- 90 (6.5 sd) fails with probability below 1e-9 per cell for any seed."""
    images = torch.rand(5000, 2, 7, 6, generator=torch.Generator().manual_seed(0))
    moved = shift_images(images, 2, torch.Generator().manual_seed(1))
    assert moved.shape == images.shape
    offsets = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    matches = torch.stack([(_moved(images, *o) == moved).flatten(1).all(1) for o in offsets])  # (25, N)
    assert matches.sum(0).eq(1).all()
    counts = matches.sum(1)
    assert counts.ge(110).all() and counts.le(290).all(), counts


def test_a_shard_is_shifted_as_the_whole_batch_would_be():
    images = torch.rand(10, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    whole = shift_images(images, 1, torch.Generator().manual_seed(3))
    part = shift_images(images[4:7], 1, torch.Generator().manual_seed(3), of=(4, 10))
    assert torch.equal(part, whole[4:7])


def test_batches_are_shifted_after_their_bits_are_drawn_and_only_when_asked():
    images = torch.rand(20, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    order = torch.arange(20)
    plain = [b for _, b in iterate_batches(images, 8, torch.Generator().manual_seed(4), True, order)]
    unshifted = [b for _, b in iterate_batches(images, 8, torch.Generator().manual_seed(4), True, order, max_shift=0)]
    shifted = [b for _, b in iterate_batches(images, 8, torch.Generator().manual_seed(4), True, order, max_shift=2)]
    assert all(torch.equal(a, b) for a, b in zip(plain, unshifted))
    # the first batch's bits come first from the generator, then its offsets
    assert set(shifted[0].unique().tolist()) <= {0.0, 1.0}
    assert shifted[0].sum() <= plain[0].sum()  # a translation only pushes pixels out
    assert not all(torch.equal(a, b) for a, b in zip(plain, shifted))
