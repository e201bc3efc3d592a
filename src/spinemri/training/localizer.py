"""A localizer's fit, piece by piece: batches of the slice cache, the validation monitor (point error in mm and
slice accuracy per epoch), a split's point errors, the mean-position baseline and the figures of a run.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf

from spinemri.localization.dataset import LocalizerDataset
from spinemri.localization.locate import SeriesSlices, choose_sites, point_errors, summarize_errors
from spinemri.localization.sites import SeriesTask, SliceFrame
from spinemri.training.data import read_rows

MONITOR = "val_point_error_mm"  # best checkpoint, early stopping and LR schedule (what users care about)


@dataclass
class LocalizerSplit:
    """One split of the slice cache with its targets and ground truth."""

    slices: pd.DataFrame  # rows of slices.csv
    targets: dict[str, np.ndarray]
    truth: pd.DataFrame  # labelled points of this series type in these studies


def make_dataset(images_path: Path, split: LocalizerSplit, batch_size: int, *, shuffle: bool, seed: int) -> tf.data.Dataset:
    """Batches of (image float32 0..255, {points: (B, P, 3) u/v/mask, slice: (B, G, 2) target/mask})."""
    images_path = str(images_path)
    shape = np.load(images_path, mmap_mode="r").shape[1:]
    t = split.targets
    y_points = np.concatenate([t["points"], t["point_mask"][..., None]], axis=-1)
    y_slice = np.stack([t["slice_target"], t["slice_mask"]], axis=-1)
    ds = tf.data.Dataset.from_tensor_slices((split.slices["index"].to_numpy(np.int64), positions(split.slices),
                                             y_points, y_slice))
    if shuffle:
        ds = ds.shuffle(len(split.slices), seed=seed, reshuffle_each_iteration=True)

    def load(rows, position, points, slice_targets_):
        images = tf.numpy_function(lambda r: read_rows(images_path, r), [rows], tf.uint8)
        images = tf.cast(tf.reshape(images, (-1, *shape)), tf.float32)
        return {"image": images, "position": position}, {"points": points, "slice": slice_targets_}

    return ds.batch(batch_size).map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def positions(slices: pd.DataFrame) -> np.ndarray:
    """The model's position input: each slice's place in its study's stack, 0..1 (see dataset.stack_positions)."""
    return slices["stack_position"].to_numpy(np.float32)[:, None]


def split_outputs(model: keras.Model, images_path: Path, split: LocalizerSplit, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    points, scores = [], []
    rows = split.slices["index"].to_numpy(np.int64)
    where = positions(split.slices)
    for start in range(0, len(rows), 256):
        out = model.predict({"image": read_rows(str(images_path), rows[start:start + 256]).astype(np.float32),
                             "position": where[start:start + 256]}, batch_size=batch_size, verbose=0)
        points.append(np.asarray(out["points"]))
        scores.append(np.asarray(out["slice"]))
    return np.concatenate(points), np.concatenate(scores)


def split_errors(task: SeriesTask, split: LocalizerSplit, points: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """Choose the sites of every study of the split from per-slice outputs; one error row per labelled point."""
    slices = split.slices
    frames, positions = {}, {}
    for row in slices.itertuples(index=False):
        frames.setdefault((row.study_id, row.series_id), SliceFrame(int(row.width), int(row.height),
                                                                     float(row.row_mm), float(row.col_mm)))
        positions[(row.study_id, row.series_id, int(row.instance_number))] = int(row.position)
    out = []
    for study, rows in slices.groupby("study_id").indices.items():
        study_slices = slices.iloc[rows]
        series, p, s = [], [], []
        for series_id, local in study_slices.groupby("series_id").indices.items():
            index = rows[local]
            ordered = index[np.argsort(slices["position"].to_numpy()[index])]
            series.append(SeriesSlices(int(series_id), tuple(slices["instance_number"].to_numpy()[ordered]),
                                       frames[(study, series_id)]))
            p.append(points[ordered])
            s.append(scores[ordered])
        sites = choose_sites(task, series, p, s)
        out.append(point_errors(sites, split.truth[split.truth["study_id"] == study], frames, positions))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def baseline_outputs(task: SeriesTask, train: LocalizerSplit, split: LocalizerSplit) -> tuple[np.ndarray, np.ndarray]:
    """A model-free answer: every point at its mean training position, each group's slice at its mean
    place in the study's stack."""
    t = train.targets
    weight = t["point_mask"][..., None]
    mean_points = (t["points"] * weight).sum(axis=0) / np.maximum(weight.sum(axis=0), 1)
    relative = train.slices["stack_position"].to_numpy()
    peak = t["slice_target"] * t["slice_mask"]
    mean_relative = np.array([relative[peak[:, g] > 0.99].mean() if (peak[:, g] > 0.99).any() else 0.5
                              for g in range(len(task.groups))])
    rel = split.slices["stack_position"].to_numpy()
    # Slightly prefer longer series, so that a study with two series of the type picks one consistently.
    scores = -np.abs(rel[:, None] - mean_relative[None, :]) + 1e-3 * split.slices["n_slices"].to_numpy()[:, None]
    return np.repeat(mean_points[None], len(split.slices), axis=0), scores


class ValidationErrors(keras.callbacks.Callback):
    """Point error (mm) and slice accuracy on the validation studies, before training and after each epoch."""

    def __init__(self, task: SeriesTask, images_path: Path, split: LocalizerSplit, batch_size: int):
        super().__init__()
        self.task, self.images_path, self.split, self.batch_size = task, images_path, split, batch_size
        self.history: list[dict[str, float]] = []

    def _measure(self, step: int) -> dict[str, float]:
        summary = summarize_errors(split_errors(self.task, self.split,
                                                *split_outputs(self.model, self.images_path, self.split, self.batch_size)))
        values = {f"val_{k}": v for k, v in summary.items() if k != "points" and math.isfinite(v)}
        self.history.append(values)
        return values

    def on_train_begin(self, logs=None):
        if not self.history:
            mlflow.log_metrics(self._measure(0), step=0)

    def on_epoch_end(self, epoch, logs=None):
        # Into the epoch's logs: checkpointing and early stopping watch val_point_error_mm, and
        # MlflowEpochLogger logs it with the losses (step = epoch, 1-based).
        logs.update(self._measure(epoch + 1))


def curves_figure(history: dict[str, list[float]], errors: list[dict[str, float]]) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key in zip(axes[:2], ("points_loss", "slice_loss")):
        for prefix, style in (("", "-o"), ("val_", "--o")):
            values = history.get(prefix + key)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, ms=3, label="validation" if prefix else "train")
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.legend()
    axes[2].plot(range(len(errors)), [e.get("val_point_error_mm", math.nan) for e in errors], "-o", ms=3)
    axes[2].set_title("validation point error (mm)")
    axes[2].set_xlabel("epoch (0 = untrained)")
    fig.tight_layout()
    return fig


def sites_figure(dataset: LocalizerDataset, task: SeriesTask, test: LocalizerSplit, errors: pd.DataFrame,
                  model: keras.Model, batch_size: int, count: int = 4) -> plt.Figure:
    """Test slices with the labelled points (green) and the localizer's (red) on the labelled slice."""
    truth = test.truth.drop_duplicates(["study_id", "series_id", "instance_number"]).head(count)
    fig, axes = plt.subplots(1, max(len(truth), 1), figsize=(3.2 * max(len(truth), 1), 3.4), squeeze=False)
    images = dataset.images()
    size = images.shape[1]
    for ax, point in zip(axes[0], truth.itertuples(index=False)):
        row = test.slices[(test.slices["study_id"] == point.study_id) & (test.slices["series_id"] == point.series_id)
                          & (test.slices["instance_number"] == point.instance_number)]
        if row.empty:
            continue
        row = row.iloc[0]
        full = np.asarray(images[int(row["index"])])
        image = full[..., full.shape[-1] // 2]
        out = model.predict({"image": full[None].astype(np.float32), "position": positions(row.to_frame().T)},
                            verbose=0)
        frame = SliceFrame(int(row["width"]), int(row["height"]), float(row["row_mm"]), float(row["col_mm"]))
        here = test.truth[(test.truth["study_id"] == point.study_id) & (test.truth["instance_number"] == point.instance_number)
                          & (test.truth["series_id"] == point.series_id)]
        u, v = frame.to_unit(here["x"].to_numpy(), here["y"].to_numpy())
        ax.imshow(image, cmap="gray")
        ax.scatter(u * size - 0.5, v * size - 0.5, s=14, c="lime", label="label")
        predicted = np.asarray(out["points"])[0]
        ax.scatter(predicted[:, 0] * size - 0.5, predicted[:, 1] * size - 0.5, s=14, c="red", marker="x", label="model")
        ax.set_title(f"study {point.study_id}\ninstance {point.instance_number}", fontsize=8)
        ax.axis("off")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{task.description}: held-out slices, labels vs localizer (this slice's output)", fontsize=9)
    fig.tight_layout()
    return fig
