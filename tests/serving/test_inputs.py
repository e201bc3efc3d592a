"""The one table of input kinds: what every served classifier, `spinemri predict` and the request rows read."""

from __future__ import annotations

import numpy as np
import pytest

from spinemri.data.dicom import BITMAP_SUFFIXES, encode_dicom
from spinemri.data.preprocess import PreprocessConfig
from spinemri.serving import inputs
from spinemri.serving.predict import find_inputs
from spinemri.serving.requests import INPUT_SCHEMA


def test_every_kind_has_a_column_in_the_request_schema_and_its_suffixes_are_found_by_predict(tmp_path):
    assert set(inputs.IMAGE_COLUMNS) <= set(INPUT_SCHEMA.input_names())
    for kind in inputs.INPUT_KINDS:
        for suffix in kind.suffixes:
            (tmp_path / f"image{suffix}").write_bytes(b"x")
    found = {p.suffix for p in find_inputs(tmp_path)}
    assert found == {s for kind in inputs.INPUT_KINDS for s in kind.suffixes}
    assert set(BITMAP_SUFFIXES) <= found


@pytest.mark.parametrize("name, column", [("a.dcm", "dicom_b64"), ("b.PNG", "image_b64"), ("c.jpeg", "image_b64"),
                                          ("1.2.840.10008", "dicom_b64")])  # a DICOM file may have any name
def test_a_file_is_of_the_kind_its_suffix_says(name, column):
    assert inputs.kind_of_path(name).column == column


def test_a_file_read_from_disk_and_the_same_bytes_in_a_request_decode_alike(tmp_path):
    path = tmp_path / "slice.dcm"
    path.write_bytes(encode_dicom(np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)))
    config = PreprocessConfig(img_size=32)
    row = inputs.file_row(path)
    from_request = inputs.decode_value(row["dicom_b64"], "dicom_b64", 0, config)
    np.testing.assert_array_equal(inputs.read_file(path, config).pixels, from_request.pixels)
    with pytest.raises(inputs.InputError, match="row 3: image_b64 is not valid base64"):
        inputs.decode_value("%%%", "image_b64", 3, config)
