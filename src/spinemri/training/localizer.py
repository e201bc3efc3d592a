"""train_localizer(config): slice cache -> localizer -> fit -> held-out point errors -> MLflow -> registry.

One MLflow run per series type (``spinemri train --task localize --series sagittal_t2``), in the
experiment ``spinemri-localize``. The held-out studies are the classifier's test studies (same
split function, same label table, same seed), so stage 1 and stage 2 are judged on the same
patients. Metrics, per series type ``<s>``:

    test_<s>_point_error_mm (mean), _median, test_<s>_within_5mm, _within_10mm,
    test_<s>_slice_accuracy (the labelled slice found within one slice), test_<s>_slice_exact (found
    on that very slice: what spinemri.training.jitter reads), and the same for a
    baseline that always answers the training set's mean position (test_<s>_baseline_...);
    val_point_error_mm / val_slice_accuracy per epoch (step 0 = before training).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
import math
from pathlib import Path
import time

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf

from spinemri.config import ExperimentConfig, MlflowConfig, run_params
from spinemri.training.source import resolve_data_dir
from spinemri.errors import DatasetError
from spinemri.localization.dataset import LocalizerDataset, prepare_localizer, slice_targets, study_splits
from spinemri.localization.locate import SeriesSlices, choose_sites, error_terms, point_errors, summarize_errors
from spinemri.serving.localizer import log_localizer
from spinemri.localization.model import build_localizer, point_loss, slice_loss
from spinemri.localization.sites import SeriesTask, SliceFrame, get_task
from spinemri.metrics.paired import terms_artifact
from spinemri.tracking import lineage
from spinemri.tracking.registry import eval_set_hash
from spinemri.tracking.runs import (TrainResult, log_figure, log_split, pip_requirements, register_and_tag, run_tags,
    training_run)
from spinemri.training import fit
from spinemri.training.data import read_rows
from spinemri.training.fit import best_weights, check_finite, seed_everything

DEFAULT_EXPERIMENT = "spinemri-localize"
DEFAULT_REGISTERED_MODEL = "spinemri-localizer"
MONITOR = "val_point_error_mm"  # best checkpoint, early stopping and LR schedule (what users care about)


@dataclass
class _Split:
    """One split of the slice cache with its targets and ground truth."""

    slices: pd.DataFrame  # rows of slices.csv
    targets: dict[str, np.ndarray]
    truth: pd.DataFrame  # labelled points of this series type in these studies


def experiment_name(config: ExperimentConfig) -> str:
    return DEFAULT_EXPERIMENT if config.mlflow.experiment == MlflowConfig.experiment else config.mlflow.experiment


def registered_model_name(config: ExperimentConfig) -> str:
    name = config.mlflow.registered_model
    return DEFAULT_REGISTERED_MODEL if name == MlflowConfig.registered_model else name


def prepare(config: ExperimentConfig) -> tuple[LocalizerDataset, dict[str, _Split]]:
    """The slice cache for ``config.localize.series`` and its train/val/test splits (study level)."""
    dataset, samples = localizer_samples(config)
    split_of = dict(study_splits(samples, config.split.fractions, config.split.seed)[["study_id", "split"]]
                    .itertuples(index=False))
    return dataset, make_splits(config, dataset, samples, split_of, ("train", "val", "test"))


def localizer_samples(config: ExperimentConfig) -> tuple[LocalizerDataset, pd.DataFrame]:
    """The slice cache for ``config.localize.series`` and the labelled sample table (every study's labels)."""
    return prepare_localizer(resolve_data_dir(config), get_task(config.localize.series).name,
                             config.localizer_preprocessing, workers=config.data.workers)


def make_splits(config: ExperimentConfig, dataset: LocalizerDataset, samples: pd.DataFrame,
                split_of: dict[str, str], names: tuple[str, ...]) -> dict[str, _Split]:
    """The slices, targets and labelled points of each split in ``names`` (``split_of``: study -> split)."""
    task = get_task(config.localize.series)
    slices = dataset.slices()
    targets = slice_targets(slices, samples, task, config.localize.slice_sigma, config.localize.point_slices)
    conditions = {c for c, *_ in task.sites}
    truth = samples[samples["condition"].isin(conditions) & (samples["series_description"] == task.description)]
    split_of = {str(k): v for k, v in split_of.items()}
    splits = {}
    for name in names:
        keep = slices["study_id"].astype(str).map(split_of).eq(name).to_numpy()
        studies = set(slices.loc[keep, "study_id"])
        splits[name] = _Split(slices[keep].reset_index(drop=True), {k: v[keep] for k, v in targets.items()},
                              truth[truth["study_id"].isin(studies)].reset_index(drop=True))
        if not len(splits[name].slices) or splits[name].truth.empty:
            raise DatasetError([f"{config.data.data_dir or 'the phantom'} has no labelled {task.description} series in "
                                f"the {name} split; use more studies or other split.fractions"])
    return splits


def make_dataset(images_path: Path, split: _Split, batch_size: int, *, shuffle: bool, seed: int) -> tf.data.Dataset:
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


def split_outputs(model: keras.Model, images_path: Path, split: _Split, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    points, scores = [], []
    rows = split.slices["index"].to_numpy(np.int64)
    where = positions(split.slices)
    for start in range(0, len(rows), 256):
        out = model.predict({"image": read_rows(str(images_path), rows[start:start + 256]).astype(np.float32),
                             "position": where[start:start + 256]}, batch_size=batch_size, verbose=0)
        points.append(np.asarray(out["points"]))
        scores.append(np.asarray(out["slice"]))
    return np.concatenate(points), np.concatenate(scores)


def split_errors(task: SeriesTask, split: _Split, points: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
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


def baseline_outputs(task: SeriesTask, train: _Split, split: _Split) -> tuple[np.ndarray, np.ndarray]:
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

    def __init__(self, task: SeriesTask, images_path: Path, split: _Split, batch_size: int):
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


def train_localizer(config: ExperimentConfig, *, nested: bool = False) -> TrainResult:
    config.validate()
    if config.task != "localize":
        raise ValueError(f"train_localizer needs task: localize, got {config.task!r}")
    task = get_task(config.localize.series)
    dataset, splits = prepare(config)
    seed_everything(config.train)
    params = {**run_params(config), "data_dir": dataset.manifest["data_dir"]}
    tags = {**run_tags(dataset.fingerprint, config.model.arch, "localize"), "localize.series": task.name}
    with training_run(experiment=experiment_name(config), config=config.to_dict(redacted=True), params=params,
                      tags=tags, run_name=f"localize-{task.name}-{config.model.arch}-{datetime.now():%Y%m%d-%H%M%S}",
                      nested=nested) as run:
        log_split(pd.concat([pd.DataFrame({"study_id": sorted(s.slices["study_id"].unique()), "split": n})
                             for n, s in splits.items()], ignore_index=True))  # predict-study checks it for leaks
        lineage.log_splits(config.data, config.split, dataset.manifest["data_dir"], dataset.content_digest,
                           {n: s.slices for n, s in splits.items()}, unit="slices")
        result, _ = train_in_run(config, task, dataset, splits)
    result.run_id = run.info.run_id
    return result


def train_in_run(config: ExperimentConfig, task: SeriesTask, dataset: LocalizerDataset, splits: dict[str, _Split],
                 *, held: str = "test", prefix: str = "test", register: bool = True) -> tuple[TrainResult, pd.DataFrame]:
    """Fit on ``splits["train"]`` (``"val"`` watched), measure on ``splits[held]`` as ``<prefix>_<s>_...``, log
    the model (registered with ``register`` and ``mlflow.register``); returns the result and the held-out
    point errors."""
    cfg, loc, pre = config.train, config.localize, config.localizer_preprocessing
    images_path = dataset.path / "images.npy"
    model = build_localizer(config.model.arch, loc.img_size, loc.channels, task, weights=config.model.weights,
                            dense_units=config.model.dense_units, dropout=config.model.dropout)
    model.compile(optimizer=keras.optimizers.Adam(cfg.lr), loss={"points": point_loss, "slice": slice_loss},
                  loss_weights={"points": loc.point_loss_weight, "slice": loc.slice_loss_weight})
    train_ds = make_dataset(images_path, splits["train"], cfg.batch_size, shuffle=True, seed=cfg.seed)
    val_ds = make_dataset(images_path, splits["val"], cfg.batch_size, shuffle=False, seed=cfg.seed)
    monitor = ValidationErrors(task, images_path, splits["val"], cfg.batch_size)
    started = time.perf_counter()
    with best_weights(model) as best:
        # The monitor first: it adds val_point_error_mm to the epoch logs the others read.
        fitted = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, verbose=2,
                           callbacks=fit.callbacks(cfg, MONITOR, best, first=[monitor], step_offset=1))
        history = {k: [float(v) for v in values] for k, values in fitted.history.items()}
        check_finite(history, "the localizer", cfg.lr)
    training_time = time.perf_counter() - started

    test = splits[held]
    errors = split_errors(task, test, *split_outputs(model, images_path, test, cfg.batch_size))
    baseline = split_errors(task, test, *baseline_outputs(task, splits["train"], test))
    summary, base_summary = summarize_errors(errors), summarize_errors(baseline)
    metrics = {f"{prefix}_{task.name}_{k}": v for k, v in summary.items() if math.isfinite(v)}
    metrics.update({f"{prefix}_{task.name}_baseline_{k}": v for k, v in base_summary.items()
                    if k != "points" and math.isfinite(v)})
    initial = monitor.history[0].get("val_point_error_mm") if monitor.history else None
    metrics.update(training_time_s=round(training_time, 2), epochs_trained=len(history.get("loss", [])),
                   model_params=model.count_params())
    if initial is not None:
        metrics["val_point_error_mm_untrained"] = initial
    mlflow.log_metrics(metrics)
    mlflow.log_text(errors.to_csv(index=False), f"localize/{prefix}_errors.csv")
    log_figure(_curves(history, monitor.history), "plots/localizer_curves.png")
    log_figure(_sites_figure(dataset, task, test, errors, model, cfg.batch_size), f"plots/{prefix}_sites.png")

    meta = {"series": task.name, "arch": config.model.arch, "preprocess": pre.to_dict(),
            "input_shape": [loc.img_size, loc.img_size, loc.channels], "groups": list(task.groups),
            "sites": [list(s) for s in task.sites], "data_fingerprint": dataset.fingerprint}
    model_uri = log_localizer(model, meta, pip_requirements()).model_uri
    decision = None
    metric = f"{prefix}_{task.name}_point_error_mm"
    terms = error_terms(errors)  # what a paired champion decision compares
    mlflow.log_text(terms.to_csv(index=False), terms_artifact(metric))
    if register and config.mlflow.register:
        decision = register_and_tag(
            model_uri, registered_model_name(config), metric=metric, value=metrics.get(metric),
            eval_set=eval_set_hash(test.truth), champion=task.name, challenger=f"{task.name}-challenger",
            policy=config.mlflow.champion_policy, evidence=terms, needs_floor=False,
            tags={"arch": config.model.arch, "series": task.name, "experiment": config.name,
                  "eval_set_studies": str(test.truth["study_id"].nunique())})
    result = TrainResult(run_id="", metrics=metrics, model_uri=model_uri, epochs_trained=metrics["epochs_trained"],
                         history={**history, "val_point_error_mm_by_step": [h.get("val_point_error_mm", math.nan)
                                                                            for h in monitor.history]},
                         registered=decision)
    return result, errors


def _curves(history: dict[str, list[float]], errors: list[dict[str, float]]) -> plt.Figure:
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


def _sites_figure(dataset: LocalizerDataset, task: SeriesTask, test: _Split, errors: pd.DataFrame,
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
