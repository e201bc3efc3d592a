"""The header scanner that reads the usual MR file without pydicom gives pydicom's image, or declines.

The reference is spinemri's pydicom path (``_dcmread`` + ``_decode``), which the scanner replaces
for the files it takes: the two must agree on every field and every pixel, bit for bit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid

from spinemri.data.dicom import decode as dicom
from spinemri.data.dicom import native as native_dicom
from spinemri.data.dicom import decode_dicom_bytes, read_dicom
from spinemri.errors import DicomReadError


@pytest.fixture
def with_pydicom(monkeypatch):
    """spinemri's reader with the scanner switched off (SPINEMRI_DICOM_READER=pydicom)."""
    def read(path, voi=False):
        with monkeypatch.context() as patch:
            patch.setenv("SPINEMRI_DICOM_READER", "pydicom")
            return read_dicom(path, voi=voi)
    return read


def _outcome(read, path):
    try:
        return read(path)
    except DicomReadError as exc:
        return f"error: {exc}"


def _assert_same(a, b):
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    assert a.pixels.dtype == b.pixels.dtype == np.float32
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.pixels.flags.c_contiguous
    if a.stored is not None:  # the integers the scanner keeps for the window give the same pixels
        np.testing.assert_array_equal(dicom.rescale(*a.stored), a.pixels)
    for field in dataclasses.fields(a):
        if field.name not in ("pixels", "stored"):
            x, y = getattr(a, field.name), getattr(b, field.name)
            assert x == y and type(x) is type(y), field.name
            if isinstance(x, tuple):
                assert [type(v) for v in x] == [type(v) for v in y], field.name


def _mr(pixels: np.ndarray, **tags) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesDescription, ds.InstanceNumber = "MR", "Sagittal T2/STIR", 7
    ds.ImagePositionPatient = [-12.5, 30.25, 101.0]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.PixelSpacing = [0.6875, 0.6875]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = 8 * pixels.itemsize
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def _save(ds: Dataset, path: Path, implicit=False) -> Path:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return path


def _undefined_lengths(ds: Dataset, keyword: str) -> None:
    ds[keyword].is_undefined_length = True
    for item in ds[keyword].value:
        item.is_undefined_length_sequence_item = True


def _nested(ds: Dataset) -> Dataset:
    """Sequences in front of the pixel data: nested, some of undefined length, and private tags."""
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator = "T-D0146", "SRT"
    outer = Dataset()
    outer.ReferencedSOPClassUID, outer.ReferencedSOPInstanceUID = MRImageStorage, generate_uid()
    outer.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([outer, Dataset()])
    _undefined_lengths(ds, "ReferencedImageSequence")
    ds.add_new(0x00191010, "LO", "a vendor's private text")
    ds.add_new(0x00191011, "OB", b"\x01\x02\x03")  # odd length, padded when written
    ds.RequestAttributesSequence = Sequence([Dataset()])  # defined length
    return ds


rng = np.random.default_rng(5)
IMAGE_U16 = rng.integers(0, 1800, size=(48, 40)).astype(np.uint16)

TAKEN = {
    "no rescale tags": lambda: _mr(IMAGE_U16),
    "only a slope (ignored, as pydicom does)": lambda: _mr(IMAGE_U16, RescaleSlope=2),
    "slope 1 intercept 0": lambda: _mr(IMAGE_U16, RescaleSlope=1, RescaleIntercept=0),
    "rescaled": lambda: _mr(IMAGE_U16, RescaleSlope="2.5", RescaleIntercept="-1024.25"),
    "12 of 16 bits, junk above": lambda: _mr(IMAGE_U16 | 0xF000, BitsStored=12, HighBit=11),
    "signed 12 bits": lambda: _mr((IMAGE_U16.astype(np.int16) - 900) & 0x0FFF, BitsStored=12, HighBit=11,
                                  PixelRepresentation=1),
    "8 bits": lambda: _mr((IMAGE_U16 // 8).astype(np.uint8)),
    "no geometry": lambda: _mr(IMAGE_U16, ImagePositionPatient=None, ImageOrientationPatient=None,
                               InstanceNumber=None),
    "zero spacing": lambda: _mr(IMAGE_U16, PixelSpacing=[0, 0]),
    "sequences and private tags": lambda: _nested(_mr(IMAGE_U16)),
    "window, read without voi": lambda: _mr(IMAGE_U16, WindowCenter=600, WindowWidth=1200),
}


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit VR", "implicit VR"])
@pytest.mark.parametrize("case", list(TAKEN))
def test_the_usual_files_are_read_without_pydicom_and_match_it(tmp_path, case, implicit, with_pydicom):
    path = _save(TAKEN[case](), tmp_path / "slice.dcm", implicit=implicit)
    data = path.read_bytes()
    assert native_dicom.scan(data) is not None, "the scanner should take this file"
    assert dicom._common_image(data, path, voi=False) is not None
    expected = with_pydicom(path)
    _assert_same(read_dicom(path), expected)
    _assert_same(decode_dicom_bytes(data, str(path)), expected)


def test_sequences_of_undefined_length_are_stepped_over(tmp_path):
    path = _save(_nested(_mr(IMAGE_U16)), tmp_path / "slice.dcm")
    data = path.read_bytes()
    assert b"\xfe\xff\xdd\xe0" in data and b"\xfe\xff\x0d\xe0" in data  # sequence and item delimiters
    tags, offset, length = native_dicom.scan(data)
    assert (tags["Rows"], tags["Columns"], tags["InstanceNumber"]) == (48, 40, 7)
    assert tags["PixelSpacing"] == [0.6875, 0.6875] and tags["ImagePositionPatient"] == [-12.5, 30.25, 101.0]
    assert data[offset:offset + length] == IMAGE_U16.tobytes()


DECLINED = {
    "MONOCHROME1": lambda: _mr(IMAGE_U16, PhotometricInterpretation="MONOCHROME1"),
    "no pixel spacing": lambda: _mr(IMAGE_U16, PixelSpacing=None),
    "empty slope": lambda: _mr(IMAGE_U16, RescaleSlope="", RescaleIntercept=0),
    "a modality LUT": lambda: _modality_lut(_mr(IMAGE_U16)),
    "32 bits": lambda: _mr(IMAGE_U16.astype(np.uint32)),
    "two frames": lambda: _mr(np.concatenate([IMAGE_U16, IMAGE_U16]), Rows=48, NumberOfFrames=2),
    "zero rows": lambda: _mr(IMAGE_U16[:0]),
    "a non-integer instance number": lambda: _mr(IMAGE_U16, InstanceNumber="7.0"),
}


def _modality_lut(ds: Dataset) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [2048, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new(0x00283006, "OW", np.arange(0, 4096, 2, dtype="<u2").tobytes())  # LUTData
    ds.ModalityLUTSequence = Sequence([item])
    return ds


@pytest.mark.parametrize("case", list(DECLINED))
def test_other_files_are_left_to_pydicom(tmp_path, case, with_pydicom):
    path = _save(DECLINED[case](), tmp_path / "slice.dcm")
    assert dicom._common_image(path.read_bytes(), path, voi=False) is None
    _assert_same(_outcome(read_dicom, path), _outcome(with_pydicom, path))


def test_a_window_is_left_to_pydicom_only_when_it_is_applied(tmp_path, with_pydicom):
    path = _save(_mr(IMAGE_U16, WindowCenter=600, WindowWidth=1200), tmp_path / "slice.dcm")
    data = path.read_bytes()
    assert native_dicom.scan(data, voi=False) is not None and native_dicom.scan(data, voi=True) is None
    _assert_same(read_dicom(path, voi=True), with_pydicom(path, voi=True))


@pytest.mark.parametrize("cut", [60, 132, 200, -100, -1])
def test_a_truncated_file_gets_pydicom_s_error(tmp_path, cut, with_pydicom):
    whole = _save(_nested(_mr(IMAGE_U16)), tmp_path / "whole.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(whole[:cut])
    assert native_dicom.scan(path.read_bytes()) is None
    outcome = _outcome(read_dicom, path)
    assert isinstance(outcome, str) and outcome == _outcome(with_pydicom, path)


def test_every_pydicom_test_file_reads_as_pydicom_reads_it(with_pydicom):
    # 146 files from pydicom and pydicom-data: every transfer syntax, big endian, deflate, multi-frame,
    # files without a preamble or with implicit VR data in an explicit VR file.
    files = sorted(get_testdata_files("*.dcm"))
    assert len(files) > 100, "pydicom-data is not installed"
    taken = set()
    for path in files:
        data = Path(path).read_bytes()
        if dicom._common_image(data, path, voi=False) is not None:
            taken.add(Path(path).name)
        try:
            expected = _outcome(with_pydicom, path)
        except Exception:  # noqa: BLE001 - files spinemri's pydicom path cannot handle either way
            continue
        _assert_same(_outcome(read_dicom, path), expected)
    # The scanner takes the single-frame MONOCHROME2 MR and CT images with a pixel spacing (from
    # real scanners too: Siemens, with overlays and private sequences), and nothing in colour,
    # compressed, big endian, multi-frame, MONOCHROME1 or truncated.
    assert {"MR_small.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm", "MR2_UNCR.dcm", "MR2_UNCI.dcm",
            "MR-SIEMENS-DICOM-WithOverlays.dcm", "CT_small.dcm", "693_UNCR.dcm"} <= taken
    assert not {"MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_truncated.dcm", "emri_small.dcm",
                "RG1_UNCR.dcm", "SC_rgb.dcm"} & taken


def test_every_phantom_file_takes_the_scanner_and_matches_pydicom(phantom_dir, with_pydicom):
    files = sorted(phantom_dir.rglob("*.dcm"))
    assert len(files) > 100
    for path in files:
        assert dicom._common_image(path.read_bytes(), path, voi=False) is not None, path
        _assert_same(read_dicom(path), with_pydicom(path))


def test_a_misspelt_reader_setting_is_refused(tmp_path, monkeypatch):
    path = _save(_mr(IMAGE_U16), tmp_path / "slice.dcm")
    monkeypatch.setenv("SPINEMRI_DICOM_READER", "pydciom")
    with pytest.raises(ValueError, match="SPINEMRI_DICOM_READER='pydciom' is not a reader: set it to 'auto' .* or 'pydicom'"):
        read_dicom(path)
    monkeypatch.setenv("SPINEMRI_DICOM_READER", "auto")
    assert read_dicom(path).pixels.shape == (48, 40)


def test_a_file_too_large_for_a_slice_goes_straight_to_pydicom(tmp_path, monkeypatch, with_pydicom):
    path = _save(_mr(IMAGE_U16), tmp_path / "slice.dcm")
    assert dicom._read_common(path, voi=False) is not None
    monkeypatch.setattr(dicom, "LARGEST_SCANNED_FILE", path.stat().st_size - 1)
    assert dicom._read_common(path, voi=False) is None
    _assert_same(read_dicom(path), with_pydicom(path))
