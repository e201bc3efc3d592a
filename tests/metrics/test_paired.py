"""The paired bootstrap over studies: a difference and its interval from both models' predictions on one set."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spinemri.data.schema import HEAD_CLASSES
from spinemri.metrics import heads
from spinemri.metrics.paired import head_metric, paired_difference, prediction_table

STUDIES, SITES = 40, 10


def _reference(seed: int = 0) -> tuple[pd.DataFrame, dict, dict]:
    """A held-out set of 40 studies x 10 sites, and a mediocre model's probabilities."""
    rng = np.random.default_rng(seed)
    n = STUDIES * SITES
    samples = pd.DataFrame({"study_id": np.repeat(np.arange(1000, 1000 + STUDIES), SITES),
                            "series_id": 7, "instance_number": np.tile(np.arange(SITES), STUDIES),
                            "condition": "spinal_canal_stenosis", "level": "L1/L2"})
    targets, proba = {}, {}
    for head, classes in HEAD_CLASSES.items():
        y = rng.integers(0, len(classes), n)
        y[rng.random(n) < 0.1] = -1  # unlabelled rows are left out of every metric
        logits = rng.normal(0, 1, (n, len(classes)))
        logits[np.arange(n), np.maximum(y, 0)] += 1.0
        proba[head] = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        targets[head] = y
    return samples, targets, proba


def _sharpen(proba: np.ndarray, y: np.ndarray, rows: np.ndarray, amount: float) -> np.ndarray:
    """Move the probabilities of ``rows`` a fraction ``amount`` towards the true class."""
    out = proba.copy()
    onehot = np.eye(proba.shape[1])[np.maximum(y, 0)]
    out[rows] = (1 - amount) * proba[rows] + amount * onehot[rows]
    return out


def test_a_model_against_itself_differs_by_exactly_zero():
    samples, targets, proba = _reference()
    table = prediction_table(samples, targets, proba)
    result = paired_difference(table, table, "test_severity_weighted_log_loss", resamples=200)
    assert result.difference == 0 and result.ci_low == 0 and result.ci_high == 0
    assert not result.significant and result.studies == STUDIES
    keep = targets["severity"] >= 0
    assert result.candidate == pytest.approx(heads.weighted_log_loss(targets["severity"][keep], proba["severity"][keep]))


def test_a_better_model_on_every_study_is_significantly_better():
    samples, targets, proba = _reference()
    better = {**proba, "severity": _sharpen(proba["severity"], targets["severity"], np.arange(len(samples)), 0.2)}
    result = paired_difference(prediction_table(samples, targets, better), prediction_table(samples, targets, proba),
                               "test_severity_weighted_log_loss", resamples=500)
    assert result.difference < 0 and result.ci_high < 0 and result.significant
    # The same improvement in a higher-is-better metric points the other way.
    auc = paired_difference(prediction_table(samples, targets, better), prediction_table(samples, targets, proba),
                            "test_severity_roc_auc", resamples=500)
    assert auc.difference > 0 and auc.ci_low > 0 and auc.significant


def test_better_on_average_because_of_one_study_is_not_significant():
    samples, targets, proba = _reference()
    y = targets["severity"]
    one_study = np.flatnonzero(samples["study_id"].to_numpy() == 1000)
    lucky = _sharpen(proba["severity"], y, one_study, 0.9)  # much better on one study ...
    rest = np.flatnonzero(samples["study_id"].to_numpy() != 1000)
    noisy = np.random.default_rng(5).dirichlet(np.ones(3), len(rest))
    lucky[rest] = 0.97 * lucky[rest] + 0.03 * noisy  # ... and a little worse on the others
    result = paired_difference(prediction_table(samples, targets, {**proba, "severity": lucky}),
                               prediction_table(samples, targets, proba), "test_severity_weighted_log_loss",
                               resamples=1000)
    assert result.difference < 0, result  # better on average: the strict rule would promote it
    assert result.ci_low < 0 < result.ci_high and not result.significant, result


def test_the_bootstrap_resamples_studies_not_rows():
    # Two studies: one where the candidate is much better, one where it is much worse. A row bootstrap
    # would give 20 rows per draw a say; a study bootstrap draws whole studies, so about a quarter of
    # the resamples hold only the worse study and the interval spans zero widely.
    samples, targets, proba = _reference()
    keep = samples["study_id"].isin([1000, 1001]).to_numpy()
    small = samples[keep].reset_index(drop=True)
    t = {h: v[keep] for h, v in targets.items()}
    p = {h: v[keep] for h, v in proba.items()}
    first = np.flatnonzero(small["study_id"].to_numpy() == 1000)
    second = np.flatnonzero(small["study_id"].to_numpy() == 1001)
    candidate = _sharpen(p["severity"], t["severity"], first, 0.8)
    wrong = np.roll(np.eye(3)[np.maximum(t["severity"], 0)], 1, axis=1)
    candidate[second] = 0.5 * candidate[second] + 0.5 * wrong[second]
    result = paired_difference(prediction_table(small, t, {**p, "severity": candidate}), prediction_table(small, t, p),
                               "test_severity_weighted_log_loss", resamples=400)
    assert result.studies == 2 and result.ci_low < -0.1 and result.ci_high > 0.1


def test_tables_of_other_samples_or_unpairable_metrics_are_refused():
    samples, targets, proba = _reference()
    table = prediction_table(samples, targets, proba)
    with pytest.raises(ValueError, match="not evaluated on the same labelled samples"):
        paired_difference(table.iloc[:-SITES], table, "test_severity_weighted_log_loss")
    relabelled = table.copy()
    relabelled.loc[relabelled["severity:target"] == 0, "severity:target"] = 1
    with pytest.raises(ValueError, match="not evaluated on the same labelled samples"):
        paired_difference(relabelled, table, "test_severity_weighted_log_loss")
    with pytest.raises(ValueError, match="cannot be compared by a paired bootstrap"):
        paired_difference(table, table, "test_severity_ece_spinal_canal_stenosis")
    assert head_metric("test_condition_weighted_log_loss") is None and head_metric("val_loss") is None
    assert head_metric("test_level_f1_macro") == ("level", "f1_macro")
    # Row order does not matter: tables are aligned on the sample key.
    shuffled = table.sample(frac=1, random_state=1)
    assert paired_difference(shuffled, table, "test_condition_loss", resamples=50).difference == pytest.approx(0)


def test_the_competition_score_is_paired_from_its_per_study_terms():
    from spinemri.phantom import label_table
    from spinemri.metrics.competition import TERMS, rsna_score, score_terms
    from spinemri.metrics.paired import MIN_PAIRED_STUDIES

    labels = label_table(studies=60, blanks=10, seed=3)
    rows = labels.melt(id_vars="study_id", var_name="finding", value_name="severity").dropna()
    codes = rows["severity"].map({"Normal/Mild": 0, "Moderate": 1, "Severe": 2}).to_numpy()
    rng = np.random.default_rng(0)

    def submission(sharpness):
        logits = rng.normal(0, 1, (len(rows), 3))
        logits[np.arange(len(rows)), codes] += sharpness
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return pd.DataFrame({"row_id": (rows["study_id"].astype(str) + "_" + rows["finding"]).to_numpy(),
                             "normal_mild": p[:, 0], "moderate": p[:, 1], "severe": p[:, 2]})

    weak, strong = submission(0.5), submission(2.5)
    terms = score_terms(labels, weak)
    assert len(terms) == 60 and {f"{t}:sum" for t in TERMS} <= set(terms.columns)
    parts = rsna_score(labels, weak, return_parts=True)
    for term in TERMS:  # each term is the ratio of its columns' sums; the score their mean
        assert parts[term] == pytest.approx(terms[f"{term}:sum"].sum() / terms[f"{term}:weight"].sum(), rel=1e-12)

    ours, theirs = score_terms(labels, strong).reset_index(), terms.reset_index()
    result = paired_difference(ours, theirs, "test_rsna_score", resamples=500)
    assert result.candidate == pytest.approx(rsna_score(labels, strong), rel=1e-12)
    assert result.reference == pytest.approx(parts["score"], rel=1e-12)
    assert result.studies == 60 >= MIN_PAIRED_STUDIES and result.ci_high < 0 and result.significant
    same = paired_difference(theirs, theirs, "test_rsna_score", resamples=100)
    assert same.difference == 0 and not same.significant
    with pytest.raises(ValueError, match="not evaluated on the same studies"):
        paired_difference(ours.iloc[1:], theirs, "test_rsna_score")


def test_a_localizer_s_mean_error_is_paired_from_its_per_study_terms():
    from spinemri.localization.locate import error_terms, summarize_errors

    rng = np.random.default_rng(2)
    errors = pd.DataFrame({"study_id": np.repeat(np.arange(30), 5), "error_mm": rng.gamma(2, 3, 150)})
    errors.loc[rng.random(150) < 0.1, "error_mm"] = np.nan  # a site on another series: not measured
    terms = error_terms(errors)
    assert len(terms) == 30
    mean = summarize_errors(errors.assign(slice_ok=True))["point_error_mm"]
    result = paired_difference(terms, terms, "test_sagittal_t2_point_error_mm", resamples=10)
    assert result.candidate == pytest.approx(mean, rel=1e-12) and result.difference == 0
    closer = error_terms(errors.assign(error_mm=errors["error_mm"] * 0.7))
    better = paired_difference(closer, terms, "test_sagittal_t2_point_error_mm", resamples=500)
    assert better.difference == pytest.approx(-0.3 * mean) and better.significant


def test_resamples_are_scored_a_block_at_a_time_with_the_same_result(monkeypatch):
    # Rows x resamples counts would take gigabytes at the size of an out-of-fold table (50,000 rows);
    # they are built a block of resamples at a time, and the blocks do not change the draws.
    from spinemri.metrics import paired

    samples, targets, proba = _reference()
    better = {**proba, "severity": _sharpen(proba["severity"], targets["severity"], np.arange(len(samples)), 0.1)}
    ours, theirs = prediction_table(samples, targets, better), prediction_table(samples, targets, proba)
    results = []
    for block in (7, 100, 5000):
        monkeypatch.setattr(paired, "RESAMPLES_AT_ONCE", block)
        results.append(paired_difference(ours, theirs, "test_severity_roc_auc", resamples=300))
    assert results[0] == results[1] == results[2]
