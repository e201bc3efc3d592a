"""A header scanner for the DICOM files MR scanners usually write, without building a pydicom dataset.

``pydicom.dcmread`` turns every element of a file into Python objects, and each tag read afterwards
is converted again; for a 320x320 slice that is most of the cost of reading it. :func:`scan` walks
the encoded elements once, keeps the raw bytes of the few tags spinemri reads, and stops at the
pixel data. It only takes the common case:

* a Part 10 file (128-byte preamble, ``DICM``) in Explicit or Implicit VR Little Endian;
* one frame of one sample, 8 or 16 bits allocated, uncompressed pixel data of a defined length;
* RescaleSlope/Intercept (not a Modality LUT Sequence), PixelSpacing present, no enhanced-MR
  functional groups, and with ``voi=True`` no window or VOI LUT.

Anything else — another transfer syntax, a truncated or malformed element, a value it cannot
parse — gives None, and the caller reads the file with pydicom, which also names what is wrong.
Sequences the scanner does not need (of defined or undefined length, nested) are stepped over.
"""

from __future__ import annotations

from struct import unpack_from

EXPLICIT_VR_LE = b"1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = b"1.2.840.10008.1.2"

_UNDEFINED = 0xFFFFFFFF
_TRANSFER_SYNTAX = 0x00020010
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Explicit VRs whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"))

# tag -> (keyword, kind): "US" one unsigned short, "IS" one integer string, "DS" decimal strings,
# "CS" a code string.
WANTED = {
    0x00280010: ("Rows", "US"),
    0x00280011: ("Columns", "US"),
    0x00280002: ("SamplesPerPixel", "US"),
    0x00280100: ("BitsAllocated", "US"),
    0x00280101: ("BitsStored", "US"),
    0x00280103: ("PixelRepresentation", "US"),
    0x00280008: ("NumberOfFrames", "IS"),
    0x00200013: ("InstanceNumber", "IS"),
    0x00280004: ("PhotometricInterpretation", "CS"),
    0x00281052: ("RescaleIntercept", "DS"),
    0x00281053: ("RescaleSlope", "DS"),
    0x00280030: ("PixelSpacing", "DS"),
    0x00200037: ("ImageOrientationPatient", "DS"),
    0x00200032: ("ImagePositionPatient", "DS"),
}
# Tags that need pydicom's handling (LUTs, enhanced multi-frame geometry, other pixel encodings).
_DECLINED = frozenset((0x00283000, 0x52009229, 0x52009230, 0x7FE00008, 0x7FE00009))
_VOI = frozenset((0x00281050, 0x00281051, 0x00283010))


class _Declined(Exception):
    """The file is not one the scanner takes; pydicom reads it instead."""


def scan(data: bytes, *, voi: bool = False) -> tuple[dict, int, int] | None:
    """The wanted tags' values, and the offset and length of the pixel data; None if not the common case.

    Values are Python ints, floats, lists of floats and str, keyed by keyword; tags absent from the
    file are absent from the dict.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    try:
        return _scan(data, voi)
    except (_Declined, ValueError, UnicodeDecodeError, IndexError):
        return None  # struct.error is a ValueError: an element runs past the end of the data


def _scan(data: bytes, voi: bool) -> tuple[dict, int, int]:
    end = len(data)
    declined = _DECLINED | _VOI if voi else _DECLINED
    values: dict = {}
    position, explicit, syntax = 132, True, None
    while position < end:
        group, element = unpack_from("<HH", data, position)
        tag = group << 16 | element
        if group != 2 and syntax is None:
            raise _Declined  # no transfer syntax in the file meta information
        if group != 2 and explicit is True and syntax == IMPLICIT_VR_LE:
            explicit = False  # the dataset after the (always explicit) file meta information
        start, length, vr = _header(data, position, explicit)
        if tag == _PIXEL_DATA:
            if length == _UNDEFINED or start + length > end:
                raise _Declined  # encapsulated (compressed) or truncated
            return values, start, length
        if tag in declined or tag >> 16 == 0xFFFE:
            raise _Declined
        if length == _UNDEFINED:
            position = _skip_sequence(data, start, explicit and vr != b"UN")
            continue
        if start + length > end:
            raise _Declined
        if tag == _TRANSFER_SYNTAX:
            syntax = bytes(data[start:start + length]).rstrip(b"\x00 ")
            if syntax not in (EXPLICIT_VR_LE, IMPLICIT_VR_LE):
                raise _Declined
        elif tag in WANTED:
            keyword, kind = WANTED[tag]
            values[keyword] = _value(data, start, length, kind)
        position = start + length
    raise _Declined  # no pixel data


def _header(data: bytes, position: int, explicit: bool) -> tuple[int, int, bytes | None]:
    """Where an element's value starts, its length, and its VR (None in implicit VR)."""
    if not explicit:
        return position + 8, unpack_from("<I", data, position + 4)[0], None
    vr = bytes(data[position + 4:position + 6])
    if vr in _LONG_VRS:
        return position + 12, unpack_from("<I", data, position + 8)[0], vr
    if vr not in _SHORT_VRS:
        raise _Declined  # not an explicit VR after all (implicit VR data in an explicit VR file)
    return position + 8, unpack_from("<H", data, position + 6)[0], vr


def _skip_sequence(data: bytes, position: int, explicit: bool) -> int:
    """Step over the items of a sequence of undefined length; returns the offset after its end."""
    while True:
        tag = unpack_from("<HH", data, position)
        tag = tag[0] << 16 | tag[1]
        length = unpack_from("<I", data, position + 4)[0]
        position += 8
        if tag == _SEQUENCE_END:
            return position
        if tag != _ITEM:
            raise _Declined
        if length == _UNDEFINED:
            position = _skip_item(data, position, explicit)
        else:
            position += length
        if position > len(data):
            raise _Declined


def _skip_item(data: bytes, position: int, explicit: bool) -> int:
    """Step over the elements of an item of undefined length; returns the offset after its end."""
    while True:
        group, element = unpack_from("<HH", data, position)
        if group << 16 | element == _ITEM_END:
            return position + 8
        start, length, vr = _header(data, position, explicit)
        if length == _UNDEFINED:
            position = _skip_sequence(data, start, explicit and vr != b"UN")
        else:
            position = start + length
        if position > len(data):
            raise _Declined


def _value(data: bytes, start: int, length: int, kind: str):
    if kind == "US":
        if length != 2:
            raise _Declined
        return unpack_from("<H", data, start)[0]
    text = bytes(data[start:start + length]).decode("ascii").strip(" \x00")
    if kind == "CS":
        return text
    if not text:
        raise _Declined  # an empty number: pydicom's reading of it decides
    if kind == "IS":
        return int(text)
    numbers = [float(part) for part in text.split("\\")]
    return numbers if len(numbers) > 1 else numbers[0]
