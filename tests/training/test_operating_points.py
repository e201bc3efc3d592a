"""A run's referral operating points: fitted on the validation rows, judged on the held-out ones, logged."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from spinemri.config import load_experiment
from spinemri.data.schema import CONDITIONS, LEVELS
from spinemri.metrics import operating
from spinemri.training.classifier import Graded, log_operating_points
from spinemri.training.data import SplitData


def _split(name: str, studies: int, seed: int) -> tuple[SplitData, np.ndarray]:
    rng = np.random.default_rng(seed)
    sites = [(s, c, lv) for s in range(studies) for c in CONDITIONS for lv in LEVELS[3:]]
    samples = pd.DataFrame(sites, columns=["study_id", "condition", "level"]).assign(
        study_id=lambda f: f"{name}-" + f["study_id"].astype(str))
    grade = rng.choice([0, 1, 2], len(samples), p=[0.6, 0.25, 0.15])
    samples["severity"] = grade
    proba = rng.dirichlet([2, 1, 1], len(samples))
    proba[grade >= 1] = (proba[grade >= 1] + [0, 0.5, 0.5]) / 2
    targets = {"severity": grade, "condition": np.zeros(len(samples), int), "level": np.zeros(len(samples), int)}
    split = SplitData(name, np.arange(len(samples)), targets, np.zeros(len(samples), bool), samples)
    return split, proba / proba.sum(axis=1, keepdims=True)


def test_the_thresholds_never_see_the_held_out_labels(tracking):
    (val, val_proba), (test, test_proba), (train, _) = _split("val", 30, 0), _split("test", 30, 1), _split("train", 60, 2)
    targets = load_experiment("quick", {}).clinical.targets()
    flipped = SplitData("test", test.rows, {**test.targets, "severity": 2 - test.targets["severity"]}, test.axial,
                        test.samples)
    mlflow.set_experiment("operating-points")
    logged = []
    for held in (test, flipped):
        with mlflow.start_run() as run:
            thresholds = log_operating_points(Graded.of(val, val_proba, train), Graded.of(held, test_proba, train),
                                              targets, "test")
        table = mlflow.MlflowClient().load_table(run.info.experiment_id, "evaluation/test_operating_points.json",
                                                 run_ids=[run.info.run_id])
        logged.append((run.info.run_id, thresholds, table))
    (first, thresholds, table), (_, again, flipped_table) = logged
    assert thresholds == again  # the held-out labels changed, the thresholds did not
    assert not table["value"].equals(flipped_table["value"])  # what they do on those rows did
    # what the model carries is what the run logged
    carried = mlflow.artifacts.load_dict(f"runs:/{first}/{operating.ARTIFACT}")
    assert carried == {"fitted_on": "val", "points": thresholds}
    spinal = table[(table["point"] == "spinal_canal_stenosis")].set_index("rate")
    assert set(spinal.index) == set(operating.RATES)
    assert (spinal["ci_low"] <= spinal["value"]).all() and (spinal["value"] <= spinal["ci_high"]).all()
    assert (spinal["floor"].loc["referral_rate"] in (0.0, 1.0))  # the prior flags every site or none
    run = mlflow.get_run(first)
    assert {"test_refer_any_sensitivity", "test_refer_any_referral_rate"} <= set(run.data.metrics)
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(first, "clinical")}
    assert {f"clinical/test_{name}.png" for name in operating.POINTS} <= files


def test_out_of_fold_rates_are_cross_fitted_and_reach_the_target_within_their_interval(tracking):
    # Five folds of 70 studies (about 21 severe spinal sites each, enough to promise 0.95) with a model that
    # separates the grades: each study is judged by the threshold its fold's other studies chose, and the
    # sensitivity it reaches is the target's, within its interval.
    parts = [_split(f"fold{k}", 70, k) for k in range(5)]
    samples = pd.concat([p.samples.assign(fold=k) for k, (p, _) in enumerate(parts)], ignore_index=True)
    severity = np.concatenate([p.targets["severity"] for p, _ in parts])
    proba = np.concatenate([q for _, q in parts])
    floor = np.tile([0.6, 0.25, 0.15], (len(samples), 1))
    targets = load_experiment("quick", {}).clinical.targets()
    mlflow.set_experiment("operating-points")
    with mlflow.start_run() as run:
        thresholds = log_operating_points(Graded("out-of-fold", samples, severity, proba, floor), None, targets, "cv")
    table = mlflow.MlflowClient().load_table(run.info.experiment_id, "evaluation/cv_operating_points.json",
                                             run_ids=[run.info.run_id])
    sensitivity = table[table["rate"] == "sensitivity"].set_index("point")
    for name, target in targets.items():
        row = sensitivity.loc[name]
        assert row["ci_low"] <= target <= row["ci_high"], (name, row.to_dict())
        assert row["threshold"] == pytest.approx(thresholds[name]["threshold"], rel=1e-9)  # what the model carries
    # cross-fitted, not fitted on the rows it judges: an in-sample threshold would reach the target exactly
    judged = operating.cases("spinal_canal_stenosis", samples, severity, proba)
    in_sample = operating.rates(judged, thresholds["spinal_canal_stenosis"]["threshold"], resamples=10)["sensitivity"]
    assert in_sample[0] >= targets["spinal_canal_stenosis"]
    assert sensitivity.loc["spinal_canal_stenosis", "value"] != in_sample[0]
