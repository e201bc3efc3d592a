"""Pixels to a minimal valid MR DICOM file (what the tests, exports and examples send to a served model).
"""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


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
