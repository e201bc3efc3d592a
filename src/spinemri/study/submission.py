"""`spinemri predict-study` as one function: a data folder and model URIs in, the submission file out."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from spinemri.data.studies import find_studies
from spinemri.errors import StudyError
from spinemri.study.held_out import held_out
from spinemri.serving.study_predictor import (PredictSummary, StudyPredictor, classifier_prior, predict_studies,
    resolve_localizers)
from spinemri.serving.classifier import load_classifier


def predict_submission(data_dir: str | Path, out: str | Path, *, localizer_uris: Sequence[str], classifier_uri: str,
                       study_ids: Sequence[str] = (), split: str = "all", progress: bool = False) -> PredictSummary:
    """Localize and grade the studies of ``data_dir`` — those named, those of one split of the classifier's
    own study-level split (checked against the localizers'), or all — and write the submission."""
    if split != "all":
        if study_ids:
            raise StudyError("give --study or --split, not both")
        studies = held_out(data_dir, split, classifier_uri, list(localizer_uris))[0]
    else:
        studies = find_studies(data_dir, list(study_ids) or None)
    classifier = load_classifier(classifier_uri)
    prior, source = classifier_prior(classifier)
    predictor = StudyPredictor(resolve_localizers(localizer_uris), classifier, prior)
    return predict_studies(predictor, studies, out, progress=progress, prior_source=source)
