"""A request to a served model, checked row by row: the classifier's input schema, its optional
site and coordinate columns, and the probability frame it answers with.

A bad row raises :class:`InputError` (an ``MlflowException``, HTTP 400 from the scoring server) whose
message names the row, the column and the problem.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
import numpy as np
import pandas as pd

from spinemri.data.schema import CONDITIONS, HEAD_CLASSES, LEVELS, condition_key, level_name
from spinemri.serving.inputs import IMAGE_COLUMNS, INPUT_KINDS, InputError

INPUT_SCHEMA = Schema([
    ColSpec(DataType.string, "dicom_b64", required=False),
    ColSpec(DataType.string, "image_b64", required=False),
    ColSpec(DataType.double, "x", required=False),
    ColSpec(DataType.double, "y", required=False),
    ColSpec(Array(DataType.string), "neighbors_b64", required=False),
    ColSpec(DataType.string, "condition", required=False),
    ColSpec(DataType.string, "level", required=False),
])


def probabilities_frame(outputs: Mapping[str, np.ndarray]) -> pd.DataFrame:
    columns: dict[str, object] = {}
    for head, classes in HEAD_CLASSES.items():
        columns[head] = [classes[i] for i in np.asarray(outputs[head]).argmax(axis=1)]
    for head, classes in HEAD_CLASSES.items():
        for k, name in enumerate(classes):
            columns[f"{head}:{name}"] = np.asarray(outputs[head])[:, k].astype(np.float64)
    return pd.DataFrame(columns)


def output_schema(frame: pd.DataFrame) -> Schema:
    def kind(column: pd.Series) -> DataType:
        if pd.api.types.is_bool_dtype(column):
            return DataType.boolean
        return DataType.double if pd.api.types.is_float_dtype(column) else DataType.string

    return Schema([ColSpec(kind(frame[c]), c) for c in frame.columns])


def request_frame(model_input) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, Mapping):  # one row, or columns when the image column holds a list
        columns = any(isinstance(model_input.get(c), (list, tuple)) for c in IMAGE_COLUMNS)
        frame = pd.DataFrame(model_input) if columns else pd.DataFrame([model_input])
    elif isinstance(model_input, list) and all(isinstance(r, Mapping) for r in model_input):
        frame = pd.DataFrame(model_input)
    else:
        raise InputError(f"expected a table with a dicom_b64 or image_b64 column, got {type(model_input).__name__}")
    if not any(c in frame.columns for c in IMAGE_COLUMNS):
        kinds = " or ".join(f"{kind.column} ({kind.holds})" for kind in INPUT_KINDS)
        got = list(map(str, frame.columns))
        raise InputError(f"missing column: give {kinds} in every row; got " + (f"columns {got}" if got else
                         "no column the model reads (a served model's input schema drops the others)"))
    if len(frame) == 0:
        raise InputError("the request has no rows; send one row per image with a dicom_b64 or image_b64 column")
    return frame


def site_column(frame: pd.DataFrame, column: str, parse, allowed: str) -> list[str] | None:
    """An optional text column naming each row's site (``condition`` or ``level``), each value ``parse``d;
    "" where a row leaves it blank, None when the column is absent; InputError names a bad row."""
    if column not in frame.columns:
        return None
    names = []
    for index, value in enumerate(frame[column]):
        if not present(value):
            names.append("")
            continue
        name = parse(value) if isinstance(value, str) else None
        if name is None:
            raise InputError(f"row {index}: {column} {value!r} is not one of {allowed}")
        names.append(name)
    return names


def row_conditions(frame: pd.DataFrame) -> list[str] | None:
    """The optional ``condition`` column (what each site's severity grades), checked; None when absent."""
    return site_column(frame, "condition", condition_key,
                        f"{', '.join(CONDITIONS)} (or their names in train_label_coordinates.csv; leave it out "
                        "when unknown)")


def row_levels(frame: pd.DataFrame) -> list[str] | None:
    """The optional ``level`` column (the level of each row's site), checked; None when absent."""
    return site_column(frame, "level", level_name, ", ".join(LEVELS))


def require_sites(frame: pd.DataFrame, conditions: list[str] | None, levels: list[str] | None) -> None:
    """A per-site model's request: every row names its site, or InputError names the first that does not."""
    for index in range(len(frame)):
        condition = conditions[index] if conditions else ""
        level = levels[index] if levels else ""
        if not condition or not level:
            missing = " and ".join(name for name, given in (("condition", condition), ("level", level)) if not given)
            raise InputError(f"row {index}: no {missing}; this model grades the site a row names (it was trained "
                             f"on images that show several sites): give condition (one of {', '.join(CONDITIONS)}) "
                             f"and level (one of {', '.join(LEVELS)}), e.g. condition "
                             "left_neural_foraminal_narrowing, level L4/L5")


def present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    if isinstance(value, (list, tuple, np.ndarray)):
        return len(value) > 0
    return not (isinstance(value, str) and value == "")


def coordinate(row: Mapping[str, Any], key: str, index: int) -> float | None:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"row {index}: {key} must be a number of pixels, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"row {index}: {key} must be a number of pixels, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"row {index}: {key} must be finite, got {value!r}")
    return number
