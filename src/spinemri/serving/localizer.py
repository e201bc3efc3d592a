"""The logged and served localizer: a Keras model of one series type and its meta.json, as an MLflow pyfunc.

Request: one row per slice of a series, each with ``dicom_b64``; answer: one row per site found
(spinemri.localization.locate.Site). The study model (spinemri.serving.study) calls :meth:`SpineLocalizer.locate`
on a study's series directly.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import numpy as np
import pandas as pd

from spinemri.data.dicom import SeriesStack
from spinemri.data.preprocess import PreprocessConfig
from spinemri.localization.dataset import series_inputs, stack_positions
from spinemri.localization.locate import SeriesSlices, Site, choose_sites, register_layers
from spinemri.localization.sites import SeriesTask, SliceFrame, get_task
from spinemri.serving.inputs import InputError, series_from_b64
from spinemri.serving.mlflow_model import KerasWithMeta, load_python_model, log_keras_pyfunc


class SpineLocalizer(KerasWithMeta):
    """A logged localizer: the Keras model and meta.json (series type, preprocessing)."""

    def load_context(self, context) -> None:
        register_layers()
        super().load_context(context)

    @property
    def task(self) -> SeriesTask:
        return get_task(self.meta["series"])

    @property
    def preprocessing(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.meta["preprocess"])

    def series_images(self, stack: SeriesStack) -> np.ndarray:
        return series_inputs(stack, self.preprocessing)

    def outputs(self, images: np.ndarray, positions: np.ndarray | None = None,
                batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Outputs on the slices of one series, given in position order; ``positions`` (n, 1) is their
        place in the study's stack (:func:`stack_positions`), by default their place in the series."""
        if len(images) == 0:
            return np.zeros((0, self.task.points, 2)), np.zeros((0, len(self.task.groups)))
        n = len(images)
        # Full batches only (padded with the last slice): one traced graph for every series length.
        pad = -n % batch_size
        images = np.asarray(images, np.float32)
        positions = stack_positions([(n, None, None)])[0] if positions is None else np.asarray(positions, np.float32)
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
            positions = np.concatenate([positions, np.repeat(positions[-1:], pad, axis=0)])
        out = self.model.predict({"image": images, "position": positions}, batch_size=batch_size, verbose=0)
        return np.asarray(out["points"])[:n], np.asarray(out["slice"])[:n]

    def locate(self, stacks: Sequence[tuple[int, SeriesStack]]) -> list[Site]:
        """Sites on a study's series of this localizer's type, given as (series_id, decoded stack).

        The series are placed in one stack (:func:`stack_positions`, in series-id order as in training)."""
        stacks = sorted(stacks, key=lambda item: int(item[0]))
        where = stack_positions([(len(stack.instance_numbers), stack.origins, stack.normal) for _, stack in stacks])
        series, points, scores = [], [], []
        for (series_id, stack), positions in zip(stacks, where):
            height, width = stack.pixels.shape[1:]
            series.append(SeriesSlices(int(series_id), tuple(stack.instance_numbers),
                                       SliceFrame(width, height, *stack.pixel_spacing)))
            p, s = self.outputs(self.series_images(stack), positions)
            points.append(p)
            scores.append(s)
        return choose_sites(self.task, series, points, scores)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Rows with ``dicom_b64``: every slice of one series -> one row per site found."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "dicom_b64" not in frame.columns or frame.empty:
            raise InputError("send one row per slice of a series, each with a dicom_b64 column (a base64 DICOM file)")
        stack = series_from_b64(list(frame["dicom_b64"]))
        return pd.DataFrame([asdict(s) for s in self.locate([(0, stack)])])


def log_localizer(model, meta: dict, pip_requirements: list[str]):
    """Log a trained localizer as a pyfunc model (Keras file + meta.json + the spinemri package)."""
    return log_keras_pyfunc(SpineLocalizer(), model, meta, pip_requirements=pip_requirements)


def load_localizer(model_uri: str) -> SpineLocalizer:
    return load_python_model(model_uri, SpineLocalizer, "localizer",
                             "train one with `spinemri train --task localize --series SERIES`; a classifier "
                             "goes to --classifier")
