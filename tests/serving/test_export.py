"""Mobile export: the written file runs in its own runtime and matches the Keras model head by head."""

from __future__ import annotations

import importlib.util
import sys

import keras
import numpy as np
import pytest

from spinemri.serving import export
from spinemri.data.preprocess import PreprocessConfig
from spinemri.serving.export import ExportError, export_model, match_outputs, phantom_samples
from spinemri.data.schema import HEAD_CLASSES
from spinemri.models.network import build_model

SIZE = 64
META = {"arch": "tiny", "input_shape": [SIZE, SIZE, 1],
        "preprocess": PreprocessConfig(img_size=SIZE, slices=1).to_dict(),
        "classes": {head: list(names) for head, names in HEAD_CLASSES.items()}}
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="ONNX export needs tf2onnx and onnxruntime (spinemri[export])")


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    return phantom_samples(META, count=20)  # more than one runtime batch (16)


@pytest.fixture(scope="module")
def model(samples) -> keras.Model:
    return fitted("tiny", samples)


def fitted(arch: str, images: np.ndarray, lr: float = 3e-3) -> keras.Model:
    """A classifier after a few steps on the phantom, so BatchNormalization has real statistics.

    Random-init outputs are almost the same for every image (near-uniform softmaxes; exactly uniform
    for mobilenet_v2), which a broken export could match within the tolerance; these vary by image.
    """
    keras.utils.set_random_seed(0)
    net = build_model(arch, images.shape[1], images.shape[-1], weights="none", dense_units=32, bn_momentum=0.01)
    net.compile(optimizer=keras.optimizers.Adam(lr), loss={h: "sparse_categorical_crossentropy" for h in HEAD_CLASSES})
    rng = np.random.default_rng(0)
    net.fit(images, {h: rng.integers(0, len(c), len(images)) for h, c in HEAD_CLASSES.items()},
            batch_size=10, epochs=3, verbose=0)
    spread = min(float(p.std(axis=0).max()) for p in net.predict(images, verbose=0).values())
    assert spread > 0.01, f"outputs barely depend on the image (std {spread:.2g}); the parity tests would be weak"
    return net


def assert_parity(result, out, fmt, samples):
    assert result.path == out and out.is_file()
    assert result.format == fmt
    assert result.size_bytes == out.stat().st_size > 10_000  # the weights are in the file
    assert result.samples == len(samples)
    assert set(result.per_head_max_abs_diff) == set(HEAD_CLASSES)
    assert result.max_abs_diff == max(result.per_head_max_abs_diff.values())
    assert 0 <= result.max_abs_diff < 1e-4
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no partial file left behind


def test_tflite_matches_keras(model, samples, tmp_path):
    out = tmp_path / "model.tflite"
    result = export_model(model, "tflite", out, samples)
    assert_parity(result, out, "tflite", samples)
    assert out.read_bytes()[4:8] == b"TFL3"


def test_tflite_runs_without_ai_edge_litert(model, samples, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    out = tmp_path / "model.tflite"
    result = export_model(model, "tflite", out, samples)
    assert result.runtime.startswith("tf.lite")
    assert_parity(result, out, "tflite", samples)


@needs_onnx
def test_onnx_matches_keras(model, samples, tmp_path):
    out = tmp_path / "model.onnx"
    result = export_model(model, "onnx", out, samples)
    assert_parity(result, out, "onnx", samples)
    assert result.runtime.startswith("onnxruntime")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("arch", ["mobilenet_v2", "densenet"])
def test_imagenet_backbones_match_keras(arch, fmt, tmp_path):
    if fmt == "onnx" and not HAS_ONNX:
        pytest.skip("ONNX export needs tf2onnx and onnxruntime")
    meta = {"preprocess": PreprocessConfig(img_size=32, slices=3).to_dict(), "input_shape": [32, 32, 3]}
    images = phantom_samples(meta, count=20)
    out = tmp_path / f"{arch}.{fmt}"
    assert_parity(export_model(fitted(arch, images, lr=1e-3), fmt, out, images), out, fmt, images)


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_model_with_normalization_constants(fmt, tmp_path):
    """Normalization's mean/variance (densenet, resnet50, vgg16 scaling) must be folded into the file."""
    if fmt == "onnx" and not HAS_ONNX:
        pytest.skip("ONNX export needs tf2onnx and onnxruntime")
    keras.utils.set_random_seed(1)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Normalization(mean=[103.9, 116.8, 123.7], variance=[3000.0, 3100.0, 3200.0])(inputs)
    x = keras.layers.Conv2D(8, 3)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.5)(x)
    outputs = {head: keras.layers.Dense(len(c), activation="softmax", name=head)(x) for head, c in HEAD_CLASSES.items()}
    net = keras.Model(inputs, outputs)
    images = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    result = export_model(net, fmt, tmp_path / f"net.{fmt}", images)
    assert result.max_abs_diff < 1e-4


def test_parity_failure_raises_and_writes_nothing(model, samples, tmp_path):
    # No runtime reproduces TensorFlow's float arithmetic bit for bit, so tolerance 0 fails for real.
    out = tmp_path / "model.tflite"
    with pytest.raises(ExportError, match=r"max abs difference .* > tolerance 0 over 20 samples .*severity"):
        export_model(model, "tflite", out, samples, tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_keeps_the_previous_file(model, samples, tmp_path):
    out = tmp_path / "model.tflite"
    out.write_bytes(b"previous")
    with pytest.raises(ExportError, match="does not match the Keras model"):
        export_model(model, "tflite", out, samples, tolerance=0.0, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model.tflite"] and out.read_bytes() == b"previous"


def test_overwrite_replaces_an_existing_file(model, samples, tmp_path):
    out = tmp_path / "model.tflite"
    out.write_bytes(b"old")
    with pytest.raises(ExportError, match="already exists.*--overwrite"):
        export_model(model, "tflite", out, samples)
    assert out.read_bytes() == b"old"
    export_model(model, "tflite", out, samples, overwrite=True)
    assert out.read_bytes()[4:8] == b"TFL3"


def test_unknown_format(model, samples, tmp_path):
    with pytest.raises(ExportError, match=r"unknown export format 'coreml'; choose one of: tflite, onnx"):
        export_model(model, "coreml", tmp_path / "model.mlmodel", samples)


def test_missing_folder(model, samples, tmp_path):
    with pytest.raises(ExportError, match="folder .*missing does not exist"):
        export_model(model, "tflite", tmp_path / "missing" / "model.tflite", samples)
    with pytest.raises(ExportError, match="is a folder"):
        export_model(model, "tflite", tmp_path, samples)


def test_missing_onnx_packages(model, samples, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # makes `import tf2onnx` fail
    with pytest.raises(ExportError, match=r"needs tf2onnx and onnxruntime \(missing: tf2onnx[,)].*spinemri\[export\]"):
        export_model(model, "onnx", tmp_path / "model.onnx", samples)
    assert list(tmp_path.iterdir()) == []


def test_samples_must_fit_the_model(model, tmp_path):
    with pytest.raises(ExportError, match=r"shape \(N, 64, 64, 1\); got \(2, 32, 32, 1\)"):
        export_model(model, "tflite", tmp_path / "m.tflite", np.zeros((2, 32, 32, 1), np.float32))
    with pytest.raises(ExportError, match="non-empty"):
        export_model(model, "tflite", tmp_path / "m.tflite", np.zeros((0, SIZE, SIZE, 1), np.float32))


def test_outputs_are_matched_by_name():
    heads = ["condition", "level", "severity"]
    assert match_outputs(heads, ["severity", "condition", "level"]) == {h: h for h in heads}
    assert match_outputs(heads, ["m/Level:0", "m/condition:0", "m/severity:0"])["level"] == "m/Level:0"
    with pytest.raises(ExportError, match="cannot match"):
        match_outputs(heads, ["StatefulPartitionedCall:0", "StatefulPartitionedCall:1", "StatefulPartitionedCall:2"])
    with pytest.raises(ExportError, match="cannot match"):
        match_outputs(heads, ["condition", "level"])


def test_phantom_samples(samples):
    assert samples.shape == (20, SIZE, SIZE, 1) and samples.dtype == np.float32
    assert 0 <= samples.min() and samples.max() <= 255 and samples.std() > 10  # real images, not blanks
    assert len({s.tobytes() for s in samples}) == 20


def test_phantom_samples_more_than_one_study_and_three_channels():
    meta = {"preprocess": PreprocessConfig(img_size=32, slices=3).to_dict(), "input_shape": [32, 32, 3]}
    images = phantom_samples(meta, count=30, seed=1)
    assert images.shape == (30, 32, 32, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(images[:3], phantom_samples(meta, count=30, seed=1)[:3])
    with pytest.raises(ValueError, match="expects"):
        phantom_samples({**meta, "input_shape": [64, 64, 3]}, count=2)


