"""The backbone registry and the three-head model: every architecture builds and trains a batch."""

from __future__ import annotations

import keras
import urllib.request

import numpy as np
import pytest

from spinemri.errors import UnknownArchitecture, WeightsUnavailable
from spinemri.models.backbones import BACKBONES, build_backbone, get_backbone
from spinemri.models.catalog import THESIS_ARCHS as THESIS_BACKBONES
from spinemri.data.schema import HEAD_CLASSES
from spinemri.models.network import build_model, set_backbone_trainable

REQUIRED = (*THESIS_BACKBONES, "efficientnet_b0", "convnext_tiny", "tiny")


def test_registry_has_the_thesis_backbones_and_the_extras():
    assert set(REQUIRED) <= set(BACKBONES)
    assert {"densenet169", "densenet201"} <= set(BACKBONES)
    assert get_backbone("inception_v3").native_size == 299 and get_backbone("inception_v3").min_size == 75
    assert get_backbone("nasnet_large").native_size == 331
    assert get_backbone("xception").min_size == 71


@pytest.mark.parametrize("arch", REQUIRED)
def test_each_backbone_builds_and_trains_one_batch(arch):
    size = max(get_backbone(arch).min_size, 32)
    model = build_model(arch, size, 1, weights="none", dense_units=16)
    # Eager: one batch is about compiling nothing, and NASNetLarge's graph takes minutes to trace.
    model.compile("adam", loss={h: "categorical_crossentropy" for h in HEAD_CLASSES}, run_eagerly=True)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, size, size, 1)).astype(np.float32)
    y = {h: keras.utils.to_categorical([0, 1], len(c)) for h, c in HEAD_CLASSES.items()}
    before = [w.copy() for w in model.get_layer("condition").get_weights()]
    losses = model.train_on_batch(x, y)
    assert np.all(np.isfinite(losses))
    after = model.get_layer("condition").get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(before, after))  # it learned something
    out = model.predict(x, verbose=0)
    for head, classes in HEAD_CLASSES.items():
        assert out[head].shape == (2, len(classes))
        np.testing.assert_allclose(out[head].sum(axis=1), 1.0, atol=1e-5)
    keras.backend.clear_session()


def test_unknown_arch_lists_the_valid_ones():
    with pytest.raises(UnknownArchitecture) as info:
        get_backbone("denset")
    assert "'denset'" in str(info.value)
    for name in REQUIRED:
        assert name in str(info.value)


def test_input_below_the_minimum_names_it():
    with pytest.raises(ValueError, match="below the minimum of 75 px for inception_v3"):
        build_model("inception_v3", 64, 1)


def test_imagenet_weights_offline_fail_at_once_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # an empty cache
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there: the download fails fast
    # urllib builds its global opener once, with the proxies of that moment: drop it afterwards, or
    # every later urlopen() in this worker would go through the dead proxy.
    monkeypatch.setattr(urllib.request, "_opener", None)
    with pytest.raises(WeightsUnavailable) as info:
        build_backbone(get_backbone("mobilenet_v2"), (32, 32, 3), "imagenet")
    message = str(info.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in message
    assert str(tmp_path / "keras" / "models") in message
    assert "weights=none" in message


def test_weights_from_a_file_and_gray_repeated_to_three_channels(tmp_path):
    source = build_backbone(get_backbone("mobilenet_v2"), (32, 32, 3), "none")
    path = tmp_path / "mobilenet.weights.h5"
    source.save_weights(path)
    model = build_model("mobilenet_v2", 32, 1, weights=str(path))
    assert model.get_layer("gray_to_rgb") is not None
    np.testing.assert_array_equal(model.get_layer("backbone").get_weights()[0], source.get_weights()[0])
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        build_model("mobilenet_v2", 32, 1, weights=str(tmp_path / "missing.h5"))
    gray = build_model("mobilenet_v2", 32, 1, weights="none")
    assert "gray_to_rgb" not in [layer.name for layer in gray.layers]
    # Five slices meet ImageNet filters through a 1x1 mix to RGB that starts as the slices' mean.
    stack = build_model("mobilenet_v2", 32, 5, weights=str(path))
    np.testing.assert_allclose(stack.get_layer("slices_to_rgb").get_weights()[0], np.full((1, 1, 5, 3), 0.2))
    np.testing.assert_array_equal(stack.get_layer("backbone").get_weights()[0], source.get_weights()[0])


@pytest.mark.parametrize("pooling", ["attention", "lstm"])
def test_per_slice_pooling_shares_one_backbone_and_freezes_with_it(pooling):
    model = build_model("tiny", 32, 5, dense_units=8, slice_pooling=pooling)
    assert isinstance(model.get_layer("backbone"), keras.layers.TimeDistributed)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 5)).astype(np.float32)
    out = model.predict(images, verbose=0)
    np.testing.assert_allclose(out["severity"].sum(axis=1), 1.0, atol=1e-5)
    trainable = len(model.trainable_weights)
    set_backbone_trainable(model, False)
    assert 0 < len(model.trainable_weights) < trainable
    with pytest.raises(ValueError, match="slice_pooling must be one of channels, attention, lstm"):
        build_model("tiny", 32, 5, slice_pooling="mean")


@pytest.mark.parametrize("arch, low, high", [("mobilenet_v2", -1.0, 1.0), ("tiny", 0.0, 1.0)])
def test_the_model_scales_pixels_for_its_backbone(arch, low, high):
    model = build_model(arch, 32, 1)
    scale = model.get_layer("scale")
    out = keras.ops.convert_to_numpy(scale(np.array([[[[0.0]], [[255.0]]]], np.float32)))
    assert out.min() == pytest.approx(low) and out.max() == pytest.approx(high)


def test_the_model_round_trips_through_the_keras_format(tmp_path):
    model = build_model("densenet", 32, 1, dense_units=8)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    x = np.full((1, 32, 32, 1), 100.0, np.float32)
    for head in HEAD_CLASSES:
        np.testing.assert_allclose(model.predict(x, verbose=0)[head], loaded.predict(x, verbose=0)[head], atol=1e-6)
