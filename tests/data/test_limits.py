"""Decompression bombs and oversized declarations are refused from their headers, before decoding,
with the limit and the variable that raises it named; memory stays small while refusing them."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from spinemri.data import limits
from spinemri.errors import DicomReadError, ImageTooLarge
from spinemri.data.dicom import (decode_bitmap_bytes, decode_dicom_bytes,
                                 encode_dicom, read_dicom, read_header, read_image)
from tests import hostile

MB = 1 << 20


def _peak_mb(call) -> tuple[float, BaseException | None]:
    """Peak Python-visible allocation (numpy and bytes included) while ``call`` runs, and what it raised."""
    tracemalloc.start()
    raised = None
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - the caller inspects it
        raised = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / MB, raised


@pytest.fixture(scope="module")
def deflated_bomb() -> bytes:
    data = hostile.deflated_dicom(12000, 12000)  # 288 MB of pixels in about 300 KB
    assert len(data) < 2 * MB
    return data


def test_a_deflated_dicom_bomb_is_refused_while_inflating(deflated_bomb, tmp_path):
    peak, raised = _peak_mb(lambda: decode_dicom_bytes(deflated_bomb, "upload.dcm"))
    assert isinstance(raised, ImageTooLarge), raised
    assert "SPINEMRI_MAX_IMAGE_MB" in str(raised) and "upload.dcm" in str(raised)
    assert peak < 40, f"refusing the bomb took {peak:.0f} MB"
    path = tmp_path / "bomb.dcm"
    path.write_bytes(deflated_bomb)
    for read in (read_dicom, read_header, read_image):  # a header read inflates the whole data set too
        with pytest.raises(ImageTooLarge, match="SPINEMRI_MAX_IMAGE_MB"):
            read(path)


def test_a_small_deflated_dicom_still_decodes(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    expected = ds.pixel_array.astype(np.float32)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert np.array_equal(read_dicom(path).pixels, expected)


def test_a_declared_size_is_checked_before_the_pixels_are_read(tmp_path):
    data = hostile.oversized_dicom(23170, 23170)
    with pytest.raises(ImageTooLarge, match="23170 x 23170 image .*SPINEMRI_MAX_IMAGE_PIXELS"):
        decode_dicom_bytes(data, "upload.dcm")
    path = tmp_path / "big.dcm"
    path.write_bytes(data)
    with pytest.raises(ImageTooLarge, match="SPINEMRI_MAX_IMAGE_PIXELS"):
        read_dicom(path)


def test_a_png_bomb_is_refused_from_its_header(tmp_path):
    data = hostile.png(20000, 20000)  # 400 megapixels in about 0.4 MB
    peak, raised = _peak_mb(lambda: decode_bitmap_bytes(data, "upload.png"))
    assert isinstance(raised, ImageTooLarge) and "SPINEMRI_MAX_IMAGE_PIXELS" in str(raised), raised
    assert peak < 20, f"refusing the PNG took {peak:.0f} MB"
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(ImageTooLarge, match="bomb.png"):
        read_image(path)


def test_the_limits_are_set_by_environment_variables(monkeypatch, tmp_path):
    image = encode_dicom(np.ones((300, 200)))
    assert decode_dicom_bytes(image, "ok.dcm").pixels.shape == (300, 200)
    monkeypatch.setenv("SPINEMRI_MAX_IMAGE_PIXELS", str(200 * 299))
    with pytest.raises(ImageTooLarge, match="the limit of 59,800 pixels per image"):
        decode_dicom_bytes(image, "ok.dcm")
    monkeypatch.setenv("SPINEMRI_MAX_IMAGE_PIXELS", "60000")
    assert decode_dicom_bytes(image, "ok.dcm").pixels.shape == (300, 200)
    monkeypatch.setenv("SPINEMRI_MAX_IMAGE_MB", "0.1")  # 120 KB of 16-bit pixels is over 0.1 MB
    with pytest.raises(ImageTooLarge, match="SPINEMRI_MAX_IMAGE_MB"):
        decode_dicom_bytes(image, "ok.dcm")
    monkeypatch.setenv("SPINEMRI_MAX_IMAGE_MB", "lots")
    with pytest.raises(limits.LimitError, match="SPINEMRI_MAX_IMAGE_MB='lots' is not a number"):
        decode_dicom_bytes(image, "ok.dcm")


def test_a_corrupt_jpeg2000_file_is_called_corrupt_not_undecodable(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    frame = bytearray(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1).__next__())
    frame[len(frame) // 3: len(frame) // 3 + 64] = bytes(64)  # damage the code stream, keep its header
    ds.PixelData = pydicom.encaps.encapsulate([bytes(frame[: len(frame) // 2])])
    path = tmp_path / "corrupt_j2k.dcm"
    ds.save_as(path)
    with pytest.raises(DicomReadError) as info:
        read_dicom(path)
    message = str(info.value)
    assert "corrupt or truncated" in message and "no installed decoder" not in message, message
