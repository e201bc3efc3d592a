"""A table of graded sites per image (``study_id, condition_level, severity, file``) as the flat CSV.

Exports of the RSNA 2024 data often come as one row per graded site: the train.csv column of the
site (``left_neural_foraminal_narrowing_l4_l5``), its grade and the image it was graded on, without
series, instance numbers or the point. :func:`flat_from_site_table` writes such a table in the
thesis's flat CSV layout (``schema.FLAT_COLUMNS``) with empty x/y: images graded without a point, for
whole-slice models (``preprocess.mode slice``), which grade the site each row names.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spinemri.data import schema
from spinemri.errors import DatasetError
from spinemri.atomic import check_target, write_csv

COLUMNS = ("study_id", "condition_level", "severity", "file")
MAX_LISTED = 10


def flat_from_site_table(table_csv: str | Path, *, scan_type: str = schema.SAGITTAL_T1) -> pd.DataFrame:
    """The flat CSV rows of a site table: one row per graded site, ``image_path`` absolute (``file`` is read
    relative to the table's folder), ``series_id`` 1 and ``instance_number`` the image's number within its
    study (neither is known), ``scan_type`` as given. Raises DatasetError naming the rows that cannot be read."""
    table_csv = Path(table_csv)
    try:
        table = pd.read_csv(table_csv, dtype={"study_id": str})
    except FileNotFoundError:
        raise DatasetError([f"{table_csv} does not exist; pass the site table (columns {', '.join(COLUMNS)})"]) from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DatasetError([f"{table_csv} is not a readable CSV ({type(exc).__name__}: {exc})"]) from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError([f"{table_csv} lacks column(s) {', '.join(missing)}; a site table has "
                            f"{', '.join(COLUMNS)} (one row per graded site)"])
    if scan_type not in schema.SERIES_DESCRIPTIONS:
        raise DatasetError([f"scan type {scan_type!r} is not one of {', '.join(schema.SERIES_DESCRIPTIONS)}"])
    problems, rows = [], []
    names = {name.lower(): name for name in schema.SEVERITIES}
    for line, (study, site, severity, file) in enumerate(table[list(COLUMNS)].itertuples(index=False), start=2):
        parsed = schema.parse_label_column(str(site).strip())
        grade = names.get(str(severity).strip().lower())
        path = Path(str(file))
        path = path if path.is_absolute() else table_csv.parent / path
        if not str(study).strip().isdigit():
            problems.append(f"{table_csv} row {line}: study_id {study!r} is not a whole number")
        elif parsed is None:
            problems.append(f"{table_csv} row {line}: condition_level {site!r} is not a train.csv column such as "
                            "left_neural_foraminal_narrowing_l4_l5")
        elif grade is None:
            problems.append(f"{table_csv} row {line}: severity {severity!r} is not one of "
                            f"{', '.join(schema.SEVERITIES)}")
        elif not path.is_file():
            problems.append(f"{table_csv} row {line}: image {path} does not exist (file is read from the table's "
                            "folder)")
        else:
            rows.append((int(study), parsed[0], parsed[1], str(path.resolve()), grade))
    if problems:
        shown = problems[:MAX_LISTED]
        if len(problems) > MAX_LISTED:
            shown.append(f"... and {len(problems) - MAX_LISTED} more problems ({len(problems)} in all)")
        raise DatasetError(shown)
    frame = pd.DataFrame(rows, columns=["study_id", "condition", "level", "image_path", "label_name"])
    duplicated = frame[frame.duplicated(["study_id", "condition", "level", "image_path"], keep=False)]
    if len(duplicated):
        first = duplicated.iloc[0]
        raise DatasetError([f"{table_csv}: study {first['study_id']} grades {first['condition']} {first['level']} "
                            f"twice on {first['image_path']} ({len(duplicated)} such rows); keep one row per site "
                            "and image"])
    number = frame.groupby("study_id")["image_path"].transform(lambda files: pd.factorize(files)[0] + 1)
    return pd.DataFrame({
        "study_id": frame["study_id"], "series_id": 1, "instance_number": number.astype(int),
        "image_path": frame["image_path"], "scan_type": scan_type,
        "condition": frame["condition"].map(schema.CONDITION_NAMES), "level": frame["level"],
        "x": "", "y": "", "label": frame["label_name"].map(schema.SEVERITY_INDEX), "label_name": frame["label_name"],
    }, columns=list(schema.FLAT_COLUMNS))


def write_flat_csv(table_csv: str | Path, out: str | Path, *, scan_type: str = schema.SAGITTAL_T1,
                   overwrite: bool = False) -> pd.DataFrame:
    """:func:`flat_from_site_table` written to ``out`` (complete or not at all); returns the rows."""
    out = check_target(out, overwrite=overwrite, error=lambda message: DatasetError([message]), label=str(out),
                       what="the CSV file to write")
    flat = flat_from_site_table(table_csv, scan_type=scan_type)
    write_csv(flat, out)
    return flat
