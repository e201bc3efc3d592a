"""spinemri.api.evaluate: study-level bootstrap CIs, baselines, calibration and breakdowns on synthetic predictions,
then evaluate_run on a real tiny training run in a private MLflow store."""

from __future__ import annotations

import json
import math
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, log_loss, precision_score, recall_score,
    roc_auc_score)

from spinemri.data.schema import CONDITIONS, HEAD_CLASSES, LEVELS
from spinemri.metrics.heads import (METRICS, evaluate_predictions, head_metrics, resample_scores,
    study_bootstrap_counts, weighted_log_loss)
from spinemri.metrics.report import (breakdown_figure, evaluation_markdown, evaluation_metrics, evaluation_table,
    reliability_figure)
from spinemri.metrics.scores import HEAD_METRICS

HEADS = tuple(HEAD_CLASSES)
# The oracle clips probabilities to 1e-7, so exact zeros or tiny Dirichlet draws no longer sum to one.
pytestmark = pytest.mark.filterwarnings("ignore:The y_prob values do not sum to one")


def sklearn_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """The oracle: scikit-learn's accuracy, log loss, macro one-vs-rest ROC-AUC over the classes with positive and
    negative rows, macro F1/precision/recall and balanced accuracy of the labelled rows."""
    keep = y >= 0
    y, p = y[keep], p[keep]
    predicted = p.argmax(axis=1)
    aucs = [roc_auc_score(y == k, p[:, k]) for k in range(p.shape[1]) if 0 < (y == k).sum() < len(y)]
    return {
        "accuracy": accuracy_score(y, predicted),
        "loss": log_loss(y, np.clip(p, 1e-7, 1), labels=list(range(p.shape[1]))),
        "roc_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "f1_macro": f1_score(y, predicted, average="macro", zero_division=0),
        "precision_macro": precision_score(y, predicted, average="macro", zero_division=0),
        "recall_macro": recall_score(y, predicted, average="macro", zero_division=0),
        "balanced_accuracy": balanced_accuracy_score(y, predicted),
    }


def oracle_weighted_log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """The competition's formula written out: -sum w_i log p_i(y_i) / sum w_i, w = 1/2/4, p clipped to 1e-15 and
    renormalised."""
    keep = y >= 0
    y, p = y[keep], np.clip(p[keep], 1e-15, 1)
    p = p / p.sum(axis=1, keepdims=True)
    w = np.array([1.0, 2.0, 4.0])[y]
    return float(-(w * np.log(p[np.arange(len(y)), y])).sum() / w.sum())


def synthetic(n_studies: int, per_study: int = 10, seed: int = 0, sharpen: float = 1.0):
    """A split of ``n_studies`` x ``per_study`` samples with calibrated predictions: each label is drawn from the
    predicted distribution (``sharpen`` > 1 then makes the model overconfident). Conditions and levels cycle, so
    every breakdown group gets the same share of rows."""
    rng = np.random.default_rng(seed)
    n = n_studies * per_study
    samples = pd.DataFrame({"study_id": np.repeat(1000 + np.arange(n_studies), per_study),
                            "condition": [CONDITIONS[i % 5] for i in range(n)],
                            "level": [LEVELS[(i // 5) % 5] for i in range(n)]})
    targets, proba = {}, {}
    for head, classes in HEAD_CLASSES.items():
        p = rng.dirichlet(np.full(len(classes), 0.4), n)
        targets[head] = np.minimum((p.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1), len(classes) - 1)
        sharp = p ** sharpen
        proba[head] = sharp / sharp.sum(axis=1, keepdims=True)
    return samples, targets, proba


def entries(report):
    """Every {value, ci_low, ci_high, ...} of a report, with where it sits."""
    for head, result in report["heads"].items():
        for metric, entry in result["metrics"].items():
            yield f"{head}.{metric}", entry
        for cls, scores in result["per_class"].items():
            for score in ("f1", "precision", "recall"):
                yield f"{head}.{cls}.{score}", scores[score]
    for column, groups in report["breakdowns"]["severity"].items():
        for group, result in groups.items():
            for metric, entry in result["metrics"].items():
                yield f"severity.{column}={group}.{metric}", entry


def width(entry) -> float:
    return entry["ci_high"] - entry["ci_low"]


# --- the scores behind every resample ----------------------------------------------------------

def test_resampled_scores_equal_scikit_learn_on_the_resample_written_out():
    samples, targets, proba = synthetic(12, per_study=8, seed=1)
    proba["severity"][:20] = np.round(proba["severity"][:20], 1)  # tied scores for the AUC
    proba["severity"][:20] /= proba["severity"][:20].sum(axis=1, keepdims=True)
    counts = study_bootstrap_counts(samples["study_id"], 25, seed=4)
    for head in HEADS:
        y, p = targets[head], proba[head]
        scores = resample_scores(y, p, counts, severity=head == "severity")
        for b in range(len(counts)):
            rows = np.repeat(np.arange(len(y)), counts[b])
            yy, pp = y[rows], p[rows]
            predicted = pp.argmax(axis=1)
            expected = sklearn_metrics(yy, pp)
            if head == "severity":
                expected["weighted_log_loss"] = oracle_weighted_log_loss(yy, pp)
            for name, value in expected.items():
                assert scores[name][b] == pytest.approx(value, abs=1e-12, nan_ok=True), (head, b, name)
            labels = list(range(p.shape[1]))
            for name, fn in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
                reference = fn(yy, predicted, labels=labels, average=None, zero_division=0)
                for k in np.unique(yy):
                    assert scores[f"{name}_per_class"][b, k] == pytest.approx(reference[k], abs=1e-12)
                absent = np.setdiff1d(labels, yy)
                assert np.isnan(scores[f"{name}_per_class"][b, absent]).all()


def test_point_values_are_exactly_what_training_logs():
    samples, targets, proba = synthetic(15, seed=2)
    proba = {h: p.astype(np.float32) for h, p in proba.items()}  # what Keras returns
    report = evaluate_predictions(samples, targets, proba, n_boot=20)
    for head in HEADS:
        expected, oracle = head_metrics(targets[head], proba[head]), sklearn_metrics(targets[head], proba[head])
        for name in METRICS:
            assert report["heads"][head]["metrics"][name]["value"] == expected[name], (head, name)
            assert expected[name] == pytest.approx(oracle[name], abs=1e-6), (head, name)  # float32 inputs
    assert report["heads"]["severity"]["metrics"]["weighted_log_loss"]["value"] == \
        weighted_log_loss(targets["severity"], proba["severity"])
    assert weighted_log_loss(targets["severity"], proba["severity"]) == pytest.approx(
        oracle_weighted_log_loss(targets["severity"], proba["severity"]), abs=1e-6)


# --- confidence intervals ----------------------------------------------------------------------

def test_every_interval_contains_its_point_estimate():
    report = evaluate_predictions(*synthetic(60, seed=3), n_boot=500)
    checked = 0
    for where, entry in entries(report):
        # ECE is left out: sampling noise only adds to it, so a calibrated model's resampled ECEs mostly lie
        # above its point estimate and the percentile interval may not contain it (see the module docstring).
        if entry["ci_low"] is None or where.endswith(".ece"):
            continue
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], where
        assert entry["ci_low"] < entry["ci_high"], where
        checked += 1
    assert checked == 22 + 3 * (6 + 5 + 3) + 10 * 8  # head metrics, per-class scores, breakdowns: none skipped
    assert report["heads"]["severity"]["metrics"]["accuracy"]["n_valid"] == 500
    assert report["n_studies"] == 60 and report["n_samples"] == 600


def test_intervals_shrink_with_more_studies():
    few = evaluate_predictions(*synthetic(20, seed=5), n_boot=400)
    many = evaluate_predictions(*synthetic(200, seed=5), n_boot=400)
    for head in HEADS:
        for metric in (*HEAD_METRICS, "ece"):
            narrow, wide = many["heads"][head]["metrics"][metric], few["heads"][head]["metrics"][metric]
            # sqrt(10) times more studies: about a third of the width
            assert width(narrow) < 0.6 * width(wide), (head, metric, width(narrow), width(wide))
    by_level = many["breakdowns"]["severity"]["level"]["L3/L4"]["metrics"]["weighted_log_loss"]
    assert width(by_level) < 0.6 * width(few["breakdowns"]["severity"]["level"]["L3/L4"]["metrics"]["weighted_log_loss"])


def test_a_resample_keeps_whole_studies():
    study_ids = np.array([7, 7, 7, 3, 3, 9, 9, 9, 9, 1])
    counts = study_bootstrap_counts(study_ids, 300, seed=0)
    assert counts.shape == (300, 10)
    for study in np.unique(study_ids):
        rows = counts[:, study_ids == study]
        assert (rows == rows[:, :1]).all(), study  # a study's rows are drawn together
    per_study = np.stack([counts[:, np.flatnonzero(study_ids == s)[0]] for s in np.unique(study_ids)], axis=1)
    assert (per_study.sum(axis=1) == 4).all()  # as many studies drawn as there are
    assert (per_study == 0).any() and (per_study >= 2).any()  # with replacement


def test_clustered_studies_widen_the_interval_beyond_sample_resampling():
    """40 studies of 10 samples, each study read all right or all wrong: only 40 independent outcomes."""
    rng = np.random.default_rng(0)
    study_right = rng.random(40) < 0.6
    n = 400
    samples = pd.DataFrame({"study_id": np.repeat(np.arange(40), 10)})
    severity = np.zeros(n, dtype=int)
    proba = np.tile([0.1, 0.1, 0.8], (n, 1))  # always predicts Severe
    severity[np.repeat(study_right, 10)] = 2
    as_studies = evaluate_predictions(samples, {"severity": severity}, {"severity": proba}, n_boot=500)
    as_slices = evaluate_predictions(samples.assign(study_id=np.arange(n)), {"severity": severity},
                                     {"severity": proba}, n_boot=500)
    by_study = as_studies["heads"]["severity"]["metrics"]["accuracy"]
    by_slice = as_slices["heads"]["severity"]["metrics"]["accuracy"]
    assert by_study["value"] == by_slice["value"]
    assert width(by_study) > 2.5 * width(by_slice)  # about sqrt(10) = 3.2 times wider


def test_resamples_where_a_metric_is_undefined_are_skipped_and_counted():
    samples, targets, proba = synthetic(30, seed=6)
    severe = targets["severity"] == 2
    first_severe_study = samples["study_id"][severe].iloc[0]
    targets["severity"][severe & (samples["study_id"] != first_severe_study).to_numpy()] = 1  # Severe in one study
    report = evaluate_predictions(samples, targets, proba, n_boot=400)
    recall = report["heads"]["severity"]["per_class"]["Severe"]["recall"]
    assert 0 < recall["n_valid"] < 400  # about 1 - (29/30)^30 = 64 % of the resamples hold that study
    assert report["heads"]["severity"]["metrics"]["accuracy"]["n_valid"] == 400


def test_a_single_study_gets_no_interval():
    samples, targets, proba = synthetic(1, per_study=30, seed=7)
    report = evaluate_predictions(samples, targets, proba, n_boot=100)
    accuracy = report["heads"]["severity"]["metrics"]["accuracy"]
    assert accuracy["value"] is not None and accuracy["ci_low"] is None and accuracy["n_valid"] == 0
    assert "Only 1 study" in evaluation_markdown(report, "test")


# --- baselines, calibration, breakdowns --------------------------------------------------------

def test_majority_and_prior_baselines_from_the_evaluated_split():
    samples, targets, proba = synthetic(50, seed=8)
    report = evaluate_predictions(samples, targets, proba, n_boot=50)
    assert report["baseline_source"] == "evaluated split"
    for head in HEADS:
        y = targets[head]
        frequency = np.bincount(y, minlength=len(HEAD_CLASSES[head])) / len(y)
        metrics = report["heads"][head]["metrics"]
        assert metrics["accuracy"]["majority"] == pytest.approx(frequency.max())
        assert metrics["accuracy"]["prior"] == pytest.approx(frequency.max())  # its top class is the majority
        entropy = -(frequency[frequency > 0] * np.log(frequency[frequency > 0])).sum()
        assert metrics["loss"]["prior"] == pytest.approx(entropy, rel=1e-6)
        assert metrics["roc_auc"]["majority"] == metrics["roc_auc"]["prior"] == 0.5  # constant scores
        assert metrics["balanced_accuracy"]["majority"] == pytest.approx(1 / len(np.unique(y)))
        assert metrics["ece"]["prior"] == pytest.approx(0, abs=1e-9)  # the prior is calibrated on its own labels
        assert metrics["ece"]["majority"] == pytest.approx(1 - frequency.max())
        assert report["heads"][head]["baselines"]["majority_class"] == HEAD_CLASSES[head][frequency.argmax()]


def test_baselines_come_from_the_training_split_when_given():
    samples, targets, proba = synthetic(20, seed=9)
    n = len(samples)
    train = {head: np.full(n, len(classes) - 1) for head, classes in HEAD_CLASSES.items()}  # all the last class
    train["severity"] = np.r_[np.full(10, 1), np.full(30, 2), np.full(60, -1)]  # 25 % Moderate, 75 % Severe
    report = evaluate_predictions(samples, targets, proba, n_boot=50, train_targets=train)
    assert report["baseline_source"] == "train"
    severity = report["heads"]["severity"]
    assert severity["baselines"]["majority_class"] == "Severe"
    assert severity["baselines"]["prior"] == {"Normal/Mild": 0.0, "Moderate": 0.25, "Severe": 0.75}
    y = targets["severity"]
    assert severity["metrics"]["accuracy"]["majority"] == pytest.approx(np.mean(y == 2))
    expected_loss = -np.mean(np.log(np.array([1e-7, 0.25, 0.75])[y]))  # head_metrics clips zeros to 1e-7
    assert severity["metrics"]["loss"]["prior"] == pytest.approx(expected_loss, rel=1e-6)


def test_ece_is_small_when_calibrated_and_large_when_overconfident():
    calibrated = evaluate_predictions(*synthetic(300, seed=10), n_boot=100)
    overconfident = evaluate_predictions(*synthetic(300, seed=10, sharpen=4.0), n_boot=100)
    for head in HEADS:
        assert calibrated["heads"][head]["metrics"]["ece"]["value"] < 0.03, head
        assert overconfident["heads"][head]["metrics"]["ece"]["value"] > 0.1, head
        bins = overconfident["heads"][head]["calibration"]
        assert sum(bins["count"]) == 3000 and len(bins["edges"]) == 16
        # overconfident: in the confident bins accuracy falls short of confidence
        top = [(a, c) for a, c, k in zip(bins["accuracy"], bins["confidence"], bins["count"]) if k > 50 and c > 0.8]
        assert top and all(a < c - 0.05 for a, c in top)


def test_ece_adds_the_gap_of_every_bin():
    """Overconfident at 0.9 and underconfident at 0.6 by the same 0.2: the gaps must not cancel."""
    n = 200
    proba = np.array([[0.9, 0.05, 0.05]] * 100 + [[0.6, 0.2, 0.2]] * 100)
    correct = np.r_[np.arange(100) < 70, np.arange(100) < 80]
    severity = np.where(correct, 0, 1)
    samples = pd.DataFrame({"study_id": np.arange(n) % 20})
    report = evaluate_predictions(samples, {"severity": severity}, {"severity": proba}, n_boot=50)
    result = report["heads"]["severity"]
    assert result["metrics"]["ece"]["value"] == pytest.approx(0.2)
    assert result["metrics"]["accuracy"]["value"] == pytest.approx(0.75)  # overall 0.75 vs mean confidence 0.75
    bins = result["calibration"]
    assert bins["count"][13] == bins["count"][9] == 100 and sum(bins["count"]) == n
    assert (bins["accuracy"][13], bins["confidence"][13]) == pytest.approx((0.7, 0.9))
    assert (bins["accuracy"][9], bins["confidence"][9]) == pytest.approx((0.8, 0.6))
    assert bins["accuracy"][0] is None  # an empty bin


def test_unknown_targets_are_left_out_and_breakdowns_count_their_rows():
    samples, targets, proba = synthetic(25, seed=11)
    full = evaluate_predictions(samples, targets, proba, n_boot=100)
    unknown = np.arange(len(samples)) % 4 == 0
    masked = {head: np.where(unknown, -1, y) for head, y in targets.items()}
    extra = samples.copy()
    extra.loc[unknown, "condition"] = np.nan  # a flat-CSV normal slice: no condition, no grade
    report = evaluate_predictions(extra, masked, proba, n_boot=100)
    kept = evaluate_predictions(samples[~unknown].reset_index(drop=True),
                                {h: y[~unknown] for h, y in targets.items()},
                                {h: p[~unknown] for h, p in proba.items()}, n_boot=100)
    assert report["n_samples"] == 250 and report["heads"]["severity"]["n_samples"] == 250 - unknown.sum()
    for head in HEADS:
        for metric in ("accuracy", "loss", "roc_auc", "ece"):
            assert report["heads"][head]["metrics"][metric]["value"] == kept["heads"][head]["metrics"][metric]["value"]
        assert report["heads"][head]["metrics"]["accuracy"]["value"] != \
            full["heads"][head]["metrics"]["accuracy"]["value"]
    breakdowns = report["breakdowns"]["severity"]
    assert list(breakdowns["condition"]) == list(CONDITIONS) and list(breakdowns["level"]) == list(LEVELS)
    labelled = samples[~unknown]
    for column in ("condition", "level"):
        for group, result in breakdowns[column].items():
            rows = labelled[labelled[column] == group]
            assert result["n_samples"] == len(rows) > 0, (column, group)
            assert result["n_studies"] == rows["study_id"].nunique()
            expected = sklearn_metrics(targets["severity"][rows.index], proba["severity"][rows.index])
            assert result["metrics"]["accuracy"]["value"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert sum(r["n_samples"] for r in breakdowns["level"].values()) == report["heads"]["severity"]["n_samples"]


def test_bad_inputs_are_refused():
    samples, targets, proba = synthetic(5, seed=12)
    with pytest.raises(ValueError, match="severity: expected 50 targets"):
        evaluate_predictions(samples, targets, {**proba, "severity": proba["severity"][:, :2]})
    with pytest.raises(ValueError, match="none of the 50 samples has a label"):
        evaluate_predictions(samples, {h: np.full(50, -1) for h in HEADS}, proba)
    with pytest.raises(ValueError, match="study_id"):
        evaluate_predictions(samples.drop(columns="study_id"), targets, proba)


# --- what is published -------------------------------------------------------------------------

def test_the_report_is_json_and_its_metric_names_are_plain():
    samples, targets, proba = synthetic(30, seed=13)
    report = evaluate_predictions(samples, targets, proba, n_boot=100)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    metrics = evaluation_metrics(report, "test")
    assert all(re.fullmatch(r"test_[a-z0-9_]+", name) for name in metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    for head in HEADS:
        for name in METRICS:
            assert metrics[f"test_{head}_{name}"] == head_metrics(targets[head], proba[head])[name]
            for suffix in ("_ci_low", "_ci_high"):
                assert f"test_{head}_{name}{suffix}" in metrics
        assert f"test_{head}_ece" in metrics and f"test_{head}_balanced_accuracy_ci_high" in metrics
    assert metrics["test_severity_weighted_log_loss"] == weighted_log_loss(targets["severity"], proba["severity"])
    # The headline set only: 8 metrics per head (9 for severity), each with its two CI bounds.
    assert len(metrics) == 3 * (3 * 8 + 1)

    table = evaluation_table(report)
    assert set(table["scope"]) == {"head", "class", "condition", "level"}
    recall = table[(table["head"] == "severity") & (table["scope"] == "class") & (table["group"] == "Normal/Mild")
                   & (table["metric"] == "recall")].iloc[0]
    assert recall["value"] == report["heads"]["severity"]["per_class"]["Normal/Mild"]["recall"]["value"]
    by_level = table[(table["scope"] == "level") & (table["group"] == "L5/S1") & (table["metric"] == "accuracy")].iloc[0]
    assert by_level["prior"] == report["breakdowns"]["severity"]["level"]["L5/S1"]["metrics"]["accuracy"]["prior"]
    headline = table[table["scope"] == "head"]
    assert {f"test_{h}_{m}" for h, m in zip(headline["head"], headline["metric"])} == \
        {k for k in metrics if not k.endswith(("_ci_low", "_ci_high"))}

    markdown = evaluation_markdown(report, "test")
    accuracy = report["heads"]["severity"]["metrics"]["accuracy"]
    assert (f"| accuracy | {accuracy['value']:.3f} [{accuracy['ci_low']:.3f}, {accuracy['ci_high']:.3f}] | 100 | "
            f"{accuracy['majority']:.3f} | {accuracy['prior']:.3f} |") in markdown
    assert "## severity by level" in markdown and "| L4/L5 |" in markdown

    figure = reliability_figure(report, "severity")
    assert len(figure.axes) == 2 and "ECE" in figure.axes[0].get_title()
    plt.close(figure)
    figure = breakdown_figure(report)
    assert len(figure.axes) == 4
    plt.close(figure)
