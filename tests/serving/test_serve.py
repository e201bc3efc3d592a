"""A real `mlflow models serve` process on models:/spinemri@champion, spoken to over HTTP."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from spinemri.data.dicom import encode_dicom
from spinemri.models.network import HEAD_CLASSES
from spinemri.models.pyfunc import file_row

from .conftest import no_pixels_dicom_b64

# One worker runs all serving tests: one trained model and one server instead of two of each.
pytestmark = pytest.mark.xdist_group("serving")


# Straight to 127.0.0.1, whatever proxy the environment (or an earlier test) configured.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env.update(MLFLOW_TRACKING_URI=trained.tracking_uri,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(mlflow_cli), "models", "serve", "-m", "models:/spinemri@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    started, last_error = time.monotonic(), None
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with DIRECT.open(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except (OSError, http.client.HTTPException) as exc:
                last_error = exc
            if time.monotonic() - started > 300:
                pytest.fail(f"mlflow models serve on port {port} did not answer /ping within 300 s (last error: "
                            f"{last_error!r}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        print(f"server answered /ping {time.monotonic() - started:.1f} s after start")
        yield url, process
    finally:
        import signal

        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _post(url: str, payload) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with DIRECT.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


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
