"""DICOM decoding: one file (or frame) to a display-ready 2-D array, and a series to an ordered stack.

    image    DicomImage (a slice) and SeriesStack (a series), the types every layer above reads
    guards   what a file declares, checked against spinemri.data.limits before anything is decoded
    native   a header scanner for the files MR scanners usually write, without a pydicom data set
    decode   one file (DICOM, or a PNG/JPEG export) to a DicomImage
    series   the files of a series to a SeriesStack ordered along the slice normal
    encode   pixels to a minimal MR DICOM file

Every error a user can cause with a bad file is raised as :class:`DicomReadError`, which names the
file, the reason and what to do about it; no pydicom traceback reaches the user.
"""

from spinemri.data.dicom.decode import (BITMAP_SUFFIXES, READERS, decode_bitmap_bytes, decode_dicom_bytes, dicom_reader,
    read_dicom, read_frames, read_header, read_image)
from spinemri.data.dicom.encode import encode_dicom
from spinemri.data.dicom.guards import MIN_SIDE, bitmap_geometry, check_header, check_spacing, header_tags
from spinemri.data.dicom.image import SKIP_HINT, DicomImage, SeriesStack, rescale
from spinemri.data.dicom.series import SeriesPixels, read_series, series_order, slice_normal

__all__ = ["BITMAP_SUFFIXES", "MIN_SIDE", "READERS", "SKIP_HINT", "DicomImage", "SeriesPixels", "SeriesStack",
           "bitmap_geometry", "check_header", "check_spacing", "decode_bitmap_bytes", "decode_dicom_bytes",
           "dicom_reader", "encode_dicom", "header_tags", "read_dicom", "read_frames", "read_header", "read_image",
           "read_series", "rescale", "series_order", "slice_normal"]
