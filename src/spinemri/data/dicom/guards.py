"""How large a file may be before it is decoded: a file's declared size, frames and geometry checked
against spinemri.data.limits from its header (and, for deflated data sets and bitmaps, from the
bytes that declare it), so that a decompression bomb is refused before any pixel is inflated.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping
import zlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from spinemri.data import limits
from spinemri.errors import DicomReadError, ImageReadError, ImageTooLarge

LARGEST_SCANNED_FILE = 32 << 20  # bytes; a single MR slice is well under 2 MB


_DEFLATED_UID = b"1.2.840.10008.1.2.1.99"


_HEADER_ALLOWANCE = 16 << 20  # bytes of a deflated data set beyond its pixels (tags, overlays, icons)


def check_inflated_size(handle, path) -> None:
    """Refuse a Deflated Explicit VR Little Endian file whose data set inflates beyond the image budget.

    pydicom inflates such a data set whole, headers included, before it reads a tag: a 1 MB file can
    hold gigabytes of zeros. The inflation is counted here, in chunks, without keeping the output.
    """
    head = handle.read(4096)
    if _DEFLATED_UID not in head or head[128:132] != b"DICM":
        return
    handle.seek(132)
    try:
        meta = pydicom.filereader._read_file_meta_info(handle)
    except Exception:  # noqa: BLE001 - a broken meta group: pydicom's own read names the problem
        return
    if meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return
    budget = limits.IMAGE_BYTES.value + _HEADER_ALLOWANCE
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    try:
        while not inflater.eof:
            chunk = inflater.unconsumed_tail or handle.read(1 << 20)
            if not chunk:
                break
            inflated += len(inflater.decompress(chunk, 1 << 22))
            if inflated > budget:
                raise ImageTooLarge(
                    path, f"is a deflated DICOM whose data set inflates to more than {limits.human_size(budget)}, "
                    f"over {limits.IMAGE_BYTES.describe()}")
    except zlib.error as exc:
        raise DicomReadError(path, f"has a deflated data set that cannot be inflated ({exc})") from None


def check_bitmap_size(handle, path) -> None:
    """Refuse a PNG/JPEG whose header declares more pixels than the image budget, before decoding it;
    anything that is neither is refused too (the column and the flat CSV take PNG and JPEG only)."""
    geometry = bitmap_geometry(handle)
    if geometry is None:
        raise ImageReadError(path, "is not a PNG or JPEG image", None)
    problem = limits.image_problem(*geometry)
    if problem:
        raise ImageTooLarge(path, problem)


_PNG_SAMPLES = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # by colour type (a palette decodes to RGB)


_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def bitmap_geometry(handle) -> tuple[int, int, int, int] | None:
    """(rows, columns, 1 frame, samples, bits per sample) from a PNG's IHDR or a JPEG's frame header, read
    from ``handle`` without decoding; None for anything else. Only the header bytes are read."""
    head = handle.read(33)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 26:
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        samples = _PNG_SAMPLES.get(head[25])
        return None if samples is None else (height, width, 1, samples, max(head[24], 8))
    if head[:2] != b"\xff\xd8":
        return None
    handle.seek(2)
    while True:  # JPEG segments: FF <marker> <length> <body>, until the frame header
        marker = handle.read(4)
        if len(marker) < 4 or marker[0] != 0xFF:
            return None
        length = int.from_bytes(marker[2:4], "big")
        if marker[1] in _JPEG_FRAMES:
            body = handle.read(6)
            if len(body) < 6:
                return None
            height, width = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big")
            return height, width, 1, body[5], max(body[0], 8)
        if length < 2:
            return None
        handle.seek(length - 2, io.SEEK_CUR)


# The tags decoding needs, each read (and converted by pydicom) once per file.
HEADER_TAGS = (
    "Rows", "Columns", "PhotometricInterpretation", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated",
    "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence",
    "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "PerFrameFunctionalGroupsSequence",
    "InstanceNumber",
)


MIN_SIDE = 16  # pixels: a slice any smaller cannot show a lumbar level (RSNA slices are 256-1024 a side)


def check_header(tags: Mapping, path: str | Path, *, frames: int | None = None) -> None:
    """Refuse, from its header alone, an image that decoding would refuse or could only misread: no or too few
    pixels (``MIN_SIDE``), not grayscale, more than ``frames`` frames (None: any number), or over the size
    limits (:class:`ImageTooLarge`). ``tags``: the values of :data:`HEADER_TAGS` (missing ones None). What
    `spinemri data check` and every decoder test."""
    rows, cols = int(tags.get("Rows") or 0), int(tags.get("Columns") or 0)
    if rows == 0 or cols == 0:
        raise DicomReadError(path, f"has a zero-size image (Rows={rows}, Columns={cols})")
    if rows < MIN_SIDE or cols < MIN_SIDE:
        raise DicomReadError(path, f"is a {cols} x {rows} image, smaller than {MIN_SIDE} pixels a side: too small "
                             "to show a spine")
    photometric = str(tags.get("PhotometricInterpretation") or "MONOCHROME2")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomReadError(
            path, f"is a {photometric} image; spinemri reads grayscale MR (MONOCHROME1/2) only"
        )
    n_frames = int(tags.get("NumberOfFrames") or 1)
    if frames is not None and n_frames > frames:
        raise DicomReadError(path, f"is a multi-frame file with {n_frames} frames", "send one frame per file")
    problem = limits.image_problem(rows, cols, n_frames, int(tags.get("SamplesPerPixel") or 1),
                                   int(tags.get("BitsAllocated") or 16))
    if problem:
        raise ImageTooLarge(path, problem)


def check_spacing(ds: Dataset, path: str | Path) -> None:
    """Refuse a file whose PixelSpacing is given but is not two positive sizes in mm (0\\0, negative, NaN): a
    series graded in millimetres cannot be read without it. A file without PixelSpacing is read as 1 mm pixels."""
    spacing = ds.get("PixelSpacing")
    if spacing is None:
        return
    values = floats(spacing)
    if not values or len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        shown = ("\\".join(f"{v:g}" for v in values) if values else str(spacing))[:40]
        raise DicomReadError(path, f"declares PixelSpacing {shown}, not two positive sizes in mm: its geometry "
                             "cannot be read")


def check_side(pixels: np.ndarray, path) -> None:
    if min(pixels.shape[:2]) < MIN_SIDE:
        raise ImageReadError(path, f"is a {pixels.shape[1]} x {pixels.shape[0]} image, smaller than {MIN_SIDE} pixels "
                             "a side: too small to show a spine")


def header_tags(ds: Dataset) -> dict:
    """The values of :data:`HEADER_TAGS` in a pydicom data set (None where absent)."""
    return {name: ds.get(name) for name in HEADER_TAGS}


def floats(value) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None
