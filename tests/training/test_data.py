"""Targets, masks and the tf.data pipeline that streams the cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from spinemri.config import AugmentConfig
from spinemri.data.cache import prepare
from spinemri.data.preprocess import PreprocessConfig
from spinemri.data.schema import HEAD_CLASSES
from spinemri.training.data import encode_targets, jitter_sites, make_dataset, sample_weights, split_data


def test_targets_follow_the_thesis_categories():
    samples = pd.DataFrame({
        "condition": ["spinal_canal_stenosis", "left_subarticular_stenosis", "right_neural_foraminal_narrowing", None,
                      "spinal_canal_stenosis"],
        "level": ["L1/L2", "L5/S1", "L3/L4", None, "L2/L3"],
        "severity": pd.array([0, 2, 1, 0, None], dtype="Int64"),
    })
    targets = encode_targets(samples)
    healthy = HEAD_CLASSES["condition"].index("healthy")
    assert targets["condition"].tolist() == [healthy, 3, 2, healthy, -1]  # graded Normal/Mild = Healthy
    assert targets["level"].tolist() == [0, 4, 2, -1, 1]
    assert targets["severity"].tolist() == [0, 2, 1, 0, -1]
    weights = sample_weights(targets, severity_weights=True)
    assert weights["severity"].tolist() == [1, 4, 2, 1, 0]
    assert weights["condition"].tolist() == [1, 1, 1, 1, 0]
    assert sample_weights(targets, severity_weights=False)["severity"].tolist() == [1, 1, 1, 1, 0]


@pytest.fixture(scope="module")
def prepared(phantom_dir, tmp_path_factory):
    dataset = prepare(phantom_dir, PreprocessConfig(img_size=32), cache_dir=tmp_path_factory.mktemp("cache"))
    return dataset, dataset.samples_with_split()


def test_batches_stream_from_the_cache_with_one_hot_targets(prepared):
    dataset, samples = prepared
    train = split_data(samples, "train")
    batches = list(make_dataset(dataset.path / "images.npy", train, 16, shuffle=False, seed=0))
    assert sum(len(x) for x, _, _ in batches) == len(train)
    x, y, w = batches[0]
    images = dataset.images()
    np.testing.assert_array_equal(x.numpy(), images[train.rows[:16]].astype(np.float32))
    for head, classes in HEAD_CLASSES.items():
        assert y[head].shape == (16, len(classes))
        onehot = y[head].numpy()
        known = train.targets[head][:16] >= 0
        assert (onehot[known].argmax(axis=1) == train.targets[head][:16][known]).all()
        assert (onehot[~known] == 0).all()
        assert w[head].shape == (16,)


def test_replicas_get_batches_of_one_size(prepared):
    # Under MirroredStrategy with 2 replicas a batch must split evenly: an odd last batch is trimmed.
    dataset, samples = prepared
    train = split_data(samples, "train")
    sizes = [len(x) for x, _, _ in make_dataset(dataset.path / "images.npy", train, 15, shuffle=False, seed=0,
                                                min_batch=2)]
    full, rest = divmod(len(train), 15)
    assert sizes == [14] * full + ([rest // 2 * 2] if rest >= 2 else [])


def test_shuffle_changes_order_per_epoch_but_not_content(prepared):
    dataset, samples = prepared
    train = split_data(samples, "train")
    ds = make_dataset(dataset.path / "images.npy", train, len(train), shuffle=True, seed=1)
    first, second = [next(iter(ds))[0].numpy() for _ in range(2)]
    assert not np.array_equal(first, second)
    assert np.isclose(first.sum(), second.sum())


def test_flip_swaps_sides_on_axial_images_only(prepared):
    dataset, samples = prepared
    train = split_data(samples, "train")
    none = AugmentConfig(rotation_deg=0, shift=0, zoom=0, brightness=0, contrast=0, flip=True)
    ds = make_dataset(dataset.path / "images.npy", train, len(train), shuffle=False, seed=3, augment=none)
    x, y, _ = next(iter(ds))
    x, condition = x.numpy(), y["condition"].numpy()
    original = dataset.images()[train.rows].astype(np.float32)
    flipped = np.array([not np.array_equal(x[i], original[i]) for i in range(len(x))])
    assert 0.2 < flipped.mean() < 0.8
    np.testing.assert_array_equal(x[flipped], original[flipped][:, :, ::-1])
    names = HEAD_CLASSES["condition"]
    swapped = {"left_subarticular_stenosis": "right_subarticular_stenosis",
               "right_subarticular_stenosis": "left_subarticular_stenosis"}
    checked = 0
    for i in range(len(x)):
        if train.targets["condition"][i] < 0:
            continue
        before = names[train.targets["condition"][i]]
        after = names[condition[i].argmax()]
        if flipped[i] and train.axial[i] and before in swapped:
            assert after == swapped[before]
            checked += 1
        else:
            assert after == before  # sagittal: a flip mirrors anterior-posterior, no side changes
    assert checked > 0


def test_read_rows_returns_the_rows_asked_for_in_any_order(prepared):
    from spinemri.training.data import read_rows

    dataset, _ = prepared
    images = np.load(dataset.path / "images.npy")
    rows = np.array([5, 3, 4, 0, len(images) - 1, 3, 17, 16])  # runs, reversed order, a duplicate, the last row
    np.testing.assert_array_equal(read_rows(str(dataset.path / "images.npy"), rows), images[rows])
    assert read_rows(str(dataset.path / "images.npy"), np.array([], dtype=np.int64)).shape == (0, *images.shape[1:])
    with pytest.raises(IndexError, match="rows outside"):
        read_rows(str(dataset.path / "images.npy"), np.array([len(images)]))


def test_read_rows_sees_a_replaced_cache_file(tmp_path):
    from spinemri.training.data import read_rows

    path = tmp_path / "images.npy"
    np.save(path, np.zeros((4, 2, 2, 1), np.uint8))
    assert read_rows(str(path), np.array([1])).max() == 0
    path.unlink()
    np.save(path, np.full((4, 2, 2, 1), 7, np.uint8))
    assert read_rows(str(path), np.array([1])).max() == 7


def test_site_jitter_moves_crops_as_far_as_asked_and_stacks_by_one_slice():
    """A bright dot at the centre of each crop: its displacement's spread is σ per axis; a stack moves one slice."""
    n, size = 600, 41
    x = np.zeros((n, size, size, 5), np.float32)
    x[:, 20, 20, :] = 255.0
    x *= np.arange(1, 6, dtype=np.float32)  # slice k holds value 255 * (k + 1) at the dot
    sigma = np.full(n, 3.0, np.float32)
    move = np.r_[np.zeros(n // 2), np.ones(n // 2)].astype(np.float32)
    out = jitter_sites(tf.constant(x), tf.constant(sigma), tf.constant(move), seed=0).numpy()
    centre = out[..., 2]
    weights = centre.sum(axis=(1, 2))
    rows = (centre.sum(axis=2) * np.arange(size)).sum(axis=1) / np.maximum(weights, 1e-9)
    cols = (centre.sum(axis=1) * np.arange(size)).sum(axis=1) / np.maximum(weights, 1e-9)
    kept = weights > 0  # a dot shifted off the crop is gone, as outside an image
    for axis in (rows[kept] - 20, cols[kept] - 20):
        assert abs(axis.mean()) < 0.5 and 2.5 < axis.std() < 3.5
    stacks = jitter_sites(tf.constant(x), tf.zeros(n), tf.constant(move), seed=0).numpy()  # no in-plane shift
    level = stacks.max(axis=(1, 2)) / 255.0  # which slice each channel now shows
    assert np.allclose(level[: n // 2], np.arange(1, 6), atol=0.2)  # move 0: the stack stays
    shifted = level[n // 2:]
    up, down = np.allclose(shifted, [2, 3, 4, 5, 5], atol=0.2, rtol=0), np.allclose(shifted, [1, 1, 2, 3, 4], atol=0.2)
    assert not up and not down  # both directions occur...
    per_row = [np.allclose(r, [2, 3, 4, 5, 5], atol=0.3) or np.allclose(r, [1, 1, 2, 3, 4], atol=0.3)
               for r in shifted]
    assert np.mean(per_row) > 0.9  # ...and each moved stack is one slice away, its edge slice repeated
    still = jitter_sites(tf.constant(x), tf.zeros(n), tf.zeros(n), seed=0).numpy()
    np.testing.assert_allclose(still, x, atol=1e-4)


def test_site_jitter_from_the_config_and_its_limits():
    from spinemri.config import load_experiment
    from spinemri.errors import ConfigError
    from spinemri.training.jitter import site_jitter

    assert site_jitter_of(load_experiment("quick")) is None
    config = load_experiment("quick", {"train.site_jitter_mm": 4.0, "train.site_jitter_slices": 0.3,
                                       "preprocess.slices": 3})
    jitter = site_jitter(config.train, config.preprocess)
    samples = pd.DataFrame({"series_description": ["Axial T2", "Sagittal T1", "Unknown"]})
    sigma, move = jitter.per_sample(samples, pixels_per_mm=2.0)
    assert sigma.tolist() == [8.0, 8.0, 0.0] and np.allclose(move, [0.3, 0.3, 0.0])
    assert site_jitter_of(load_experiment("quick", {"train.site_jitter_slices": 0.3})).slice_move["Axial T2"] == 0
    with pytest.raises(ConfigError, match="preprocess.mode slice has no site to move"):
        site_jitter_of(load_experiment("quick", {"train.site_jitter_mm": 4.0, "mode": "slice"}))
    with pytest.raises(ConfigError, match="train.site_jitter_slices must be a probability"):
        load_experiment("quick", {"train.site_jitter_slices": 2})


def site_jitter_of(config):
    """The site jitter an experiment's training and preprocessing settings ask for."""
    from spinemri.training.jitter import site_jitter

    return site_jitter(config.train, config.preprocess)
