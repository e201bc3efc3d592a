"""What every labelled layout's check shares, and the interface a layout implements.

A :class:`Layout` says whether a path is in its layout (``matches``), reads its sample table (``load``)
and checks it (``check``): structural problems and a summary from the layout's own files, then
:func:`check_samples` for what every sample table is checked for: labelled points per condition,
points missing or given twice, every image's header (or pixels) read as decoding will, and points
outside their image.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spinemri.data.dicom import check_header, header_tags, read_header, read_image
from spinemri.data.preprocess import site_inside
from spinemri.data.tables import CheckReport, listed, rows_text
from spinemri.errors import ImageReadError


@dataclass(frozen=True)
class Layout:
    """One dataset layout: the readers, detection and ``data check`` all go through this list's entries."""

    name: str  # as reported by ``data check`` ("rsna", "flat", "studies")
    missing: str  # what a path lacks when not in this layout ("no ..."), for the message when none matches
    matches: Callable[[Path], bool]  # whether the path (a file or a folder) is in this layout
    load: Callable[[Path], pd.DataFrame]  # the sample table, or DatasetError naming file, row and fix
    check: Callable[[Path, bool, int], CheckReport]  # (path, decode, workers) -> the report, never raising


def check_samples(report: CheckReport, samples: pd.DataFrame, path: Path, *, decode: bool, workers: int
                  ) -> CheckReport:
    """The checks every labelled layout's sample table gets, added to ``report``."""
    report.summary["labelled_points"] = _points_per_condition(samples)
    report.summary["graded_points"] = int(samples["severity"].notna().sum())
    pointless = samples[samples["condition"].notna() & (samples["x"].isna() | samples["y"].isna())]
    if len(pointless):
        report.summary["graded_without_point"] = len(pointless)
        report.warnings.append(f"{samples.attrs.get('labels_csv', str(path))}: {len(pointless)} labelled row(s) "
                               f"have no x/y (rows {rows_text(pointless['label_row'])}): they train whole-slice "
                               "models (--mode slice, which grades the site each row names); roi mode refuses them")
    labels_csv = samples.attrs.get("labels_csv", str(path))
    twice = samples[samples["condition"].notna()]
    twice = twice[twice.duplicated(["study_id", "condition", "level"], keep=False)]
    report.warnings += listed(
        [(s, c, lv, sorted(g["label_row"])) for (s, c, lv), g in twice.groupby(["study_id", "condition", "level"])],
        lambda t: f"{labels_csv} rows {', '.join(map(str, t[3]))}: study {t[0]} has {t[1]} {t[2]} labelled on "
                  f"{len(t[3])} images; each becomes a sample with the same grade",
        "keep one row per condition and level unless both images show it")

    unreadable, sizes = _probe(sorted(set(samples["path"])), decode=decode, workers=workers)
    report.summary["files_unreadable"] = len(unreadable)
    report.warnings += listed(unreadable, lambda u: f"unreadable: {u}",
                               "prepare with --on-bad-file=skip to leave these samples out")
    outside = [(row, x, y, sizes[p], p) for row, x, y, p in
               zip(samples["label_row"], samples["x"], samples["y"], samples["path"])
               if p in sizes and np.isfinite(x) and np.isfinite(y) and not site_inside(x, y, *sizes[p])]
    report.problems += listed(
        outside, lambda o: f"{labels_csv} row {o[0]}: the point (x={o[1]:g}, y={o[2]:g}) lies outside the "
                           f"{o[3][0]}x{o[3][1]} image {o[4]}", "fix the coordinate (pixels, column x and row y) or drop the row")
    return report


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
