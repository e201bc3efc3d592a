"""The RSNA 2024 LSDC score: hand-computed cases, error messages, and a cross-check with sklearn."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from spinemri.data.schema import CONDITIONS, LABEL_COLUMNS, LEVELS, SEVERITIES, label_column
from spinemri.errors import UserError
from spinemri.metrics.competition import PROBABILITY_COLUMNS, MetricError, rsna_score, score_files

UNIFORM = (1 / 3, 1 / 3, 1 / 3)
EPS = np.finfo(np.float64).eps  # sklearn's clipping for float64 predictions
SPINAL = [label_column(CONDITIONS[0], level) for level in LEVELS]


def wide_labels(study_ids, cells=None) -> pd.DataFrame:
    """train.csv layout: every cell Normal/Mild unless ``cells[study_id][column]`` says otherwise."""
    cells = cells or {}
    return pd.DataFrame([{"study_id": study_id, **dict.fromkeys(LABEL_COLUMNS, SEVERITIES[0]),
                          **cells.get(study_id, {})} for study_id in study_ids])


def make_submission(study_ids, probs=UNIFORM, rows=None) -> pd.DataFrame:
    """25 rows per study with ``probs``, except ``rows[row_id]``."""
    rows = rows or {}
    return pd.DataFrame([{"row_id": f"{s}_{c}", **dict(zip(PROBABILITY_COLUMNS, rows.get(f"{s}_{c}", probs)))}
                         for s in study_ids for c in LABEL_COLUMNS])


def spinal_severe(p_severe: list[float]) -> dict[str, tuple[float, float, float]]:
    """Rows for the 5 spinal levels with the given severe probability (the rest split evenly)."""
    return {column: ((1 - p) / 2, (1 - p) / 2, p) for column, p in zip(SPINAL, p_severe)}


# Study 1: severe spinal L1/L2 and moderate left foraminal L4/L5; study 2: moderate spinal L3/L4;
# study 3: all Normal/Mild.
KNOWN = wide_labels([1, 2, 3], {
    1: {SPINAL[0]: "Severe", label_column(CONDITIONS[1], "L4/L5"): "Moderate"},
    2: {SPINAL[2]: "Moderate"},
})


def test_perfect_predictions_score_only_the_clipping_epsilon():
    truth = KNOWN.set_index("study_id")
    one_hot = {f"{s}_{c}": tuple(float(SEVERITIES.index(truth.loc[s, c]) == k) for k in range(3))
               for s in truth.index for c in LABEL_COLUMNS}
    # p=1 is clipped to 1-EPS, so every row (and the any-severe term) loses -ln(1-EPS) ~ 2.2e-16.
    score = rsna_score(KNOWN, make_submission([1, 2, 3], rows=one_hot))
    assert 0 < score <= 2 * EPS
    near = {row_id: tuple(1 - 2e-15 if p else 1e-15 for p in probs) for row_id, probs in one_hot.items()}
    # 1 - 2e-15 for the true class: every row loses ~2e-15; any severe: study 1 (weight 4) loses
    # -ln(1 - 2e-15), studies 2 and 3 (weights 2, 1) lose -ln(1 - 1e-15).
    expected = (3 * 2e-15 + (4 * 2e-15 + 3 * 1e-15) / 7) / 4
    score = rsna_score(KNOWN, make_submission([1, 2, 3], rows=near))
    assert score == pytest.approx(expected, rel=0.02, abs=0)  # approx's default abs=1e-12 would hide it


def test_uniform_predictions_match_the_hand_computed_score():
    parts = rsna_score(KNOWN, make_submission([1, 2, 3]), return_parts=True)
    # Every row loses ln 3 whatever its weight, so each group's weighted mean is ln 3.
    for group in ("spinal", "foraminal", "subarticular"):
        assert parts[group] == pytest.approx(math.log(3), rel=1e-12)
    # any severe, prediction 1/3 for every study: study 1 positive (weight 4, loss -ln 1/3 = ln 3);
    # study 2 negative (weight 2, loss -ln 2/3 = ln 1.5); study 3 negative (weight 1, ln 1.5).
    any_severe = (4 * math.log(3) + 2 * math.log(1.5) + 1 * math.log(1.5)) / 7  # 0.801549...
    assert parts["any_severe_spinal"] == pytest.approx(any_severe, rel=1e-12)
    assert parts["score"] == pytest.approx((3 * math.log(3) + any_severe) / 4, rel=1e-12)  # 1.024347...
    assert parts["score"] == pytest.approx(1.0243465, abs=1e-7)
    assert parts["rows"] == {"spinal": 15, "foraminal": 30, "subarticular": 30, "any_severe_spinal": 3}
    assert rsna_score(KNOWN, make_submission([1, 2, 3])) == parts["score"]


def test_any_severe_term_by_hand():
    labels = wide_labels([1, 2, 3], {1: {SPINAL[3]: "Severe"}, 2: {SPINAL[1]: "Moderate"}})
    rows = {**{f"1_{c}": v for c, v in spinal_severe([0.1, 0.2, 0.3, 0.6, 0.05]).items()},
            **{f"2_{c}": v for c, v in spinal_severe([0.25, 0.1, 0.0, 0.2, 0.1]).items()},
            **{f"3_{c}": v for c, v in spinal_severe([0.1, 0.1, 0.1, 0.1, 0.1]).items()}}
    parts = rsna_score(labels, make_submission([1, 2, 3], rows=rows), return_parts=True)
    # study 1: severe, max 0.6, weight 4; study 2: not severe, max 0.25, weight 2 (moderate);
    # study 3: not severe, max 0.1, weight 1.
    expected = (4 * -math.log(0.6) + 2 * -math.log(0.75) + 1 * -math.log(0.9)) / 7
    assert parts["any_severe_spinal"] == pytest.approx(expected, rel=1e-12)


def test_blank_labels_are_ignored():
    blank = {1: {SPINAL[4]: np.nan, label_column(CONDITIONS[3], "L1/L2"): ""},
             3: dict.fromkeys(SPINAL, np.nan)}  # study 3 has no labelled spinal level at all
    labels = wide_labels([1, 2, 3], {1: {**KNOWN.iloc[0].to_dict(), **blank[1]}, 3: blank[3]})
    base = rsna_score(labels, make_submission([1, 2, 3]), return_parts=True)
    # Blank rows get extreme (and, for the spinal ones, the study's largest severe) predictions.
    changed = {f"1_{SPINAL[4]}": (0.0, 0.0, 1.0), f"1_{label_column(CONDITIONS[3], 'L1/L2')}": (0, 1, 0),
               **{f"3_{c}": (0.0, 0.0, 1.0) for c in SPINAL}}
    assert rsna_score(labels, make_submission([1, 2, 3], rows=changed), return_parts=True) == base
    assert base["rows"] == {"spinal": 9, "foraminal": 30, "subarticular": 29, "any_severe_spinal": 2}
    # Without the blanks those predictions do count.
    assert rsna_score(KNOWN, make_submission([1, 2, 3], rows=changed)) != pytest.approx(base["score"])


def test_scaling_a_row_does_not_change_the_score():
    rng = np.random.default_rng(0)
    probs = {f"{s}_{c}": tuple(rng.dirichlet([1, 1, 1])) for s in (1, 2, 3) for c in LABEL_COLUMNS}
    scaled = {row_id: tuple(7.5 * p for p in row) if i % 2 else tuple(0.01 * p for p in row)
              for i, (row_id, row) in enumerate(probs.items())}
    base = rsna_score(KNOWN, make_submission([1, 2, 3], rows=probs))
    assert rsna_score(KNOWN, make_submission([1, 2, 3], rows=scaled)) == pytest.approx(base, rel=1e-12)


def test_long_labels_score_like_the_wide_layout():
    submission = make_submission([1, 2, 3], rows=spinal_severe([0.3, 0.2, 0.1, 0.05, 0.5]))
    long = KNOWN.melt(id_vars="study_id", var_name="column", value_name="severity")
    long["row_id"] = long["study_id"].astype(str) + "_" + long["column"]
    wide_score = rsna_score(KNOWN, submission)
    assert rsna_score(long[["row_id", "severity"]], submission) == wide_score
    codes = long.assign(severity=long["severity"].map(SEVERITIES.index))
    assert rsna_score(codes[["row_id", "severity"]], submission) == wide_score


def test_extra_submission_rows_for_unlabelled_studies_are_ignored():
    base = rsna_score(KNOWN, make_submission([1, 2, 3]))
    extra = pd.concat([make_submission([1, 2, 3]), make_submission([99], probs=(np.nan, -1.0, 0.0))])
    assert rsna_score(KNOWN, extra) == base


ROW = f"2_{SPINAL[2]}"


def _drop_row(sub):
    return sub[sub["row_id"] != ROW]


def _set_row(values):
    def change(sub):
        sub.loc[sub["row_id"] == ROW, list(PROBABILITY_COLUMNS)] = values
        return sub
    return change


def _object_row(sub):
    sub = sub.astype({"moderate": object})
    sub.loc[sub["row_id"] == ROW, "moderate"] = "high"
    return sub


@pytest.mark.parametrize("damage, words", [
    (_drop_row, "lacks 1 labelled row"),
    (_set_row([np.nan, 0.5, 0.5]), "NaN"),
    (_set_row([np.inf, 0.5, 0.5]), "infinite"),
    (_object_row, "not numbers"),
    (_set_row([-0.1, 0.6, 0.5]), "negative"),
    (_set_row([0.0, 0.0, 0.0]), "sum to 0"),
    (lambda sub: pd.concat([sub, sub[sub["row_id"] == ROW]]), "repeats 1 row_id"),
], ids=["missing-row", "nan", "inf", "text", "negative", "zero-sum", "duplicate"])
def test_bad_submissions_name_the_row(damage, words):
    with pytest.raises(MetricError, match=words) as info:
        rsna_score(KNOWN, damage(make_submission([1, 2, 3])))
    assert ROW in str(info.value)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_many_missing_rows_are_counted():
    with pytest.raises(MetricError, match=r"lacks 25 labelled row.*\(and 20 more, 25 in all\)") as info:
        rsna_score(KNOWN, make_submission([1, 2]))
    assert f"3_{LABEL_COLUMNS[0]}" in str(info.value)


def test_missing_submission_column_is_named():
    with pytest.raises(MetricError, match="lacks column.*moderate.*sample_submission"):
        rsna_score(KNOWN, make_submission([1, 2, 3]).drop(columns="moderate"))


def test_unknown_severity_names_the_row_and_the_choices():
    labels = wide_labels([1, 2], {2: {SPINAL[2]: "Sever"}})
    with pytest.raises(MetricError, match=r"unknown severity 'Sever'.*Normal/Mild, Moderate, Severe") as info:
        rsna_score(labels, make_submission([1, 2]))
    assert ROW in str(info.value)
    with pytest.raises(MetricError, match=r"unknown severity 3"):
        rsna_score(pd.DataFrame({"row_id": [ROW], "severity": [3]}), make_submission([2]))


def test_bad_labels_layouts():
    with pytest.raises(MetricError, match=f"lack 1 train.csv column.*{SPINAL[1]}"):
        rsna_score(KNOWN.drop(columns=SPINAL[1]), make_submission([1, 2, 3]))
    with pytest.raises(MetricError, match="repeat 25 row_id.*1_spinal_canal_stenosis_l1_l2"):
        rsna_score(pd.concat([KNOWN, KNOWN.iloc[:1]]), make_submission([1, 2, 3]))
    with pytest.raises(MetricError, match="not <study_id>_<condition>_<level>: 2_spinal_l1"):
        rsna_score(pd.DataFrame({"row_id": ["2_spinal_l1"], "severity": ["Severe"]}), make_submission([2]))
    with pytest.raises(MetricError, match="no labelled row"):
        rsna_score(wide_labels([1], {1: dict.fromkeys(LABEL_COLUMNS, np.nan)}), make_submission([1]))


def test_matches_sklearn_log_loss_on_random_studies():
    rng = np.random.default_rng(2024)
    study_ids = rng.choice(np.arange(10**6, 10**7), size=20, replace=False)
    severity = rng.choice(3, size=(20, 25), p=[0.7, 0.2, 0.1]).astype(float)
    severity[rng.random((20, 25)) < 0.05] = np.nan  # some blank cells
    probs = rng.dirichlet([2, 1, 0.5], size=(20, 25))
    labels = pd.DataFrame([{"study_id": s, **{c: (None if np.isnan(v) else SEVERITIES[int(v)])
                                             for c, v in zip(LABEL_COLUMNS, row)}}
                           for s, row in zip(study_ids, severity)])
    submission = pd.DataFrame([{"row_id": f"{s}_{c}", **dict(zip(PROBABILITY_COLUMNS, p))}
                               for s, row in zip(study_ids, probs) for c, p in zip(LABEL_COLUMNS, row)])

    condition = np.array([c.rsplit("_", 2)[0] for c in LABEL_COLUMNS])
    groups = {"spinal": condition == CONDITIONS[0],
              "foraminal": np.isin(condition, CONDITIONS[1:3]),
              "subarticular": np.isin(condition, CONDITIONS[3:5])}
    expected = {}
    for group, columns in groups.items():
        y = severity[:, columns].ravel()
        p = probs[:, columns].reshape(-1, 3)
        keep = ~np.isnan(y)
        expected[group] = log_loss(y[keep].astype(int), p[keep], sample_weight=np.array([1, 2, 4])[
            y[keep].astype(int)], labels=[0, 1, 2])
    y_any, p_any, w_any = [], [], []
    for s in range(20):
        labelled = ~np.isnan(severity[s, groups["spinal"]])
        if labelled.any():
            spinal_y = severity[s, groups["spinal"]][labelled].astype(int)
            y_any.append(int((spinal_y == 2).any()))
            p_any.append(probs[s, groups["spinal"]][labelled, 2].max())
            w_any.append(max(np.array([1, 2, 4])[spinal_y]))
    expected["any_severe_spinal"] = log_loss(y_any, p_any, sample_weight=w_any, labels=[0, 1])

    parts = rsna_score(labels, submission, return_parts=True)
    for name, value in expected.items():
        assert parts[name] == pytest.approx(value, rel=1e-10), name
    assert parts["score"] == pytest.approx(np.mean(list(expected.values())), rel=1e-10)
    assert parts["rows"]["spinal"] == int((~np.isnan(severity[:, groups["spinal"]])).sum())


def test_score_files_scores_the_submitted_studies(tmp_path):
    labels = wide_labels([1, 2, 3, 4], {1: {SPINAL[0]: "Severe"}, 4: {SPINAL[1]: np.nan}})
    labels_csv, submission_csv = tmp_path / "train.csv", tmp_path / "submission.csv"
    labels.to_csv(labels_csv, index=False)
    submission = make_submission([1, 4], rows={f"1_{SPINAL[0]}": (0.2, 0.3, 0.5)})
    submission.to_csv(submission_csv, index=False)
    expected = rsna_score(labels[labels["study_id"].isin([1, 4])], submission, return_parts=True)
    assert expected["rows"] == {"spinal": 9, "foraminal": 20, "subarticular": 20, "any_severe_spinal": 2}
    parts = score_files(labels_csv, submission_csv)
    assert parts.pop("rows") == expected.pop("rows")
    assert parts == pytest.approx(expected, rel=1e-12)  # the CSV round trip may move the last digit

    make_submission([1, 5, 6]).to_csv(submission_csv, index=False)
    with pytest.raises(MetricError, match=f"2 study.*{labels_csv.name} does not label: 5, 6"):
        score_files(labels_csv, submission_csv)


def test_score_files_unreadable_csv_names_the_file(tmp_path):
    submission_csv = tmp_path / "submission.csv"
    make_submission([1]).to_csv(submission_csv, index=False)
    with pytest.raises(MetricError, match="cannot read labels .*nowhere.csv"):
        score_files(tmp_path / "nowhere.csv", submission_csv)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(MetricError, match="cannot read submission .*empty.csv"):
        wide_labels([1]).to_csv(tmp_path / "train.csv", index=False)
        score_files(tmp_path / "train.csv", empty)


def test_a_group_without_labelled_rows_is_refused():
    only_spinal = pd.DataFrame({"row_id": [f"1_{c}" for c in SPINAL], "severity": ["Severe"] * 5})
    with pytest.raises(MetricError, match="no labelled foraminal row"):
        rsna_score(only_spinal, make_submission([1]))


def test_a_real_size_label_file_scores_like_the_table_in_memory(tmp_path):
    from spinemri.phantom import label_table

    labels = label_table()  # the real train.csv's size: 1,975 studies, 572 blank cells
    rng = np.random.default_rng(0)
    row_ids = [f"{s}_{c}" for s in labels["study_id"] for c in LABEL_COLUMNS]
    submission = pd.DataFrame(rng.dirichlet(np.ones(3), size=len(row_ids)), columns=list(PROBABILITY_COLUMNS))
    submission.insert(0, "row_id", row_ids)
    labels.to_csv(tmp_path / "train.csv", index=False)
    submission.to_csv(tmp_path / "submission.csv", index=False)
    parts = score_files(tmp_path / "train.csv", tmp_path / "submission.csv")
    assert parts["rows"]["any_severe_spinal"] == 1975
    graded = labels[list(LABEL_COLUMNS)].notna()
    assert sum(parts["rows"][g] for g in ("spinal", "foraminal", "subarticular")) == graded.to_numpy().sum() == 48803
    expected = rsna_score(labels.astype({"study_id": str}), submission, return_parts=True)
    assert parts["score"] == pytest.approx(expected["score"], abs=1e-9)
