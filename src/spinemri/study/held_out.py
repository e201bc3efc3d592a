"""The studies a model may be judged on: the held-out split of the classifier's own study-level split,
checked against the localizers' (no model of the pipeline may have trained on them)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from spinemri.data.studies import find_studies
from spinemri.errors import StudyError
from spinemri.serving.study_predictor import resolve_localizer_uris
from spinemri.tracking.artifacts import logged_csv


def held_out(data_dir: str, split: str, classifier_uri: str, localizer_uris: Sequence[str]):
    """The studies of ``split`` in the classifier's own study-level split, checked against the
    localizers' splits (no localizer may have trained on them), their labels, and the labels of
    every other study (what the prior baseline may learn from)."""
    splits = run_splits(classifier_uri)
    chosen = sorted(splits.loc[splits["split"] == split, "study_id"].astype(str))
    if not chosen:
        raise StudyError(f"the classifier's split has no {split} studies")
    for uri in resolve_localizer_uris(localizer_uris):
        theirs = run_splits(uri)
        leaked = sorted(set(theirs.loc[theirs["split"] == "train", "study_id"].astype(str)) & set(chosen))
        if leaked:
            raise StudyError(f"localizer {uri} trained on {len(leaked)} of the {split} studies (e.g. {leaked[0]}); "
                             "train localizers and classifier with the same split.seed and split.fractions")
    labels_path = Path(data_dir) / "train.csv"
    if not labels_path.is_file():
        raise StudyError(f"{labels_path} is missing; evaluating on held-out studies needs their labels")
    labels = pd.read_csv(labels_path, dtype={"study_id": str})
    studies = find_studies(data_dir, chosen)
    prior_labels = labels[~labels["study_id"].isin(chosen)]
    return studies, labels, prior_labels


def run_splits(model_uri: str) -> pd.DataFrame:
    """The study-level split (data/splits.csv) logged by the run that trained ``model_uri``."""
    try:
        run_id = mlflow.models.get_model_info(model_uri).run_id
        return logged_csv(run_id, "data/splits.csv", dtype={"study_id": str})
    except (MlflowException, OSError) as exc:
        raise StudyError(f"cannot read the training split of {model_uri}: {exc}; --split needs models trained by "
                         "spinemri (their runs log data/splits.csv)") from None

