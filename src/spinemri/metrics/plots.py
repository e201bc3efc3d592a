"""Figures logged with every run: training curves, confusion matrices, ROC curves, test predictions."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from spinemri.data.schema import short_name  # noqa: E402
from spinemri.figures import grid_margins  # noqa: E402


def training_curves(history: dict[str, list[float]], heads) -> plt.Figure:
    """Loss and per-head accuracy per epoch, train vs validation."""
    panels = ["loss", *[f"{h}_accuracy" for h in heads]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, key in zip(axes, panels):
        for prefix, style in (("", "-o"), ("val_", "--o")):
            values = history.get(prefix + key)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, label="validation" if prefix else "train", ms=3)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    return fig


def confusion(y_true: np.ndarray, proba: np.ndarray, class_names, title: str) -> plt.Figure:
    keep = y_true >= 0
    fig, ax = plt.subplots(figsize=(1.1 * len(class_names) + 3, 1.0 * len(class_names) + 2.5))
    ConfusionMatrixDisplay.from_predictions(
        y_true[keep], proba[keep].argmax(axis=1), labels=list(range(len(class_names))),
        display_labels=[short_name(c) for c in class_names], ax=ax, colorbar=False, xticks_rotation=45)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def roc_curves(y_true: np.ndarray, proba: np.ndarray, class_names, title: str) -> plt.Figure:
    keep = y_true >= 0
    y, p = y_true[keep], proba[keep]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, name in enumerate(class_names):
        if 0 < (y == k).sum() < len(y):
            RocCurveDisplay.from_predictions(y == k, p[:, k], name=short_name(name), ax=ax)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def sample_predictions(images: np.ndarray, truths: list[str], predictions: list[str], probabilities: list[float],
                       title: str, columns: int = 6) -> plt.Figure:
    """A grid of test images with the true class, the predicted class and its probability."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, truth, pred, prob in zip(axes.ravel(), images, truths, predictions, probabilities):
        ax.imshow(image[..., image.shape[-1] // 2], cmap="gray", vmin=0, vmax=255)
        color = "green" if truth == pred else "red"
        ax.set_title(f"true {short_name(truth)}\npred {short_name(pred)} {prob:.2f}", fontsize=7, color=color)
    fig.suptitle(title)
    grid_margins(fig, top_title=True)
    return fig



def operating_point(name: str, event: np.ndarray, score: np.ndarray, threshold: float, target: float) -> plt.Figure:
    """One referral point on held-out cases: the ROC curve with the point its threshold reaches, and the
    sensitivity against the referral rate as the threshold moves, with the target sensitivity."""
    from sklearn.metrics import roc_curve

    event = np.asarray(event, bool)
    fig, (roc, trade) = plt.subplots(1, 2, figsize=(10, 4.5))
    if 0 < event.sum() < len(event):
        fpr, tpr, _ = roc_curve(event, score)
        roc.plot(fpr, tpr, label="model")
    roc.plot([0, 1], [0, 1], ":", color="grey")
    order = np.sort(np.unique(score))[::-1]
    if len(order) and event.any():
        sens = [(score[event] >= t).mean() for t in order]
        rate = [(score >= t).mean() for t in order]
        trade.plot(rate, sens, label="threshold moved")
    if np.isfinite(threshold) and event.any() and (~event).any():
        flag = score >= threshold
        roc.plot([flag[~event].mean()], [flag[event].mean()], "o", color="C3", label=f"threshold {threshold:.3f}")
        trade.plot([flag.mean()], [flag[event].mean()], "o", color="C3", label=f"threshold {threshold:.3f}")
    trade.axhline(target, ls="--", color="grey", label=f"target sensitivity {target:.2f}")
    roc.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{name}: ROC")
    trade.set(xlabel="referral rate", ylabel="sensitivity", title=f"{name}: referrals vs sensitivity",
              xlim=(0, 1), ylim=(0, 1.02))
    for ax in (roc, trade):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
