"""The study-level baseline: the weight-aware prior, and a submission scored beside it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spinemri.data.schema import CONDITIONS, LABEL_COLUMNS
from spinemri.errors import StudyError
from spinemri.metrics.competition import rsna_score
from spinemri.metrics.prior import prior_from_labels, prior_submission, weighted_prior
from spinemri.study.evaluate import evaluate_submission


def test_the_weighted_prior_is_the_best_constant_under_the_weighted_log_loss():
    counts = {c: (50, 12, 6) for c in CONDITIONS}
    prior = np.asarray(weighted_prior(counts)[CONDITIONS[0]])
    assert prior == pytest.approx(np.array([51, 13 * 2, 7 * 4]) / (51 + 26 + 28))
    n = np.array([51, 13, 7])  # the smoothed counts the prior is optimal for
    w = np.array([1.0, 2.0, 4.0])

    def loss(p):
        return -(n * w * np.log(p)).sum() / (n * w).sum()
    rng = np.random.default_rng(0)
    for other in rng.dirichlet(np.ones(3), size=500):
        assert loss(prior) <= loss(other) + 1e-12
    frequencies = n / n.sum()
    assert loss(prior) < loss(frequencies)  # the plain class frequencies are not the best constant


def _labels(studies, rng):
    grades = rng.choice(["Normal/Mild", "Moderate", "Severe"], size=(len(studies), len(LABEL_COLUMNS)), p=[.7, .2, .1])
    return pd.DataFrame(grades, columns=list(LABEL_COLUMNS)).assign(study_id=[str(s) for s in studies])


def test_evaluate_submission_scores_against_a_prior_learnt_elsewhere():
    rng = np.random.default_rng(1)
    labels = _labels(range(100, 130), rng)
    scored, others = labels.iloc[:5], labels.iloc[5:]
    prior = prior_from_labels(others)
    submission = prior_submission(scored["study_id"], prior)
    report = evaluate_submission(labels, submission, others)
    assert report["model"]["score"] == pytest.approx(report["prior_baseline"]["score"])
    assert report["prior_baseline"]["score"] == pytest.approx(rsna_score(scored, submission))
    assert report["studies"] == 5 and report["prior_studies"] == 25
    with pytest.raises(StudyError, match="must not see them"):
        evaluate_submission(labels, submission, labels)
    with pytest.raises(StudyError, match="do not have 1 submitted"):
        evaluate_submission(labels, prior_submission(["999"], prior), others)
