"""The served two-stage study model: a zipped DICOM study in, its 25 submission rows out.

Request rows: ``study_zip_b64`` (a base64 zip of one study's DICOM files, any folder layout) and
optionally ``study_id`` (else the archive's top folder). Response: 25 rows per study with
``row_id, normal_mild, moderate, severe``, ``source`` (``model``, or ``prior`` where nothing
could be seen: see :mod:`spinemri.serving.study_predictor`) and, when the classifier carries referral
thresholds, ``refer`` (whether the finding is referred at them). The model bundles each localizer's and the
classifier's Keras file and meta.json; :func:`spinemri.study.package.package_study` logs and registers it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from pathlib import Path
import tempfile

import mlflow
from mlflow.types import ColSpec, DataType, Schema
import pandas as pd

from spinemri.data.studies import study_from_zip
from spinemri.errors import ImageReadError, StudyError
from spinemri.localization.locate import register_layers
from spinemri.quiet import start_tensorflow
from spinemri.serving.classifier import SpineClassifier
from spinemri.serving.inputs import InputError
from spinemri.serving.localizer import SpineLocalizer
from spinemri.serving.mlflow_model import check_settings_at_load, guard_scoring_server
from spinemri.serving.study_predictor import StudyPredictor

INPUT_SCHEMA = Schema([ColSpec(DataType.string, "study_zip_b64"), ColSpec(DataType.string, "study_id", required=False)])


OUTPUT_SCHEMA = Schema([ColSpec(DataType.string, "row_id"), ColSpec(DataType.double, "normal_mild"),
                        ColSpec(DataType.double, "moderate"), ColSpec(DataType.double, "severe"),
                        ColSpec(DataType.string, "source"), ColSpec(DataType.boolean, "refer", required=False)])


REGISTERED_MODEL = "spinemri-study"


class SpineStudyModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        start_tensorflow()  # quietly: no CUDA start-up lines in a server without a GPU
        import keras

        check_settings_at_load()
        guard_scoring_server()
        register_layers()

        def part(cls, key):
            obj = cls()
            obj.model = keras.models.load_model(context.artifacts[f"{key}_keras"], compile=False)
            obj.meta = json.loads(Path(context.artifacts[f"{key}_meta"]).read_text())
            return obj

        manifest = json.loads(Path(context.artifacts["manifest"]).read_text())
        localizers = {name: part(SpineLocalizer, f"localizer_{name}") for name in manifest["localizers"]}
        self.predictor = StudyPredictor(localizers, part(SpineClassifier, "classifier"), manifest["prior"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(
            [model_input] if isinstance(model_input, dict) else model_input)
        if "study_zip_b64" not in frame.columns or frame.empty:
            raise InputError("send one row per study with a study_zip_b64 column (a base64 zip of its DICOM files) "
                             f"and optionally study_id; got columns {list(map(str, frame.columns)) or 'none'}")
        out = []
        for index, row in enumerate(frame.to_dict("records")):
            value = row.get("study_zip_b64")
            if not isinstance(value, str) or not value:
                raise InputError(f"row {index}: study_zip_b64 must be a non-empty base64 string")
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise InputError(f"row {index}: study_zip_b64 is not valid base64 ({exc})") from None
            study_id = row.get("study_id")
            study_id = None if study_id is None or (isinstance(study_id, float) and math.isnan(study_id)) else str(study_id)
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    study = study_from_zip(data, study_id, Path(tmp), name=f"row {index}: study_zip_b64")
                    prediction = self.predictor.predict(study)
                except StudyError as exc:
                    raise InputError(str(exc)) from None
                except ImageReadError as exc:  # only a file over a size limit gets here: the rest fall back
                    raise InputError(f"row {index}: study_zip_b64: {exc.reason}") from None
            extra = [c for c in ("source", "refer") if c in prediction.sites]
            out.append(prediction.rows.assign(**{c: prediction.sites[c].to_numpy() for c in extra}))
        return pd.concat(out, ignore_index=True)
