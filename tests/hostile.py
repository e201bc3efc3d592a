"""Hostile inputs for the hardening tests, built in a few MB of memory however much they declare.

    deflated_dicom(rows, columns)   Deflated Explicit VR Little Endian: the data set, pixels included,
                                    is one deflate stream (a 1 MB file can inflate to gigabytes)
    oversized_dicom(rows, columns)  an uncompressed header declaring a huge image, with 8 bytes of pixels
    png(width, height)              a valid 8-bit grayscale PNG of zeros
    zip_of_zeros(sizes)             a zip whose members are that many bytes of zeros each
    zip_with(**damage)              a small zip of one file, encrypted / with a bad CRC / an unknown method
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from spinemri.data.dicom import encode_dicom

_CHUNK = bytes(1 << 22)


def _header(rows: int, columns: int, syntax, like: Dataset | None = None) -> tuple[bytes, bytes]:
    """(preamble + file meta, the data set's elements before PixelData) in explicit VR little endian; ``like``: a
    slice whose attributes (its study, series, patient, geometry) the file takes, but for its pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    head = io.BytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.InstanceNumber = 1
    ds.PixelSpacing = [0.5, 0.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if like is not None:
        for element in like:
            if element.tag < 0x7FE00010 and element.keyword not in (
                    "SOPInstanceUID", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
                ds[element.tag] = element
    body = pydicom.filebase.DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return head.getvalue(), body.getvalue()


def deflated_dicom(rows: int = 23170, columns: int = 23170, like: Dataset | None = None) -> bytes:
    """A deflated DICOM whose 16-bit pixels (rows x columns, all zero) inflate to 2 x rows x columns bytes
    (``like``: the slice of a study it stands in for)."""
    head, body = _header(rows, columns, DeflatedExplicitVRLittleEndian, like)
    size = rows * columns * 2
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [head, deflater.compress(body + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size))]
    left = size
    while left:
        step = min(left, len(_CHUNK))
        parts.append(deflater.compress(_CHUNK[:step]))
        left -= step
    parts.append(deflater.flush())
    return b"".join(parts)


def oversized_dicom(rows: int = 23170, columns: int = 23170) -> bytes:
    """An uncompressed DICOM declaring rows x columns 16-bit pixels whose PixelData holds 8 bytes."""
    head, body = _header(rows, columns, ExplicitVRLittleEndian)
    return head + body + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 8) + bytes(8)


def png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 8-bit grayscale PNG of zeros, compressed row by row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    deflater = zlib.compressobj(1)
    row = bytes(width + 1)  # filter byte 0, then the pixels
    compressed = [deflater.compress(row) for _ in range(height)]
    compressed.append(deflater.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(compressed)) + chunk(b"IEND", b"")


def zip_of_zeros(sizes: list[int], names: list[str] | None = None) -> bytes:
    """A deflated zip whose members hold ``sizes[i]`` zero bytes each."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for k, size in enumerate(sizes):
            name = names[k] if names else f"study/{k}/{k}.dcm"
            with archive.open(name, "w", force_zip64=True) as out:
                left = size
                while left:
                    step = min(left, len(_CHUNK))
                    out.write(_CHUNK[:step])
                    left -= step
    return buffer.getvalue()


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_with(damage: str) -> bytes:
    """One small DICOM in a stored zip, then damaged: 'encrypted', 'bad_crc' or 'unknown_method'."""
    data = zip_of({"study/1/1.dcm": encode_dicom(np.ones((16, 16)))})
    raw = bytearray(data)
    local, central = 0, raw.find(b"PK\x01\x02")
    if damage == "encrypted":  # general purpose flag bit 0, in the local and the central header
        raw[local + 6] |= 1
        raw[central + 8] |= 1
    elif damage == "unknown_method":  # compression method 97 (WavPack): no decoder in zipfile
        struct.pack_into("<H", raw, local + 8, 97)
        struct.pack_into("<H", raw, central + 10, 97)
    elif damage == "bad_crc":  # flip one byte of the stored data
        name_length, extra_length = struct.unpack_from("<HH", raw, local + 26)
        raw[local + 30 + name_length + extra_length + 200] ^= 0xFF
    else:
        raise ValueError(damage)
    return bytes(raw)
