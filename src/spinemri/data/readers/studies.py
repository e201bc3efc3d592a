"""A folder of unlabelled studies, ``<study>/<series>/*.dcm`` (or ``*_images/<study>/<series>/*.dcm``): what
``predict-study`` and the PACS worker read. It has no sample table; its check lists each series' type and why
(:func:`spinemri.data.studies.check_studies`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spinemri.data.readers.check import Layout
from spinemri.data.studies import check_studies
from spinemri.data.tables import CheckReport
from spinemri.errors import DatasetError


def matches(path: Path) -> bool:
    return path.is_dir() and (next(path.glob("*/*/*.dcm"), None) is not None
                              or next(path.glob("*_images/*/*/*.dcm"), None) is not None)


def load(path: Path) -> pd.DataFrame:
    raise DatasetError([f"{path} is a folder of studies without labels, so it has no samples to train or evaluate "
                        "on; grade it with `spinemri predict-study`, or add train.csv and "
                        "train_label_coordinates.csv (the RSNA layout)"])


def check(path: Path, decode: bool, workers: int) -> CheckReport:
    return check_studies(path)


LAYOUT = Layout("studies", "no <study>/<series>/*.dcm folders", matches, load, check)
