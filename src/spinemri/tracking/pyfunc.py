"""The logged and served model: an MLflow pyfunc that takes DICOM (or PNG/JPEG) files and names its outputs by class.

Input, one row per image (a pandas DataFrame, or JSON ``dataframe_records`` / ``dataframe_split``
posted to ``mlflow models serve``):

    dicom_b64      base64 of a DICOM file            } exactly one of the two
    image_b64      base64 of a PNG or JPEG export    }
    x, y           optional site centre in pixels (column, row); default: the image centre
    condition      the condition whose severity the site is graded for (e.g. spinal_canal_stenosis),
                   which picks that condition's severity temperature; optional for a model of ROI
                   crops, required (with ``level``) by a per-site model (trained on whole slices that
                   show several sites), which grades the site the row names
    level          the level of that site (L1/L2 ... L5/S1); see ``condition``
    neighbors_b64  optional, for a 2.5D model of S slices: the S - 1 neighbouring slices in order
                   (base64, same kind; [previous, next] for 3), the site's slice left out; without
                   them the site's slice is repeated, as at the ends of a series in training

Each image goes through :func:`spinemri.data.preprocess.preprocess` with the configuration the
model was trained with (stored in the model's ``meta.json``): the same function that built the
training cache, not a copy. Output, one row per image: the predicted ``condition``, ``level`` and
``severity``, and one probability column per class, ``<head>:<class>`` (e.g. ``severity:Moderate``).

A bad row raises :class:`InputError` (an ``MlflowException``, HTTP 400 from the scoring server)
whose message names the row, the column and the problem.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array

from spinemri.data import limits
from spinemri.data.dicom import (DicomImage, SeriesStack, decode_bitmap_bytes, decode_dicom_bytes, encode_dicom,
                                 read_image, read_series)
from spinemri.data.preprocess import PreprocessConfig, preprocess, with_centre
from spinemri.data.schema import CONDITIONS, HEAD_CLASSES, LEVELS, condition_key, level_name, site_indices
from spinemri.errors import ImageReadError, UserError
from spinemri.models.calibration import Temperatures
from spinemri.models.severity import severity_at

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/spinemri, logged with every model as its code
IMAGE_COLUMNS = ("dicom_b64", "image_b64")
INPUT_SCHEMA = Schema([
    ColSpec(DataType.string, "dicom_b64", required=False),
    ColSpec(DataType.string, "image_b64", required=False),
    ColSpec(DataType.double, "x", required=False),
    ColSpec(DataType.double, "y", required=False),
    ColSpec(Array(DataType.string), "neighbors_b64", required=False),
    ColSpec(DataType.string, "condition", required=False),
    ColSpec(DataType.string, "level", required=False),
])


class InputError(MlflowException):
    """A request row the model cannot use; the scoring server answers HTTP 400 with this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def probabilities_frame(outputs: Mapping[str, np.ndarray]) -> pd.DataFrame:
    columns: dict[str, object] = {}
    for head, classes in HEAD_CLASSES.items():
        columns[head] = [classes[i] for i in np.asarray(outputs[head]).argmax(axis=1)]
    for head, classes in HEAD_CLASSES.items():
        for k, name in enumerate(classes):
            columns[f"{head}:{name}"] = np.asarray(outputs[head])[:, k].astype(np.float64)
    return pd.DataFrame(columns)


def file_row(path: str | Path, x: float | None = None, y: float | None = None, condition: str | None = None,
             level: str | None = None) -> dict[str, Any]:
    """A request row for an image file on disk (what ``spinemri predict`` and the README's curl send)."""
    path = Path(path)
    column = "image_b64" if path.suffix.lower() in (".png", ".jpg", ".jpeg") else "dicom_b64"
    row: dict[str, Any] = {column: base64.b64encode(path.read_bytes()).decode("ascii")}
    if x is not None and y is not None:
        row.update(x=float(x), y=float(y))
    if condition is not None and level is not None:
        row.update(condition=condition, level=level)
    return row


def guard_scoring_server() -> None:
    """Inside `mlflow models serve`, bound what a request may cost before MLflow parses it.

    MLflow's scoring server reads any body and hands it to ``json.loads``: a body over
    ``SPINEMRI_MAX_REQUEST_MB`` is answered 413 before it is parsed, and JSON nested too deep for
    Python's parser (which MLflow answers with a 500) gets a 400 that says so. Outside the server
    (``mlflow.pyfunc.load_model`` in a script) this does nothing.
    """
    import sys

    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    if server is None or getattr(server.invocations, "spinemri_guard", False):
        return
    original = server.invocations

    def invocations(data, content_type, model, input_schema):
        size = len(data) if isinstance(data, (bytes, str)) else 0
        if size > limits.REQUEST_BYTES.value:
            message = (f"the request body is {limits.human_size(size)}, over {limits.REQUEST_BYTES.describe()}; "
                       "send fewer images or studies per request")
            return server.InvocationsResponse(json.dumps({"error_code": "REQUEST_TOO_LARGE", "message": message}),
                                              413, "application/json")
        try:
            return original(data, content_type, model, input_schema)
        except RecursionError:
            raise InputError("the request's JSON is nested too deeply to parse; send a flat dataframe_split or "
                             "dataframe_records payload (one row per image or study)") from None

    invocations.spinemri_guard = True
    server.invocations = invocations


class KerasWithMeta(mlflow.pyfunc.PythonModel):
    """A pyfunc whose artifacts are a Keras file and meta.json (preprocessing, classes, ...)."""

    def load_context(self, context) -> None:
        import keras

        guard_scoring_server()

        self.model = keras.models.load_model(context.artifacts["keras_model"], compile=False)
        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())


def log_keras_pyfunc(python_model: KerasWithMeta, model, meta: dict, **log_model_kwargs):
    """Save ``model`` and ``meta`` as the artifacts of ``python_model`` and log it as ``model``."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # Schemas are given explicitly where needed; MLflow's hint about type-hinted predict() does not apply.
        warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")
        keras_path = Path(tmp) / "model.keras"
        model.save(keras_path)
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps(meta, indent=2))
        return mlflow.pyfunc.log_model(name="model", python_model=python_model,
                                       artifacts={"keras_model": str(keras_path), "meta": str(meta_path)},
                                       code_paths=[str(PACKAGE_DIR)], **log_model_kwargs)


def load_python_model(model_uri: str, cls: type, what: str, hint: str):
    """The ``cls`` instance behind a logged model URI, or a UserError naming the URI and the fix."""
    tracking_uri = mlflow.get_tracking_uri()
    if tracking_uri.startswith(("http://", "https://")) and not Path(model_uri).exists():
        from spinemri.tracking.store import check_server

        check_server(tracking_uri)  # within seconds, not after MLflow's minutes of retries
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        raise UserError(f"cannot load {what} {model_uri!r} from {mlflow.get_tracking_uri()}: {exc.message}; "
                        f"{hint}") from None
    except OSError as exc:
        raise UserError(f"cannot load {what} {model_uri!r}: {exc}") from None
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, cls):
        raise UserError(f"{model_uri!r} is a {type(python_model).__name__}, not a spinemri {what}")
    return python_model


class SpineClassifier(KerasWithMeta):

    @property
    def preprocessing(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.meta["preprocess"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        frame = _as_frame(model_input)
        conditions, levels = _conditions(frame), _levels(frame)
        if self.per_site:
            _require_sites(frame, conditions, levels)
        images = np.stack([self.prepare_row(row, i) for i, row in enumerate(frame.to_dict("records"))])
        return probabilities_frame(self.predict_images(images, conditions=conditions, levels=levels))

    @property
    def per_site(self) -> bool:
        """Whether the model grades the site a row names (a per-site severity output)."""
        return self.meta.get("severity_head") == "per_site"

    def prepare_row(self, row: Mapping[str, Any], index: int) -> np.ndarray:
        """One request row -> the model input uint8 (S, S, C); InputError names the row and column."""
        config = self.preprocessing
        given = [c for c in IMAGE_COLUMNS if _present(row.get(c))]
        if len(given) != 1:
            found = ", ".join(sorted(str(k) for k in row)) or "none"
            what = "both" if given else "neither"
            raise InputError(f"row {index}: give exactly one of the columns dicom_b64 (a base64 DICOM file) or "
                             f"image_b64 (a base64 PNG/JPEG); got {what} (columns: {found})")
        column = given[0]
        centre = _decode(row[column], column, index, config)
        neighbours = None
        if config.slices > 1 and _present(row.get("neighbors_b64")):
            values = row["neighbors_b64"]
            if isinstance(values, str) or len(values) != config.slices - 1:
                shown = type(values).__name__ if isinstance(values, str) else f"{len(values)} files"
                raise InputError(f"row {index}: neighbors_b64 must be a list of {config.slices - 1} base64 files, "
                                 f"the neighbouring slices in order ({'[previous, next]' if config.slices == 3 else 'lower first'}) "
                                 f"for this {config.slices}-slice model, got {shown}")
            neighbours = [_decode(v, f"neighbors_b64[{k}]", index, config) for k, v in enumerate(values)]
        x, y = _coordinate(row, "x", index), _coordinate(row, "y", index)
        if (x is None) != (y is None):
            raise InputError(f"row {index}: give both x and y (the site centre in pixels) or neither")
        try:
            return self.prepare_image(centre, neighbours, x, y)
        except ValueError as exc:
            raise InputError(f"row {index}: {exc}") from None

    def prepare_image(self, centre: DicomImage, neighbours: Sequence[DicomImage] | None = None,
                      x: float | None = None, y: float | None = None) -> np.ndarray:
        """A decoded slice (and, for a 2.5D model, its neighbours in order) -> the model input, as in training.

        A 2.5D model without neighbours gets the site's slice repeated, as training does at the ends of
        a series. Raises ValueError (e.g. a site outside the image).
        """
        count = self.preprocessing.slices
        stack = with_centre(centre.pixels, [n.pixels for n in neighbours or ()] if count > 1 else (), count)
        return preprocess(stack, centre.pixel_spacing, self.preprocessing, x, y)

    def _sites(self, count: int, conditions: Sequence | None, levels: Sequence | None, unsited: str = "refuse"
               ) -> np.ndarray:
        """Each image's site index (-1 for none); a per-site model refuses images without one (unless
        ``unsited="mean"``)."""
        if conditions is None or levels is None:
            sites = np.full(count, -1, np.int64)
        else:
            sites = site_indices(conditions, levels)
        if len(sites) != count:
            raise InputError(f"{len(sites)} sites given for {count} images")
        if self.per_site and unsited == "refuse" and (sites < 0).any():
            raise InputError(f"this model grades the site each image is given for (it was trained on images that "
                             f"show several sites): give every image a condition ({', '.join(CONDITIONS)}) and a "
                             f"level ({', '.join(LEVELS)})")
        return sites

    def _model_ready(self, images: np.ndarray) -> np.ndarray:
        """``images`` as float32, checked against the model's input shape (N, S, S, C)."""
        images = np.asarray(images, dtype=np.float32)
        expected = tuple(self.meta["input_shape"])
        if images.ndim != 4 or images.shape[1:] != expected:
            raise InputError(f"expected images of shape (N, {', '.join(map(str, expected))}), got {images.shape}")
        return images

    def predict_images(self, images: np.ndarray, batch_size: int = 32, conditions: Sequence | None = None,
                       levels: Sequence | None = None, unsited: str = "refuse") -> dict[str, np.ndarray]:
        """Probabilities per head for model-ready images (N, S, S, C), pixel values 0..255, calibrated by the
        model's temperatures when it has them (``conditions``: the condition each image's severity grades,
        for the per-condition severity temperatures; see spinemri.models.calibration). A per-site model
        reads each image's severity at its site, ``conditions`` and ``levels``: an image without one is
        refused (InputError), or with ``unsited="mean"`` gets the mean over the sites (as the training
        evaluation scores a flat-CSV slice that names no site)."""
        images = self._model_ready(images)
        sites = self._sites(len(images), conditions, levels, unsited)
        outputs = self.model.predict(images, batch_size=batch_size, verbose=0)
        proba = {head: np.asarray(outputs[head]) for head in HEAD_CLASSES}
        proba["severity"] = severity_at(proba["severity"], sites)
        if self.meta.get("temperature"):
            proba = Temperatures.from_dict(self.meta["temperature"]).apply(proba, conditions)
        return proba


class SpineEnsemble(SpineClassifier):
    """Several classifiers served as one: the same request rows, preprocessed once with the members'
    shared preprocessing, and the mean of the members' calibrated probabilities per head.

    ``meta["members"]`` lists each member (``arch``, ``run_id``, ``fold``, ``temperature``); its Keras
    file is the artifact ``member_<i>``.
    """

    def load_context(self, context) -> None:
        import keras

        guard_scoring_server()
        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.members = [keras.models.load_model(context.artifacts[f"member_{i}"], compile=False)
                        for i in range(len(self.meta["members"]))]
        self.model = self.members[0]

    def predict_images(self, images: np.ndarray, batch_size: int = 32, conditions: Sequence | None = None,
                       levels: Sequence | None = None, unsited: str = "refuse") -> dict[str, np.ndarray]:
        """The mean over members of each one's probabilities, calibrated by its own temperatures."""
        images = self._model_ready(images)
        sites = self._sites(len(images), conditions, levels, unsited)
        total: dict[str, np.ndarray] = {}
        for model, member in zip(self.members, self.meta["members"]):
            outputs = model.predict(images, batch_size=batch_size, verbose=0)
            proba = {head: np.asarray(outputs[head], dtype=np.float64) for head in HEAD_CLASSES}
            proba["severity"] = severity_at(proba["severity"], sites)
            if member.get("temperature"):
                proba = Temperatures.from_dict(member["temperature"]).apply(proba, conditions)
            for head, p in proba.items():
                total[head] = total.get(head, 0.0) + p
        return {head: (p / len(self.members)).astype(np.float32) for head, p in total.items()}


def log_ensemble(members: Sequence, meta: dict, example: dict[str, Any], pip_requirements: list[str]):
    """Log Keras ``members`` as one :class:`SpineEnsemble` pyfunc (``model``) with ``meta``, a signature
    and a request-row input example."""
    ensemble = SpineEnsemble()
    ensemble.members, ensemble.model, ensemble.meta = list(members), members[0], meta
    example_frame = pd.DataFrame([example])
    signature = ModelSignature(inputs=INPUT_SCHEMA, outputs=_output_schema(ensemble.predict(None, example_frame)))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")
        artifacts = {}
        for i, member in enumerate(members):
            path = Path(tmp) / f"member_{i}.keras"
            member.save(path)
            artifacts[f"member_{i}"] = str(path)
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps(meta, indent=2))
        artifacts["meta"] = str(meta_path)
        return mlflow.pyfunc.log_model(name="model", python_model=SpineEnsemble(), artifacts=artifacts,
                                       code_paths=[str(PACKAGE_DIR)], signature=signature,
                                       input_example=example_frame, pip_requirements=pip_requirements)


def load_classifier(model_uri: str) -> SpineClassifier:
    """The :class:`SpineClassifier` behind a logged model URI (``models:/spinemri@champion``, ``runs:/...``)."""
    return load_python_model(model_uri, SpineClassifier, "classifier",
                             "see `spinemri registry list` for the versions and aliases there")


def example_row(sample: Mapping[str, Any], config: PreprocessConfig, neighbours: Sequence[str] = ()) -> dict[str, Any]:
    """A de-identified request row made from a training sample, for the logged input example.

    The slice (and its neighbours) is cropped around the site and re-encoded with
    :func:`~spinemri.data.dicom.encode_dicom`, which writes pixels and spacing only: no tag of the
    source file (patient, study, institution, dates) reaches the logged model.
    """
    image = read_image(sample["path"], voi=config.dicom_window)
    height, width = image.pixels.shape
    x = None if pd.isna(sample.get("x")) else float(sample["x"])
    y = None if pd.isna(sample.get("y")) else float(sample["y"])
    if config.mode == "roi" and x is not None and y is not None:
        half = (0.75 * config.roi_mm / image.pixel_spacing[1], 0.75 * config.roi_mm / image.pixel_spacing[0])
        left, top = max(0, int(x - half[0])), max(0, int(y - half[1]))
        right, bottom = min(width, int(math.ceil(x + half[0])) + 1), min(height, int(math.ceil(y + half[1])) + 1)
    else:
        left, top, right, bottom = 0, 0, width, height
        x = y = None

    def crop(img: DicomImage) -> str:
        return base64.b64encode(encode_dicom(img.pixels[top:bottom, left:right], img.pixel_spacing)).decode("ascii")

    row: dict[str, Any] = {"dicom_b64": crop(image)}
    if x is not None:
        row.update(x=x - left, y=y - top)
    if isinstance(sample.get("condition"), str) and isinstance(sample.get("level"), str):
        row.update(condition=sample["condition"], level=sample["level"])  # the site the row grades
    if config.slices > 1 and len(neighbours) == config.slices - 1:
        row["neighbors_b64"] = [crop(read_image(p, voi=config.dicom_window)) for p in neighbours]
    return row


def log_classifier(model, meta: dict, example: dict[str, Any], pip_requirements: list[str]):
    """Log the Keras model as a pyfunc with its preprocessing, signature and a request-row input example."""
    classifier = SpineClassifier()
    classifier.model, classifier.meta = model, meta
    example_frame = pd.DataFrame([example])
    signature = ModelSignature(inputs=INPUT_SCHEMA,
                               outputs=_output_schema(classifier.predict(None, example_frame)))
    return log_keras_pyfunc(SpineClassifier(), model, meta, signature=signature, input_example=example_frame,
                            pip_requirements=pip_requirements)


def series_from_b64(values: Sequence) -> SeriesStack:
    """Base64 DICOM files of one series (a request's rows, any order) -> a stack ordered along the slice normal."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for k, value in enumerate(values):
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError, TypeError) as exc:
                raise InputError(f"row {k}: dicom_b64 is not valid base64 ({exc})") from None
            try:
                decode_dicom_bytes(data, f"row {k}: dicom_b64")
            except ImageReadError as exc:
                raise InputError(f"row {k}: dicom_b64 {exc.reason}") from None
            path = Path(tmp) / f"{k:06d}.dcm"
            path.write_bytes(data)
            paths.append(path)
        try:
            stack = read_series(paths)
            return dataclasses.replace(stack, pixels=np.asarray(stack.pixels))  # decoded before the files go
        except ImageReadError as exc:
            raise InputError(f"the series cannot be stacked: {exc.reason}") from None


def _output_schema(frame: pd.DataFrame) -> Schema:
    return Schema([ColSpec(DataType.double if pd.api.types.is_float_dtype(frame[c]) else DataType.string, c)
                   for c in frame.columns])


def _as_frame(model_input) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, Mapping):  # one row, or columns when the image column holds a list
        columns = any(isinstance(model_input.get(c), (list, tuple)) for c in IMAGE_COLUMNS)
        frame = pd.DataFrame(model_input) if columns else pd.DataFrame([model_input])
    elif isinstance(model_input, list) and all(isinstance(r, Mapping) for r in model_input):
        frame = pd.DataFrame(model_input)
    else:
        raise InputError(f"expected a table with a dicom_b64 or image_b64 column, got {type(model_input).__name__}")
    if not any(c in frame.columns for c in IMAGE_COLUMNS):
        raise InputError(f"missing column: give dicom_b64 (a base64 DICOM file) or image_b64 (a base64 PNG/JPEG) "
                         f"in every row; got columns {list(map(str, frame.columns)) or 'none'}")
    if len(frame) == 0:
        raise InputError("the request has no rows; send one row per image with a dicom_b64 or image_b64 column")
    return frame


def _site_column(frame: pd.DataFrame, column: str, parse, allowed: str) -> list[str] | None:
    """An optional text column naming each row's site (``condition`` or ``level``), each value ``parse``d;
    "" where a row leaves it blank, None when the column is absent; InputError names a bad row."""
    if column not in frame.columns:
        return None
    names = []
    for index, value in enumerate(frame[column]):
        if not _present(value):
            names.append("")
            continue
        name = parse(value) if isinstance(value, str) else None
        if name is None:
            raise InputError(f"row {index}: {column} {value!r} is not one of {allowed}")
        names.append(name)
    return names


def _conditions(frame: pd.DataFrame) -> list[str] | None:
    """The optional ``condition`` column (what each site's severity grades), checked; None when absent."""
    return _site_column(frame, "condition", condition_key,
                        f"{', '.join(CONDITIONS)} (or their names in train_label_coordinates.csv; leave it out "
                        "when unknown)")


def _levels(frame: pd.DataFrame) -> list[str] | None:
    """The optional ``level`` column (the level of each row's site), checked; None when absent."""
    return _site_column(frame, "level", level_name, ", ".join(LEVELS))


def _require_sites(frame: pd.DataFrame, conditions: list[str] | None, levels: list[str] | None) -> None:
    """A per-site model's request: every row names its site, or InputError names the first that does not."""
    for index in range(len(frame)):
        condition = conditions[index] if conditions else ""
        level = levels[index] if levels else ""
        if not condition or not level:
            missing = " and ".join(name for name, given in (("condition", condition), ("level", level)) if not given)
            raise InputError(f"row {index}: no {missing}; this model grades the site a row names (it was trained "
                             f"on images that show several sites): give condition (one of {', '.join(CONDITIONS)}) "
                             f"and level (one of {', '.join(LEVELS)}), e.g. condition "
                             "left_neural_foraminal_narrowing, level L4/L5")


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    if isinstance(value, (list, tuple, np.ndarray)):
        return len(value) > 0
    return not (isinstance(value, str) and value == "")


def _decode(value, column: str, index: int, config: PreprocessConfig) -> DicomImage:
    name = f"row {index}: {column}"
    if not isinstance(value, (str, bytes)):
        raise InputError(f"{name} must be a base64 string, got {type(value).__name__}")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{name} is not valid base64 ({exc})") from None
    try:
        if column == "image_b64" or (column.startswith("neighbors") and not _looks_like_dicom(data)):
            return decode_bitmap_bytes(data, name)
        return decode_dicom_bytes(data, name, voi=config.dicom_window)
    except ImageReadError as exc:
        raise InputError(f"{name} {exc.reason}") from None


def _looks_like_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def _coordinate(row: Mapping[str, Any], key: str, index: int) -> float | None:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"row {index}: {key} must be a number of pixels, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"row {index}: {key} must be a number of pixels, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"row {index}: {key} must be finite, got {value!r}")
    return number
