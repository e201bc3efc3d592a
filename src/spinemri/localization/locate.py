"""From a localizer's outputs on every slice of a study's series to one site per (condition, level).

For each slice group the slice with the highest score over all series of the type wins (a study
with two axial series is searched as one); each point is read from the winning slice of its group
and mapped back to that slice's pixels. The same code serves evaluation (on cached slices), the
``predict-study`` command and the served study model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from spinemri.data.dicom import SeriesStack
from spinemri.data.preprocess import PreprocessConfig
from spinemri.localization.dataset import series_inputs, stack_positions
from spinemri.localization.sites import SeriesTask, SliceFrame, get_task
from spinemri.tracking.pyfunc import InputError, KerasWithMeta, load_python_model, log_keras_pyfunc, series_from_b64


@dataclass(frozen=True)
class SeriesSlices:
    """One series as the localizer saw it: its slices in position order and their frame."""

    series_id: int
    instance_numbers: tuple[int, ...]
    frame: SliceFrame


@dataclass(frozen=True)
class Site:
    condition: str
    level: str
    series_id: int
    instance_number: int
    slice_index: int  # position of the slice in its series (0 = first along the normal)
    x: float  # pixels of that slice
    y: float
    slice_score: float


def choose_sites(task: SeriesTask, series: Sequence[SeriesSlices], points: Sequence[np.ndarray],
                 scores: Sequence[np.ndarray]) -> list[Site]:
    """``points[k]`` (n_k, P, 2) and ``scores[k]`` (n_k, G) are the outputs on series k's slices."""
    sites = []
    for condition, level, group, point in task.sites:
        best = None
        for k, info in enumerate(series):
            if len(scores[k]) == 0:
                continue
            i = int(np.argmax(scores[k][:, group]))
            if best is None or scores[k][i, group] > best[2]:
                best = (k, i, float(scores[k][i, group]))
        if best is None:
            continue
        k, i, score = best
        x, y = series[k].frame.to_pixels(*points[k][i, point])
        sites.append(Site(condition, level, series[k].series_id, int(series[k].instance_numbers[i]), i,
                          float(x), float(y), score))
    return sites


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

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """Rows with ``dicom_b64``: every slice of one series -> one row per site found."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "dicom_b64" not in frame.columns or frame.empty:
            raise InputError("send one row per slice of a series, each with a dicom_b64 column (a base64 DICOM file)")
        stack = series_from_b64(list(frame["dicom_b64"]))
        return pd.DataFrame([asdict(s) for s in self.locate([(0, stack)])])


def register_layers() -> None:
    """Make the localizer's own Keras layers known to Keras, to load a saved localizer.

    Imported here, when a model is loaded, rather than with this module: reading sites and
    errors needs no TensorFlow.
    """
    from spinemri.localization import model  # noqa: F401 - defining its layers registers them


def log_localizer(model, meta: dict, pip_requirements: list[str]):
    """Log a trained localizer as a pyfunc model (Keras file + meta.json + the spinemri package)."""
    return log_keras_pyfunc(SpineLocalizer(), model, meta, pip_requirements=pip_requirements)


def load_localizer(model_uri: str) -> SpineLocalizer:
    return load_python_model(model_uri, SpineLocalizer, "localizer",
                             "train one with `spinemri train --task localize --series SERIES`; a classifier "
                             "goes to --classifier")


def point_errors(sites: Sequence[Site], truth: pd.DataFrame, frames: dict[tuple[int, int], SliceFrame],
                 positions: dict[tuple[int, int, int], int]) -> pd.DataFrame:
    """One row per labelled point of ``truth`` (one study): the found site's slice and in-plane error.

    ``frames[(study, series)]`` and ``positions[(study, series, instance)]`` describe the series.
    ``error_mm`` is measured on the labelled slice's frame; it is NaN when the site was found on
    another series (a study with two axial series) or not at all, and ``slice_ok`` is then False.
    """
    found = {(s.condition, s.level): s for s in sites}
    rows = []
    for point in truth.itertuples(index=False):
        site = found.get((point.condition, point.level))
        key = (point.study_id, point.series_id)
        same_series = site is not None and site.series_id == point.series_id and key in frames
        error = slice_off = math.nan
        if same_series:
            error = float(frames[key].distance_mm(site.x, site.y, point.x, point.y))
            true_position = positions.get((point.study_id, point.series_id, int(point.instance_number)))
            if true_position is not None:
                slice_off = abs(site.slice_index - true_position)
        rows.append(dict(study_id=point.study_id, condition=point.condition, level=point.level,
                         error_mm=error, slices_off=slice_off,
                         slice_ok=bool(same_series and not math.isnan(slice_off) and slice_off <= 1)))
    return pd.DataFrame(rows)


def error_terms(errors: pd.DataFrame) -> pd.DataFrame:
    """The mean point error taken apart by study (``study_id``, ``point_error_mm:sum``, ``:weight`` = points
    measured): what a paired comparison of two localizers on the same studies resamples."""
    measured = errors["error_mm"].notna()
    table = pd.DataFrame({"study_id": errors["study_id"].astype(str),
                          "point_error_mm:sum": errors["error_mm"].where(measured, 0.0).astype(float),
                          "point_error_mm:weight": measured.astype(float)})
    return table.groupby("study_id", as_index=False).sum()


def summarize_errors(errors: pd.DataFrame) -> dict[str, float]:
    """Mean/median point error (mm), shares within 5 and 10 mm, slice accuracy (within one slice) and the share
    of points found on their very slice (``slice_exact``)."""
    measured = errors["error_mm"].dropna()
    n = max(len(errors), 1)
    return {
        "point_error_mm": float(measured.mean()) if len(measured) else math.nan,
        "point_error_mm_median": float(measured.median()) if len(measured) else math.nan,
        "within_5mm": float((measured <= 5).sum() / n),
        "within_10mm": float((measured <= 10).sum() / n),
        "slice_accuracy": float(errors["slice_ok"].sum() / n),
        "slice_exact": float((errors["slices_off"] == 0).sum() / n) if "slices_off" in errors else math.nan,
        "points": float(len(errors)),
    }
