"""A real `mlflow models serve` process on models:/spinemri@champion, spoken to over HTTP."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from spinemri.data.dicom import encode_dicom
from spinemri.models.network import HEAD_CLASSES
from spinemri.models.pyfunc import file_row

from .conftest import no_pixels_dicom_b64
from .server import post as _post, serve_model

# One worker runs all serving tests: one trained model and one server instead of two of each.
pytestmark = pytest.mark.xdist_group("serving")


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_model("models:/spinemri@champion", trained.tracking_uri, log) as (url, process):
        yield url, process


def _site(data_dir: Path) -> dict:
    coords = pd.read_csv(data_dir / "train_label_coordinates.csv").iloc[3]
    path = data_dir / "train_images" / str(coords.study_id) / str(coords.series_id) / f"{coords.instance_number}.dcm"
    return file_row(path, coords.x, coords.y)


def _assert_probabilities(prediction: dict) -> None:
    for head, classes in HEAD_CLASSES.items():
        values = np.array([prediction[f"{head}:{c}"] for c in classes])
        assert np.all((values >= 0) & (values <= 1))
        assert values.sum() == pytest.approx(1.0, abs=1e-5)
        assert prediction[head] == classes[int(values.argmax())]


def test_a_phantom_dicom_gets_per_head_probabilities(server, trained):
    url, _ = server
    row = _site(trained.data_dir)
    started = time.perf_counter()
    status, body = _post(url, {"dataframe_records": [row]})
    latency = time.perf_counter() - started
    assert status == 200, body
    assert len(body["predictions"]) == 1
    _assert_probabilities(body["predictions"][0])
    print(f"one-DICOM request: {latency * 1000:.0f} ms")

    # dataframe_split, integer coordinates and two rows (the second at the image centre)
    centre = {"dicom_b64": row["dicom_b64"]}
    status, body = _post(url, {"dataframe_split": {"columns": ["dicom_b64", "x", "y"],
                                                   "data": [[row["dicom_b64"], int(row["x"]), int(row["y"])],
                                                            [centre["dicom_b64"], None, None]]}})
    assert status == 200, body
    assert len(body["predictions"]) == 2
    for prediction in body["predictions"]:
        _assert_probabilities(prediction)


def _empty_dicom() -> str:
    """A DICOM file with the preamble, the DICM marker and its file meta only: no data set at all."""
    ds = pydicom.dcmread(io.BytesIO(encode_dicom(np.ones((8, 8)))))
    for keyword in [e.keyword for e in ds if e.keyword]:
        delattr(ds, keyword)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return base64.b64encode(buffer.getvalue()).decode()


BAD_REQUESTS = {
    "garbage base64": ({"dicom_b64": "this is %%% not base64"}, "dicom_b64 is not valid base64"),
    "not an image": ({"dicom_b64": base64.b64encode(b"hello, I am a text file").decode()},
                     "dicom_b64 is not a DICOM file"),
    "not a PNG": ({"image_b64": base64.b64encode(b"\x89PNX broken").decode()}, "image_b64 is not a PNG or JPEG"),
    "empty DICOM": ({"dicom_b64": _empty_dicom()}, "dicom_b64 has no pixel data"),
    "zero bytes": ({"dicom_b64": ""}, "give exactly one of the columns dicom_b64"),
    "DICOM without pixels": ({"dicom_b64": no_pixels_dicom_b64()}, "dicom_b64 has no pixel data"),
    "missing column": ({"file": "scan.dcm"}, "missing column: give dicom_b64"),
    "x/y outside": ("outside", "lies outside the"),
    "x without y": ("x-only", "give both x and y"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_400_with_a_clear_message_and_the_server_keeps_answering(server, trained, case):
    url, process = server
    row, expected = BAD_REQUESTS[case]
    good = _site(trained.data_dir)
    if row == "outside":
        row = {"dicom_b64": good["dicom_b64"], "x": 5000.0, "y": 10.0}
    elif row == "x-only":
        row = {"dicom_b64": good["dicom_b64"], "x": 5.0}
    status, body = _post(url, {"dataframe_records": [row]})
    assert status == 400, body
    assert expected in body["message"], body["message"]
    status, body = _post(url, {"dataframe_records": [good]})
    assert status == 200 and process.poll() is None


def test_malformed_json_is_a_400_too(server, trained):
    url, process = server
    status, body = _post(url, b"{not json")
    assert status == 400
    status, _ = _post(url, {"dataframe_records": [_site(trained.data_dir)]})
    assert status == 200 and process.poll() is None
