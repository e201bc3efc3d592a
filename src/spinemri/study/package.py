"""Package the two-stage pipeline as one servable model and register it.

``package_study(localizer_uris, classifier_uri)`` logs one MLflow pyfunc model
(:class:`spinemri.serving.study.SpineStudyModel`) that bundles each localizer's and the classifier's
Keras file and meta.json with the spinemri package, and registers it as ``spinemri-study``. With
held-out studies (``data_dir`` + ``split``) the package is first run on them: its competition score
and the prior baseline's are logged, and the score decides the ``champion`` alias like any spinemri
model (lower wins, same held-out studies). The classifier's referral thresholds (chosen on its validation
rows) are then judged on those studies as the study model flags them, localization included, beside the
floor's thresholds chosen on the prior's own studies.
"""

from __future__ import annotations

import json
from pathlib import Path
import tempfile
from typing import Any, Sequence

import mlflow
from mlflow.models import ModelSignature
import pandas as pd

from spinemri.metrics import operating
from spinemri.metrics.competition import score_terms
from spinemri.metrics.floor import compare_submissions
from spinemri.metrics.prior import prior_submission
from spinemri.serving.classifier import load_classifier
from spinemri.serving.mlflow_model import PACKAGE_DIR
from spinemri.serving.study import INPUT_SCHEMA, OUTPUT_SCHEMA, REGISTERED_MODEL, SpineStudyModel
from spinemri.serving.study_predictor import StudyPredictor, classifier_prior, predict_studies, resolve_localizers
from spinemri.study.evaluate import evaluate_submission, verdict_metrics
from spinemri.study.held_out import held_out
from spinemri.tracking.registry import eval_set_hash
from spinemri.tracking.reports import log_competition_score
from spinemri.tracking.runs import describe_run, log_headline, pip_requirements, register_and_tag, start_run, use_experiment
from spinemri.training.classifier import Graded, log_point_rates


def package_study(localizer_uris: Sequence[str], classifier_uri: str, *, data_dir: str | None = None,
                  split: str = "test", name: str = REGISTERED_MODEL, register: bool = True,
                  policy: str = "paired", allow_below_floor: bool = False) -> dict[str, Any]:
    """Log (and register) the two-stage study model; see the module docstring. ``policy``: the registry's
    champion policy (:mod:`spinemri.tracking.registry`)."""
    localizers = resolve_localizers(localizer_uris)
    classifier = load_classifier(classifier_uri)
    prior, prior_source = classifier_prior(classifier)
    predictor = StudyPredictor(localizers, classifier, prior)
    use_experiment("spinemri-study")
    with start_run(run_name="study-model") as run, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mlflow.set_tags({"role": "study-model", "classifier": classifier_uri, "prior_source": prior_source,
                         **{f"localizer.{s}": "given" for s in localizers}})
        mlflow.log_params({"classifier_uri": classifier_uri, "localizer_uris": ",".join(localizer_uris),
                           "series_localized": ",".join(sorted(localizers))})
        result: dict[str, Any] = {"run_id": run.info.run_id, "series_localized": sorted(localizers)}
        metric_value, eval_set, terms, verdict = None, "none", None, None
        if data_dir:
            studies, labels, prior_labels = held_out(data_dir, split, classifier_uri, list(localizer_uris))
            summary = predict_studies(predictor, studies, tmp / "submission.csv")
            submission = pd.read_csv(tmp / "submission.csv", dtype={"row_id": str})
            report = evaluate_submission(labels, submission, prior_labels)
            metric_value = report["model"]["score"]
            scored = labels[labels["study_id"].astype(str).isin([s.study_id for s in studies])]
            eval_set = eval_set_hash(scored)
            terms = score_terms(scored, submission).reset_index()  # what a paired champion decision compares
            floor = prior_submission([s.study_id for s in studies], report["prior"])
            scores = log_competition_score(scored, submission, floor, "test")
            verdict = compare_submissions(scored, submission, floor)
            mlflow.set_tags(verdict.tags())
            if classifier.meta.get("operating_points"):
                log_study_operating_points(classifier.meta["operating_points"], scored, submission, floor,
                                           prior_labels, report["prior"])
            judged = verdict_metrics(report["verdict"], "test")
            mlflow.log_metrics({"test_rows_from_prior": summary.from_prior, "test_studies": len(studies), **judged})
            log_headline({**scores, **judged}, "test_rsna_score")
            result["verdict"] = report["verdict"]
            mlflow.log_artifact(str(summary.out), "study")
            mlflow.log_artifact(str(summary.sites), "study")
            mlflow.log_text(json.dumps(report, indent=2), "study/evaluation.json")
            result.update(score=metric_value, prior_score=report["prior_baseline"]["score"], studies=len(studies),
                          rows_from_prior=summary.from_prior)
        artifacts = {"manifest": str(tmp / "manifest.json")}
        (tmp / "manifest.json").write_text(json.dumps({"localizers": sorted(localizers), "prior": prior,
                                                        "prior_source": prior_source}, indent=2))
        for key, part in [("classifier", classifier), *((f"localizer_{s}", loc) for s, loc in localizers.items())]:
            part.model.save(tmp / f"{key}.keras")
            (tmp / f"{key}.json").write_text(json.dumps(part.meta, indent=2))
            artifacts.update({f"{key}_keras": str(tmp / f"{key}.keras"), f"{key}_meta": str(tmp / f"{key}.json")})
        info = mlflow.pyfunc.log_model(name="model", python_model=SpineStudyModel(), artifacts=artifacts,
                                       code_paths=[str(PACKAGE_DIR)],
                                       signature=ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA),
                                       pip_requirements=pip_requirements())
        result["model_uri"] = info.model_uri
        if register:
            decision = register_and_tag(info.model_uri, name, metric="test_rsna_score", value=metric_value,
                                        eval_set=eval_set, tags={"classifier": classifier_uri,
                                                                 "series_localized": ",".join(sorted(localizers))},
                                        policy=policy, evidence=terms, verdict=verdict,
                                        allow_below_floor=allow_below_floor)
            result["decision"] = str(decision)
        describe_run(verdict, result.get("decision", ""))
    return result


def log_study_operating_points(carried: dict, labels: pd.DataFrame, submission: pd.DataFrame, floor: pd.DataFrame,
                               prior_labels: pd.DataFrame, prior: dict) -> None:
    """The classifier's referral thresholds (``carried``: its meta.json ``operating_points``) judged on the
    held-out studies' submission, as the study model flags them; the floor (``floor``: the prior's submission)
    at thresholds chosen on the studies whose labels made the prior (``prior_labels``), never the held-out ones."""
    points = {name: operating.OperatingPoint.from_dict(name, entry) for name, entry in carried.items()}
    held = Graded("test", *operating.submission_rows(labels, submission),
                  operating.submission_rows(labels, floor)[2])
    others = prior_labels["study_id"].astype(str).unique()
    samples, severity, floor_proba = operating.submission_rows(prior_labels, prior_submission(others, prior))
    floor_points = operating.fit_thresholds(samples, severity, floor_proba,
                                            {name: point.target for name, point in points.items()})
    table = operating.evaluate(points, held.samples, held.severity, held.proba, floor_points, held.floor)
    log_point_rates(points, "classifier's val", table, held, "test")
