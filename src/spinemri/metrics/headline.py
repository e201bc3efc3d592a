"""The few numbers a run is judged by, picked from its metrics by name: what a training's summary prints
and what its run page opens on.

MLflow's run page groups its charts by the part of a metric's name before the last ``/`` and shows the
groups in alphabetical order, those without one last; a run logs a rounded copy of each headline metric
as ``headline/<name>``, so that its page opens on them and everything else follows, folded away.
"""

from __future__ import annotations

from collections.abc import Mapping
import math

from spinemri.data.schema import HEADS

GROUP = "headline"  # the run page's first group of charts
DIGITS = 4  # a headline value as the UI shows it; the metric itself keeps every digit
SPLITS = ("test", "cv", "fold", "val")  # the held-out split a run is judged on: the first it has metrics for
JUDGED = ("severity_weighted_log_loss", "rsna_score")  # each shown beside the floor's value
POINT_ERROR = "_point_error_mm"  # a localizer's, shown beside its mean-position baseline's


def judged_split(metrics: Mapping[str, float]) -> str | None:
    """The split whose metrics a run is judged by: test, else cv (out of fold), else fold (a fold's run), else
    val; None without any."""
    return next((s for s in SPLITS if any(k.startswith(f"{s}_") for k in metrics)), None)


def floor_name(name: str, split: str) -> str:
    """The floor's value of a model metric: ``test_rsna_score`` → ``test_floor_rsna_score``."""
    return name.replace(f"{split}_", f"{split}_floor_", 1)


def baseline_name(name: str) -> str:
    """The mean-position baseline of a localizer's point error."""
    return name.removesuffix(POINT_ERROR) + "_baseline" + POINT_ERROR


def headline(metrics: Mapping[str, float], champion_metric: str | None = None) -> dict[str, float]:
    """The headline metrics in ``metrics``, in the order they are shown. A classifier's, on its judged split:
    the severity-weighted log loss and the RSNA score each followed by the floor's value, the difference to
    the floor (``<split>_vs_floor``), the champion metric when it is another, each head's ROC-AUC. A
    localizer's: each point error followed by its mean-position baseline. Names missing from ``metrics``
    are left out, and so are values that are not finite."""
    split = judged_split(metrics)
    names: list[str] = []
    if split is not None:
        for metric in JUDGED:
            names += [f"{split}_{metric}", floor_name(f"{split}_{metric}", split)]
        names.append(f"{split}_vs_floor")
        if champion_metric:
            names.append(champion_metric)
        names += [f"{split}_{head}_roc_auc" for head in HEADS]
    for name in sorted(k for k in metrics if k.endswith(POINT_ERROR) and "_baseline_" not in k):
        names += [name, baseline_name(name)]
    return {name: float(metrics[name]) for name in dict.fromkeys(names) if name in metrics and math.isfinite(metrics[name])}


def headline_metrics(metrics: Mapping[str, float], champion_metric: str | None = None) -> dict[str, float]:
    """The rounded copies a run logs: ``headline/<name>`` for each of :func:`headline`."""
    return {f"{GROUP}/{name}": round(value, DIGITS) for name, value in headline(metrics, champion_metric).items()}
