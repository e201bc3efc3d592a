"""`spinemri ensemble`: the fold models of one or more cross-validations, served as one model.

Every fold model of a cross-validation run (spinemri.api.cv) is a member, calibrated by its own
temperatures (fitted on its held-out fold); the ensemble averages the members' calibrated
probabilities (:class:`spinemri.serving.ensemble.SpineEnsemble`). Runs of several backbones mix,
as long as they share the data, the split and the preprocessing, so that one request row means
the same input to every member. Together the members trained on every study outside the locked test
split, so the ensemble is judged on that split alone — in a run of its own (tag ``role=ensemble``) with
the same ``test_*`` evaluation as a training run — and registered under the champion policy like any
classifier: `mlflow models serve`, `spinemri predict` and `predict-study` take it unchanged.

Its referral thresholds (spinemri.metrics.operating) are chosen on the cross-validations' out-of-fold
predictions — each row by the fold model that never trained on it, averaged over the runs — and judged on
the locked test split, which never chooses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import mlflow
from mlflow.exceptions import MlflowException
import numpy as np
import pandas as pd

from spinemri.api.cv import FOLD_MODELS_ARTIFACT, OOF_ARTIFACT
from spinemri.api.source import prepare_data
from spinemri.errors import EnsembleError
from spinemri.metrics import floor as floors
from spinemri.metrics import paired
from spinemri.data.schema import HEAD_CLASSES
from spinemri.metrics.prior import prior_from_samples, prior_rows, prior_submission
from spinemri.serving.classifier import load_classifier
from spinemri.serving.ensemble import SpineEnsemble, log_ensemble
from spinemri.tracking import lineage
from spinemri.tracking.registry import eval_set_hash
from spinemri.api.evaluate import run_config
from spinemri.tracking.runs import (CV_ROLE, TrainResult, describe_run, log_headline, log_split, pip_requirements, register_and_tag,
    run_tags, training_run)
from spinemri.training.data import encode_targets, split_data
from spinemri.training.classifier import (Graded, log_floor, log_held_out, log_operating_points, log_site_score,
    predict_cached, request_example)

ENSEMBLE_ROLE = "ensemble"
# What members must share for one request row to be the same input to all of them.
SHARED = ("preprocess", "input_shape", "data_fingerprint", "severity_head")


def build_ensemble(run_ids: Sequence[str], *, registered_model: str | None = None, register: bool = True,
                   policy: str | None = None) -> TrainResult:
    """Package the fold models of the cross-validation runs ``run_ids`` as one model, evaluate it on
    the locked test split, log it and (``register``) register it; see the module docstring."""
    if not run_ids:
        raise EnsembleError("give at least one cross-validation run (--run RUN_ID)")
    members, described, configs = [], [], []
    for run_id in dict.fromkeys(run_ids):
        config, folds = _cross_validation(run_id)
        configs.append((run_id, config))
        for fold in folds:
            classifier = load_classifier(fold["model_uri"])
            members.append(classifier)
            described.append({"arch": classifier.meta["arch"], "cv_run": run_id, "fold": fold["fold"],
                              "run_id": fold["run_id"], "temperature": classifier.meta.get("temperature")})
    first = members[0].meta
    for member, about in zip(members, described):
        differing = [key for key in SHARED if member.meta.get(key) != first.get(key)]
        if differing:
            raise EnsembleError(f"fold {about['fold']} of run {about['cv_run']} differs from fold "
                                f"{described[0]['fold']} of run {described[0]['cv_run']} in {', '.join(differing)}; "
                                "ensemble cross-validations of the same data with the same preprocessing")
    splits = {(c.split.fractions, c.split.seed, c.split.folds) for _, c in configs}
    if len(splits) > 1:
        raise EnsembleError(f"the runs split the studies differently ({', '.join(r for r, _ in configs)}); "
                            "ensemble cross-validations with the same split.fractions, split.seed and split.folds")
    config = configs[0][1]
    dataset, samples = prepare_data(config)
    test = split_data(samples, "test")
    meta = {"arch": "ensemble", "archs": sorted({d["arch"] for d in described}),
            "input_shape": first["input_shape"], "preprocess": first["preprocess"], "classes": first["classes"],
            "data_fingerprint": first.get("data_fingerprint"), "severity_head": first.get("severity_head", "single"),
            "severity_prior": prior_from_samples(samples[samples["split"] != "test"]), "members": described}
    ensemble = SpineEnsemble()
    ensemble.members, ensemble.model, ensemble.meta = [m.model for m in members], members[0].model, meta
    params = {"ensemble.members": len(members), "ensemble.runs": ",".join(r for r, _ in configs),
              "ensemble.archs": ",".join(meta["archs"])}
    tags = {**run_tags(dataset.fingerprint, "ensemble", config.task), "role": ENSEMBLE_ROLE}
    with training_run(experiment=config.mlflow.experiment, config=config.to_dict(redacted=True), params=params,
                      tags=tags, run_name=f"ensemble-{len(members)}-{datetime.now():%Y%m%d-%H%M%S}") as run:
        log_split(dataset.splits(config.split.fractions, config.split.seed))
        lineage.log_splits(config.data, config.split, dataset.manifest["data_dir"], dataset.content_digest,
                           {"test": test.samples})
        proba = predict_cached(ensemble, dataset.path / "images.npy", test, config.train.batch_size)
        evaluation = log_held_out(test.samples, test.targets, proba, split_data(samples, "train").targets, "test")
        predictions = paired.prediction_table(test.samples, test.targets, proba)
        mlflow.log_text(predictions.to_csv(index=False), paired.PREDICTIONS_ARTIFACT)
        metrics = {f"test_{head}_{name}": float(entry["value"]) for head, result in evaluation["heads"].items()
                   for name, entry in result.get("metrics", {}).items() if entry["value"] is not None}
        prior = prior_submission(sorted(test.samples["study_id"].astype(str).unique()), meta["severity_prior"])
        metrics.update(log_site_score(test.samples, proba["severity"], prior, "test"))
        trained = samples[samples["split"] != "test"]
        floor = floors.floor_predictions(test.samples, trained, encode_targets(trained))
        verdict, values = log_floor("test", test.samples, test.targets, proba, floor, config.mlflow.champion_metric)
        metrics.update(values)
        meta["operating_points"] = log_operating_points(
            out_of_fold([r for r, _ in configs], trained),
            Graded(test.name, test.samples, test.targets["severity"], proba["severity"], floor["severity"]),
            config.clinical.targets(), "test")
        example = request_example(test.samples, dataset.manifest.get("dataset_root", ""),
                                  ensemble.preprocessing)
        model_uri = log_ensemble(ensemble.members, meta, example, pip_requirements()).model_uri
        decision = None
        if register:
            metric = config.mlflow.champion_metric
            decision = register_and_tag(
                model_uri, registered_model or config.mlflow.registered_model, metric=metric,
                value=metrics.get(metric), eval_set=eval_set_hash(test.samples),
                tags={"arch": "ensemble", "members": str(len(members)), "archs": ",".join(meta["archs"]),
                      "experiment": config.name, "eval_set_samples": str(len(test)),
                      "eval_set_studies": str(test.samples["study_id"].nunique())},
                policy=policy or config.mlflow.champion_policy, evidence=predictions, verdict=verdict,
                allow_below_floor=config.mlflow.allow_below_floor)
        describe_run(verdict, f"An ensemble of {len(members)} fold models, evaluated on the locked test split.",
                     str(decision) if decision else "")
        log_headline(metrics, config.mlflow.champion_metric)
    return TrainResult(run_id=run.info.run_id, metrics=metrics, model_uri=model_uri, epochs_trained=0,
                       registered=decision, verdict=verdict)


def out_of_fold(run_ids: Sequence[str], trained: pd.DataFrame) -> Graded:
    """The rows an ensemble's referral thresholds are chosen on: the out-of-fold predictions of the
    cross-validations ``run_ids`` (of the same samples and folds), their severity probabilities averaged over
    the runs, with each fold's floor the per-site prior of the other folds' rows of ``trained`` (the samples
    outside the test split)."""
    tables = []
    for run_id in run_ids:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=OOF_ARTIFACT)
        except (MlflowException, OSError):
            raise EnsembleError(f"run {run_id} logged no out-of-fold predictions ({OOF_ARTIFACT}) to choose the "
                                "referral thresholds on; ensemble a cross-validation that finished") from None
        table = pd.read_csv(path, dtype={"study_id": str})
        keys = [c for c in paired.KEY_COLUMNS if c in table.columns]
        tables.append(table.set_index(table[keys].astype(str).agg("|".join, axis=1)))
    first = tables[0]
    for run_id, table in zip(run_ids[1:], tables[1:]):
        if set(table.index) != set(first.index) or not table["fold"].reindex(first.index).equals(first["fold"]):
            raise EnsembleError(f"the out-of-fold predictions of runs {run_ids[0]} and {run_id} are not of the same "
                                "samples in the same folds; ensemble cross-validations of the same data and split")
    columns = [f"severity:{c}" for c in HEAD_CLASSES["severity"]]
    proba = np.mean([t.loc[first.index, columns].to_numpy(np.float64) for t in tables], axis=0)
    samples = first.reset_index(drop=True)
    floor = np.zeros_like(proba)
    for fold in samples["fold"].unique():
        held = (samples["fold"] == fold).to_numpy()
        others = trained[trained["study_id"].astype(str).isin(set(samples.loc[~held, "study_id"]))]
        floor[held] = prior_rows(prior_from_samples(others), samples.loc[held, "condition"].tolist(),
                                 samples.loc[held, "level"].tolist())
    return Graded("out-of-fold", samples, samples["severity:target"].to_numpy(np.int64), proba, floor)


def _cross_validation(run_id: str) -> tuple:
    """The config and fold models of a finished cross-validation run, or an EnsembleError saying why not."""
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise EnsembleError(f"no run {run_id!r} in {mlflow.get_tracking_uri()}") from None
    if run.data.tags.get("role") != CV_ROLE:
        raise EnsembleError(f"run {run_id} is not a cross-validation run (tag role=cv); cross-validate first "
                            "with `spinemri train --folds K` and pass its parent run")
    if run.info.status != "FINISHED":
        raise EnsembleError(f"run {run_id} is {run.info.status}, not FINISHED; ensemble a finished cross-validation")
    try:
        folds = mlflow.artifacts.load_dict(f"runs:/{run_id}/{FOLD_MODELS_ARTIFACT}")["folds"]
    except (MlflowException, OSError, KeyError):
        raise EnsembleError(f"run {run_id} logged no fold models ({FOLD_MODELS_ARTIFACT}); cross-validate with "
                            "the fold models logged") from None
    return run_config(run_id), folds
