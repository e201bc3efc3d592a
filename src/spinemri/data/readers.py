"""Dataset readers: an RSNA 2024 LSDC folder, or the thesis's flat CSV, into one tidy sample table.

The sample table has one row per labelled point (``schema.SAMPLE_COLUMNS``): study_id, series_id,
series_description, instance_number, condition (a key of ``schema.CONDITIONS``, or missing for a
flat-CSV slice without a finding), level ("L4/L5"), severity (0/1/2, or missing for a blank
label), x and y (pixels), and the image path. Structural problems raise :class:`DatasetError`
naming the file, the row and the fix.
"""

from __future__ import annotations

import os

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from spinemri.data import schema
from spinemri.data.dicom import check_header, header_tags, read_header, read_image
from spinemri.data.preprocess import site_inside
from spinemri.errors import DatasetError, ImageReadError

MAX_LISTED = 10  # problems of one kind listed before "... and N more"


def detect_layout(path: str | Path) -> str:
    """'rsna' for a folder with train.csv + train_series_descriptions.csv, 'flat' for a CSV file,
    'studies' for a folder of unlabelled ``<study>/<series>/*.dcm`` folders."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return "flat"
    if path.is_dir():
        if (path / schema.TRAIN_CSV).is_file() or (path / schema.COORDINATES_CSV).is_file():
            return "rsna"
        flat = [p for p in path.glob("*.csv") if _looks_flat(p)]
        if len(flat) == 1:
            return "flat"
        if next(path.glob("*/*/*.dcm"), None) is not None or next(path.glob("*_images/*/*/*.dcm"), None) is not None:
            return "studies"
        raise DatasetError([
            f"{path}: no {schema.TRAIN_CSV} / {schema.COORDINATES_CSV} (RSNA layout), no single flat CSV "
            f"with columns {', '.join(schema.FLAT_COLUMNS)} and no <study>/<series>/*.dcm folders; point to the "
            "competition folder, to the CSV file or to a folder of studies"
        ])
    if path.exists():
        raise DatasetError([f"{path} is neither a folder nor a .csv file; pass the dataset folder (RSNA layout) "
                            "or the flat CSV file"])
    raise DatasetError([f"{path} does not exist; pass a dataset folder or a flat CSV file"])


def load_samples(path: str | Path) -> pd.DataFrame:
    """The sample table of a dataset in either layout (see the module docstring)."""
    path = Path(path)
    if detect_layout(path) == "rsna":
        return load_rsna(path)
    if path.is_dir():
        path = next(p for p in path.glob("*.csv") if _looks_flat(p))
    return load_flat_csv(path)


def load_rsna(root: str | Path) -> pd.DataFrame:
    """Read an RSNA-layout folder; raises DatasetError on missing files, columns or references."""
    root = Path(root)
    tables = _read_rsna_tables(root)
    problems = _rsna_problems(root, tables)
    if problems:
        raise DatasetError(problems)
    return _rsna_samples(root, tables)


def load_flat_csv(csv_path: str | Path) -> pd.DataFrame:
    """Read the thesis's flat CSV (images as PNG/JPEG/DICOM paths relative to the CSV's folder)."""
    csv_path = Path(csv_path)
    frame = _read_csv(csv_path, required=[c for c in schema.FLAT_COLUMNS if c != "label"])
    problems = []
    conditions = [_condition_key(v) for v in frame["condition"]]  # plain lists: None stays None
    for row, (raw, key) in enumerate(zip(frame["condition"], conditions), start=2):
        if key is None and not _blank(raw):
            problems.append(f"{csv_path} row {row}: unknown condition {raw!r}; use one of "
                            f"{', '.join(schema.CONDITION_NAMES.values())} (or leave it blank for a normal slice)")
    levels = [_level_name(v) for v in frame["level"]]
    for row, (raw, level, key) in enumerate(zip(frame["level"], levels, conditions), start=2):
        if level is None and (key is not None or not _blank(raw)):
            problems.append(f"{csv_path} row {row}: unknown level {raw!r}; use one of {', '.join(schema.LEVELS)}")
    xy = frame[["x", "y"]].apply(pd.to_numeric, errors="coerce")
    for row, (raw_x, raw_y, x, y) in enumerate(zip(frame["x"], frame["y"], xy["x"], xy["y"]), start=2):
        # Both blank: a labelled image without a point (usable on whole slices, preprocess.mode slice).
        if _blank(raw_x) != _blank(raw_y) or (not _blank(raw_x) and not (np.isfinite(x) and np.isfinite(y))):
            shown = ", ".join("blank" if _blank(v) else repr(v) for v in (raw_x, raw_y))
            problems.append(f"{csv_path} row {row}: x/y ({shown}) must be two finite numbers (the "
                            "point's pixel column and row), or both blank for an image graded without a point "
                            "(whole slices only, preprocess.mode slice)")
    severity = []
    for row, name in enumerate(frame["label_name"], start=2):
        grade = _FLAT_SEVERITY.get(str(name).strip().lower()) if not _blank(name) else None
        if grade is None and not _blank(name):
            problems.append(f"{csv_path} row {row}: unknown label_name {name!r}; use Normal/Mild, Moderate or Severe")
        severity.append(grade)
    paths = [str(p if Path(p).is_absolute() else (csv_path.parent / p)) for p in frame["image_path"].astype(str)]
    missing = [(row, p) for row, p in enumerate(paths, start=2) if not Path(p).is_file()]
    problems += _listed(missing, lambda m: f"{csv_path} row {m[0]}: image {m[1]} does not exist",
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


@dataclass
class CheckReport:
    """What ``spinemri data check`` prints: a summary, structural problems (fatal) and warnings."""

    path: str
    layout: str
    summary: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    series: list[dict] = field(default_factory=list)  # a folder of studies: each series' type and why

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2, default=_json_default)


def check_dataset(path: str | Path, *, decode: bool = False, workers: int = 4) -> CheckReport:
    """Validate a dataset without changing it.

    Reads every labelled image's header (``decode=True``: its pixels too) to count unreadable
    files. Only the file names, reasons and counts are reported: never patient tags.
    """
    path = Path(path)
    try:
        layout = detect_layout(path)
    except DatasetError as exc:
        return CheckReport(str(path), "unknown", problems=exc.problems)
    report = CheckReport(str(path), layout)
    if layout == "studies":  # unlabelled: its series are what there is to check
        report.problems.append(f"{path} is a folder of studies without labels; check it with "
                               "spinemri.data.studies.check_studies (what `spinemri data check` does)")
        return report
    if layout == "rsna":
        tables = _read_rsna_tables(path, report.problems)
        if report.problems:
            return report
        report.problems += _rsna_problems(path, tables)
        report.summary = _rsna_summary(path, tables)
        if report.problems:
            return report
        samples = _rsna_samples(path, tables)
    else:
        try:
            samples = load_samples(path)
        except DatasetError as exc:
            report.problems += exc.problems
            return report
        report.summary = {"studies": int(samples["study_id"].nunique()),
                          "series": int(samples[["study_id", "series_id"]].drop_duplicates().shape[0])}
    report.summary["labelled_points"] = _points_per_condition(samples)
    report.summary["graded_points"] = int(samples["severity"].notna().sum())
    pointless = samples[samples["condition"].notna() & (samples["x"].isna() | samples["y"].isna())]
    if len(pointless):
        report.summary["graded_without_point"] = len(pointless)
        report.warnings.append(f"{samples.attrs.get('labels_csv', str(path))}: {len(pointless)} labelled row(s) "
                               f"have no x/y (rows {_rows_text(pointless['label_row'])}): they train whole-slice "
                               "models (--mode slice, which grades the site each row names); roi mode refuses them")
    labels_csv = samples.attrs.get("labels_csv", str(path))
    twice = samples[samples["condition"].notna()]
    twice = twice[twice.duplicated(["study_id", "condition", "level"], keep=False)]
    report.warnings += _listed(
        [(s, c, lv, sorted(g["label_row"])) for (s, c, lv), g in twice.groupby(["study_id", "condition", "level"])],
        lambda t: f"{labels_csv} rows {', '.join(map(str, t[3]))}: study {t[0]} has {t[1]} {t[2]} labelled on "
                  f"{len(t[3])} images; each becomes a sample with the same grade",
        "keep one row per condition and level unless both images show it")

    unreadable, sizes = _probe(sorted(set(samples["path"])), decode=decode, workers=workers)
    report.summary["files_unreadable"] = len(unreadable)
    report.warnings += _listed(unreadable, lambda u: f"unreadable: {u}",
                               "prepare with --on-bad-file=skip to leave these samples out")
    outside = [(row, x, y, sizes[p], p) for row, x, y, p in
               zip(samples["label_row"], samples["x"], samples["y"], samples["path"])
               if p in sizes and np.isfinite(x) and np.isfinite(y) and not site_inside(x, y, *sizes[p])]
    report.problems += _listed(
        outside, lambda o: f"{labels_csv} row {o[0]}: the point (x={o[1]:g}, y={o[2]:g}) lies outside the "
                           f"{o[3][0]}x{o[3][1]} image {o[4]}", "fix the coordinate (pixels, column x and row y) or drop the row")
    return report


def series_descriptions(root: str | Path) -> dict[tuple[str, int], str]:
    """``{(study_id, series_id): series_description}`` from a dataset folder's train_ and test_ series CSVs
    (neither is required: an empty dict without them)."""
    found: dict[tuple[str, int], str] = {}
    for name in (schema.SERIES_CSV, schema.TEST_SERIES_CSV):
        path = Path(root) / name
        if path.is_file():
            table = _read_csv(path, required=list(schema.SERIES_COLUMNS))
            found.update({(str(s), int(se)): str(d) for s, se, d in
                          table[list(schema.SERIES_COLUMNS)].itertuples(index=False)})
    return found


# --- RSNA layout internals --------------------------------------------------------------------

POINT_KEY = ("study_id", "series_id", "instance_number", "condition", "level")  # one labelled point


def _repeated_rows(table: pd.DataFrame, key: list[str]) -> list[tuple[int, int]]:
    """(CSV row, CSV row of its first occurrence) for every row whose ``key`` repeats an earlier row's."""
    first = table.groupby(key, sort=False, dropna=False).ngroup()
    seen: dict[int, int] = {}
    repeats = []
    for index, group in zip(table.index, first):
        if group in seen:
            repeats.append((index + 2, seen[group]))
        else:
            seen[group] = index + 2
    return repeats


_FLAT_SEVERITY = {"normal/mild": 0, "normal": 0, "mild": 0, "moderate": 1, "severe": 2}


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
            tables[name] = _read_csv(root / name, required=required)
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
            if not _blank(value) and str(value).strip() not in schema.SEVERITY_INDEX:
                bad_grades.append((row + 2, column, value))
    problems += _listed(bad_grades, lambda b: f"{train_csv} row {b[0]}: {b[1]} = {b[2]!r} is not a severity",
                        f"use one of {', '.join(schema.SEVERITIES)} or leave the cell blank")
    twice = series[series.duplicated(["study_id", "series_id"])]
    problems += _listed([(i + 2, s, se) for i, s, se in zip(twice.index, twice["study_id"], twice["series_id"])],
                        lambda b: f"{series_csv} row {b[0]}: series {b[1]}/{b[2]} is listed more than once",
                        "keep one row per series")
    duplicates = train["study_id"][train["study_id"].duplicated()].tolist()
    problems += _listed(duplicates, lambda s: f"{train_csv}: study {s} appears more than once", "keep one row per study")

    bad_desc = [(i + 2, d) for i, d in zip(series.index, series["series_description"])
                if str(d) not in schema.SERIES_DESCRIPTIONS]
    problems += _listed(bad_desc, lambda b: f"{series_csv} row {b[0]}: unknown series_description {b[1]!r}",
                        f"use one of {', '.join(schema.SERIES_DESCRIPTIONS)}")

    rows = coords.index + 2
    bad_condition = [(r, c) for r, c in zip(rows, coords["condition"]) if c not in schema.CONDITION_KEYS]
    problems += _listed(bad_condition, lambda b: f"{coords_csv} row {b[0]}: unknown condition {b[1]!r}",
                        f"use one of {', '.join(schema.CONDITION_NAMES.values())}")
    bad_level = [(r, lv) for r, lv in zip(rows, coords["level"]) if lv not in schema.LEVELS]
    problems += _listed(bad_level, lambda b: f"{coords_csv} row {b[0]}: unknown level {b[1]!r}",
                        f"use one of {', '.join(schema.LEVELS)}")
    xy = coords[["x", "y"]].apply(pd.to_numeric, errors="coerce")
    bad_xy = [r for r, ok in zip(rows, np.isfinite(xy.to_numpy(float)).all(axis=1)) if not ok]
    problems += _listed(bad_xy, lambda r: f"{coords_csv} row {r}: x/y are not finite numbers", "fix or drop the row")
    known = coords[coords["condition"].isin(list(schema.CONDITION_KEYS)) & coords["level"].isin(list(schema.LEVELS))]
    problems += _listed(_repeated_rows(known, list(POINT_KEY)),
                        lambda b: f"{coords_csv} row {b[0]} repeats row {b[1]} (the same condition and level on the "
                                  "same image)", "drop the repeated row: each labelled point becomes one sample")

    known_studies = set(train["study_id"])
    known_series = set(zip(series["study_id"], series["series_id"]))
    no_study = [(r, s) for r, s in zip(rows, coords["study_id"]) if s not in known_studies]
    problems += _listed(no_study, lambda b: f"{coords_csv} row {b[0]}: study {b[1]} is not in {schema.TRAIN_CSV}",
                        "add its labels or drop its coordinates")
    no_series = [(r, s, se) for r, s, se in zip(rows, coords["study_id"], coords["series_id"])
                 if (s, se) not in known_series]
    problems += _listed(no_series, lambda b: f"{coords_csv} row {b[0]}: series {b[1]}/{b[2]} is not in {schema.SERIES_CSV}",
                        "add the series' description or drop the row")
    images = root / schema.IMAGES_DIR
    if not images.is_dir():
        problems.append(f"{images} does not exist; the DICOM files go in {schema.IMAGES_DIR}/<study_id>/<series_id>/<instance>.dcm")
        return problems
    absent_series = sorted(pair for pair in set(zip(coords["study_id"], coords["series_id"]))
                           if not os.path.isdir(os.path.join(images, str(pair[0]), str(pair[1]))))
    problems += _listed(absent_series, lambda b: f"labels point at absent series folder {images / str(b[0]) / str(b[1])}",
                        "restore the series or drop its rows from the CSVs")
    labelled = [(r, _image_path(root, s, se, n)) for r, s, se, n in
                zip(rows, coords["study_id"], coords["series_id"], coords["instance_number"]) if (s, se) not in absent_series]
    exists = {path: os.path.isfile(path) for path in {path for _, path in labelled}}  # a file has ~3 labelled points
    absent_files = sorted({(r, path) for r, path in labelled if not exists[path]})
    problems += _listed(absent_files, lambda b: f"{coords_csv} row {b[0]}: labelled instance {b[1]} does not exist",
                        "restore the file or drop the row")
    return problems


def _rsna_samples(root: Path, tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    train, series, coords = tables[schema.TRAIN_CSV], tables[schema.SERIES_CSV], tables[schema.COORDINATES_CSV]
    grades = train.melt(id_vars="study_id", value_vars=[c for c in schema.LABEL_COLUMNS if c in train.columns],
                        var_name="column", value_name="grade")
    parsed = grades["column"].map(schema.parse_label_column)
    grades["condition"] = parsed.str[0]
    grades["level"] = parsed.str[1]
    grades["severity"] = grades["grade"].map(lambda g: None if _blank(g) else schema.SEVERITY_INDEX[str(g).strip()])

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


# --- shared helpers ------------------------------------------------------------------------------

def _read_csv(path: Path, *, required: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DatasetError([f"{path} is missing; an RSNA-layout dataset needs {schema.TRAIN_CSV}, "
                            f"{schema.SERIES_CSV} and {schema.COORDINATES_CSV}"])
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError([f"{path} is not a readable CSV ({type(exc).__name__}: {str(exc).splitlines()[0]})"]) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    frame = frame.replace(r"^\s*$", np.nan, regex=True)  # whitespace-only cells are blank
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DatasetError([f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(frame.columns)}"])
    problems = []
    for column in ("study_id", "series_id", "instance_number"):
        if column in frame.columns:
            values = pd.to_numeric(frame[column], errors="coerce")
            bad = [i + 2 for i, v in zip(frame.index, values) if not np.isfinite(v) or v != int(v)]
            problems += _listed(bad, lambda r, c=column: f"{path} row {r}: {c} is not an integer", "fix or drop the row")
            if not bad:
                frame[column] = values.astype("int64")
    if problems:
        raise DatasetError(problems)
    return frame


def _looks_flat(path: Path) -> bool:
    try:
        header = pd.read_csv(path, nrows=0).columns
    except Exception:  # noqa: BLE001 - any unreadable CSV simply is not the flat layout
        return False
    return {"image_path", "scan_type", "label_name"} <= set(header)


def _condition_key(value) -> str | None:
    if _blank(value):
        return None
    return schema.condition_key(str(value))


def _level_name(value) -> str | None:
    if _blank(value):
        return None
    return schema.level_name(str(value))


def _rows_text(rows) -> str:
    """'2, 3, 4, 5, 6 and 40 more' for a warning about many rows."""
    rows = [str(int(r)) for r in rows]
    return ", ".join(rows[:5]) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip()) or value is pd.NA


def _listed(items, describe, fix: str) -> list[str]:
    """One line per problem (at most MAX_LISTED), the fix on the first, a count of the rest."""
    items = list(items)
    lines = [describe(item) for item in items[:MAX_LISTED]]
    if lines:
        lines[0] += f" ({fix})"
    if len(items) > MAX_LISTED:
        lines.append(f"... and {len(items) - MAX_LISTED} more of the same kind")
    return lines


def _points_per_condition(samples: pd.DataFrame) -> dict[str, int]:
    counts = samples["condition"].fillna("none (normal slice)").value_counts()
    return {str(k): int(v) for k, v in counts.sort_index().items()}


def _probe(paths: list[str], *, decode: bool, workers: int) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Each file's readability and image size: (unreadable 'path reason' lines, {path: (width, height)})."""
    def probe(path: str) -> tuple[str | None, tuple[int, int] | None]:
        try:
            if decode or not path.lower().endswith(".dcm"):
                height, width = read_image(path).pixels.shape
                return None, (width, height)
            header = read_header(path)
            if not any(k in header for k in ("Rows", "Columns")):
                return f"{path} has no image attributes (Rows/Columns)", None
            check_header(header_tags(header), path, frames=1)  # what decoding it would refuse
            return None, (int(header.get("Columns") or 0), int(header.get("Rows") or 0))
        except ImageReadError as exc:
            return str(exc.path) + " " + exc.reason, None

    unreadable, sizes = [], {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, (problem, size) in zip(paths, pool.map(probe, paths)):
            if problem is not None:
                unreadable.append(problem)
            elif size is not None:
                sizes[path] = size
    return unreadable, sizes


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)
