"""From a localizer's outputs on every slice of a study's series to one site per (condition, level).

For each slice group the slice with the highest score over all series of the type wins (a study
with two axial series is searched as one); each point is read from the winning slice of its group
and mapped back to that slice's pixels. The same code serves evaluation (on cached slices), the
``predict-study`` command and the served localizer and study model (spinemri.serving).
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Sequence

import numpy as np
import pandas as pd

from spinemri.localization.sites import SeriesTask, SliceFrame


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


def register_layers() -> None:
    """Make the localizer's own Keras layers known to Keras, to load a saved localizer.

    Imported here, when a model is loaded, rather than with this module: reading sites and
    errors needs no TensorFlow.
    """
    from spinemri.localization import model  # noqa: F401 - defining its layers registers them


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
