"""The thesis's flat CSV: one row per graded image (PNG, JPEG or DICOM, a path relative to the CSV's
folder), with study, series, instance, scan type, condition, level, grade and, optionally, the point's x/y.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spinemri.data import schema
from spinemri.data.readers.check import Layout, check_samples
from spinemri.data.tables import CheckReport, blank, condition_of, level_of, listed, read_csv
from spinemri.errors import DatasetError


def load_flat_csv(csv_path: str | Path) -> pd.DataFrame:
    """Read the thesis's flat CSV (images as PNG/JPEG/DICOM paths relative to the CSV's folder)."""
    csv_path = Path(csv_path)
    frame = read_csv(csv_path, required=[c for c in schema.FLAT_COLUMNS if c != "label"])
    problems = []
    conditions = [condition_of(v) for v in frame["condition"]]  # plain lists: None stays None
    for row, (raw, key) in enumerate(zip(frame["condition"], conditions), start=2):
        if key is None and not blank(raw):
            problems.append(f"{csv_path} row {row}: unknown condition {raw!r}; use one of "
                            f"{', '.join(schema.CONDITION_NAMES.values())} (or leave it blank for a normal slice)")
    levels = [level_of(v) for v in frame["level"]]
    for row, (raw, level, key) in enumerate(zip(frame["level"], levels, conditions), start=2):
        if level is None and (key is not None or not blank(raw)):
            problems.append(f"{csv_path} row {row}: unknown level {raw!r}; use one of {', '.join(schema.LEVELS)}")
    xy = frame[["x", "y"]].apply(pd.to_numeric, errors="coerce")
    for row, (raw_x, raw_y, x, y) in enumerate(zip(frame["x"], frame["y"], xy["x"], xy["y"]), start=2):
        # Both blank: a labelled image without a point (usable on whole slices, preprocess.mode slice).
        if blank(raw_x) != blank(raw_y) or (not blank(raw_x) and not (np.isfinite(x) and np.isfinite(y))):
            shown = ", ".join("blank" if blank(v) else repr(v) for v in (raw_x, raw_y))
            problems.append(f"{csv_path} row {row}: x/y ({shown}) must be two finite numbers (the "
                            "point's pixel column and row), or both blank for an image graded without a point "
                            "(whole slices only, preprocess.mode slice)")
    severity = []
    for row, name in enumerate(frame["label_name"], start=2):
        grade = _FLAT_SEVERITY.get(str(name).strip().lower()) if not blank(name) else None
        if grade is None and not blank(name):
            problems.append(f"{csv_path} row {row}: unknown label_name {name!r}; use Normal/Mild, Moderate or Severe")
        severity.append(grade)
    paths = [str(p if Path(p).is_absolute() else (csv_path.parent / p)) for p in frame["image_path"].astype(str)]
    missing = [(row, p) for row, p in enumerate(paths, start=2) if not Path(p).is_file()]
    problems += listed(missing, lambda m: f"{csv_path} row {m[0]}: image {m[1]} does not exist",
                        "fix image_path (relative paths are read from the CSV's folder)")
    if problems:
        raise DatasetError(problems)
    samples = pd.DataFrame({
        "study_id": frame["study_id"].astype("int64"),
        "series_id": frame["series_id"].astype("int64"),
        "series_description": frame["scan_type"].astype(str),
        "instance_number": frame["instance_number"].astype("int64"),
        "condition": pd.Series(conditions, dtype=object),
        "level": pd.Series(levels, dtype=object),
        "severity": pd.array(severity, dtype="Int64"),
        "x": xy["x"].astype(float),
        "y": xy["y"].astype(float),
        "path": paths,
        "label_row": np.arange(2, len(frame) + 2, dtype=np.int64),
    })
    samples.attrs["root"] = str(csv_path.parent)
    samples.attrs["labels_csv"] = str(csv_path)
    return samples


_FLAT_SEVERITY = {"normal/mild": 0, "normal": 0, "mild": 0, "moderate": 1, "severe": 2}


def looks_flat(path: Path) -> bool:
    try:
        header = pd.read_csv(path, nrows=0).columns
    except Exception:  # noqa: BLE001 - any unreadable CSV simply is not the flat layout
        return False
    return {"image_path", "scan_type", "label_name"} <= set(header)


def _csv_of(path: Path) -> Path | None:
    """The flat CSV a path names: the file itself, or the one flat CSV in a folder (None: not exactly one)."""
    if path.is_file():
        return path if path.suffix.lower() == ".csv" else None
    found = [p for p in sorted(path.glob("*.csv")) if looks_flat(p)] if path.is_dir() else []
    return found[0] if len(found) == 1 else None


def matches(path: Path) -> bool:
    return _csv_of(path) is not None


def load(path: Path) -> pd.DataFrame:
    return load_flat_csv(_csv_of(path) or path)


def check(path: Path, decode: bool, workers: int) -> CheckReport:
    report = CheckReport(str(path), "flat")
    try:
        samples = load(path)
    except DatasetError as exc:
        report.problems += exc.problems
        return report
    report.summary = {"studies": int(samples["study_id"].nunique()),
                      "series": int(samples[["study_id", "series_id"]].drop_duplicates().shape[0])}
    return check_samples(report, samples, path, decode=decode, workers=workers)


LAYOUT = Layout("flat", f"no single flat CSV with columns {', '.join(schema.FLAT_COLUMNS)}",
                matches, load, check)
