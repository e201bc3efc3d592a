"""The input kinds a served model takes, defined once: the request column of each, what it holds, the
file suffixes it is read from, and its decoder.

    dicom_b64   base64 of a DICOM file           (.dcm, or any other name)
    image_b64   base64 of a PNG or JPEG export   (spinemri.data.dicom.BITMAP_SUFFIXES)

``spinemri predict`` picks the kind of a file on disk by :func:`kind_of_path`; a request cell is decoded by
:func:`decode_value`. A new input kind is one more :class:`InputKind` in :data:`INPUT_KINDS`. A bad cell
raises :class:`InputError` (an ``MlflowException``, HTTP 400 from the scoring server) naming its row and
column.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from pathlib import Path
import tempfile
from typing import Any, Sequence

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
import numpy as np

from spinemri.data.dicom import (BITMAP_SUFFIXES, DicomImage, SeriesStack, decode_bitmap_bytes, decode_dicom_bytes,
                                 read_dicom, read_image, read_series)
from spinemri.data.preprocess import PreprocessConfig
from spinemri.errors import ImageReadError


class InputError(MlflowException):
    """A request row the model cannot use; the scoring server answers HTTP 400 with this message."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class InputKind:
    """One kind of image a request may carry."""

    column: str  # the request column that holds it, base64
    holds: str  # what it is, for messages
    suffixes: tuple[str, ...]  # files of this kind on disk (lower case); the DICOM kind also takes any other name
    decode: Callable[[bytes, str, PreprocessConfig], DicomImage]  # (bytes, name for errors, preprocessing)
    read: Callable[[Path, PreprocessConfig], DicomImage]  # a file of this kind on disk (spinemri predict)


DICOM = InputKind("dicom_b64", "a base64 DICOM file", (".dcm",),
                  lambda data, name, config: decode_dicom_bytes(data, name, voi=config.dicom_window),
                  lambda path, config: read_dicom(path, voi=config.dicom_window))
BITMAP = InputKind("image_b64", "a base64 PNG/JPEG", BITMAP_SUFFIXES,
                   lambda data, name, config: decode_bitmap_bytes(data, name),
                   lambda path, config: read_image(path))
INPUT_KINDS = (DICOM, BITMAP)
KINDS = {kind.column: kind for kind in INPUT_KINDS}
IMAGE_COLUMNS = tuple(KINDS)
SUFFIXES = tuple(suffix for kind in INPUT_KINDS for suffix in kind.suffixes)


def kind_of_path(path: str | Path) -> InputKind:
    """The input kind of a file on disk, by its suffix (DICOM for any name no other kind claims)."""
    suffix = Path(path).suffix.lower()
    return next((kind for kind in INPUT_KINDS if suffix in kind.suffixes), DICOM)


def read_file(path: str | Path, config: PreprocessConfig) -> DicomImage:
    """An image file on disk, read as its kind reads it (what ``spinemri predict`` does with each file)."""
    return kind_of_path(path).read(Path(path), config)


def file_row(path: str | Path, x: float | None = None, y: float | None = None, condition: str | None = None,
             level: str | None = None) -> dict[str, Any]:
    """A request row for an image file on disk (what ``spinemri predict`` and the README's curl send)."""
    path = Path(path)
    row: dict[str, Any] = {kind_of_path(path).column: base64.b64encode(path.read_bytes()).decode("ascii")}
    if x is not None and y is not None:
        row.update(x=float(x), y=float(y))
    if condition is not None and level is not None:
        row.update(condition=condition, level=level)
    return row


def series_from_b64(values: Sequence) -> SeriesStack:
    """Base64 DICOM files of one series (a request's rows, any order) -> a stack ordered along the slice normal."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for k, value in enumerate(values):
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError, TypeError) as exc:
                raise InputError(f"row {k}: dicom_b64 is not valid base64 ({exc})") from None
            try:
                decode_dicom_bytes(data, f"row {k}: dicom_b64")
            except ImageReadError as exc:
                raise InputError(f"row {k}: dicom_b64 {exc.reason}") from None
            path = Path(tmp) / f"{k:06d}.dcm"
            path.write_bytes(data)
            paths.append(path)
        try:
            stack = read_series(paths)
            return dataclasses.replace(stack, pixels=np.asarray(stack.pixels))  # decoded before the files go
        except ImageReadError as exc:
            raise InputError(f"the series cannot be stacked: {exc.reason}") from None


def decode_value(value, column: str, index: int, config: PreprocessConfig) -> DicomImage:
    """A request cell (base64 of a file of the kind its ``column`` names) -> one decoded image; InputError
    names the row and column. A neighbour column holds the same kind as the row's image: sniffed."""
    name = f"row {index}: {column}"
    if not isinstance(value, (str, bytes)):
        raise InputError(f"{name} must be a base64 string, got {type(value).__name__}")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"{name} is not valid base64 ({exc})") from None
    try:
        kind = KINDS[column] if column in KINDS else (DICOM if looks_like_dicom(data) else BITMAP)
        return kind.decode(data, name, config)
    except ImageReadError as exc:
        raise InputError(f"{name} {exc.reason}") from None


def looks_like_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"
