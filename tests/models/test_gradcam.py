"""Grad-CAM: the layer each backbone explains, the re-assembled forward pass, where the maps look, the logged figure."""

from __future__ import annotations


import keras
import matplotlib.pyplot as plt
import numpy as np
import pytest

from spinemri.models.backbones import build_backbone, get_backbone
from spinemri.models.catalog import THESIS_ARCHS as THESIS_BACKBONES
from spinemri.models.gradcam import GradCamModel, gradcam, gradcam_figure, gradcam_grid, last_conv_layer
from spinemri.data.schema import HEAD_CLASSES
from spinemri.models.network import build_model

# None: the backbone's own output layer (NASNet's is auto-named, its number depends on the session).
EXPECTED_LAYER = {
    "inception_v3": "mixed10",
    "xception": "block14_sepconv2_act",
    "vgg16": "block5_conv3",  # the backbone ends in block5_pool: the map before it is twice as fine
    "nasnet_large": None,
    "resnet50": "conv5_block3_out",
    "mobilenet_v2": "out_relu",
    "densenet": "relu",
}


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    yield
    keras.backend.clear_session()


def _images(n: int, size: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, channels)).astype(np.float32)


@pytest.mark.parametrize("arch", THESIS_BACKBONES)
def test_each_thesis_backbone_gives_maps_at_the_input_size(arch):
    size = max(get_backbone(arch).min_size, 32)
    model = build_model(arch, size, 1, dense_units=16)
    model.compile(run_eagerly=True)  # NASNetLarge's predict graph takes minutes to trace
    backbone = model.get_layer("backbone")
    assert last_conv_layer(model) == (EXPECTED_LAYER[arch] or backbone.layers[-1].name)
    images = _images(3, size)
    # The heads differ only in their last Dense; the gray-to-RGB test below checks each of them.
    features, scores, probabilities = GradCamModel(model, "severity")(images)
    predicted = model.predict(images, verbose=0)["severity"]
    np.testing.assert_allclose(probabilities.numpy(), predicted, atol=1e-5)
    np.testing.assert_allclose(keras.ops.softmax(scores).numpy(), predicted, atol=1e-5)
    assert features.shape[0] == 3 and len(features.shape) == 4
    maps = gradcam(model, images, "severity")
    assert maps.shape == (3, size, size) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0


def test_compiled_predict_matches_with_gray_repeated_to_rgb_and_a_chosen_layer(tmp_path):
    # A weights file makes build_model repeat the gray channel as RGB before the scaling layers.
    path = tmp_path / "mobilenet.weights.h5"
    build_backbone(get_backbone("mobilenet_v2"), (64, 64, 3), "none").save_weights(path)
    model = build_model("mobilenet_v2", 64, 1, weights=str(path), dense_units=16)
    assert "gray_to_rgb" in [layer.name for layer in model.layers]
    images = _images(4, 64, seed=1)
    predicted = model.predict(images, verbose=0)  # compiled, as training's evaluation runs it
    for head in HEAD_CLASSES:
        _, _, probabilities = GradCamModel(model, head)(images)
        np.testing.assert_allclose(probabilities.numpy(), predicted[head], atol=1e-5)

    features, _, _ = GradCamModel(model, "level", layer="block_13_expand_relu")(images)
    assert features.shape[1:3] == (4, 4)  # finer than the 2x2 output map
    maps = gradcam(model, images, "level", class_index=np.array([0, 1, 2, 4]), layer="block_13_expand_relu")
    assert maps.shape == (4, 64, 64) and np.isfinite(maps).all() and 0.0 <= maps.min() <= maps.max() <= 1.0


SIZE = 32
CORNERS = ((2, 2), (2, 22), (22, 2), (22, 22))  # top-left row/column of an 8x8 square in each quadrant


def _corner_squares(n: int, rng: np.random.Generator):
    """Noise with dim squares in random corners; class 1 has one bright square, in a corner of its own.

    Returns images float32 (n, 32, 32, 1) 0..255, the class (n,) and the bright square's corner (n,).
    """
    images = rng.normal(60, 15, (n, SIZE, SIZE, 1))
    label = rng.integers(0, 2, n)
    corner = rng.integers(0, 4, n)
    for i in range(n):
        for k, (row, col) in enumerate(CORNERS):
            if k == corner[i] and label[i] == 1:
                images[i, row:row + 8, col:col + 8] = 230
            elif k != corner[i] and rng.random() < 0.5:
                images[i, row:row + 8, col:col + 8] = 130  # a distractor, in both classes
    return images.clip(0, 255).astype(np.float32), label, corner


def test_the_heatmap_finds_the_bright_square_that_decides_the_class():
    keras.utils.set_random_seed(0)
    images, label, _ = _corner_squares(512, np.random.default_rng(0))
    model = build_model("tiny", SIZE, 1, dense_units=16, dropout=0.0)
    model.compile(keras.optimizers.Adam(3e-3), loss={h: "sparse_categorical_crossentropy" for h in HEAD_CLASSES})
    model.fit(images, {h: label for h in HEAD_CLASSES}, epochs=6, batch_size=32, verbose=0)

    test_images, test_label, corner = _corner_squares(64, np.random.default_rng(100))
    accuracy = (model.predict(test_images, verbose=0)["severity"].argmax(axis=1) == test_label).mean()
    assert accuracy >= 0.95, f"the model did not learn the task (accuracy {accuracy:.2f}); the maps would mean nothing"

    positive = test_label == 1
    maps = gradcam(model, test_images[positive], "severity", class_index=1)
    half = SIZE // 2
    quadrants = np.stack([maps[:, :half, :half], maps[:, :half, half:], maps[:, half:, :half], maps[:, half:, half:]],
                         axis=1).sum(axis=(2, 3))  # (n, 4) in CORNERS order
    share = quadrants / np.maximum(quadrants.sum(axis=1, keepdims=True), 1e-9)
    own = share[np.arange(len(share)), corner[positive]]
    elsewhere = np.where(np.eye(4, dtype=bool)[corner[positive]], -1.0, share).max(axis=1)
    # A map that ignores the square puts 0.25 in each quadrant; seeds 0-7 give a mean of 0.59-0.71.
    assert own.mean() > 0.45, f"the square's quadrant holds {own.mean():.2f} of the heatmap"
    assert (own > elsewhere).mean() >= 0.9


def test_no_positive_evidence_gives_a_map_of_zeros_not_nan():
    model = build_model("tiny", SIZE, 1, dense_units=8)
    black = np.zeros((2, SIZE, SIZE, 1), np.float32)  # an untrained tiny backbone has no bias: features are 0
    features, _, _ = GradCamModel(model, "severity")(black)
    assert not features.numpy().any()
    maps = gradcam(model, black, "severity")
    assert maps.shape == (2, SIZE, SIZE) and not np.isnan(maps).any() and not maps.any()


def test_bad_arguments_name_the_choices():
    model = build_model("tiny", SIZE, 1, dense_units=8)
    images = _images(2, SIZE)
    with pytest.raises(ValueError, match="unknown head 'grade'; choose one of: condition, level, severity"):
        gradcam(model, images, "grade")
    with pytest.raises(ValueError, match=r"class_index must be in 0\.\.2 for head 'severity', got \[3\]"):
        gradcam(model, images, "severity", class_index=3)
    with pytest.raises(ValueError, match="has no layer 'conv99'; omit layer= to use 'conv2d"):
        gradcam(model, images, "severity", layer="conv99")
    flat = keras.Sequential([keras.Input((SIZE, SIZE, 1)), keras.layers.Flatten(), keras.layers.Dense(3)], name="flat")
    with pytest.raises(ValueError, match="no nested backbone layer 'backbone'"):
        last_conv_layer(flat)


def test_a_backbone_without_a_spatial_map_is_reported():
    inputs = keras.Input((SIZE, SIZE, 1))
    backbone = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs)))
    backbone.name = "backbone"
    outer_inputs = keras.Input((SIZE, SIZE, 1))
    model = keras.Model(outer_inputs, {"severity": keras.layers.Dense(3, name="severity")(backbone(outer_inputs))})
    assert last_conv_layer(model).startswith("conv2d")  # walks back past the global pooling
    vector = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Flatten()(inputs)), name="backbone")
    outer = keras.Model(outer_inputs, {"severity": keras.layers.Dense(3, name="severity")(vector(outer_inputs))})
    with pytest.raises(ValueError, match="has no rank-4 feature map"):
        last_conv_layer(outer)


def test_gradcam_figure_lays_out_rows_with_empty_cells():
    images = [_images(1, SIZE)[0], None, _images(1, SIZE, seed=2)[0]]
    maps = [np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE), None, np.zeros((SIZE, SIZE))]
    titles = ["true Moderate / pred Severe 0.71", "", "true Severe / pred Severe 0.90"]
    fig = gradcam_figure(images, maps, titles, ncols=2, row_labels=["true Moderate", "true Severe"])
    assert len(fig.axes) == 4  # 2 rows x 2 columns, the last one empty
    assert [ax.get_title() for ax in fig.axes] == [titles[0], "", titles[2], ""]
    assert [len(ax.images) for ax in fig.axes] == [2, 0, 2, 0]  # the input and its heatmap
    assert "true Severe" in [text.get_text() for text in fig.axes[2].texts]
    plt.close(fig)


def test_gradcam_grid_draws_a_figure_per_labelled_head():
    model = build_model("tiny", SIZE, 1, dense_units=8)
    images = _images(9, SIZE).astype(np.uint8)
    proba = {h: p for h, p in model.predict(images.astype(np.float32), verbose=0).items()}
    # No Normal/Mild sample: that row stays empty; -1 (unknown) is never drawn.
    targets = {"severity": np.array([1, 2, -1, 2, 1, -1, 2, 1, 2]), "condition": np.full(9, -1),
               "level": np.array([0, 1, 2, 3, 4, 0, 1, 2, 3])}
    figures = gradcam_grid(model, images, targets, proba, per_class=2)
    assert list(figures) == ["severity"]
    rows = [ax for ax in figures["severity"].axes if ax.images]
    assert len(rows) == 4  # two Moderate and two Severe samples; the Normal/Mild row is empty
    assert gradcam_grid(model, images, targets, proba, head="condition") == {}  # no labelled sample
    assert list(gradcam_grid(model, images, targets, proba, head=("level", "condition"))) == ["level"]
    for figure in figures.values():
        plt.close(figure)
