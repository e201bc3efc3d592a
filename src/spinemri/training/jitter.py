"""Training crops moved the way stage 1 errs: site jitter for the ROI classifier.

The classifier trains on crops at the *labelled* sites, but in a study it grades crops at the sites
the localizers *found*, a few millimetres (and sometimes a slice) away. Jitter moves each training
crop the way the localizer of its series type errs, so that grading at predicted sites degrades
less:

- **in plane**: a random shift of the crop, each axis drawn from a normal distribution whose
  standard deviation is ``σ = E / sqrt(π/2)`` for a localizer with mean point error ``E`` (that is
  the σ of an isotropic 2D normal whose mean distance from the centre is ``E``), converted to pixels
  of the crop (``img_size / roi_mm`` per mm); the border it uncovers is zero, as outside an image;
- **across slices**: with the probability that the localizer misses the labelled slice
  (``1 - test_<s>_slice_exact``), the 2.5D stack moves one slice up or down, its edge slice repeated
  (the stack holds only ``preprocess.slices`` slices); a stack of one slice cannot move.

The numbers come from ``train.site_jitter_mm`` / ``train.site_jitter_slices`` (the same for every
series type) or, with ``train.site_jitter_from``, from localizers' held-out metrics: those of the
runs behind a registered localizer's aliases ``sagittal_t2``, ``sagittal_t1`` and ``axial_t2``
(``models:/spinemri-localizer``), or of localizer runs named ``runs:/<id>,runs:/<id>,...`` — a
localizer cross-validation's out-of-fold errors are the truest measure of how stage 1 errs. Validation and test crops are never moved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from spinemri.config import PreprocessConfig, TrainConfig
from spinemri.data.schema import SERIES_TYPES
from spinemri.errors import ConfigError

_MEAN_RADIUS = math.sqrt(math.pi / 2)  # mean distance from the centre of a 2D normal, in units of its σ


@dataclass(frozen=True)
class SiteJitter:
    """Per series description: σ of the in-plane shift per axis (mm) and the chance of a one-slice move."""

    sigma_mm: dict[str, float]
    slice_move: dict[str, float]
    source: str

    def per_sample(self, samples: pd.DataFrame, pixels_per_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """σ in crop pixels and the slice-move probability of each sample (float32 arrays)."""
        series = samples["series_description"].astype(str)
        sigma = series.map(self.sigma_mm).fillna(0.0).to_numpy(np.float32) * np.float32(pixels_per_mm)
        move = series.map(self.slice_move).fillna(0.0).to_numpy(np.float32)
        return sigma, move

    def params(self) -> dict[str, object]:
        out: dict[str, object] = {"site_jitter.source": self.source}
        for name, description in SERIES_TYPES.items():
            out[f"site_jitter.{name}_sigma_mm"] = round(self.sigma_mm.get(description, 0.0), 4)
            out[f"site_jitter.{name}_slice_move"] = round(self.slice_move.get(description, 0.0), 4)
        return out


def site_jitter(train: TrainConfig, preprocess: PreprocessConfig) -> SiteJitter | None:
    """The jitter the training settings ask for, or None; ConfigError where it cannot apply (``preprocess``)."""
    cfg = train
    if not (cfg.site_jitter_from or cfg.site_jitter_mm > 0 or cfg.site_jitter_slices > 0):
        return None
    if preprocess.mode != "roi":
        raise ConfigError("train.site_jitter_* moves ROI crops; preprocess.mode slice has no site to move "
                          "(set the jitter to 0 or use mode roi)")
    if cfg.site_jitter_from:
        jitter = from_localizers(cfg.site_jitter_from)
    else:
        jitter = SiteJitter({d: cfg.site_jitter_mm for d in SERIES_TYPES.values()},
                            {d: cfg.site_jitter_slices for d in SERIES_TYPES.values()}, "config")
    if preprocess.slices == 1 and any(p > 0 for p in jitter.slice_move.values()):
        print(f"site jitter: a 1-slice crop cannot move across slices; only in-plane jitter applies "
              f"({jitter.source})", flush=True)
        jitter = SiteJitter(jitter.sigma_mm, {d: 0.0 for d in jitter.slice_move}, jitter.source)
    return jitter


def from_localizers(source: str) -> SiteJitter:
    """σ and slice-move chance per series type from localizers' held-out metrics: those of the runs behind a
    registered localizer's aliases (``models:/spinemri-localizer`` or the bare name), or of localizer runs
    given as ``runs:/<id>`` separated by commas (a cross-validation's out-of-fold ``cv_<s>_...`` numbers,
    a single run's ``test_<s>_...``)."""
    if source.strip().startswith("runs:/"):
        return _from_runs([part.strip() for part in source.split(",") if part.strip()])
    name = source.removeprefix("models:/").split("@")[0].split("/")[0]
    client = mlflow.MlflowClient()
    sigma, move, found = {}, {}, []
    for series, description in SERIES_TYPES.items():
        try:
            version = client.get_model_version_by_alias(name, series)
        except MlflowException:
            continue
        where = f"the {series} localizer (version {version.version} of {name})"
        metrics = client.get_run(version.run_id).data.metrics
        sigma[description], move[description] = _localizer_error(metrics, series, "test", where)
        found.append(f"{series} v{version.version}")
    if not found:
        raise ConfigError(f"train.site_jitter_from: {source!r} has none of the aliases {', '.join(SERIES_TYPES)} in "
                          f"{mlflow.get_tracking_uri()}; train the localizers first, or set train.site_jitter_mm")
    return SiteJitter(sigma, move, f"{name} ({', '.join(found)})")


def _from_runs(uris: list[str]) -> SiteJitter:
    client = mlflow.MlflowClient()
    sigma, move, found = {}, {}, []
    for uri in uris:
        run_id = uri.removeprefix("runs:/").strip("/").split("/")[0]
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ConfigError(f"train.site_jitter_from: no run {run_id} in {mlflow.get_tracking_uri()}") from None
        series = run.data.tags.get("localize.series")
        if series not in SERIES_TYPES:
            raise ConfigError(f"train.site_jitter_from: run {run_id} is not a localizer run (no localize.series tag)")
        if SERIES_TYPES[series] in sigma:
            raise ConfigError(f"train.site_jitter_from: two runs for {series}; give one per series type")
        role = run.data.tags.get("role")
        if role == "fold":
            raise ConfigError(f"train.site_jitter_from: run {run_id} is one fold of a localizer cross-validation; "
                              f"give its parent run ({run.data.tags.get('mlflow.parentRunId', 'the role=cv run')}), "
                              "whose errors cover every fold")
        prefix = "cv" if role == "cv" else "test"
        sigma[SERIES_TYPES[series]], move[SERIES_TYPES[series]] = _localizer_error(
            run.data.metrics, series, prefix, f"localizer run {run_id}")
        found.append(f"{series} {prefix} run {run_id[:8]}")
    missing = [name for name, description in SERIES_TYPES.items() if description not in sigma]
    if missing:
        print(f"site jitter: no localizer run for {', '.join(missing)}: those crops are not moved", flush=True)
    return SiteJitter(sigma, move, ", ".join(found))


def _localizer_error(metrics: dict[str, float], series: str, prefix: str, where: str) -> tuple[float, float]:
    """(σ mm, slice-move chance) from ``<prefix>_<series>_point_error_mm`` and ``_slice_exact``."""
    error, exact = metrics.get(f"{prefix}_{series}_point_error_mm"), metrics.get(f"{prefix}_{series}_slice_exact")
    if error is None or not math.isfinite(error):
        raise ConfigError(f"train.site_jitter_from: {where} logged no {prefix}_{series}_point_error_mm; retrain it "
                          "with this version of spinemri")
    return float(error) / _MEAN_RADIUS, 0.0 if exact is None or not math.isfinite(exact) else float(1.0 - exact)
