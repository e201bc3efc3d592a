"""Dataset readers: every layout a dataset may come in, in one list that detection, loading and ``data check``
all read.

    LAYOUTS         rsna (the competition's folder), flat (the thesis's flat CSV), studies (unlabelled)
    detect_layout   the name of the first layout a path matches
    load_samples    the tidy sample table of a labelled dataset
    check_dataset   what ``spinemri data check`` prints, without changing the dataset

The sample table has one row per labelled point (``schema.SAMPLE_COLUMNS``): study_id, series_id,
series_description, instance_number, condition (a key of ``schema.CONDITIONS``, or missing for a
flat-CSV slice without a finding), level ("L4/L5"), severity (0/1/2, or missing for a blank
label), x and y (pixels, or missing for an image graded without a point), and the image path.
Structural problems raise :class:`DatasetError` naming the file, the row and the fix. A new layout
is one module here with a :class:`~spinemri.data.readers.check.Layout`, added to :data:`LAYOUTS`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spinemri.data.readers import flat, rsna, studies
from spinemri.data.readers.check import Layout
from spinemri.data.readers.flat import load_flat_csv
from spinemri.data.readers.rsna import load_rsna
from spinemri.data.tables import MAX_LISTED, CheckReport
from spinemri.errors import DatasetError

LAYOUTS: tuple[Layout, ...] = (rsna.LAYOUT, flat.LAYOUT, studies.LAYOUT)  # the first that matches wins

__all__ = ["LAYOUTS", "MAX_LISTED", "CheckReport", "DatasetError", "Layout", "check_dataset", "detect_layout", "layout_of",
           "load_flat_csv", "load_rsna", "load_samples"]


def layout_of(path: str | Path) -> Layout:
    """The layout of a dataset path, or DatasetError saying what each layout looks like."""
    path = Path(path)
    if not path.exists():
        raise DatasetError([f"{path} does not exist; pass a dataset folder or a flat CSV file"])
    for layout in LAYOUTS:
        if layout.matches(path):
            return layout
    if path.is_file():
        raise DatasetError([f"{path} is neither a folder nor a .csv file; pass the dataset folder (RSNA layout) "
                            "or the flat CSV file"])
    missing = ", ".join(layout.missing for layout in LAYOUTS)
    raise DatasetError([f"{path} is in none of the dataset layouts: {missing}; point to the competition folder, "
                        "to the CSV file or to a folder of studies"])


def detect_layout(path: str | Path) -> str:
    """The name of the layout a path is in (see :data:`LAYOUTS`)."""
    return layout_of(path).name


def load_samples(path: str | Path) -> pd.DataFrame:
    """The sample table of a labelled dataset in any layout (see the module docstring)."""
    path = Path(path)
    return layout_of(path).load(path)


def check_dataset(path: str | Path, *, decode: bool = False, workers: int = 4) -> CheckReport:
    """Validate a dataset without changing it.

    Reads every labelled image's header (``decode=True``: its pixels too) to count unreadable
    files. Only the file names, reasons and counts are reported: never patient tags.
    """
    path = Path(path)
    try:
        layout = layout_of(path)
    except DatasetError as exc:
        return CheckReport(str(path), "unknown", problems=exc.problems)
    return layout.check(path, decode, workers)
