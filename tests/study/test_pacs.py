"""`spinemri pacs` against a real Orthanc (DICOMweb plugin): studies uploaded with patient identity and clinical
series names, reported once as a DICOM SR whose findings equal predict-study's, by two workers at once; a second
run stores nothing new; an Orthanc outage mid-run is retried; a malformed study is logged and skipped."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, generate_uid

from spinemri.cli import main
from spinemri.data.schema import CONDITIONS, LEVELS, PROBABILITY_COLUMNS, SAGITTAL_T1, SEVERITIES, row_id
from spinemri.pacs.report import read_report, structured_report
from spinemri.errors import StudyError
from spinemri.pacs.worker import PassResult
from spinemri.pacs.study import metadata_header
from spinemri.pacs.server import value_of
from spinemri.pacs.state import remember_pass, to_remember, window_start
from tests.services import orthanc_server

pytestmark = pytest.mark.xdist_group("study")

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-778899", "PatientBirthDate": "19610203", "PatientSex": "F"}
AS_FOUND = {"PatientBirthDate": "1961-02-03", "PatientSex": "Female"}
CLINICAL = {"Sagittal T1": "T1_TSE_SAG", "Sagittal T2/STIR": "T2_TSE_SAG", "Axial T2": "t2_tse_tra"}


def _held_out(two_stage, n: int) -> list[str]:
    splits = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=two_stage.classifier.run_id,
                                                             artifact_path="data/splits.csv"))
    return [str(s) for s in splits.loc[splits["split"] == "test", "study_id"].head(n)]


def _upload(orthanc, two_stage, study: str, folder: Path, *, drop: str | None = None, break_one: str = "",
            date: dt.date | None = None, as_found: bool = False) -> None:
    """Upload a phantom study to Orthanc with a patient identity, a StudyDate (today's unless given) and clinical
    series names (also copied to ``folder/<study>`` for predict-study); ``drop`` leaves out a series type;
    ``break_one``: a Sagittal T1 file without InstanceNumber ("unnumbered"), or a file of its first series with
    another's ("repeated");
    ``as_found`` stores it as archives hold studies that
    did not come from a careful scanner: JPEG 2000 compressed (which Orthanc cannot transcode), with a birth
    date and sex that are not valid DICOM."""
    series = pd.read_csv(two_stage.data_dir / "train_series_descriptions.csv")
    kinds = {str(r.series_id): r.series_description for r in series[series["study_id"] == int(study)].itertuples()}
    first_series = min((two_stage.data_dir / "train_images" / study).iterdir())
    for series_folder in sorted((two_stage.data_dir / "train_images" / study).iterdir()):
        kind = kinds[series_folder.name]
        if kind == drop:
            continue
        target = folder / study / series_folder.name
        target.mkdir(parents=True)
        for k, path in enumerate(sorted(series_folder.glob("*.dcm"))):
            ds = pydicom.dcmread(path)
            for keyword, value in {**PATIENT, "StudyDate": (date or dt.date.today()).strftime("%Y%m%d"),
                                   "SeriesDescription": CLINICAL[kind]}.items():
                setattr(ds, keyword, value)
            if k == 0:
                first_number = ds.InstanceNumber
            if break_one == "unnumbered" and kind == SAGITTAL_T1 and k == 0:
                del ds.InstanceNumber
            if break_one == "repeated" and series_folder == first_series and k == 1:
                ds.InstanceNumber = first_number
            if as_found:
                ds.PatientBirthDate, ds.PatientSex = AS_FOUND["PatientBirthDate"], AS_FOUND["PatientSex"]
                ds.compress(JPEG2000Lossless)
            ds.save_as(target / path.name)
            orthanc.upload(target / path.name)


def _worker(two_stage, orthanc, tmp_path, *args, wait=True, log=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=two_stage.tracking_uri, SPINEMRI_CACHE_DIR=str(two_stage.cache_dir),
               SPINEMRI_PACS_STATE=str(tmp_path / "state"))
    command = [sys.executable, "-m", "spinemri", "pacs", "--url", orthanc.dicomweb, "--once", *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True,
                               stderr=open(log, "w") if log else subprocess.PIPE)
    if not wait:
        return process
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-4000:]
    return out, err


@contextlib.contextmanager
def _answering_server():
    """An HTTP server on 127.0.0.1 that answers GET /<status>/... with that status."""
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            self.send_response(int(self.path.split("/")[1]))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _reports(orthanc) -> dict[str, list[bytes]]:
    return orthanc.reports()


def test_studies_are_reported_once_as_an_sr_that_equals_predict_study(study_model, study_store, tmp_path):
    two_stage = study_store
    studies = _held_out(two_stage, 4)
    folder = tmp_path / "studies"
    with orthanc_server() as orthanc:
        _upload(orthanc, two_stage, studies[0], folder, as_found=True)  # reported all the same
        _upload(orthanc, two_stage, studies[1], folder, drop=SAGITTAL_T1)  # an SR that says what was missing
        _upload(orthanc, two_stage, studies[2], folder, break_one="unnumbered")  # malformed studies: no SR
        _upload(orthanc, two_stage, studies[3], folder, break_one="repeated")
        # Two workers at once on the same studies (as two machines would run them): one report per study.
        workers = [_worker(two_stage, orthanc, tmp_path / f"worker-{k}", wait=False) for k in range(2)]
        outputs = [process.communicate(timeout=600) for process in workers]
        for process, (out, err) in zip(workers, outputs):
            assert process.returncode == 0, err[-4000:]
            assert "4 MR studies" in out and "2 failed" in out, out + err
            assert "series repeats InstanceNumbers (1 of its" in err, err[-3000:]
            assert "failed (malformed: a Sagittal T1 file has no InstanceNumber" in err, err[-3000:]
        reports = _reports(orthanc)
        assert sorted(len(v) for v in reports.values()) == [1, 1]

        out, err = _worker(two_stage, orthanc, tmp_path / "worker-0")  # a second run stores nothing new
        assert "4 MR studies, 0 reported, 2 already reported, 2 failed" in out, out + err
        assert sorted(len(v) for v in _reports(orthanc).values()) == [1, 1]
        outputs.append((out, err))

    expected_out = tmp_path / "submission.csv"
    shutil.rmtree(folder / studies[2])
    shutil.rmtree(folder / studies[3])
    result = CliRunner().invoke(main, ["predict-study", "--data", str(folder), "--out", str(expected_out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    expected = pd.read_csv(expected_out, dtype={"row_id": str}).set_index("row_id")
    sites = pd.read_csv(tmp_path / "submission.sites.csv", dtype={"row_id": str}).set_index("row_id")
    by_study = {}
    for [data] in reports.values():
        ds = pydicom.dcmread(io.BytesIO(data))
        assert str(ds.PatientName) == PATIENT["PatientName"] and ds.PatientID == PATIENT["PatientID"]
        assert ds.SeriesDescription == "spinemri spinemri-study v1" and ds.Modality == "SR"
        source = next(s for s in studies[:2] if (folder / s).is_dir() and ds.StudyInstanceUID ==
                      pydicom.dcmread(next((folder / s).rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
        by_study[source] = (ds, read_report(ds))
        if source == studies[0]:  # what is not valid DICOM is left empty, not copied or refused
            assert ds.PatientBirthDate == "" and ds.PatientSex == ""
    assert set(by_study) == set(studies[:2])
    for study, (ds, found) in by_study.items():
        assert len(found) == 25
        content = str(ds.ContentSequence)  # the algorithm's name and version sit on every measurement group
        assert "spinemri-study" in content and "spinemri-study 1" in content
        for row in found.itertuples():
            rid = row_id(study, row.condition, row.level)
            want = expected.loc[rid, list(PROBABILITY_COLUMNS)].to_numpy(float)
            got = np.array([getattr(row, c) for c in PROBABILITY_COLUMNS])
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=rid)
            assert row.grade == SEVERITIES[int(np.argmax(want))]
            assert row.source == sites.loc[rid, "source"]
            assert row.refer in (True, False) and row.refer == sites.loc[rid, "refer"], rid  # coded Yes / No, read back
            if row.source == "model":
                assert row.x == pytest.approx(sites.loc[rid, "x"], abs=1e-3)
                assert row.y == pytest.approx(sites.loc[rid, "y"], abs=1e-3)
                assert row.sop_instance_uid  # the site's source image, referenced by its UID
    missing = by_study[studies[1]][1]
    foraminal = missing[missing["condition"].str.contains("foraminal")]
    assert (foraminal["source"] == "prior").all() and (foraminal["missing"] == SAGITTAL_T1).all()
    assert (missing.loc[~missing["condition"].str.contains("foraminal"), "source"] == "model").all()

    # Nothing of the patient module in the worker's output or in MLflow.
    client = mlflow.MlflowClient(tracking_uri=two_stage.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.role = 'pacs'")
    assert len(runs) == 3 and runs[0].data.metrics["skipped"] == 2 and runs[0].data.metrics["failed"] == 2
    assert sum(r.data.metrics["reported"] for r in runs) >= 2  # each study by one worker, or by both
    texts = [*(text for pair in outputs for text in pair), *(json.dumps(r.to_dictionary(), default=str) for r in runs)]
    texts += [Path(mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path="pacs/studies.csv",
                                                       tracking_uri=two_stage.tracking_uri)).read_text() for r in runs]
    for text in texts:
        for value in ("Doe^Jane", "Doe", "PID-778899", "778899", "19610203", *AS_FOUND.values()):  # (sex "F": a letter)
            assert value not in text


def test_an_orthanc_outage_mid_run_is_retried_and_nothing_is_lost(study_model, two_stage, tmp_path, monkeypatch):
    studies = _held_out(two_stage, 4)
    today = dt.date.today()
    with orthanc_server() as orthanc:
        for k, study in enumerate(studies):  # one acquired yesterday, stored after today's last complete pass
            _upload(orthanc, two_stage, study, tmp_path / "studies", date=today - dt.timedelta(days=k == 0))
        monkeypatch.setenv("SPINEMRI_PACS_STATE", str(tmp_path / "state"))
        remember_pass(orthanc.dicomweb, today)
        log = tmp_path / "worker.log"
        process = _worker(two_stage, orthanc, tmp_path, "--retry-for", "120", wait=False, log=log)
        deadline = time.monotonic() + 300
        while not _reports(orthanc):  # the first report is stored: the worker is mid-run
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        orthanc.stop()
        while "retrying" not in log.read_text():  # down until the worker has found it down, and waits
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        orthanc.start()
        out, _ = process.communicate(timeout=600)
        err = log.read_text()
        assert process.returncode == 0, err[-4000:]
        assert "4 MR studies, 4 reported, 0 already reported, 0 failed" in out, out + err[-3000:]
        reports = _reports(orthanc)
        assert len(reports) == 4 and all(len(v) == 1 for v in reports.values())


def test_a_worker_refuses_an_unregistered_model_and_names_an_unreachable_server(study_model, study_store, tmp_path,
                                                                                monkeypatch):
    result = CliRunner().invoke(main, ["pacs", "--url", "http://127.0.0.1:9/dicom-web", "--once", "--model",
                                       "runs:/abc/model"])
    assert result.exit_code == 1 and "models:/NAME@ALIAS or models:/NAME/VERSION" in result.output
    monkeypatch.setenv("SPINEMRI_PACS_STATE", str(tmp_path))
    result = CliRunner().invoke(main, ["pacs", "--url", "http://user:secret@127.0.0.1:9/dicom-web", "--once",
                                       "--retry-for", "2"])
    assert result.exit_code == 1, result.output
    assert "did not answer the study search (QIDO-RS) for 2 s" in result.output and "secret" not in result.output
    with _answering_server() as root:  # a server up but answering every request with an error
        for status, message in [(500, "answered the study search (QIDO-RS) with HTTP 500, 3 times running"),
                                (401, "refused the study search (QIDO-RS) (HTTP 401): set SPINEMRI_PACS_USER"),
                                (404, "answered the study search (QIDO-RS) with HTTP 404")]:
            result = CliRunner().invoke(main, ["pacs", "--url", f"{root}/{status}/dicom-web", "--once"])
            assert result.exit_code == 1 and message in result.output, result.output
    result = CliRunner().invoke(main, ["pacs", "--url", "localhost:8042/dicom-web", "--once"])
    assert result.exit_code == 1 and "'localhost:8042/dicom-web' is not an http(s) address" in result.output
    monkeypatch.setenv("SPINEMRI_SERIES_RULES", str(tmp_path / "site-rules.yaml"))  # checked before any study
    result = CliRunner().invoke(main, ["pacs", "--url", "http://127.0.0.1:9/dicom-web", "--once"])
    assert result.exit_code == 1 and "site-rules.yaml: no such file" in result.output, result.output


def test_the_window_overlaps_the_last_pass_by_a_day_and_waits_for_a_study_worth_another_try():
    today = dt.date(2026, 3, 2)
    assert window_start(None, today, 7) == dt.date(2026, 2, 24)  # the first pass: the last 7 days, today included
    assert window_start(None, today, 1) == today
    assert window_start(today, today, 7) == dt.date(2026, 3, 1)  # studies of the day before midnight
    assert window_start(today + dt.timedelta(days=3), today, 7) == dt.date(2026, 3, 1)  # a clock set back
    assert to_remember(today, PassResult(found=4)) == today
    held = PassResult(found=4, retry_from=dt.date(2026, 2, 20))  # a partial transfer of a study of Feb 20
    assert to_remember(today, held, days=30) == dt.date(2026, 2, 20)
    assert window_start(to_remember(today, held, days=30), today, 7) == dt.date(2026, 2, 19)
    assert to_remember(today, held, days=7) == dt.date(2026, 2, 24)  # held for --days days, not for ever


@pytest.mark.parametrize("metadata", [
    {"0008103E": {"vr": "DS", "Value": ["DOE^JOHN"]}},  # a description sent with a number's VR
    {"0008103E": {"vr": "LO", "Value": "DOE^JOHN"}},  # Value not a list
    {"00180080": {"Value": [10**400]}},  # no VR
    "DOE^JOHN",
])
def test_metadata_that_is_not_dicom_json_is_a_malformed_study_and_quotes_no_value(metadata):
    with pytest.raises(StudyError, match="malformed: a series' metadata is not DICOM JSON") as raised:
        metadata_header(metadata)
    assert "DOE" not in str(raised.value)


def test_a_study_search_answer_that_is_not_dicom_json_has_no_value():
    assert value_of({"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}, "study") == "1.2.3"
    for item in ({"0020000D": "1.2.3"}, {"0020000D": {"Value": [{"a": 1}]}}, {"0020000D": {"Value": []}}, [], None):
        assert value_of(item, "study") is None


def test_more_studies_than_a_page_are_all_found_on_an_orthanc_whose_paging_stops_after_one_page(tmp_path):
    from spinemri.pacs.server import PAGE, Settings, search_studies, client_for

    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    with orthanc_server() as orthanc:
        for k in range(PAGE + 3):  # one small MR file per study
            template.StudyInstanceUID, template.SeriesInstanceUID = generate_uid(), generate_uid()
            template.SOPInstanceUID = generate_uid()
            template.save_as(tmp_path / "one.dcm")
            orthanc.upload(tmp_path / "one.dcm")
        settings = Settings(url=orthanc.dicomweb, retry_for=10)
        found = search_studies(settings, client_for(settings), {"ModalitiesInStudy": "MR"})
    assert len(found) == PAGE + 3


def test_a_report_carries_each_referral_as_yes_or_no_and_a_model_without_thresholds_says_nothing():
    study = Dataset()
    study.update({"StudyInstanceUID": generate_uid(), "SOPInstanceUID": generate_uid(), "SOPClassUID":
                  "1.2.840.10008.5.1.4.1.1.4", "SeriesInstanceUID": generate_uid(), "Modality": "MR",
                  "PatientID": "P1", "PatientName": "Test^Patient"})
    ids = [row_id("1", c, lv) for c in CONDITIONS for lv in LEVELS]
    rows = pd.DataFrame({"row_id": ids, "normal_mild": 0.5, "moderate": 0.3, "severe": 0.2})
    refer = np.arange(25) % 3 == 0
    sites = pd.DataFrame({"row_id": ids, "source": "prior", "reason": "no series", "refer": refer})
    found = read_report(structured_report(rows, sites, {}, study, model_name="m", model_version="1"))
    by_id = {row_id("1", r.condition, r.level): r.refer for r in found.itertuples()}
    assert [by_id[i] for i in ids] == refer.tolist()
    silent = read_report(structured_report(rows, sites.drop(columns="refer"), {}, study, model_name="m",
                                           model_version="1"))
    assert silent["refer"].isna().all()
