"""The RSNA 2024 LSDC layout: a folder with train.csv, train_series_descriptions.csv,
train_label_coordinates.csv and train_images/<study>/<series>/<instance>.dcm.
"""

from __future__ import annotations

from collections import Counter
import os
from pathlib import Path

import numpy as np
import pandas as pd

from spinemri.data import schema
from spinemri.data.readers.check import Layout, check_samples
from spinemri.data.tables import CheckReport, blank, listed, read_csv, repeated_rows
from spinemri.errors import DatasetError


def load_rsna(root: str | Path) -> pd.DataFrame:
    """Read an RSNA-layout folder; raises DatasetError on missing files, columns or references."""
    root = Path(root)
    tables = _read_rsna_tables(root)
    problems = _rsna_problems(root, tables)
    if problems:
        raise DatasetError(problems)
    return _rsna_samples(root, tables)


POINT_KEY = ("study_id", "series_id", "instance_number", "condition", "level")  # one labelled point


def _read_rsna_tables(root: Path, problems: list[str] | None = None) -> dict[str, pd.DataFrame]:
    collect = problems is not None
    problems = [] if problems is None else problems
    tables = {}
    specs = {
        schema.TRAIN_CSV: ["study_id"],
        schema.SERIES_CSV: list(schema.SERIES_COLUMNS),
        schema.COORDINATES_CSV: list(schema.COORDINATE_COLUMNS),
    }
    for name, required in specs.items():
        try:
            tables[name] = read_csv(root / name, required=required)
        except DatasetError as exc:
            problems += exc.problems
    if problems and not collect:
        raise DatasetError(problems)
    return tables


def _rsna_problems(root: Path, tables: dict[str, pd.DataFrame]) -> list[str]:
    train, series, coords = tables[schema.TRAIN_CSV], tables[schema.SERIES_CSV], tables[schema.COORDINATES_CSV]
    train_csv, coords_csv, series_csv = (root / schema.TRAIN_CSV, root / schema.COORDINATES_CSV, root / schema.SERIES_CSV)
    problems = []

    unknown = [c for c in train.columns if c != "study_id" and schema.parse_label_column(c) is None]
    missing = [c for c in schema.LABEL_COLUMNS if c not in train.columns]
    if unknown:
        problems.append(f"{train_csv}: unknown column(s) {', '.join(unknown)}; label columns are "
                        f"<condition>_<level> such as spinal_canal_stenosis_l4_l5")
    if missing:
        problems.append(f"{train_csv}: missing label column(s) {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}; the competition file has all 25")
    bad_grades = []
    for column in [c for c in schema.LABEL_COLUMNS if c in train.columns]:
        for row, value in zip(train.index, train[column]):
            if not blank(value) and str(value).strip() not in schema.SEVERITY_INDEX:
                bad_grades.append((row + 2, column, value))
    problems += listed(bad_grades, lambda b: f"{train_csv} row {b[0]}: {b[1]} = {b[2]!r} is not a severity",
                        f"use one of {', '.join(schema.SEVERITIES)} or leave the cell blank")
    twice = series[series.duplicated(["study_id", "series_id"])]
    problems += listed([(i + 2, s, se) for i, s, se in zip(twice.index, twice["study_id"], twice["series_id"])],
                        lambda b: f"{series_csv} row {b[0]}: series {b[1]}/{b[2]} is listed more than once",
                        "keep one row per series")
    duplicates = train["study_id"][train["study_id"].duplicated()].tolist()
    problems += listed(duplicates, lambda s: f"{train_csv}: study {s} appears more than once", "keep one row per study")

    bad_desc = [(i + 2, d) for i, d in zip(series.index, series["series_description"])
                if str(d) not in schema.SERIES_DESCRIPTIONS]
    problems += listed(bad_desc, lambda b: f"{series_csv} row {b[0]}: unknown series_description {b[1]!r}",
                        f"use one of {', '.join(schema.SERIES_DESCRIPTIONS)}")

    rows = coords.index + 2
    bad_condition = [(r, c) for r, c in zip(rows, coords["condition"]) if c not in schema.CONDITION_KEYS]
    problems += listed(bad_condition, lambda b: f"{coords_csv} row {b[0]}: unknown condition {b[1]!r}",
                        f"use one of {', '.join(schema.CONDITION_NAMES.values())}")
    bad_level = [(r, lv) for r, lv in zip(rows, coords["level"]) if lv not in schema.LEVELS]
    problems += listed(bad_level, lambda b: f"{coords_csv} row {b[0]}: unknown level {b[1]!r}",
                        f"use one of {', '.join(schema.LEVELS)}")
    xy = coords[["x", "y"]].apply(pd.to_numeric, errors="coerce")
    bad_xy = [r for r, ok in zip(rows, np.isfinite(xy.to_numpy(float)).all(axis=1)) if not ok]
    problems += listed(bad_xy, lambda r: f"{coords_csv} row {r}: x/y are not finite numbers", "fix or drop the row")
    known = coords[coords["condition"].isin(list(schema.CONDITION_KEYS)) & coords["level"].isin(list(schema.LEVELS))]
    problems += listed(repeated_rows(known, list(POINT_KEY)),
                        lambda b: f"{coords_csv} row {b[0]} repeats row {b[1]} (the same condition and level on the "
                                  "same image)", "drop the repeated row: each labelled point becomes one sample")

    known_studies = set(train["study_id"])
    known_series = set(zip(series["study_id"], series["series_id"]))
    no_study = [(r, s) for r, s in zip(rows, coords["study_id"]) if s not in known_studies]
    problems += listed(no_study, lambda b: f"{coords_csv} row {b[0]}: study {b[1]} is not in {schema.TRAIN_CSV}",
                        "add its labels or drop its coordinates")
    no_series = [(r, s, se) for r, s, se in zip(rows, coords["study_id"], coords["series_id"])
                 if (s, se) not in known_series]
    problems += listed(no_series, lambda b: f"{coords_csv} row {b[0]}: series {b[1]}/{b[2]} is not in {schema.SERIES_CSV}",
                        "add the series' description or drop the row")
    images = root / schema.IMAGES_DIR
    if not images.is_dir():
        problems.append(f"{images} does not exist; the DICOM files go in {schema.IMAGES_DIR}/<study_id>/<series_id>/<instance>.dcm")
        return problems
    absent_series = sorted(pair for pair in set(zip(coords["study_id"], coords["series_id"]))
                           if not os.path.isdir(os.path.join(images, str(pair[0]), str(pair[1]))))
    problems += listed(absent_series, lambda b: f"labels point at absent series folder {images / str(b[0]) / str(b[1])}",
                        "restore the series or drop its rows from the CSVs")
    labelled = [(r, _image_path(root, s, se, n)) for r, s, se, n in
                zip(rows, coords["study_id"], coords["series_id"], coords["instance_number"]) if (s, se) not in absent_series]
    exists = {path: os.path.isfile(path) for path in {path for _, path in labelled}}  # a file has ~3 labelled points
    absent_files = sorted({(r, path) for r, path in labelled if not exists[path]})
    problems += listed(absent_files, lambda b: f"{coords_csv} row {b[0]}: labelled instance {b[1]} does not exist",
                        "restore the file or drop the row")
    return problems


def _rsna_samples(root: Path, tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    train, series, coords = tables[schema.TRAIN_CSV], tables[schema.SERIES_CSV], tables[schema.COORDINATES_CSV]
    grades = train.melt(id_vars="study_id", value_vars=[c for c in schema.LABEL_COLUMNS if c in train.columns],
                        var_name="column", value_name="grade")
    parsed = grades["column"].map(schema.parse_label_column)
    grades["condition"] = parsed.str[0]
    grades["level"] = parsed.str[1]
    grades["severity"] = grades["grade"].map(lambda g: None if blank(g) else schema.SEVERITY_INDEX[str(g).strip()])

    samples = coords.assign(condition=coords["condition"].map(schema.CONDITION_KEYS), label_row=coords.index + 2)
    samples = samples.merge(series, on=["study_id", "series_id"], how="left")
    samples = samples.merge(grades[["study_id", "condition", "level", "severity"]],
                            on=["study_id", "condition", "level"], how="left")
    samples["severity"] = samples["severity"].astype("Int64")
    samples["path"] = [_image_path(root, s, se, n) for s, se, n in
                       zip(samples["study_id"], samples["series_id"], samples["instance_number"])]
    samples = samples[list(schema.SAMPLE_COLUMNS)].astype({"instance_number": "int64", "x": float, "y": float,
                                                          "label_row": "int64"})
    samples = samples.sort_values(["study_id", "series_id", "instance_number", "condition", "level"], ignore_index=True)
    samples.attrs["root"] = str(root)
    samples.attrs["labels_csv"] = str(root / schema.COORDINATES_CSV)
    return samples


def _rsna_summary(root: Path, tables: dict[str, pd.DataFrame]) -> dict:
    train, series, coords = tables[schema.TRAIN_CSV], tables[schema.SERIES_CSV], tables[schema.COORDINATES_CSV]
    label_cols = [c for c in schema.LABEL_COLUMNS if c in train.columns]
    per_study = series.groupby("study_id").size()
    graded = train.melt(id_vars="study_id", value_vars=label_cols).dropna(subset=["value"])
    graded_keys = set(zip(graded["study_id"], graded["variable"]))
    pointed = {(s, schema.label_column(schema.CONDITION_KEYS.get(c, c), lv))
               for s, c, lv in zip(coords["study_id"], coords["condition"], coords["level"])}
    series_files = Counter()
    instance_numbers = {}  # (study, series) -> sorted InstanceNumbers from the file names; each folder listed once
    images = root / schema.IMAGES_DIR
    for s, se, d in zip(series["study_id"], series["series_id"], series["series_description"]):
        folder = images / str(s) / str(se)
        files = list(folder.glob("*.dcm")) if folder.is_dir() else []
        series_files[d] += len(files)
        instance_numbers[(s, se)] = sorted(int(p.stem) for p in files if p.stem.isdigit())
    non_contiguous = 0
    for s, se in coords[["study_id", "series_id"]].drop_duplicates().itertuples(index=False):
        numbers = instance_numbers.get((s, se), [])
        if numbers and (numbers[0] != 1 or numbers[-1] - numbers[0] + 1 != len(numbers)):
            non_contiguous += 1
    return {
        "studies": int(train["study_id"].nunique()),
        "series": int(len(series)),
        "series_per_description": {str(k): int(v) for k, v in series["series_description"].value_counts().sort_index().items()},
        "series_per_study": {str(k): int(v) for k, v in per_study.value_counts().sort_index().items()},
        "studies_without_series": int(len(set(train["study_id"]) - set(series["study_id"]))),
        "dicom_files": int(sum(series_files.values())),
        "dicom_files_per_description": dict(sorted(series_files.items())),
        "blank_labels": int(train[label_cols].isna().sum().sum()),
        "studies_with_blank_labels": int(train[label_cols].isna().any(axis=1).sum()),
        "graded_labels_without_coordinates": int(len(graded_keys - pointed)),
        "severity_counts": {k: int(v) for k, v in graded["value"].value_counts().reindex(schema.SEVERITIES, fill_value=0).items()},
        "series_with_non_contiguous_instances": non_contiguous,
    }


def _image_path(root: Path, study_id, series_id, instance_number) -> str:
    # os.path, not pathlib: this runs once per labelled point (and pathlib is ~10x slower at it).
    return os.path.join(root, schema.IMAGES_DIR, str(int(study_id)), str(int(series_id)), f"{int(instance_number)}.dcm")


def matches(path: Path) -> bool:
    return path.is_dir() and ((path / schema.TRAIN_CSV).is_file() or (path / schema.COORDINATES_CSV).is_file())


def check(path: Path, decode: bool, workers: int) -> CheckReport:
    report = CheckReport(str(path), "rsna")
    tables = _read_rsna_tables(path, report.problems)
    if report.problems:
        return report
    report.problems += _rsna_problems(path, tables)
    report.summary = _rsna_summary(path, tables)
    if report.problems:
        return report
    return check_samples(report, _rsna_samples(path, tables), path, decode=decode, workers=workers)


LAYOUT = Layout("rsna", f"no {schema.TRAIN_CSV} / {schema.COORDINATES_CSV} (RSNA layout)",
                matches, load_rsna, check)
