"""What the dataset readers and checks share: CSVs read with the columns they need, blank cells, site names, and
problems listed the same way (at most MAX_LISTED of a kind, the fix on the first).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import json
from pathlib import Path

import numpy as np
import pandas as pd

from spinemri.data import schema
from spinemri.errors import DatasetError

MAX_LISTED = 10  # problems of one kind listed before "... and N more"


def repeated_rows(table: pd.DataFrame, key: list[str]) -> list[tuple[int, int]]:
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


def read_csv(path: Path, *, required: list[str]) -> pd.DataFrame:
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
            problems += listed(bad, lambda r, c=column: f"{path} row {r}: {c} is not an integer", "fix or drop the row")
            if not bad:
                frame[column] = values.astype("int64")
    if problems:
        raise DatasetError(problems)
    return frame


def condition_of(value) -> str | None:
    if blank(value):
        return None
    return schema.condition_key(str(value))


def level_of(value) -> str | None:
    if blank(value):
        return None
    return schema.level_name(str(value))


def rows_text(rows) -> str:
    """'2, 3, 4, 5, 6 and 40 more' for a warning about many rows."""
    rows = [str(int(r)) for r in rows]
    return ", ".join(rows[:5]) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


def blank(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip()) or value is pd.NA


def listed(items, describe, fix: str) -> list[str]:
    """One line per problem (at most MAX_LISTED), the fix on the first, a count of the rest."""
    items = list(items)
    lines = [describe(item) for item in items[:MAX_LISTED]]
    if lines:
        lines[0] += f" ({fix})"
    if len(items) > MAX_LISTED:
        lines.append(f"... and {len(items) - MAX_LISTED} more of the same kind")
    return lines


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
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2, default=json_default)


def json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)
