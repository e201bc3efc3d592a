"""A real `mlflow models serve` process on models:/spinemri@champion, spoken to over HTTP."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
import io
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pydicom
import pytest

from spinemri.data.dicom import encode_dicom
from spinemri.data.schema import CONDITIONS, HEAD_CLASSES
from spinemri.metrics import operating
from spinemri.serving.inputs import file_row
from tests import hostile
from tests.conftest import no_pixels_dicom_b64

from .server import PeakRss, serve_model
from .server import post as _post

# One worker runs all serving tests: one trained model and one server instead of two of each.
pytestmark = pytest.mark.xdist_group("serving")


@pytest.fixture(scope="module")
def serve_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve") / "serve.log"


@pytest.fixture(scope="module")
def server(trained, serve_log):
    # A request body limit small enough to test cheaply, far above any request below.
    with serve_model("models:/spinemri@champion", trained.tracking_uri, serve_log,
                     extra_env={"SPINEMRI_MAX_REQUEST_MB": "32"}) as (url, process):
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


def test_the_server_loads_the_model_without_cuda_lines_on_a_machine_without_a_gpu(server, serve_log):
    from spinemri.quiet import NO_GPU_LINES, has_nvidia_gpu

    if has_nvidia_gpu():
        pytest.skip("this machine has an NVIDIA GPU: TensorFlow's CUDA lines are about it")
    assert _post(server[0], {"dataframe_records": [{"image": "abc"}]})[0] == 400  # the model is loaded and answering
    said = serve_log.read_text(errors="replace")
    assert not [line for line in said.splitlines() if NO_GPU_LINES.search(line) or "cuInit" in line], said[-3000:]


def test_a_phantom_dicom_gets_per_head_probabilities(server, trained, tmp_path):
    url, _ = server
    row = _site(trained.data_dir)
    started = time.perf_counter()
    status, body = _post(url, {"dataframe_records": [row]})
    latency = time.perf_counter() - started
    assert status == 200, body
    assert len(body["predictions"]) == 1
    _assert_probabilities(body["predictions"][0])
    # the referral flag is the thresholds the run chose, applied to the served probability
    carried = mlflow.artifacts.download_artifacts(run_id=trained.run_id, artifact_path=operating.ARTIFACT,
                                                  dst_path=str(tmp_path), tracking_uri=trained.tracking_uri)
    points = json.loads(Path(carried).read_text())["points"]
    served = body["predictions"][0]
    severity = np.array([[served[f"severity:{c}"] for c in HEAD_CLASSES["severity"]]])
    graded = row["condition"] if row.get("condition") in CONDITIONS else served["condition"]
    assert served["refer"] is bool(operating.refer(points, [graded], severity)[0]), served
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
    "boolean coordinates": ("boolean", "row 0: x must be a number of pixels, got True"),
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
    elif row == "boolean":  # MLflow's schema would make them 1.0 and 0.0
        row = {"dicom_b64": good["dicom_b64"], "x": True, "y": False}
    status, body = _post(url, {"dataframe_records": [row]})
    assert status == 400, body
    assert expected in body["message"], body["message"]
    status, body = _post(url, {"dataframe_records": [good]})
    assert status == 200 and process.poll() is None


def test_boolean_coordinates_are_a_400_in_the_split_payload_too(server, trained):
    url, _ = server
    good = _site(trained.data_dir)
    status, body = _post(url, {"dataframe_split": {"columns": ["dicom_b64", "x", "y"],
                                                   "data": [[good["dicom_b64"], 10.0, 12.0],
                                                            [good["dicom_b64"], 10.0, False]]}})
    assert status == 400 and "row 1: y must be a number of pixels, got False" in body["message"], body


def test_a_bad_setting_stops_the_server_at_its_start_with_the_setting_named(trained, tmp_path):
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env.update(MLFLOW_TRACKING_URI=trained.tracking_uri, SPINEMRI_MAX_IMAGE_MB="abc",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    with open(log, "wb") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                                    "models:/spinemri@champion", "--env-manager", "local", "-h", "127.0.0.1", "-p",
                                    "0", "-w", "1"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the server kept running with a bad setting:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert process.returncode != 0 and "SPINEMRI_MAX_IMAGE_MB='abc' is not a number" in text, text[-3000:]


def test_malformed_json_is_a_400_too(server, trained):
    url, process = server
    status, body = _post(url, b"{not json")
    assert status == 400
    status, _ = _post(url, {"dataframe_records": [_site(trained.data_dir)]})
    assert status == 200 and process.poll() is None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_bombs_fired_together_are_refused_in_bounded_memory(server, trained):
    url, process = server
    bombs = {  # each a small request declaring gigabytes
        "deflated DICOM": ({"dicom_b64": _b64(hostile.deflated_dicom(23170, 23170))},
                           "inflates to more than 144 MB, over the limit of 128 MB"),
        "declared DICOM": ({"dicom_b64": _b64(hostile.oversized_dicom(23170, 23170))},
                           "declares a 23170 x 23170 image"),
        "PNG": ({"image_b64": _b64(hostile.png(20000, 20000))}, "declares a 20000 x 20000 image"),
    }
    requests = [kind for kind in bombs for _ in range(3)]
    good = _site(trained.data_dir)
    with PeakRss(process.pid) as rss, ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda kind: _post(url, {"dataframe_records": [bombs[kind][0]]}, timeout=120),
                                requests))
    for kind, (status, body) in zip(requests, answers):
        assert status == 400, (kind, body)
        assert bombs[kind][1] in body["message"] and "SPINEMRI_MAX_IMAGE" in body["message"], (kind, body["message"])
    growth = (rss.peak - rss.idle) / (1 << 30)
    print(f"{len(requests)} bombs at once: server RSS {rss.idle / (1 << 20):.0f} MB idle, "
          f"peak {rss.peak / (1 << 20):.0f} MB (+{growth:.2f} GB)")
    assert growth < 1.5, f"the bombs took the server {growth:.2f} GB above idle"
    status, body = _post(url, {"dataframe_records": [good]})
    assert status == 200 and process.poll() is None, body


def test_deep_json_and_oversized_bodies_get_their_own_answers(server, trained):
    url, process = server
    deep = b'{"dataframe_records": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    status, body = _post(url, deep)
    assert status == 400 and "nested too deeply" in body["message"], (status, body)
    status, body = _post(url, b'{"dataframe_records": [{"dicom_b64": "' + b"A" * (33 << 20) + b'"}]}')
    assert status == 413 and "over the limit of 32 MB per request body" in body["message"], (status, body)
    assert "SPINEMRI_MAX_REQUEST_MB" in body["message"]
    status, _ = _post(url, {"dataframe_records": [_site(trained.data_dir)]})
    assert status == 200 and process.poll() is None
