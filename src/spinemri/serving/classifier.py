"""The logged and served classifier: an MLflow pyfunc that takes DICOM (or PNG/JPEG) files and names its outputs
by class.

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
``severity``, one probability column per class, ``<head>:<class>`` (e.g. ``severity:Moderate``), and, for a
model that carries referral thresholds (``meta.json`` ``operating_points``), ``refer``: whether the row's
finding is referred at them (spinemri.metrics.operating).

The input kinds are :data:`spinemri.serving.inputs.INPUT_KINDS`; a request is checked by
:mod:`spinemri.serving.requests`, where a bad row raises ``InputError`` (HTTP 400) naming the row, the
column and the problem.
"""

from __future__ import annotations

import base64
import math
from typing import Any, Mapping, Sequence

from mlflow.models import ModelSignature
import numpy as np
import pandas as pd

from spinemri.data.dicom import DicomImage, encode_dicom, read_image
from spinemri.data.preprocess import PreprocessConfig, preprocess, with_centre
from spinemri.data.schema import CONDITIONS, HEAD_CLASSES, LEVELS, site_indices
from spinemri.metrics import operating
from spinemri.models.calibration import Temperatures
from spinemri.models.severity import severity_at
from spinemri.serving.inputs import IMAGE_COLUMNS, decode_value
from spinemri.serving.mlflow_model import KerasWithMeta, load_python_model, log_keras_pyfunc
from spinemri.serving.requests import (INPUT_SCHEMA, InputError, coordinate, output_schema, present,
    probabilities_frame, request_frame, require_sites, row_conditions, row_levels)


class SpineClassifier(KerasWithMeta):

    @property
    def preprocessing(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.meta["preprocess"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame = request_frame(model_input)
        conditions, levels = row_conditions(frame), row_levels(frame)
        if self.per_site:
            require_sites(frame, conditions, levels)
        images = np.stack([self.prepare_row(row, i) for i, row in enumerate(frame.to_dict("records"))])
        return self.answer(self.predict_images(images, conditions=conditions, levels=levels), conditions)

    def answer(self, proba: Mapping[str, np.ndarray], conditions: Sequence | None = None) -> pd.DataFrame:
        """The response rows for these probabilities: the classes, one column per class and, for a model that
        carries referral thresholds, ``refer`` (:meth:`refer`)."""
        out = probabilities_frame(proba)
        if self.meta.get("operating_points"):
            out["refer"] = self.refer(proba["severity"], conditions, out["condition"])
        return out

    def refer(self, severity: np.ndarray, conditions: Sequence | None, predicted: Sequence) -> np.ndarray:
        """The referral flag per row (spinemri.metrics.operating.refer) at the thresholds the model carries, for
        the condition the row names, else the one the model predicts (``healthy``: not referred)."""
        named = list(conditions) if conditions is not None else [None] * len(predicted)
        graded = [c if isinstance(c, str) and c in CONDITIONS else p for c, p in zip(named, predicted)]
        return operating.refer(self.meta["operating_points"], graded, severity)

    @property
    def per_site(self) -> bool:
        """Whether the model grades the site a row names (a per-site severity output)."""
        return self.meta.get("severity_head") == "per_site"

    def prepare_row(self, row: Mapping[str, Any], index: int) -> np.ndarray:
        """One request row -> the model input uint8 (S, S, C); InputError names the row and column."""
        config = self.preprocessing
        given = [c for c in IMAGE_COLUMNS if present(row.get(c))]
        if len(given) != 1:
            found = ", ".join(sorted(str(k) for k in row)) or "none"
            what = "both" if given else "neither"
            raise InputError(f"row {index}: give exactly one of the columns dicom_b64 (a base64 DICOM file) or "
                             f"image_b64 (a base64 PNG/JPEG); got {what} (columns: {found})")
        column = given[0]
        centre = decode_value(row[column], column, index, config)
        neighbours = None
        if config.slices > 1 and present(row.get("neighbors_b64")):
            values = row["neighbors_b64"]
            if isinstance(values, str) or len(values) != config.slices - 1:
                shown = type(values).__name__ if isinstance(values, str) else f"{len(values)} files"
                raise InputError(f"row {index}: neighbors_b64 must be a list of {config.slices - 1} base64 files, "
                                 f"the neighbouring slices in order ({'[previous, next]' if config.slices == 3 else 'lower first'}) "
                                 f"for this {config.slices}-slice model, got {shown}")
            neighbours = [decode_value(v, f"neighbors_b64[{k}]", index, config) for k, v in enumerate(values)]
        x, y = coordinate(row, "x", index), coordinate(row, "y", index)
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
                               outputs=output_schema(classifier.predict(None, example_frame)))
    return log_keras_pyfunc(SpineClassifier(), model, meta, signature=signature, input_example=example_frame,
                            pip_requirements=pip_requirements)
