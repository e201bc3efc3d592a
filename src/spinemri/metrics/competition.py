"""The RSNA 2024 LSDC competition score, computed from labels and a submission table.

The score is the mean of four weighted log losses (natural log; lower is better):

- ``spinal``, ``foraminal``, ``subarticular``: for the rows of that condition group (spinal canal;
  left+right neural foraminal; left+right subarticular), the multi-class log loss of the three
  probabilities with sample weights 1/2/4 for a TRUE severity of Normal/Mild/Moderate/Severe,
  averaged as ``sum(w * loss) / sum(w)`` (sklearn ``log_loss(normalize=True, sample_weight=w)``).
- ``any_severe_spinal``: one binary log loss per study. Label: any labelled spinal level is
  Severe. Prediction: the largest ``severe`` probability over those levels. Weight: the study's
  largest spinal sample weight (4 if any Severe, else 2 if any Moderate, else 1).

Predictions: each row is divided by its sum (so any positive scale is allowed), then clipped to
``[EPS, 1 - EPS]`` with ``EPS`` the float64 machine epsilon, as sklearn's ``log_loss`` clips; a
perfect submission therefore scores about ``EPS`` (2.2e-16), not 0. For rows that already sum to
1 this is the official Kaggle metric to within ~1e-16 (that metric passed the raw rows to
sklearn, which clipped before normalising, and took the raw ``severe`` maximum).

Blank labels are not scored: their rows need no prediction, and a study's any-severe term uses
only its labelled spinal levels (label, prediction and weight alike, as the official solution file
held only labelled rows); a study with no labelled spinal level has no any-severe term.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spinemri.data.schema import (CONDITIONS, LABEL_COLUMNS, LEVELS, PROBABILITY_COLUMNS, SEVERITIES, SEVERITY_WEIGHTS,
    SUBMISSION_COLUMNS, parse_label_column, row_id)
from spinemri.errors import MetricError

GROUPS: dict[str, tuple[str, ...]] = {
    "spinal": (CONDITIONS[0],),
    "foraminal": (CONDITIONS[1], CONDITIONS[2]),
    "subarticular": (CONDITIONS[3], CONDITIONS[4]),
}
ANY_SEVERE = "any_severe_spinal"
EPS = float(np.finfo(np.float64).eps)
_SEVERITY_CODES: dict[object, int] = {
    **{name: i for i, name in enumerate(SEVERITIES)}, **{i: i for i in range(3)},
    **{str(i): i for i in range(3)},
}


def _some(ids) -> str:
    """'a, b, c, d, e (and 7 more, 12 in all)' for error messages."""
    ids = [str(i) for i in ids]
    shown = ", ".join(ids[:5])
    return f"{shown} (and {len(ids) - 5} more, {len(ids)} in all)" if len(ids) > 5 else shown


def _severity_code(value) -> float:
    """'Moderate' / 1 / '1' -> 1.0; blank (NaN, None, '') -> NaN; anything else -> -1.0."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return np.nan
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return np.nan
    try:
        return float(_SEVERITY_CODES[value])
    except (KeyError, TypeError):
        return -1.0


def label_rows(labels: pd.DataFrame) -> pd.DataFrame:
    """Labels -> one row per (study, condition, level), blanks kept as NaN.

    Accepts train.csv's wide layout (``study_id`` + the 25 ``<condition>_<level>`` columns) or a
    long layout (``row_id, severity``). Severity is a label string (``Normal/Mild``, ``Moderate``,
    ``Severe``), 0/1/2, or blank. Returns columns ``row_id, study_id, condition, severity``
    (severity float 0/1/2 or NaN).
    """
    if {"row_id", "severity"} <= set(labels.columns):
        long = pd.DataFrame({"row_id": labels["row_id"].astype(str).str.strip(),
                             "severity": labels["severity"].to_numpy(dtype=object)})
    elif "study_id" in labels.columns:
        missing = [c for c in LABEL_COLUMNS if c not in labels.columns]
        if missing:
            raise MetricError(f"labels lack {len(missing)} train.csv column(s): {_some(missing)} — "
                              "pass train.csv's layout (study_id + 25 <condition>_<level> columns)")
        # A float column (4003253.0) comes from a study_id column with a blank cell.
        study_id = pd.Series([str(int(s)) if isinstance(s, float) and s.is_integer() else str(s).strip()
                              for s in labels["study_id"]], index=labels.index, dtype=object)
        wide = labels.assign(study_id=study_id)
        long = wide.melt(id_vars="study_id", value_vars=list(LABEL_COLUMNS),
                         var_name="column", value_name="severity")
        long = pd.DataFrame({"row_id": long["study_id"] + "_" + long["column"],
                             "severity": long["severity"].to_numpy(dtype=object)})
    else:
        raise MetricError(f"labels have columns {list(labels.columns)[:8]}; expected train.csv's "
                          "layout (study_id + 25 <condition>_<level> columns) or row_id,severity")
    if long.empty:
        return pd.DataFrame({"row_id": pd.Series(dtype=str), "study_id": pd.Series(dtype=str),
                             "condition": pd.Series(dtype=str), "severity": pd.Series(dtype=float)})
    # Python lists and one parse per distinct column name: this runs on 49,375 rows for the real train.csv.
    row_ids = long["row_id"].tolist()
    parts = [row.split("_", 1) for row in row_ids]
    studies = [p[0] for p in parts]
    columns = [p[1] if len(p) == 2 else "" for p in parts]
    known = {column: parse_label_column(column) for column in set(columns)}
    conditions = [known[c][0] if known[c] else None for c in columns]
    bad = long["row_id"][[c is None for c in conditions]]
    if len(bad):
        raise MetricError(f"{len(bad)} label row_id(s) are not <study_id>_<condition>_<level>: "
                          f"{_some(bad)} — e.g. 4003253_spinal_canal_stenosis_l1_l2")
    dup = long["row_id"][long["row_id"].duplicated()].unique()
    if len(dup):
        raise MetricError(f"labels repeat {len(dup)} row_id(s): {_some(dup)} — keep one label per row")
    severity = long["severity"].map(_severity_code)
    unknown = long[severity < 0]
    if len(unknown):
        values = sorted({repr(v) for v in unknown["severity"]})
        raise MetricError(f"{len(unknown)} label(s) have unknown severity {', '.join(values[:5])}, "
                          f"in row(s) {_some(unknown['row_id'])} — use {', '.join(SEVERITIES)}, "
                          "0/1/2, or leave the cell blank")
    return pd.DataFrame({"row_id": row_ids, "study_id": studies, "condition": conditions,
                         "severity": severity.to_numpy(float)}, index=long.index)


def submission_probabilities(rows: pd.DataFrame, submission: pd.DataFrame) -> np.ndarray:
    """The submission's rows for ``rows.row_id``, checked, normalised and clipped: float64 (N, 3)."""
    missing = [c for c in SUBMISSION_COLUMNS if c not in submission.columns]
    if missing:
        raise MetricError(f"submission lacks column(s) {', '.join(missing)} — expected "
                          f"{','.join(SUBMISSION_COLUMNS)} (sample_submission.csv's layout)")
    row_ids = submission["row_id"].astype(str).str.strip()
    dup = row_ids[row_ids.duplicated()].unique()
    if len(dup):
        raise MetricError(f"submission repeats {len(dup)} row_id(s): {_some(dup)} — keep one row each")
    where = pd.Index(row_ids.to_numpy(dtype=object)).get_indexer(rows["row_id"].to_numpy(dtype=object))
    absent = rows["row_id"][where < 0]
    if len(absent):
        raise MetricError(f"submission lacks {len(absent)} labelled row(s): {_some(absent)} — add a row "
                          "<study_id>_<condition>_<level> for each (25 per study)")
    table = submission.loc[:, list(PROBABILITY_COLUMNS)].iloc[where].apply(pd.to_numeric, errors="coerce")
    probs = table.to_numpy(dtype=np.float64)
    for problem, bad in (("are NaN, infinite or not numbers", ~np.isfinite(probs).all(axis=1)),
                         ("are negative", (probs < 0).any(axis=1)),
                         ("sum to 0", probs.sum(axis=1) == 0)):
        if bad.any():
            raise MetricError(f"submission probabilities {problem} in {bad.sum()} row(s): "
                              f"{_some(rows['row_id'][bad])} — give finite, non-negative "
                              f"{'/'.join(PROBABILITY_COLUMNS)} with a positive sum")
    return np.clip(probs / probs.sum(axis=1, keepdims=True), EPS, 1 - EPS)


def rsna_score(labels: pd.DataFrame, submission: pd.DataFrame, *, return_parts: bool = False) -> float | dict:
    """The competition score of ``submission`` against ``labels`` (see the module docstring).

    ``labels``: train.csv's wide layout, ``row_id, severity``, or :func:`label_rows`' output, holding
    exactly the studies to score. ``submission``: ``row_id, normal_mild, moderate, severe``; rows
    that ``labels`` does not label are ignored. Returns the score (float), or with
    ``return_parts`` a dict: the four terms, ``score``, and ``rows`` (labelled rows per group and
    studies in the any-severe term).
    """
    terms = score_terms(labels, submission)
    parts = {term: float(terms[f"{term}:sum"].sum() / terms[f"{term}:weight"].sum()) for term in TERMS}
    score = float(np.mean([parts[term] for term in TERMS]))
    if not return_parts:
        return score
    return {**parts, "score": score, "rows": {term: int(terms[f"{term}:rows"].sum()) for term in TERMS}}


TERMS = (*GROUPS, ANY_SEVERE)


def score_terms(labels: pd.DataFrame, submission: pd.DataFrame) -> pd.DataFrame:
    """The score taken apart by study: one row per study (index ``study_id``) and, per term of
    :data:`TERMS`, its weighted loss (``<term>:sum``), weight (``<term>:weight``) and rows
    (``<term>:rows``). Each term is its column sums' ratio and the score the mean of the terms, so
    a resample of the studies is scored from these columns alone (:mod:`spinemri.metrics.paired`).
    """
    rows = label_rows(labels) if "condition" not in labels.columns else labels
    rows = rows[rows["severity"].notna()].reset_index(drop=True)
    if rows.empty:
        raise MetricError("labels hold no labelled row (all blank) — nothing to score")
    probs = submission_probabilities(rows, submission)
    severity = rows["severity"].to_numpy(dtype=int)
    weight = SEVERITY_WEIGHTS[severity].astype(np.float64)
    row_loss = -np.log(probs[np.arange(len(rows)), severity])
    study = rows["study_id"].astype(str).to_numpy()
    columns = {}
    for group, conditions in GROUPS.items():
        in_group = rows["condition"].isin(conditions).to_numpy()
        if not in_group.any():
            raise MetricError(f"labels hold no labelled {group} row — the score needs all three "
                              "groups; score more studies")
        columns[f"{group}:sum"] = pd.Series(np.where(in_group, weight * row_loss, 0.0)).groupby(study).sum()
        columns[f"{group}:weight"] = pd.Series(np.where(in_group, weight, 0.0)).groupby(study).sum()
        columns[f"{group}:rows"] = pd.Series(in_group.astype(np.int64)).groupby(study).sum()
    spinal = pd.DataFrame({"study_id": study, "severe_true": severity == 2, "weight": weight,
                           "severe_pred": probs[:, 2]})[(rows["condition"] == CONDITIONS[0]).to_numpy()]
    per_study = spinal.groupby("study_id").max()
    truth = per_study["severe_true"].to_numpy()
    pred = per_study["severe_pred"].to_numpy()
    study_loss = -np.where(truth, np.log(pred), np.log1p(-pred))
    columns[f"{ANY_SEVERE}:sum"] = pd.Series(study_loss * per_study["weight"].to_numpy(), index=per_study.index)
    columns[f"{ANY_SEVERE}:weight"] = per_study["weight"]
    columns[f"{ANY_SEVERE}:rows"] = pd.Series(1, index=per_study.index, dtype=np.int64)
    table = pd.DataFrame(columns).fillna(0)
    table.index.name = "study_id"
    return table


def _read_csv(path: Path, what: str, **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # pandas' parser errors are ValueErrors
        raise MetricError(f"cannot read {what} {path}: {exc} — pass a readable CSV file") from exc


def score_files(labels_csv: Path, submission_csv: Path) -> dict:
    """Score a sample_submission-layout CSV against a train.csv-layout CSV (all its studies).

    Only the studies present in the submission are scored; a submission study missing from the
    labels is an error. Returns :func:`rsna_score`'s parts dict.
    """
    labels = _read_csv(Path(labels_csv), "labels", dtype={"study_id": str, "row_id": str})
    submission = _read_csv(Path(submission_csv), "submission", dtype={"row_id": str})
    rows = label_rows(labels)
    if "row_id" not in submission.columns:
        raise MetricError(f"submission {submission_csv} has no row_id column — expected "
                          f"{','.join(SUBMISSION_COLUMNS)} (sample_submission.csv's layout)")
    studies = list(dict.fromkeys(str(r).strip().split("_", 1)[0] for r in submission["row_id"]))
    labelled = set(rows["study_id"])
    unknown = [s for s in studies if s not in labelled]
    if unknown:
        raise MetricError(f"submission {submission_csv} has {len(unknown)} study(ies) that {labels_csv} "
                          f"does not label: {_some(unknown)} — use the labels file for these studies")
    scored = rows[rows["study_id"].isin(set(studies))]
    return rsna_score(scored, submission, return_parts=True)


def site_predictions(samples: pd.DataFrame, severity_proba: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ROI classifier's severity predictions at the labelled sites as competition rows: its score
    *at true sites* (stage 2 alone, before any localizer error).

    ``samples``: the classifier's sample table (``study_id``, ``condition``, ``level``, ``severity``);
    ``severity_proba``: (len(samples), 3). Rows of one (study, condition, level) are averaged.
    Returns ``(labels, submission)``: ``row_id, severity`` and ``row_id, normal_mild, moderate, severe``.
    """
    proba = np.asarray(severity_proba, dtype=np.float64)
    if len(proba) != len(samples):
        raise ValueError(f"{len(proba)} predictions for {len(samples)} samples")
    graded = (samples["condition"].isin(CONDITIONS) & samples["level"].isin(LEVELS)
              & samples["severity"].notna()).to_numpy()
    sites = samples[graded]
    ids = [row_id(s, c, lv) for s, c, lv in zip(sites["study_id"], sites["condition"], sites["level"])]
    table = pd.DataFrame(proba[graded], columns=list(PROBABILITY_COLUMNS)).assign(
        row_id=ids, severity=sites["severity"].astype(int).to_numpy())
    grouped = table.groupby("row_id", sort=True)
    submission = grouped[list(PROBABILITY_COLUMNS)].mean().reset_index()
    labels = grouped["severity"].max().reset_index()
    return labels, submission
