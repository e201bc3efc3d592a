"""DICOM decoding on real files (pydicom's and pydicom-data's MR images) and on broken ones."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from spinemri.data import schema
from spinemri.errors import DicomReadError, ImageReadError
from spinemri.data.dicom import (read_dicom, read_frames, read_image,
                                 read_series, series_order)

MR_SMALL_VARIANTS = [  # the same 64x64 image in every encoding the pydicom wheel ships
    "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
    "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
]
EMRI_VARIANTS = [  # 10 frames, pydicom-data
    "emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm",
    "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm",
]


def _file(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"{name} not found: is pydicom-data installed?"
    return path


@pytest.mark.parametrize("name", MR_SMALL_VARIANTS)
def test_every_encoding_of_mr_small_decodes_to_the_same_pixels(name):
    reference = read_dicom(_file("MR_small.dcm"))
    image = read_dicom(_file(name))
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (64, 64)
    np.testing.assert_array_equal(image.pixels, reference.pixels)
    assert image.pixel_spacing == pytest.approx((0.3125, 0.3125))


@pytest.mark.parametrize("lossless, other", [("MR2_UNCR.dcm", "MR2_J2KR.dcm"), ("MR2_UNCI.dcm", "MR2_J2KI.dcm")])
def test_jpeg2000_mr_matches_its_uncompressed_twin(lossless, other):
    a, b = read_dicom(_file(lossless)).pixels, read_dicom(_file(other)).pixels
    assert a.shape == b.shape == (1024, 1024)
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_modality_lut_is_applied():
    path = _file("MR2_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleSlope) != 1.0
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(read_dicom(path).pixels, expected, rtol=1e-5)


@pytest.mark.parametrize("name", EMRI_VARIANTS)
def test_multi_frame_files_yield_frames(name):
    frames = read_frames(_file(name))
    reference = pydicom.dcmread(_file("emri_small.dcm")).pixel_array
    assert len(frames) == 10
    for i, frame in enumerate(frames):
        assert frame.frame == i
        np.testing.assert_array_equal(frame.pixels, reference[i].astype(np.float32))
    with pytest.raises(DicomReadError, match="multi-frame file with 10 frames"):
        read_dicom(_file(name))
    np.testing.assert_array_equal(read_dicom(_file(name), frame=3).pixels, frames[3].pixels)


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm"])
def test_monochrome1_comes_out_inverted(name):
    path = _file(name)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(np.float64)[::8, ::8].ravel()
    ours = read_dicom(path).pixels.astype(np.float64)[::8, ::8].ravel()
    assert np.corrcoef(raw, ours)[0, 1] < -0.999


def test_voi_window_is_optional():
    path = _file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    windowed = read_dicom(path, voi=True).pixels
    plain = read_dicom(path).pixels
    assert "WindowCenter" in ds
    assert not np.array_equal(windowed, plain)
    assert np.corrcoef(windowed.ravel(), plain.ravel())[0, 1] > 0.5


@pytest.mark.parametrize("name, reason", [
    ("MR_truncated.dcm", "is truncated"),
    ("emri_small_jpeg_2k_lossless_too_short.dcm", "is truncated"),
])
def test_truncated_files_fail_with_a_reason(name, reason):
    with pytest.raises(DicomReadError, match=reason) as info:
        read_frames(_file(name))
    assert name in str(info.value) and "--on-bad-file=skip" in str(info.value)


def test_not_a_dicom_file(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_bytes(b"this is a text file, not an MR image" * 10)
    with pytest.raises(DicomReadError, match="is not a DICOM file"):
        read_dicom(path)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(DicomReadError, match="is empty"):
        read_dicom(tmp_path / "empty.dcm")
    with pytest.raises(DicomReadError, match="does not exist"):
        read_dicom(tmp_path / "nowhere.dcm")


def _copy_with(tmp_path, **changes):
    ds = pydicom.dcmread(_file("MR_small.dcm"))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / "changed.dcm"
    ds.save_as(path)
    return path


def test_no_pixel_data(tmp_path):
    path = _copy_with(tmp_path, PixelData=None)
    with pytest.raises(DicomReadError, match=r"has no pixel data \(SOP class MR Image Storage\)"):
        read_dicom(path)


def test_zero_size_image(tmp_path):
    path = _copy_with(tmp_path, Rows=0)
    with pytest.raises(DicomReadError, match="zero-size image"):
        read_dicom(path)


def test_transfer_syntax_without_a_decoder(tmp_path):
    ds = pydicom.dcmread(_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder installed
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    path = tmp_path / "mpeg.dcm"
    ds.save_as(path)
    with pytest.raises(DicomReadError, match="no installed decoder") as info:
        read_dicom(path)
    assert "MPEG2" in str(info.value) and "pip install" in str(info.value)


def test_bitmaps_read_as_slices(tmp_path):
    import cv2

    image = (np.arange(48 * 32) % 256).astype(np.uint8).reshape(48, 32)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    slice_ = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(slice_.pixels, image.astype(np.float32))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="is not a PNG or JPEG image"):
        read_image(tmp_path / "bad.png")


def test_series_are_ordered_by_position_not_instance_number(phantom_dir):
    series = _series_folders(phantom_dir)
    for folder in series:
        files = sorted(folder.glob("*.dcm"))
        order = series_order(files)
        positions = [p for _, _, p in order]
        assert positions == sorted(positions)
        stack = read_series(folder)
        assert stack.pixels.shape[0] == len(files)
        assert stack.instance_numbers == tuple(n for n, _, _ in order)
        # The slice at index_of(n) is the file named n.
        n = stack.instance_numbers[len(files) // 2]
        np.testing.assert_array_equal(stack.pixels[stack.index_of(n)], read_dicom(folder / f"{n}.dcm").pixels)
    with pytest.raises(KeyError, match="not in this series"):
        stack.index_of(99999)


def test_a_position_that_is_not_a_number_orders_by_instance_number_and_a_bad_number_is_named(phantom_copy):
    folder = _series_folders(phantom_copy)[0]
    files = sorted(folder.glob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    ds.ImagePositionPatient = [0, "NaN", 0]
    ds.save_as(files[0])
    numbers = [n for n, _, _ in series_order(files)]
    assert numbers == sorted(numbers)  # not an order along a position that cannot be compared
    assert read_series(folder).normal is None
    ds[0x00200013] = RawDataElement(Tag(0x00200013), "IS", 4, b"12a ", 0, False, True)  # as a scanner wrote it
    ds.save_as(files[0])
    with pytest.raises(DicomReadError, match="has an InstanceNumber that is not a whole number") as raised:
        series_order(files)
    assert str(files[0]) in str(raised.value)


def test_a_series_mixing_image_sizes_is_refused_naming_its_folder(phantom_copy):
    folder = _series_folders(phantom_copy)[0]
    last = sorted(folder.glob("*.dcm"))[-1]
    ds = pydicom.dcmread(last)
    ds.Rows, ds.Columns = ds.Rows // 2, ds.Columns // 2
    ds.PixelData = np.zeros((ds.Rows, ds.Columns), np.uint16).tobytes()
    ds.save_as(last)
    with pytest.raises(DicomReadError, match="mixes image sizes .* in one series") as raised:
        read_series(folder)
    assert str(folder) in str(raised.value)


def test_a_series_decodes_each_slice_when_it_is_read_and_keeps_only_a_few(phantom_dir, monkeypatch):
    from spinemri.data.dicom import series as dicom
    from spinemri.data.preprocess import PreprocessConfig
    from spinemri.localization.dataset import series_inputs

    folder = max(_series_folders(phantom_dir), key=lambda f: len(list(f.glob("*.dcm"))))
    ordered = [path for _, path, _ in series_order(sorted(folder.glob("*.dcm")))]
    expected = np.stack([read_dicom(path).pixels for path in ordered])
    decoded = []
    real = dicom.read_dicom
    monkeypatch.setattr(dicom, "read_dicom", lambda path, **kw: decoded.append(path) or real(path, **kw))
    stack = read_series(folder)
    assert decoded == ordered[:1], "only the first slice is decoded to read the series"
    series_inputs(stack, PreprocessConfig(img_size=32, slices=3, mode="slice"))
    assert decoded == ordered, "a pass with each slice's two neighbours decodes every file once"
    assert len(stack.pixels._recent) <= 4  # the memory a series holds: a few slices, not the volume
    np.testing.assert_array_equal(np.asarray(stack.pixels), expected)
    np.testing.assert_array_equal(stack.pixels[-1, 3:5], expected[-1, 3:5])
    with pytest.raises(ValueError, match="read-only"):
        stack.pixels[0][0, 0] = 1.0


def test_a_slice_that_cannot_be_decoded_is_named_when_it_is_read(phantom_copy):
    folder = _series_folders(phantom_copy)[0]
    ordered = [path for _, path, _ in series_order(sorted(folder.glob("*.dcm")))]
    broken = ordered[len(ordered) // 2]
    data = open(broken, "rb").read()
    open(broken, "wb").write(data[: len(data) - 200])  # the pixel data cut short, the header intact
    stack = read_series(folder)
    with pytest.raises(DicomReadError) as raised:
        stack.pixels[ordered.index(broken)]
    assert broken in str(raised.value)


def _series_folders(phantom_dir):
    table = pd.read_csv(phantom_dir / schema.SERIES_CSV).head(6)
    return [phantom_dir / schema.IMAGES_DIR / str(s) / str(se) for s, se in zip(table["study_id"], table["series_id"])]


def test_phantom_instance_numbers_are_not_always_in_position_order(phantom_dir):
    reversed_or_gapped = 0
    for folder in _series_folders(phantom_dir):
        numbers = [n for n, _, _ in series_order(sorted(folder.glob("*.dcm")))]
        if numbers != list(range(1, len(numbers) + 1)):
            reversed_or_gapped += 1
    assert reversed_or_gapped >= 1


NATIVE_GRAYSCALE = ["MR_small.dcm", "MR_small_implicit.dcm", "CT_small.dcm", "MR2_UNCR.dcm", "MR2_UNCI.dcm",
                    "693_UNCI.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm"]


@pytest.mark.parametrize("name", NATIVE_GRAYSCALE)
def test_uncompressed_files_decode_exactly_as_pydicom_does(name):
    """read_dicom reads uncompressed pixels itself (speed); the values must be pydicom's, bit for bit
    (16-bit signed and unsigned, 12 and 14 bits stored, with and without a rescale)."""
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(_file(name))
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    np.testing.assert_array_equal(read_dicom(_file(name)).pixels, expected)


@pytest.mark.parametrize("signed", [0, 1])
def test_unused_high_bits_are_cleared_or_sign_extended_like_pydicom(tmp_path, signed):
    ds = pydicom.dcmread(_file("MR_small.dcm"))
    rng = np.random.default_rng(0)
    stored = rng.integers(-2048 if signed else 0, 2048 if signed else 4096, size=(64, 64))
    raw = (stored.astype(np.int64) & 0x0FFF) | (rng.integers(0, 16, size=stored.shape) << 12)  # junk in bits 12-15
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, signed
    ds.PixelData = raw.astype("<u2").tobytes()
    path = tmp_path / "junk_bits.dcm"
    ds.save_as(path)
    np.testing.assert_array_equal(read_dicom(path).pixels, pydicom.dcmread(path).pixel_array.astype(np.float32))
    np.testing.assert_array_equal(read_dicom(path).pixels, stored.astype(np.float32))
