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

The fit's parts (datasets, the validation monitor, errors, figures) are spinemri.training.localizer's.
"""

from __future__ import annotations

from datetime import datetime
import math
import time

import keras
import mlflow
import pandas as pd

from spinemri.api.source import resolve_data_dir
from spinemri.config import ExperimentConfig, MlflowConfig, run_params
from spinemri.errors import DatasetError
from spinemri.localization.dataset import LocalizerDataset, prepare_localizer, slice_targets, study_splits
from spinemri.localization.locate import error_terms, summarize_errors
from spinemri.localization.model import build_localizer, point_loss, slice_loss
from spinemri.localization.sites import SeriesTask, get_task
from spinemri.metrics.paired import terms_artifact
from spinemri.serving.localizer import log_localizer
from spinemri.tracking import lineage
from spinemri.tracking.registry import eval_set_hash
from spinemri.tracking.runs import (TrainResult, log_figure, log_headline, log_split, pip_requirements, register_and_tag,
    run_tags, training_run)
from spinemri.training import fit
from spinemri.training.fit import best_weights, check_finite, seed_everything
from spinemri.training.localizer import (MONITOR, LocalizerSplit, ValidationErrors, baseline_outputs, curves_figure,
    make_dataset, sites_figure, split_errors, split_outputs)

DEFAULT_EXPERIMENT = "spinemri-localize"


DEFAULT_REGISTERED_MODEL = "spinemri-localizer"


def experiment_name(config: ExperimentConfig) -> str:
    return DEFAULT_EXPERIMENT if config.mlflow.experiment == MlflowConfig.experiment else config.mlflow.experiment


def registered_model_name(config: ExperimentConfig) -> str:
    name = config.mlflow.registered_model
    return DEFAULT_REGISTERED_MODEL if name == MlflowConfig.registered_model else name


def prepare(config: ExperimentConfig) -> tuple[LocalizerDataset, dict[str, LocalizerSplit]]:
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
                split_of: dict[str, str], names: tuple[str, ...]) -> dict[str, LocalizerSplit]:
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
        splits[name] = LocalizerSplit(slices[keep].reset_index(drop=True), {k: v[keep] for k, v in targets.items()},
                              truth[truth["study_id"].isin(studies)].reset_index(drop=True))
        if not len(splits[name].slices) or splits[name].truth.empty:
            raise DatasetError([f"{config.data.data_dir or 'the phantom'} has no labelled {task.description} series in "
                                f"the {name} split; use more studies or other split.fractions"])
    return splits


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


def train_in_run(config: ExperimentConfig, task: SeriesTask, dataset: LocalizerDataset, splits: dict[str, LocalizerSplit],
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
        # The monitor first: it adds val_point_error_mm to the epoch logs the others read. The dataset shuffles.
        fitted = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, verbose=0, shuffle=False,
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
    log_figure(curves_figure(history, monitor.history), "plots/localizer_curves.png")
    log_figure(sites_figure(dataset, task, test, errors, model, cfg.batch_size), f"plots/{prefix}_sites.png")

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
    log_headline(metrics)
    result = TrainResult(run_id="", metrics=metrics, model_uri=model_uri, epochs_trained=metrics["epochs_trained"],
                         history={**history, "val_point_error_mm_by_step": [h.get("val_point_error_mm", math.nan)
                                                                            for h in monitor.history]},
                         registered=decision)
    return result, errors
