"""DICOM decoding: one file (or frame) to a display-ready 2-D array, and a series to an ordered stack.

Every error a user can cause with a bad file is raised as :class:`DicomReadError`, which names the
file, the reason and what to do about it; no pydicom traceback reaches the user.
"""

from __future__ import annotations

import io
import os
import warnings
import zlib
import operator
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid

from spinemri.data import limits, native_dicom
from spinemri.errors import ConfigError, DicomReadError, ImageReadError, ImageTooLarge

SKIP_HINT = "skip it with --on-bad-file=skip"


@dataclass(frozen=True)
class DicomImage:
    """One decoded slice.

    ``pixels`` is float32 (H, W) in MONOCHROME2 orientation (higher = brighter), after the modality
    LUT (RescaleSlope/Intercept) and, if requested, the VOI LUT or window. ``stored`` is, where
    the reader kept them, the stored integers with the slope and intercept that gave ``pixels``
    (``pixels == rescale(*stored)``): a faster route to the same percentile window.
    """

    pixels: np.ndarray
    path: str
    instance_number: int | None
    position: tuple[float, float, float] | None  # ImagePositionPatient, mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (row cosines, column cosines)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm; (1, 1) if absent
    frame: int = 0
    stored: tuple[np.ndarray, float, float] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SeriesStack:
    """A series ordered along the slice normal. ``pixels`` is float32 (N, H, W): an array, or from
    :func:`read_series` the :class:`SeriesPixels` that decode each slice when it is read."""

    pixels: np.ndarray | SeriesPixels
    instance_numbers: tuple[int, ...]
    positions: tuple[float, ...]  # position of each slice along the normal, mm (index order if absent)
    pixel_spacing: tuple[float, float]
    # Patient geometry, where every slice has it: each slice's ImagePositionPatient (mm) and the
    # unit normal of the first slice's plane. Places the slices of several series in one stack.
    origins: tuple[tuple[float, float, float], ...] | None = None
    normal: tuple[float, float, float] | None = None

    def index_of(self, instance_number: int) -> int:
        """Slice index (in position order) of an InstanceNumber; KeyError names the series' instances."""
        try:
            return self.instance_numbers.index(int(instance_number))
        except ValueError:
            raise KeyError(
                f"instance {instance_number} is not in this series "
                f"(instances: {sorted(self.instance_numbers)})"
            ) from None


BITMAP_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_image(path: str | Path, *, voi: bool = False) -> DicomImage:
    """Read a DICOM file, or a PNG/JPEG export (the thesis's flat-CSV datasets), as one slice.

    Bitmaps carry no geometry: their pixel spacing is taken as 1 mm.
    """
    if Path(path).suffix.lower() not in BITMAP_SUFFIXES:
        return read_dicom(path, voi=voi)
    if not Path(path).is_file():
        raise ImageReadError(path, "does not exist", None)
    if Path(path).stat().st_size == 0:
        raise ImageReadError(path, "is empty (0 bytes)")
    with open(path, "rb") as handle:
        _check_bitmap_size(handle, path)
    pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if pixels is None or pixels.size == 0:
        raise ImageReadError(path, "is not a readable PNG/JPEG image")
    _check_side(pixels, path)
    return DicomImage(
        pixels=pixels.astype(np.float32), path=str(path), instance_number=None,
        position=None, orientation=None, pixel_spacing=(1.0, 1.0),
    )


def read_header(path: str | Path) -> Dataset:
    """Read a file's tags without its pixel data (for ordering and validation)."""
    return _dcmread(path, stop_before_pixels=True)


def read_dicom(path: str | Path, *, voi: bool = False, frame: int | None = None) -> DicomImage:
    """Decode one single-frame DICOM file (or one ``frame`` of a multi-frame file).

    ``voi=True`` applies the file's VOI LUT or window (what a viewer shows); the default keeps the
    full modality range, which the percentile window in preprocessing handles more robustly.
    """
    if frame in (None, 0):
        image = _read_common(path, voi=voi)
        if image is not None:
            return image
    ds = _dcmread(path)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frame is None:
        if n_frames > 1:
            raise DicomReadError(
                path, f"is a multi-frame file with {n_frames} frames",
                "read it with read_frames() or pass frame=<index>",
            )
        frame = 0
    if not 0 <= frame < n_frames:
        raise DicomReadError(path, f"has {n_frames} frame(s); frame {frame} does not exist", None)
    return _decode(ds, path, voi=voi, frames=[frame])[0]


def read_frames(path: str | Path, *, voi: bool = False) -> list[DicomImage]:
    """Decode every frame of a (possibly multi-frame) file; a single-frame file gives one image."""
    ds = _dcmread(path)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    return _decode(ds, path, voi=voi, frames=list(range(n_frames)))


def decode_dicom_bytes(data: bytes, name: str, *, voi: bool = False) -> DicomImage:
    """Decode a single-frame DICOM file held in memory (an upload); errors name it ``name``."""
    image = _common_image(data, name, voi=voi)
    if image is not None:
        return image
    ds = _dcmread(name, data=data)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1:
        raise DicomReadError(name, f"is a multi-frame file with {n_frames} frames", "send one frame per file")
    return _decode(ds, name, voi=voi, frames=[0])[0]


def decode_bitmap_bytes(data: bytes, name: str) -> DicomImage:
    """Decode an in-memory PNG/JPEG as one grayscale slice with 1 mm pixels (like :func:`read_image`)."""
    if len(data) == 0:
        raise ImageReadError(name, "is empty (0 bytes)", None)
    _check_bitmap_size(io.BytesIO(data), name)
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if pixels is None or pixels.size == 0:
        raise ImageReadError(name, "is not a PNG or JPEG image", None)
    _check_side(pixels, name)
    return DicomImage(pixels=pixels.astype(np.float32), path=name, instance_number=None,
                      position=None, orientation=None, pixel_spacing=(1.0, 1.0))


def encode_dicom(pixels: np.ndarray, pixel_spacing: tuple[float, float] = (1.0, 1.0)) -> bytes:
    """A minimal MR DICOM file holding only ``pixels`` and their spacing: no patient, study or site tags.

    The values are mapped linearly onto 0..65535 (the percentile window of preprocessing does not
    depend on that scale), so any slice can be re-encoded without carrying over a single tag.
    """
    values = np.asarray(pixels, dtype=np.float64)
    if values.ndim != 2 or 0 in values.shape:
        raise ValueError(f"expected a non-empty 2-D image, got shape {values.shape}")
    low, high = float(values.min()), float(values.max())
    scaled = np.round((values - low) / (high - low) * 65535.0) if high > low else np.zeros_like(values)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.Rows, ds.Columns = values.shape
    ds.PixelSpacing = [f"{float(v):.6g}" for v in pixel_spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = scaled.astype("<u2").tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


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


# --- internals -----------------------------------------------------------------------------------

LARGEST_SCANNED_FILE = 32 << 20  # bytes; a single MR slice is well under 2 MB


def _read_common(path: str | Path, *, voi: bool) -> DicomImage | None:
    """The usual MR file read without pydicom (see :mod:`spinemri.data.native_dicom`); None otherwise."""
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size > LARGEST_SCANNED_FILE:
                return None  # a multi-frame or enhanced file: not one the scanner takes, and not read twice
            data = handle.read()
    except OSError:
        return None  # pydicom's path names the problem (missing, a folder, unreadable)
    return _common_image(data, path, voi=voi)


READERS = ("auto", "pydicom")


def dicom_reader() -> str:
    """``SPINEMRI_DICOM_READER``: ``auto`` (the default: spinemri's own reader for the common files, pydicom for
    the rest) or ``pydicom`` (pydicom for every file); ConfigError for anything else."""
    reader = os.environ.get("SPINEMRI_DICOM_READER", "").strip() or "auto"
    if reader not in READERS:
        raise ConfigError(f"SPINEMRI_DICOM_READER={reader!r} is not a reader: set it to 'auto' (the default) or "
                          "'pydicom', or unset it")
    return reader


def _common_image(data: bytes, path: str | Path, *, voi: bool) -> DicomImage | None:
    """The same image :func:`_decode` gives, for files :func:`native_dicom.scan` takes; None for the rest.

    Setting the environment variable ``SPINEMRI_DICOM_READER=pydicom`` reads every file with pydicom.
    """
    if dicom_reader() == "pydicom":
        return None
    scanned = native_dicom.scan(data, voi=voi)
    if scanned is None:
        return None
    found, offset, length = scanned
    tags = {name: found.get(name) for name in _HEADER_TAGS}
    rows, cols = tags["Rows"] or 0, tags["Columns"] or 0
    rescaled = tags["RescaleSlope"] is not None and tags["RescaleIntercept"] is not None
    if (rows == 0 or cols == 0 or (tags["PhotometricInterpretation"] or "MONOCHROME2") != "MONOCHROME2"
            or (tags["SamplesPerPixel"] or 1) != 1 or (tags["NumberOfFrames"] or 1) != 1
            or tags["PixelSpacing"] is None
            or (rescaled and not (isinstance(tags["RescaleSlope"], float)
                                  and isinstance(tags["RescaleIntercept"], float)))):
        return None  # pydicom's path handles (or names) the rest
    dtype = _NATIVE_DTYPES.get((tags["BitsAllocated"] or 0, tags["PixelRepresentation"] or 0))
    if dtype is None or length < rows * cols * np.dtype(dtype).itemsize:
        return None
    check_header(tags, path)
    stored = _stored_values(np.frombuffer(data, dtype=dtype, count=rows * cols, offset=offset).reshape(rows, cols),
                            tags["BitsStored"])
    # As apply_modality_lut: without both rescale tags the stored values are the modality values.
    slope, intercept = (tags["RescaleSlope"], tags["RescaleIntercept"]) if rescaled else (1.0, 0.0)
    pixels = rescale(stored, slope, intercept)
    orientation = _floats(tags["ImageOrientationPatient"])
    position = _floats(tags["ImagePositionPatient"])
    return DicomImage(
        pixels=np.ascontiguousarray(pixels),
        path=str(path),
        instance_number=tags["InstanceNumber"],
        position=tuple(position) if position else None,
        orientation=tuple(orientation) if orientation else None,
        pixel_spacing=_pixel_spacing(None, tags["PixelSpacing"]),
        stored=(stored, slope, intercept),
    )


def _dcmread(path: str | Path, *, stop_before_pixels: bool = False, data: bytes | None = None) -> Dataset:
    """Parse a file, or ``data`` (the bytes of one, named ``path`` in errors), into a dataset with pixels."""
    if data is None:
        path = Path(path)
        if not path.is_file():
            raise DicomReadError(path, "does not exist", None)
        if path.stat().st_size == 0:
            raise DicomReadError(path, "is empty (0 bytes)")
        source = path
        with open(path, "rb") as handle:
            _check_inflated_size(handle, path)
    else:
        if len(data) == 0:
            raise DicomReadError(path, "is empty (0 bytes)", None)
        source = io.BytesIO(data)
        _check_inflated_size(source, path)
        source.seek(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(source, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            raise DicomReadError(
                path, "is not a DICOM file (no 'DICM' marker after the 128-byte preamble)"
            ) from None
        except Exception as exc:  # noqa: BLE001 - pydicom signals a damaged file in many ways
            raise DicomReadError(path, f"is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    truncated = any("End of file" in str(w.message) for w in caught)
    if not stop_before_pixels and not _has_pixels(ds):
        if truncated:
            raise DicomReadError(path, "is truncated: the file ends inside its pixel data")
        sop = getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID", "unknown"))
        raise DicomReadError(path, f"has no pixel data (SOP class {sop})")
    return ds


_DEFLATED_UID = b"1.2.840.10008.1.2.1.99"
_HEADER_ALLOWANCE = 16 << 20  # bytes of a deflated data set beyond its pixels (tags, overlays, icons)


def _check_inflated_size(handle, path) -> None:
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


def _check_bitmap_size(handle, path) -> None:
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


def _has_pixels(ds: Dataset) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


# The tags decoding needs, each read (and converted by pydicom) once per file.
_HEADER_TAGS = (
    "Rows", "Columns", "PhotometricInterpretation", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated",
    "BitsStored", "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence",
    "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "PerFrameFunctionalGroupsSequence",
    "InstanceNumber",
)


MIN_SIDE = 16  # pixels: a slice any smaller cannot show a lumbar level (RSNA slices are 256-1024 a side)


def check_header(tags: Mapping, path: str | Path, *, frames: int | None = None) -> None:
    """Refuse, from its header alone, an image that decoding would refuse or could only misread: no or too few
    pixels (``MIN_SIDE``), not grayscale, more than ``frames`` frames (None: any number), or over the size
    limits (:class:`ImageTooLarge`). ``tags``: the values of :data:`_HEADER_TAGS` (missing ones None). What
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
    values = _floats(spacing)
    if not values or len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        shown = ("\\".join(f"{v:g}" for v in values) if values else str(spacing))[:40]
        raise DicomReadError(path, f"declares PixelSpacing {shown}, not two positive sizes in mm: its geometry "
                             "cannot be read")


def _check_side(pixels: np.ndarray, path) -> None:
    if min(pixels.shape[:2]) < MIN_SIDE:
        raise ImageReadError(path, f"is a {pixels.shape[1]} x {pixels.shape[0]} image, smaller than {MIN_SIDE} pixels "
                             "a side: too small to show a spine")


def header_tags(ds: Dataset) -> dict:
    """The values of :data:`_HEADER_TAGS` in a pydicom data set (None where absent)."""
    return {name: ds.get(name) for name in _HEADER_TAGS}


def _decode(ds: Dataset, path: str | Path, *, voi: bool, frames: list[int]) -> list[DicomImage]:
    tags = header_tags(ds)
    check_header(tags, path)
    rows, cols = int(tags["Rows"] or 0), int(tags["Columns"] or 0)
    photometric = str(tags["PhotometricInterpretation"] or "MONOCHROME2")
    n_frames = int(tags["NumberOfFrames"] or 1)
    try:
        stored = _native_pixels(ds, tags, rows, cols, n_frames)
        if stored is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stored = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        if _decoder_available(syntax):
            raise DicomReadError(path, f"has '{name}' pixel data that its installed decoder cannot read: the "
                                 f"compressed data is corrupt or truncated ({exc})") from None
        raise DicomReadError(
            path,
            f"uses transfer syntax '{name}', which no installed decoder can read ({exc})",
            "install the pylibjpeg plugins (pip install pylibjpeg pylibjpeg-libjpeg "
            f"pylibjpeg-openjpeg) or {SKIP_HINT}",
        ) from None
    except (ValueError, EOFError, AttributeError, TypeError) as exc:
        msg = str(exc)
        if "less than expected" in msg or "truncat" in msg.lower():
            raise DicomReadError(path, f"is truncated: {msg.split(' - ')[0]}") from None
        raise DicomReadError(path, f"has pixel data that cannot be decoded ({msg})") from None

    if n_frames == 1:
        stored = stored[np.newaxis]
    spacing = _pixel_spacing(ds, tags["PixelSpacing"])
    orientation = _floats(tags["ImageOrientationPatient"])
    position = _floats(tags["ImagePositionPatient"])
    per_frame = tags["PerFrameFunctionalGroupsSequence"]
    number = tags["InstanceNumber"]
    low, high = _modality_range(tags)
    has_window = voi and ("WindowCenter" in ds or "VOILUTSequence" in ds)

    images = []
    for frame in frames:
        values = _modality(stored[frame], ds, tags)
        frame_low, frame_high = low, high
        if has_window:
            values = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float32)
            frame_low, frame_high = float(values.min()), float(values.max())
        if photometric == "MONOCHROME1":  # 0 is white: flip so that higher is brighter
            values = (frame_high + frame_low) - values
        frame_position = position
        if per_frame is not None and frame < len(per_frame):
            plane = per_frame[frame].get("PlanePositionSequence")
            if plane:
                frame_position = _floats(plane[0].get("ImagePositionPatient"))
        images.append(DicomImage(
            pixels=np.ascontiguousarray(values),
            path=str(path),
            instance_number=int(number) if number not in (None, "") else None,
            position=tuple(frame_position) if frame_position else None,
            orientation=tuple(orientation) if orientation else None,
            pixel_spacing=spacing,
            frame=frame,
        ))
    return images


def _decoder_available(syntax) -> bool:
    """Whether a pixel-data decoder for this transfer syntax is installed (pydicom's plugins)."""
    from pydicom.pixels import get_decoder

    try:
        return bool(syntax) and get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):
        return False


_NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_NATIVE_DTYPES = {(8, 0): np.uint8, (8, 1): np.int8, (16, 0): np.dtype("<u2"), (16, 1): np.dtype("<i2")}


def _native_pixels(ds: Dataset, tags: dict, rows: int, cols: int, n_frames: int) -> np.ndarray | None:
    """The common case without pydicom's decoder machinery: an uncompressed little-endian, single-frame,
    one-sample 8/16-bit image read straight from PixelData. Same values as ``ds.pixel_array``
    (unused high bits cleared, or sign-extended, the same way); None for anything else.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in _NATIVE_SYNTAXES:
        return None
    if int(tags["SamplesPerPixel"] or 1) != 1 or n_frames != 1:
        return None
    dtype = _NATIVE_DTYPES.get((int(tags["BitsAllocated"] or 0), int(tags["PixelRepresentation"] or 0)))
    if dtype is None:
        return None
    data = ds.get("PixelData")
    if not isinstance(data, bytes) or len(data) < rows * cols * np.dtype(dtype).itemsize:
        return None  # pydicom decides, and names the problem (truncation, odd layouts)
    return _stored_values(np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols),
                          tags["BitsStored"])


def _stored_values(pixels: np.ndarray, bits_stored: int | None) -> np.ndarray:
    """As pydicom: the unused high bits shifted out and back (sign-extending signed values)."""
    bits = 8 * pixels.itemsize
    unused = bits - int(bits_stored or bits)
    if unused > 0:
        pixels = np.right_shift(np.left_shift(pixels, unused), unused)
    return pixels


def _modality(stored: np.ndarray, ds: Dataset, tags: dict) -> np.ndarray:
    """float32 modality values: ``apply_modality_lut`` without its overhead for the usual
    RescaleSlope/Intercept (the same float64 arithmetic, so the same float32s)."""
    slope, intercept = tags["RescaleSlope"], tags["RescaleIntercept"]
    if tags["ModalityLUTSequence"]:
        return apply_modality_lut(stored, ds).astype(np.float32)
    if slope is None or intercept is None:  # absent or empty: the stored values are the modality values
        return stored.astype(np.float32)
    return rescale(stored, float(slope), float(intercept))


def rescale(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """float32 modality values of stored integers: what ``apply_modality_lut`` computes (float64
    ``stored * slope + intercept``), as float32."""
    if slope == 1 and intercept == 0:  # integers of up to 24 bits are exact in float32
        return stored.astype(np.float32)
    values = stored.astype(np.float64)
    values *= slope
    values += intercept
    return values.astype(np.float32)


def _modality_range(tags: dict) -> tuple[float, float]:
    """Range of modality-LUT output implied by BitsStored/PixelRepresentation and the rescale."""
    bits = int(tags["BitsStored"] or 16)
    signed = int(tags["PixelRepresentation"] or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope = float(tags["RescaleSlope"] or 1)
    intercept = float(tags["RescaleIntercept"] or 0)
    ends = sorted((lo * slope + intercept, hi * slope + intercept))
    return ends[0], ends[1]


def _pixel_spacing(ds: Dataset, spacing) -> tuple[float, float]:
    if spacing is None:
        shared = ds.get("SharedFunctionalGroupsSequence")
        try:
            spacing = shared[0].PixelMeasuresSequence[0].PixelSpacing
        except (TypeError, AttributeError, IndexError, KeyError):
            spacing = None
    values = _floats(spacing)
    if values and len(values) == 2 and all(v > 0 for v in values):
        return float(values[0]), float(values[1])
    return 1.0, 1.0


def _floats(value) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None
