"""Test-set metrics per head, computed with scikit-learn on the labelled rows only."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, classification_report, f1_score, log_loss, precision_score,
                             recall_score, roc_auc_score)

from spinemri.training.data import SEVERITY_WEIGHTS

METRICS = ("accuracy", "loss", "roc_auc", "f1_macro", "precision_macro", "recall_macro")


def head_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """accuracy, loss (cross-entropy), roc_auc (macro one-vs-rest), f1/precision/recall (macro).

    Rows with y_true < 0 (unknown) are left out. ROC-AUC averages over the classes that have
    both positive and negative rows (NaN if none has); the macro scores average over the
    classes present in y_true or in the predictions.
    """
    keep = y_true >= 0
    y, p = y_true[keep], proba[keep]
    if len(y) == 0:
        return {name: float("nan") for name in METRICS}
    n_classes = p.shape[1]
    predicted = p.argmax(axis=1)
    aucs = [roc_auc_score(y == k, p[:, k]) for k in range(n_classes) if 0 < (y == k).sum() < len(y)]
    return {
        "accuracy": float(accuracy_score(y, predicted)),
        "loss": float(log_loss(y, np.clip(p, 1e-7, 1), labels=list(range(n_classes)))),
        "roc_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "f1_macro": float(f1_score(y, predicted, average="macro", zero_division=0)),
        "precision_macro": float(precision_score(y, predicted, average="macro", zero_division=0)),
        "recall_macro": float(recall_score(y, predicted, average="macro", zero_division=0)),
    }


def weighted_log_loss(severity: np.ndarray, proba: np.ndarray) -> float:
    """The competition's severity loss: log loss with sample weights 1/2/4 (Normal/Mild, Moderate, Severe)."""
    keep = severity >= 0
    y, p = severity[keep], np.clip(proba[keep], 1e-15, 1)
    if len(y) == 0:
        return float("nan")
    p = p / p.sum(axis=1, keepdims=True)
    weights = SEVERITY_WEIGHTS[y]
    return float(-(weights * np.log(p[np.arange(len(y)), y])).sum() / weights.sum())


def report(y_true: np.ndarray, proba: np.ndarray, class_names) -> str:
    keep = y_true >= 0
    return classification_report(y_true[keep], proba[keep].argmax(axis=1), labels=list(range(len(class_names))),
                                 target_names=list(class_names), zero_division=0)
