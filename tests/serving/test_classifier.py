"""The logged pyfunc: same probabilities as the Keras model, clear errors per row, no patient tags anywhere."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import keras
import mlflow
from mlflow import MlflowClient
import numpy as np
import pandas as pd
import pydicom
import pytest

from spinemri.api.source import prepare_data
from spinemri.data.dicom import encode_dicom, read_dicom
from spinemri.data.preprocess import PreprocessConfig, preprocess
from spinemri.data.schema import HEAD_CLASSES
from spinemri.models import calibration
from spinemri.models.network import build_model
from spinemri.serving.classifier import SpineClassifier, load_classifier
from spinemri.serving.inputs import InputError, file_row
from spinemri.api.evaluate import run_config
from spinemri.training.data import read_rows, split_data
from tests.conftest import CANARIES, no_pixels_dicom_b64

# One worker runs all serving tests: one trained model and one server instead of two of each.
pytestmark = pytest.mark.xdist_group("serving")


def _labelled_site(data_dir: Path) -> tuple[Path, float, float]:
    coords = pd.read_csv(data_dir / "train_label_coordinates.csv").iloc[0]
    path = data_dir / "train_images" / str(coords.study_id) / str(coords.series_id) / f"{coords.instance_number}.dcm"
    return path, float(coords.x), float(coords.y)


def test_pyfunc_matches_the_keras_model_on_the_same_preprocessed_input(store):
    loaded = mlflow.pyfunc.load_model(store.model_uri)
    path, x, y = _labelled_site(store.data_dir)
    served = loaded.predict(pd.DataFrame([file_row(path, x, y),
                                          {**file_row(path, x, y), "condition": "spinal_canal_stenosis"}]))

    # Independently: the .keras artifact, the training preprocessing, Keras predict, the stored temperatures.
    local = Path(mlflow.artifacts.download_artifacts(store.model_uri))
    keras_model = keras.models.load_model(next(local.rglob("model.keras")), compile=False)
    meta = json.loads(next(local.rglob("meta.json")).read_text())
    config = PreprocessConfig.from_dict(meta["preprocess"])
    image = read_dicom(path)
    tensor = preprocess([image.pixels], image.pixel_spacing, config, x, y)[np.newaxis].astype(np.float32)
    raw = keras_model.predict(tensor, verbose=0)
    temperatures = meta["temperature"]  # the fixture's model is calibrated
    for head, classes in HEAD_CLASSES.items():
        t = temperatures["heads"][head]
        assert t != pytest.approx(1.0, abs=1e-3)  # a fitted value, not the identity
        logits = np.log(raw[head][0]) / t
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        got = served[[f"{head}:{c}" for c in classes]].to_numpy()
        np.testing.assert_allclose(got[0], expected, atol=1e-6)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
        assert served[head].iloc[0] == classes[int(raw[head].argmax())]  # scaling never changes the class
    by_condition = temperatures["severity_by_condition"].get("spinal_canal_stenosis", temperatures["heads"]["severity"])
    logits = np.log(raw["severity"][0]) / by_condition
    np.testing.assert_allclose(served[[f"severity:{c}" for c in HEAD_CLASSES["severity"]]].to_numpy()[1],
                               np.exp(logits) / np.exp(logits).sum(), atol=1e-6)


def test_calibration_is_fitted_on_the_validation_split_not_on_test(store, monkeypatch):
    """Refitting on the logged model's raw validation predictions gives its stored temperatures; test would not."""
    monkeypatch.setenv("SPINEMRI_CACHE_DIR", str(store.cache_dir))
    classifier = load_classifier(store.model_uri)
    config = run_config(store.run_id)
    dataset, samples = prepare_data(config)
    refit = {}
    for split in ("val", "test"):
        part = split_data(samples, split)
        images = read_rows(str(dataset.path / "images.npy"), part.rows).astype(np.float32)
        raw = {h: np.asarray(p) for h, p in classifier.model.predict(images, verbose=0).items()}
        refit[split] = calibration.fit(part.targets, raw, part.samples["condition"].tolist(),
                                       severity_weights=config.model.severity_sample_weights)
        if split == "test":  # and what the model serves for them is the raw output scaled by the stored ones
            served = classifier.predict_images(images, conditions=part.samples["condition"].tolist())
            expected = calibration.Temperatures.from_dict(classifier.meta["temperature"]).apply(
                raw, part.samples["condition"].tolist())
            for head in HEAD_CLASSES:
                np.testing.assert_allclose(served[head], expected[head], atol=1e-6)
    stored = classifier.meta["temperature"]
    for head in HEAD_CLASSES:
        assert refit["val"].heads[head] == pytest.approx(stored["heads"][head], rel=1e-6)
    assert any(refit["test"].heads[h] != pytest.approx(stored["heads"][h], rel=1e-3) for h in HEAD_CLASSES)
    run = MlflowClient().get_run(store.run_id)
    logged = mlflow.artifacts.load_dict(f"runs:/{store.run_id}/calibration/temperatures.json")
    assert ["severity", "", pytest.approx(stored["heads"]["severity"])] in logged["data"]
    assert {"test_severity_ece_uncalibrated", "test_severity_loss_uncalibrated",
            "test_severity_weighted_log_loss_uncalibrated", "test_severity_ece"} <= set(run.data.metrics)


def test_an_unknown_condition_is_a_clear_input_error(store):
    path, x, y = _labelled_site(store.data_dir)
    with pytest.raises(InputError, match="row 0: condition 'spine' is not one of spinal_canal_stenosis"):
        mlflow.pyfunc.load_model(store.model_uri).predict(pd.DataFrame([{**file_row(path, x, y), "condition": "spine"}]))


def test_many_rows_bitmaps_and_the_default_centre(store):
    loaded = mlflow.pyfunc.load_model(store.model_uri)
    path, x, y = _labelled_site(store.data_dir)
    image = read_dicom(path)
    png = base64.b64encode(_png(image.pixels)).decode()
    rows = pd.DataFrame([file_row(path, x, y), file_row(path), {"image_b64": png}])
    out = loaded.predict(rows)
    assert len(out) == 3
    centre = loaded.predict(pd.DataFrame([file_row(path, (image.pixels.shape[1] - 1) / 2,
                                                   (image.pixels.shape[0] - 1) / 2)]))
    np.testing.assert_allclose(out.iloc[1, 3:].to_numpy(float), centre.iloc[0, 3:].to_numpy(float), atol=1e-6)


def _png(pixels: np.ndarray) -> bytes:
    import cv2

    scaled = (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1.0) * 65535
    return cv2.imencode(".png", scaled.astype(np.uint16))[1].tobytes()


@pytest.mark.parametrize("row, message", [
    ({"dicom_b64": "%%% not base64 %%%"}, "row 0: dicom_b64 is not valid base64"),
    ({"dicom_b64": base64.b64encode(b"just some text, not an image").decode()}, "row 0: dicom_b64 is not a DICOM file"),
    ({"image_b64": base64.b64encode(b"just some text, not an image").decode()}, "row 0: image_b64 is not a PNG or JPEG"),
    ({"dicom_b64": "no-pixels"}, "row 0: dicom_b64 has no pixel data"),
    ({"image_b64": ""}, "give exactly one of the columns dicom_b64"),
    ({"dicom_b64": "ok", "x": 1e5, "y": 1.0}, "row 0: site (100000.0, 1.0) lies outside the 64x64 image"),
    ({"dicom_b64": "ok", "x": 3.0}, "row 0: give both x and y"),
    ({"dicom_b64": "ok", "image_b64": "ok"}, "got both"),
])
def test_bad_rows_raise_input_errors_naming_the_problem(row, message):
    classifier = _classifier(channels=1)
    good = base64.b64encode(encode_dicom(np.random.default_rng(0).random((64, 64)))).decode()
    row = {k: (good if v == "ok" else no_pixels_dicom_b64() if v == "no-pixels" else v) for k, v in row.items()}
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        classifier.predict(None, pd.DataFrame([row]))


def test_a_dict_is_one_row_or_columns():
    classifier = _classifier(channels=3)
    rng = np.random.default_rng(2)
    b64 = [base64.b64encode(encode_dicom(rng.random((40, 40)) * 100)).decode() for _ in range(3)]
    one = classifier.predict(None, {"dicom_b64": b64[1], "neighbors_b64": [b64[0], b64[2]]})
    many = classifier.predict(None, {"dicom_b64": b64, "x": [10.0, 20.0, 30.0], "y": [10.0, 20.0, 30.0]})
    assert len(one) == 1 and len(many) == 3


def test_missing_image_column_and_empty_requests():
    classifier = _classifier(channels=1)
    with pytest.raises(InputError, match="missing column: give dicom_b64"):
        classifier.predict(None, pd.DataFrame([{"x": 1.0, "y": 2.0}]))
    with pytest.raises(InputError, match="no rows"):
        classifier.predict(None, pd.DataFrame({"dicom_b64": pd.Series([], dtype=str)}))


def _classifier(channels: int, size: int = 32, slice_pooling: str = "channels") -> SpineClassifier:
    classifier = SpineClassifier()
    classifier.model = build_model("tiny", size, channels, dense_units=8, slice_pooling=slice_pooling)
    config = PreprocessConfig(img_size=size, slices=channels, roi_mm=20.0)
    classifier.meta = {"input_shape": [size, size, channels], "preprocess": config.to_dict()}
    return classifier


def test_three_channel_models_use_the_neighbours_or_repeat_the_centre():
    classifier = _classifier(channels=3)
    rng = np.random.default_rng(1)
    slices = [rng.random((40, 40)) * 100 for _ in range(3)]
    b64 = [base64.b64encode(encode_dicom(s)).decode() for s in slices]
    with_neighbours = classifier.prepare_row({"dicom_b64": b64[1], "neighbors_b64": [b64[0], b64[2]]}, 0)
    alone = classifier.prepare_row({"dicom_b64": b64[1]}, 0)
    assert with_neighbours.shape == alone.shape == (32, 32, 3)
    np.testing.assert_array_equal(with_neighbours[..., 1], alone[..., 1])
    assert not np.array_equal(with_neighbours[..., 0], with_neighbours[..., 1])
    np.testing.assert_array_equal(alone[..., 0], alone[..., 1])
    with pytest.raises(InputError, match=r"neighbors_b64 must be a list of 2 base64 files.*\[previous, next\]"):
        classifier.prepare_row({"dicom_b64": b64[1], "neighbors_b64": [b64[0]]}, 0)


@pytest.mark.parametrize("pooling", ["channels", "attention", "lstm"])
def test_a_five_slice_request_is_the_stack_training_builds(pooling, tmp_path):
    """neighbors_b64 holds the 4 neighbours in order; the served input equals the cache's preprocess() of the
    same 5 slices, and the served probabilities are the network's on it, for every slice pooling."""
    classifier = _classifier(channels=5, slice_pooling=pooling)
    rng = np.random.default_rng(2)
    slices = [rng.random((40, 40)) * 100 + 20 * k for k in range(5)]
    b64 = [base64.b64encode(encode_dicom(s)).decode() for s in slices]
    row = {"dicom_b64": b64[2], "neighbors_b64": [b64[0], b64[1], b64[3], b64[4]], "x": 19.0, "y": 21.0}
    served = classifier.prepare_row(row, 0)
    decoded = [read_dicom(_write(tmp_path / f"{k}.dcm", s)) for k, s in enumerate(slices)]
    config = PreprocessConfig.from_dict(classifier.meta["preprocess"])
    expected = preprocess([d.pixels for d in decoded], decoded[2].pixel_spacing, config, 19.0, 21.0)
    np.testing.assert_array_equal(served, expected)
    assert served.shape == (32, 32, 5) and len({served[..., k].tobytes() for k in range(5)}) == 5
    out = classifier.predict(None, pd.DataFrame([row]))
    raw = classifier.model.predict(expected[np.newaxis].astype(np.float32), verbose=0)
    np.testing.assert_allclose(out[[f"severity:{c}" for c in HEAD_CLASSES["severity"]]].to_numpy(), raw["severity"],
                               atol=1e-6)
    with pytest.raises(InputError, match="must be a list of 4 base64 files, the neighbouring slices in order"):
        classifier.prepare_row({"dicom_b64": b64[2], "neighbors_b64": [b64[1], b64[3]]}, 0)


def _write(path: Path, pixels: np.ndarray) -> Path:
    path.write_bytes(encode_dicom(pixels))
    return path


def test_no_patient_tag_reaches_mlflow(store, tmp_path):
    """Params, tags, metrics, every artifact (model and input example included) and the registry."""
    client = MlflowClient()
    run = client.get_run(store.run_id)
    texts = [repr(run.data.params), repr(run.data.tags), repr(run.data.metrics)]
    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=store.run_id, dst_path=str(tmp_path / "run")))
    model = Path(mlflow.artifacts.download_artifacts(store.model_uri, dst_path=str(tmp_path / "model")))
    files = [p for p in [*artifacts.rglob("*"), *model.rglob("*")] if p.is_file()]
    assert any(p.name == "input_example.json" for p in files)
    blobs = [p.read_bytes() for p in files]
    for version in client.search_model_versions("name = 'spinemri'"):
        texts.append(repr(version.tags))
    # The logged input example is a real DICOM: decode it and check its tags too.
    example = mlflow.pyfunc.load_model(store.model_uri).input_example
    decoded = pydicom.dcmread(io.BytesIO(base64.b64decode(example["dicom_b64"].iloc[0])))
    assert "PatientName" not in decoded and "PatientID" not in decoded and "InstitutionName" not in decoded
    blobs.append(Path(store.tracking_uri.removeprefix("sqlite:///")).read_bytes())
    for value in CANARIES.values():
        needles = {value, value.replace("^", " "), value.split("^")[0]}
        for needle in needles:
            assert all(needle not in text for text in texts), needle
            assert all(needle.encode() not in blob for blob in blobs), needle
    # ...while the training data really did carry them.
    source = next(store.data_dir.rglob("*.dcm"))
    assert pydicom.dcmread(source, stop_before_pixels=True).PatientID == CANARIES["PatientID"]


@pytest.mark.parametrize("x, y", [(True, False), (np.True_, 3.0), (1.0, False)])
def test_booleans_are_not_coordinates(x, y):
    classifier = _classifier(channels=1)
    b64 = base64.b64encode(encode_dicom(np.random.default_rng(0).random((40, 40)) * 100)).decode()
    with pytest.raises(InputError, match=r"must be a number of pixels, got (np\.)?(True|False)"):
        classifier.prepare_row({"dicom_b64": b64, "x": x, "y": y}, 0)


def test_a_model_whose_classes_are_gone_is_named_as_logged_by_an_earlier_version(tmp_path, monkeypatch):
    import sys

    from spinemri.errors import UserError
    from spinemri.serving.mlflow_model import load_python_model

    (tmp_path / "spinemri_gone.py").write_text("import mlflow\n\nclass Old(mlflow.pyfunc.PythonModel):\n"
                                               "    def predict(self, context, model_input, params=None):\n"
                                               "        return model_input\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import spinemri_gone

    mlflow.pyfunc.save_model(str(tmp_path / "model"), python_model=spinemri_gone.Old())
    (tmp_path / "spinemri_gone.py").unlink()  # as an earlier version's module is, after an upgrade
    sys.modules.pop("spinemri_gone")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    with pytest.raises(UserError, match="logged by an earlier spinemri version.*log it again"):
        load_python_model(str(tmp_path / "model"), object, "classifier", "train one")
