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

import importlib

# Each name's module, imported on first use: preprocessing (and so every command's --help, through the
# settings) needs only `rescale`, and pydicom is imported by the decoders alone.
_HOMES = {
    "decode": ("BITMAP_SUFFIXES", "READERS", "decode_bitmap_bytes", "decode_dicom_bytes", "dicom_reader", "read_dicom",
               "read_frames", "read_header", "read_image"),
    "encode": ("encode_dicom",),
    "guards": ("MIN_SIDE", "bitmap_geometry", "check_header", "check_spacing", "header_tags"),
    "image": ("SKIP_HINT", "DicomImage", "SeriesStack", "rescale"),
    "series": ("SeriesPixels", "read_series", "series_order", "slice_normal"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


__all__ = sorted(_MODULE_OF)
