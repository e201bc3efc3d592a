"""A series of DICOM files to one stack ordered along the slice normal (the geometry read from each
header), with its pixels decoded lazily, a few slices at a time.
"""

from __future__ import annotations

from collections import OrderedDict
import operator
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from pydicom.dataset import Dataset

from spinemri.data.dicom.decode import read_dicom, read_header
from spinemri.data.dicom.guards import check_spacing
from spinemri.data.dicom.image import DicomImage, SeriesStack
from spinemri.errors import DicomReadError


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of an image plane from its ImageOrientationPatient."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else normal


def series_order(paths: Iterable[str | Path]) -> list[tuple[int, str, float]]:
    """Order a series' files along the slice normal from their headers alone.

    Returns ``(instance_number, path, position_mm)`` sorted by position. Files without
    ImagePositionPatient/ImageOrientationPatient fall back to InstanceNumber order, because
    instance numbers may be non-contiguous or reversed relative to anatomy.
    """
    return [(n, path, position) for n, path, position, _ in _ordered_headers(paths)]


def _ordered_headers(paths: Iterable[str | Path]) -> list[tuple[int, str, float, Dataset]]:
    entries = []
    for path in paths:
        ds = read_header(path)
        try:
            value = ds.get("InstanceNumber")
            number = None if value in (None, "") else int(value)
        except (TypeError, ValueError, OverflowError):
            raise DicomReadError(path, "has an InstanceNumber that is not a whole number") from None
        if number is None:
            raise DicomReadError(path, "has no InstanceNumber, so labels cannot be matched to it")
        entries.append((number, str(path), ds))
    if entries and all(_geometry(ds) is not None for *_, ds in entries):
        normal = slice_normal(_geometry(entries[0][2])[1])
        ordered = [(n, p, float(np.dot(_geometry(ds)[0], normal)), ds) for n, p, ds in entries]
    else:
        ordered = [(n, p, float(n), ds) for n, p, ds in entries]
    ordered.sort(key=lambda e: (e[2], e[0]))
    return ordered


def _geometry(ds: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """A header's (ImagePositionPatient, ImageOrientationPatient), or None where either is missing or malformed."""
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    try:
        ipp, iop = np.asarray(ipp, float), np.asarray(iop, float)
    except (TypeError, ValueError, OverflowError):
        return None
    if ipp.shape != (3,) or iop.shape != (6,) or not (np.isfinite(ipp).all() and np.isfinite(iop).all()):
        return None
    return (ipp, iop) if np.linalg.norm(np.cross(iop[:3], iop[3:])) > 1e-6 else None


def read_series(paths: str | Path | Iterable[str | Path], *, voi: bool = False) -> SeriesStack:
    """Read a series (a folder of .dcm files, or a list of files) into a stack ordered by position.

    The headers are read here, and the first slice decoded; the other slices are decoded when they
    are read (:class:`SeriesPixels`), so a long series of large images costs a few slices of memory.
    A file whose pixels cannot be decoded raises :class:`DicomReadError` when its slice is read; a file whose
    PixelSpacing is not a size (:func:`check_spacing`) is refused here.
    """
    if isinstance(paths, (str, Path)):
        folder = Path(paths)
        paths = sorted(folder.glob("*.dcm"))
        if not paths:
            raise DicomReadError(folder, "contains no .dcm files", None)
    order = _ordered_headers(paths)
    if not order:
        raise DicomReadError(".", "the series has no files", None)
    for _, path, _, ds in order:
        check_spacing(ds, path)
    sizes = sorted({(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) for *_, ds in order})
    if len(sizes) > 1:
        raise DicomReadError(Path(order[0][1]).parent, f"mixes image sizes {sizes} in one series", None)
    first = read_dicom(order[0][1], voi=voi)
    geometry = [_geometry(ds) for *_, ds in order]
    known = all(g is not None for g in geometry)
    return SeriesStack(
        pixels=SeriesPixels([path for _, path, _, _ in order], first, voi=voi),
        instance_numbers=tuple(n for n, *_ in order),
        positions=tuple(position for _, _, position, _ in order),
        pixel_spacing=first.pixel_spacing,
        origins=tuple(tuple(float(v) for v in g[0]) for g in geometry) if known else None,
        normal=tuple(float(v) for v in slice_normal(geometry[0][1])) if known else None,
    )


class SeriesPixels:
    """The float32 (N, H, W) slices of a series in position order, each decoded when it is read.

    The last few slices read are kept (``keep``), so one pass over the series with each slice's
    neighbours decodes every file once. Indexing by slice index (and then by row and column) gives
    an array, ``np.asarray`` the whole volume. Kept slices are read-only.
    """

    def __init__(self, paths: Sequence[str], first: DicomImage, *, voi: bool, keep: int = 4):
        self.paths = tuple(str(p) for p in paths)
        self.voi = voi
        self.shape = (len(self.paths), *first.pixels.shape)
        self.dtype = np.dtype(np.float32)
        self.ndim = 3
        self._keep = max(keep, 1)
        self._recent: OrderedDict[int, np.ndarray] = OrderedDict()
        self._remember(0, first.pixels)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, tuple):
            return self[index[0]][index[1:]] if index else self[:]
        if isinstance(index, slice):
            return np.stack([self[i] for i in range(*index.indices(len(self)))]) if len(self) else \
                np.zeros((0, *self.shape[1:]), np.float32)
        i = operator.index(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"slice {i} of a series of {len(self)}")
        i %= len(self)
        if i in self._recent:
            self._recent.move_to_end(i)
            return self._recent[i]
        pixels = read_dicom(self.paths[i], voi=self.voi).pixels
        if pixels.shape != self.shape[1:]:
            raise DicomReadError(Path(self.paths[i]).parent, f"mixes image sizes {sorted({self.shape[1:], pixels.shape})} "
                                 "in one series", None)
        return self._remember(i, pixels)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        volume = self[:]
        return volume if dtype is None else volume.astype(dtype)

    def _remember(self, i: int, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels, np.float32)
        pixels.flags.writeable = False
        self._recent[i] = pixels
        while len(self._recent) > self._keep:
            self._recent.popitem(last=False)
        return pixels
