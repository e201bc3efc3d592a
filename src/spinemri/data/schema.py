"""The RSNA 2024 LSDC vocabulary, defined once: conditions, levels, severities and their weights,
series types, the classifier's head classes, the default split, file and column names."""

from __future__ import annotations

import re

import numpy as np

# Condition keys as they appear in train.csv column names and submission row_ids.
CONDITIONS: tuple[str, ...] = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
# The same conditions as written in train_label_coordinates.csv.
CONDITION_NAMES: dict[str, str] = {
    "spinal_canal_stenosis": "Spinal Canal Stenosis",
    "left_neural_foraminal_narrowing": "Left Neural Foraminal Narrowing",
    "right_neural_foraminal_narrowing": "Right Neural Foraminal Narrowing",
    "left_subarticular_stenosis": "Left Subarticular Stenosis",
    "right_subarticular_stenosis": "Right Subarticular Stenosis",
}
CONDITION_KEYS: dict[str, str] = {name: key for key, name in CONDITION_NAMES.items()}


def condition_key(text: str) -> str | None:
    """'Left Subarticular Stenosis' or 'left_subarticular_stenosis' -> 'left_subarticular_stenosis'; None if neither."""
    text = text.strip()
    if text in CONDITION_KEYS:
        return CONDITION_KEYS[text]
    snake = text.lower().replace(" ", "_")
    return snake if snake in CONDITIONS else None


LEVELS: tuple[str, ...] = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")


def level_name(text: str) -> str | None:
    """'L4/L5', 'l4_l5' or 'L4-L5' -> 'L4/L5'; None if none of the five levels."""
    name = text.strip().upper().replace("_", "/").replace("-", "/")
    return name if name in LEVELS else None

SEVERITIES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
SEVERITY_INDEX: dict[str, int] = {name: i for i, name in enumerate(SEVERITIES)}

# The competition metric's sample weights by true severity (Normal/Mild, Moderate, Severe).
SEVERITY_WEIGHTS = np.array([1.0, 2.0, 4.0])
# Normal/Mild, Moderate, Severe frequencies per condition in the real training labels (FACTS.md).
RSNA_SEVERITY_FREQUENCIES: dict[str, tuple[float, float, float]] = {
    "spinal_canal_stenosis": (0.878, 0.075, 0.048),
    "left_neural_foraminal_narrowing": (0.78, 0.18, 0.04),
    "right_neural_foraminal_narrowing": (0.78, 0.18, 0.04),
    "left_subarticular_stenosis": (0.714, 0.19, 0.095),
    "right_subarticular_stenosis": (0.714, 0.19, 0.095),
}

SAGITTAL_T1 = "Sagittal T1"
SAGITTAL_T2 = "Sagittal T2/STIR"
AXIAL_T2 = "Axial T2"
SERIES_DESCRIPTIONS: tuple[str, ...] = (SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2)
# Series types by the short name commands and configs use (each has its own localizer).
SERIES_TYPES: dict[str, str] = {"sagittal_t2": SAGITTAL_T2, "sagittal_t1": SAGITTAL_T1, "axial_t2": AXIAL_T2}

# The classifier's three heads: the thesis's six categories (the five conditions, and healthy for a
# site graded Normal/Mild), the level and the severity.
HEALTHY = "healthy"
HEAD_CLASSES: dict[str, tuple[str, ...]] = {
    "condition": (*CONDITIONS, HEALTHY),
    "level": LEVELS,
    "severity": SEVERITIES,
}

HEADS: tuple[str, ...] = tuple(HEAD_CLASSES)

# Study-level split: train, validation and test fractions of the studies.
DEFAULT_SPLIT: tuple[float, float, float] = (0.8, 0.1, 0.1)
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Which series type each condition is graded on (the competition's convention).
CONDITION_SERIES: dict[str, str] = {
    "spinal_canal_stenosis": SAGITTAL_T2,
    "left_neural_foraminal_narrowing": SAGITTAL_T1,
    "right_neural_foraminal_narrowing": SAGITTAL_T1,
    "left_subarticular_stenosis": AXIAL_T2,
    "right_subarticular_stenosis": AXIAL_T2,
}

# File names of an RSNA-layout dataset folder (the competition's test set uses the test_ ones).
TRAIN_CSV = "train.csv"
SERIES_CSV = "train_series_descriptions.csv"
COORDINATES_CSV = "train_label_coordinates.csv"
IMAGES_DIR = "train_images"
TEST_SERIES_CSV = "test_series_descriptions.csv"
TEST_IMAGES_DIR = "test_images"

SERIES_COLUMNS: tuple[str, ...] = ("study_id", "series_id", "series_description")
COORDINATE_COLUMNS: tuple[str, ...] = (
    "study_id", "series_id", "instance_number", "condition", "level", "x", "y",
)
# The seed thesis's flat CSV (its Figure 3.1), images exported as PNG/JPEG.
FLAT_COLUMNS: tuple[str, ...] = (
    "study_id", "series_id", "instance_number", "image_path", "scan_type",
    "condition", "level", "x", "y", "label", "label_name",
)
# The tidy sample table every reader returns: one row per labelled point. ``label_row`` is the
# point's line in its CSV (train_label_coordinates.csv or the flat CSV; the header is line 1).
SAMPLE_COLUMNS: tuple[str, ...] = (
    "study_id", "series_id", "series_description", "instance_number",
    "condition", "level", "severity", "x", "y", "path", "label_row",
)


# The competition's submission: one row per study, condition and level.
PROBABILITY_COLUMNS: tuple[str, ...] = ("normal_mild", "moderate", "severe")  # SEVERITIES order
SUBMISSION_COLUMNS: tuple[str, ...] = ("row_id", *PROBABILITY_COLUMNS)


def level_slug(level: str) -> str:
    """'L4/L5' -> 'l4_l5' (the suffix used in train.csv and row_ids)."""
    return level.lower().replace("/", "_")


def label_column(condition: str, level: str) -> str:
    """train.csv column for a condition key and level, e.g. 'spinal_canal_stenosis_l4_l5'."""
    return f"{condition}_{level_slug(level)}"


# What a referral can be about (spinemri.metrics.operating): each condition (a moderate or severe site), a
# severe spinal canal stenosis, and a level with any moderate or severe site.
SEVERE_SPINAL = "severe_spinal_canal_stenosis"
ANY_LEVEL = "any_moderate_or_severe"
REFERRAL_POINTS: tuple[str, ...] = (*CONDITIONS, SEVERE_SPINAL, ANY_LEVEL)

LABEL_COLUMNS: tuple[str, ...] = tuple(label_column(c, lv) for c in CONDITIONS for lv in LEVELS)
# The 25 graded sites (condition, level), in LABEL_COLUMNS order: what a per-site severity output is indexed by.
SITES: tuple[tuple[str, str], ...] = tuple((c, lv) for c in CONDITIONS for lv in LEVELS)
_SITE_INDEX: dict[tuple[str, str], int] = {site: i for i, site in enumerate(SITES)}


def site_index(condition, level) -> int:
    """The site's row in a per-site output (0..24), or -1 when the condition or level is missing or unknown."""
    if not isinstance(condition, str) or not isinstance(level, str):
        return -1
    return _SITE_INDEX.get((condition, level), -1)


def site_indices(conditions, levels) -> "np.ndarray":
    """:func:`site_index` of each (condition, level) pair: int64 (n,), -1 where unknown."""
    return np.array([site_index(c, lv) for c, lv in zip(conditions, levels)], dtype=np.int64)

_LABEL_COLUMN_RE = re.compile(r"^(?P<condition>[a-z_]+)_(?P<level>l\d_[ls]\d)$")


def parse_label_column(column: str) -> tuple[str, str] | None:
    """'spinal_canal_stenosis_l4_l5' -> ('spinal_canal_stenosis', 'L4/L5'); None if not a label column."""
    match = _LABEL_COLUMN_RE.match(column)
    if not match:
        return None
    level = match["level"].upper().replace("_", "/")
    if match["condition"] not in CONDITIONS or level not in LEVELS:
        return None
    return match["condition"], level


def row_id(study_id, condition: str, level: str) -> str:
    """A submission row: '4003253_spinal_canal_stenosis_l4_l5'."""
    return f"{study_id}_{label_column(condition, level)}"


def short_name(name: str) -> str:
    """A class name short enough for a plot label ('left_neural_foraminal_narrowing' -> 'left foraminal')."""
    return (name.replace("neural_foraminal_narrowing", "foraminal").replace("subarticular_stenosis", "subarticular")
            .replace("spinal_canal_stenosis", "spinal canal").replace("_", " "))
