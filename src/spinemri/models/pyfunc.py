"""The logged model: an MLflow pyfunc around the Keras classifier that names its outputs by class.

``predict`` takes model-ready images — float (N, S, S, C) or (S, S, C), pixel values 0..255 as
made by :func:`spinemri.data.preprocess.preprocess` — and returns one row per image: the
predicted ``condition``, ``level`` and ``severity``, and one probability column per class named
``<head>:<class>`` (e.g. ``severity:Moderate``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature

from spinemri.models.network import HEAD_CLASSES

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def probabilities_frame(outputs: dict[str, np.ndarray]) -> pd.DataFrame:
    columns: dict[str, object] = {}
    for head, classes in HEAD_CLASSES.items():
        columns[head] = [classes[i] for i in np.asarray(outputs[head]).argmax(axis=1)]
    for head, classes in HEAD_CLASSES.items():
        for k, name in enumerate(classes):
            columns[f"{head}:{name}"] = np.asarray(outputs[head])[:, k].astype(np.float64)
    return pd.DataFrame(columns)


class SpineClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import keras

        self.model = keras.models.load_model(context.artifacts["keras_model"], compile=False)
        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        images = np.asarray(model_input, dtype=np.float32)
        expected = tuple(self.meta["input_shape"])
        if images.shape == expected:
            images = images[np.newaxis]
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, expected))}), got {images.shape}")
        return probabilities_frame(self.model.predict(images, verbose=0))


def log_classifier(model, meta: dict, example: np.ndarray, pip_requirements: list[str]):
    """Log the Keras model as a pyfunc (with the .keras file, signature and input example)."""
    with tempfile.TemporaryDirectory() as tmp:
        keras_path = Path(tmp) / "model.keras"
        model.save(keras_path)
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps(meta, indent=2))
        example = example.astype(np.float32)
        signature = infer_signature(example, probabilities_frame(model.predict(example, verbose=0)))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=SpineClassifier(),
            artifacts={"keras_model": str(keras_path), "meta": str(meta_path)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements,
        )
