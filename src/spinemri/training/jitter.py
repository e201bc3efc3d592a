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
series type) or, with ``train.site_jitter_from`` (e.g. ``models:/spinemri-localizer``), from the
held-out metrics of the localizer runs behind its aliases ``sagittal_t2``, ``sagittal_t1`` and
``axial_t2``. Validation and test crops are never moved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from spinemri.config import ExperimentConfig
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


def site_jitter(config: ExperimentConfig) -> SiteJitter | None:
    """The jitter ``config`` asks for, or None; ConfigError where it cannot apply."""
    cfg = config.train
    if not (cfg.site_jitter_from or cfg.site_jitter_mm > 0 or cfg.site_jitter_slices > 0):
        return None
    if config.preprocess.mode != "roi":
        raise ConfigError("train.site_jitter_* moves ROI crops; preprocess.mode slice has no site to move "
                          "(set the jitter to 0 or use mode roi)")
    if cfg.site_jitter_from:
        jitter = from_localizers(cfg.site_jitter_from)
    else:
        jitter = SiteJitter({d: cfg.site_jitter_mm for d in SERIES_TYPES.values()},
                            {d: cfg.site_jitter_slices for d in SERIES_TYPES.values()}, "config")
    if config.preprocess.slices == 1 and any(p > 0 for p in jitter.slice_move.values()):
        print(f"site jitter: a 1-slice crop cannot move across slices; only in-plane jitter applies "
              f"({jitter.source})", flush=True)
        jitter = SiteJitter(jitter.sigma_mm, {d: 0.0 for d in jitter.slice_move}, jitter.source)
    return jitter


def from_localizers(model: str) -> SiteJitter:
    """σ and slice-move chance per series type from the held-out metrics of the runs behind a registered
    localizer's aliases (``models:/spinemri-localizer`` or the bare name)."""
    name = model.removeprefix("models:/").split("@")[0].split("/")[0]
    client = mlflow.MlflowClient()
    sigma, move, found = {}, {}, []
    for series, description in SERIES_TYPES.items():
        try:
            version = client.get_model_version_by_alias(name, series)
        except MlflowException:
            continue
        metrics = client.get_run(version.run_id).data.metrics
        error, exact = metrics.get(f"test_{series}_point_error_mm"), metrics.get(f"test_{series}_slice_exact")
        if error is None or not math.isfinite(error):
            raise ConfigError(f"train.site_jitter_from: the {series} localizer (version {version.version} of {name}) "
                              f"logged no test_{series}_point_error_mm; retrain it with this version of spinemri")
        sigma[description] = float(error) / _MEAN_RADIUS
        move[description] = 0.0 if exact is None or not math.isfinite(exact) else float(1.0 - exact)
        found.append(f"{series} v{version.version}")
    if not found:
        raise ConfigError(f"train.site_jitter_from: {model!r} has none of the aliases {', '.join(SERIES_TYPES)} in "
                          f"{mlflow.get_tracking_uri()}; train the localizers first, or set train.site_jitter_mm")
    return SiteJitter(sigma, move, f"{name} ({', '.join(found)})")
