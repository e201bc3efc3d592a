"""The headline: the few numbers a run is judged by, picked by name, in the order the summary and the run page show."""

from __future__ import annotations

import math

from spinemri.metrics.headline import headline, headline_metrics, judged_split

CLASSIFIER = {
    "test_severity_weighted_log_loss": 0.612345678, "test_floor_severity_weighted_log_loss": 0.8,
    "test_severity_weighted_log_loss_ci_low": 0.5, "test_rsna_score": 0.7, "test_floor_rsna_score": 0.75,
    "test_vs_floor": -0.19, "test_vs_floor_ci_low": -0.3, "test_condition_roc_auc": 0.9,
    "test_severity_roc_auc": 0.7, "test_level_roc_auc": math.nan, "test_severity_ece": 0.05,
    "training_time_s": 12.0, "best_val_loss": 1.2,
}


def test_a_classifier_is_judged_beside_its_floor_in_a_fixed_order():
    shown = headline(CLASSIFIER, "test_severity_ece")
    assert list(shown) == ["test_severity_weighted_log_loss", "test_floor_severity_weighted_log_loss",
                           "test_rsna_score", "test_floor_rsna_score", "test_vs_floor", "test_severity_ece",
                           "test_condition_roc_auc", "test_severity_roc_auc"]  # no NaN, no CI bound, no cost


def test_the_champion_metric_is_listed_once_and_the_logged_copies_are_rounded():
    logged = headline_metrics(CLASSIFIER, "test_severity_weighted_log_loss")
    assert list(logged).count("headline/test_severity_weighted_log_loss") == 1
    assert logged["headline/test_severity_weighted_log_loss"] == 0.6123
    assert all(name.startswith("headline/") for name in logged)


def test_the_judged_split_is_test_then_out_of_fold_then_a_fold_then_validation():
    assert judged_split({"val_loss": 1, "cv_rsna_score": 0.5, "fold_rsna_score": 0.4}) == "cv"
    assert judged_split({"val_loss": 1, "fold_vs_floor": 0.1}) == "fold"
    assert judged_split({"training_time_s": 1}) is None
    assert headline({"training_time_s": 1.0}) == {}


def test_a_localizer_shows_each_point_error_beside_its_mean_position_baseline():
    metrics = {"cv_sagittal_t1_point_error_mm": 3.25, "cv_sagittal_t1_point_error_mm_ci_low": 2.0,
               "cv_sagittal_t1_baseline_point_error_mm": 8.1, "cv_n_studies": 12}
    assert list(headline(metrics)) == ["cv_sagittal_t1_point_error_mm", "cv_sagittal_t1_baseline_point_error_mm"]
