"""The served ensemble: the fold models of cross-validations averaged as one classifier (its
:class:`SpineEnsemble` takes the same requests as :class:`~spinemri.serving.classifier.SpineClassifier`).
"""

from __future__ import annotations

import json
from pathlib import Path
import tempfile
from typing import Any, Sequence

import mlflow
from mlflow.models import ModelSignature
import numpy as np
import pandas as pd

from spinemri.data.schema import HEAD_CLASSES
from spinemri.models.calibration import Temperatures
from spinemri.models.severity import severity_at
from spinemri.quiet import start_tensorflow
from spinemri.serving.classifier import SpineClassifier
from spinemri.serving.mlflow_model import PACKAGE_DIR, guard_scoring_server
from spinemri.serving.requests import INPUT_SCHEMA, output_schema


class SpineEnsemble(SpineClassifier):
    """Several classifiers served as one: the same request rows, preprocessed once with the members'
    shared preprocessing, and the mean of the members' calibrated probabilities per head.

    ``meta["members"]`` lists each member (``arch``, ``run_id``, ``fold``, ``temperature``); its Keras
    file is the artifact ``member_<i>``.
    """

    def load_context(self, context) -> None:
        start_tensorflow()  # quietly: no CUDA start-up lines in a server without a GPU
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
    signature = ModelSignature(inputs=INPUT_SCHEMA, outputs=output_schema(ensemble.predict(None, example_frame)))
    with tempfile.TemporaryDirectory() as tmp:
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
