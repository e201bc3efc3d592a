"""Which way is better for a metric: decided here, and only here, from the metric's name.

The registry's champion policy, Optuna's study direction, early stopping, the best checkpoint and
every report read it from :func:`metric_goal`.
"""

from __future__ import annotations

import math
from typing import Iterable

# Name parts of the metrics where lower is better: losses, errors, calibration error, the competition score.
_LOWER_IS_BETTER = ("loss", "error", "ece", "rsna_score")


def metric_goal(metric: str) -> str:
    """'minimize' for losses and errors (``val_loss``, ``test_severity_weighted_log_loss``,
    ``val_point_error_mm``, ``test_rsna_score``, ``ece``), else 'maximize' (accuracy, ROC-AUC, F1, ...)."""
    lowered = metric.lower()
    return "minimize" if any(part in lowered for part in _LOWER_IS_BETTER) else "maximize"


def lower_is_better(metric: str) -> bool:
    return metric_goal(metric) == "minimize"


def keras_mode(metric: str) -> str:
    """'min' or 'max', for Keras callbacks watching ``metric`` (Keras cannot tell for e.g. val_severity_loss)."""
    return "min" if lower_is_better(metric) else "max"


def best_value(values: Iterable[float], metric: str) -> float:
    """The best finite value a metric reached (NaN if none)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan")
    return min(finite) if lower_is_better(metric) else max(finite)


def is_better(value: float, than: float, metric: str) -> bool:
    return value < than if lower_is_better(metric) else value > than
