"""Decoding one DICOM file (or frame), or a PNG/JPEG export, to a display-ready 2-D array.

The usual MR file is read by spinemri.data.dicom.native without a pydicom data set; every other file by
pydicom, after spinemri.data.dicom.guards has checked what it declares. Every error a user can cause with a
bad file is raised as :class:`DicomReadError`, which names the file, the reason and what to do about it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
import warnings

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from spinemri.data.dicom import native as native_dicom
from spinemri.data.dicom.guards import (HEADER_TAGS, LARGEST_SCANNED_FILE, check_bitmap_size, check_header,
    check_inflated_size, check_side, floats, header_tags)
from spinemri.data.dicom.image import SKIP_HINT, DicomImage, rescale
from spinemri.errors import ConfigError, DicomReadError, ImageReadError

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
        check_bitmap_size(handle, path)
    pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if pixels is None or pixels.size == 0:
        raise ImageReadError(path, "is not a readable PNG/JPEG image")
    check_side(pixels, path)
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
    check_bitmap_size(io.BytesIO(data), name)
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if pixels is None or pixels.size == 0:
        raise ImageReadError(name, "is not a PNG or JPEG image", None)
    check_side(pixels, name)
    return DicomImage(pixels=pixels.astype(np.float32), path=name, instance_number=None,
                      position=None, orientation=None, pixel_spacing=(1.0, 1.0))


def _read_common(path: str | Path, *, voi: bool) -> DicomImage | None:
    """The usual MR file read without pydicom (see :mod:`spinemri.data.dicom.native`); None otherwise."""
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
    tags = {name: found.get(name) for name in HEADER_TAGS}
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
    orientation = floats(tags["ImageOrientationPatient"])
    position = floats(tags["ImagePositionPatient"])
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
            check_inflated_size(handle, path)
    else:
        if len(data) == 0:
            raise DicomReadError(path, "is empty (0 bytes)", None)
        source = io.BytesIO(data)
        check_inflated_size(source, path)
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
            # The library's own text can run over lines and quote the file's values: its kind is enough.
            raise DicomReadError(path, f"is truncated or corrupt ({type(exc).__name__})") from None
    truncated = any("End of file" in str(w.message) for w in caught)
    if not stop_before_pixels and not _has_pixels(ds):
        if truncated:
            raise DicomReadError(path, "is truncated: the file ends inside its pixel data")
        sop = getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID", "unknown"))
        raise DicomReadError(path, f"has no pixel data (SOP class {sop})")
    return ds


def _has_pixels(ds: Dataset) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


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
                                 "compressed data is corrupt or truncated") from None
        raise DicomReadError(
            path,
            f"uses transfer syntax '{name}', which no installed decoder can read",
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
    orientation = floats(tags["ImageOrientationPatient"])
    position = floats(tags["ImagePositionPatient"])
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
                frame_position = floats(plane[0].get("ImagePositionPatient"))
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
    values = floats(spacing)
    if values and len(values) == 2 and all(v > 0 for v in values):
        return float(values[0]), float(values[1])
    return 1.0, 1.0
