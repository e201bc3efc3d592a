"""`spinemri pacs` against hostile servers (a small real HTTP server that answers as a broken or malicious one would)
and hostile studies on a real Orthanc: every case ends in a clear line, within its timeout, within bounded memory,
and nothing names a study, series or instance by its UID."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import time

import mlflow
import pandas as pd
import pydicom
from pydicom.uid import JPEG2000Lossless
import pytest

from spinemri.pacs.study import study_key
from tests.hostile import deflated_dicom
from tests.services import orthanc_server
from tests.study.dicomweb_server import SERIES, STUDY, hostile_dicomweb
from tests.study.test_pacs import _held_out, _upload

pytestmark = pytest.mark.xdist_group("study")

# A launcher that forks the command and reports its peak RSS (ru_maxrss of wait4): the test process's own
# size, inherited across fork, would otherwise hide the child's.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""
# What a worker's peak may grow by over its idle size on hostile input: the served models keep every bomb
# under +20 MB; the worker also holds one JSON answer (SPINEMRI_MAX_ANSWER_MB, 4 MB here) as bytes and text.
ANSWER_MB = 4
MARGIN_MB = 20 + 2 * ANSWER_MB


def _worker(two_stage, url: str, tmp_path: Path, *args: str, timeout: float = 300) -> tuple[int, str, str, int]:
    """``spinemri pacs --url URL --once ARGS`` in a process of its own: (exit status, stdout, stderr, peak RSS MB)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=two_stage.tracking_uri, SPINEMRI_CACHE_DIR=str(two_stage.cache_dir),
               SPINEMRI_PACS_STATE=str(tmp_path / "state"), SPINEMRI_MAX_ANSWER_MB=str(ANSWER_MB))
    report = tmp_path / f"rusage-{len(list(tmp_path.glob('rusage-*')))}"
    command = [sys.executable, "-c", LAUNCHER, str(report), sys.executable, "-m", "spinemri", "pacs", "--url", url,
               "--once", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    kib, status = (int(v) for v in report.read_text().split())
    return status, done.stdout, done.stderr, kib // 1024


def _no_uid(text: str, *uids: str) -> None:
    for uid in uids:
        assert uid not in text, f"a UID in the output: {uid}"
    assert "Traceback" not in text


@pytest.fixture(scope="module")
def idle(study_model, two_stage, tmp_path_factory) -> int:
    """The worker's peak RSS (MB) on a server with no study: its size with the study model loaded."""
    with hostile_dicomweb("empty") as (url, _):
        status, out, err, rss = _worker(two_stage, url, tmp_path_factory.mktemp("idle"), "--all-dates")
    assert status == 0 and "0 MR studies" in out, err[-3000:]
    return rss


def test_answers_that_are_not_a_list_of_dicom_json_end_the_pass_with_the_reason(study_model, two_stage, tmp_path):
    for mode, message in [("not_json", "answered the study search with something that is not JSON"),
                          ("dict", "answered the study search with a JSON dict, not a list of DICOM JSON objects")]:
        with hostile_dicomweb(mode) as (url, _):
            status, out, err, _ = _worker(two_stage, url, tmp_path, "--all-dates", "--retry-for", "5")
        assert status == 1 and message in err, err[-3000:]
        _no_uid(out + err)
    client = mlflow.MlflowClient(two_stage.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.role = 'pacs'", order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "FAILED" and "a JSON dict" in runs[0].data.tags["fail_reason"]


def test_junk_entries_of_the_study_search_are_counted_as_failed(study_model, two_stage, tmp_path):
    with hostile_dicomweb("junk") as (url, _):
        status, out, err, _ = _worker(two_stage, url, tmp_path, "--all-dates")
    assert status == 0, err[-3000:]
    assert "3 MR studies, 0 reported, 0 already reported, 3 failed" in out, out + err[-2000:]
    assert err.count("malformed: a study search result without a StudyInstanceUID") == 3


def test_a_server_that_hangs_is_given_up_within_the_timeout_and_retry_for(study_model, two_stage, tmp_path):
    with hostile_dicomweb("hang", hang_s=120) as (url, _):
        status, out, err, _ = _worker(two_stage, url, tmp_path, "--all-dates", "--timeout", "2", "--retry-for", "4",
                                      timeout=90)
    assert status == 1, err[-3000:]
    assert "did not answer the study search (QIDO-RS) for 4 s (ConnectionError)" in err or \
        "did not answer the study search (QIDO-RS) for 4 s (ReadTimeout)" in err, err[-3000:]
    assert "retrying in" in err  # a line while it waits


def test_endless_pages_stop_at_max_pages_with_a_line(study_model, two_stage, tmp_path):
    with hostile_dicomweb("endless") as (url, server):
        status, out, err, _ = _worker(two_stage, url, tmp_path, "--all-dates", "--max-pages", "3")
    assert status == 0, err[-3000:]
    assert "study search stopped after 3 pages (300 studies; --max-pages)" in err, err[-3000:]
    assert "300 MR studies, 0 reported, 0 already reported, 300 failed" in out  # no series: nothing to grade
    _no_uid(out + err, STUDY)


def test_oversized_answers_are_refused_within_the_memory_bound(study_model, two_stage, tmp_path, idle,
                                                              record_property):
    with hostile_dicomweb("big_search") as (url, _):  # 400 MB of study search
        status, out, err, search_rss = _worker(two_stage, url, tmp_path, "--all-dates")
    assert status == 1 and "the server's answer to the study search is over the limit of 4 MB" in err, err[-3000:]
    with hostile_dicomweb("big_metadata") as (url, _):  # a series of a million instances
        status, out, err, metadata_rss = _worker(two_stage, url, tmp_path, "--all-dates")
    assert status == 0, err[-3000:]
    assert "1 MR studies, 0 reported, 0 already reported, 1 failed" in out, out + err[-3000:]
    assert "the server answered the series metadata with more than the 5,000 entries it may send" in err
    _no_uid(out + err, STUDY, SERIES)
    for name, value in (("idle", idle), ("search_400mb", search_rss), ("metadata_1m_entries", metadata_rss)):
        record_property(f"peak_rss_mb_{name}", value)  # for docs/reliability.md (pytest --junitxml)
    assert search_rss - idle < MARGIN_MB, (idle, search_rss)
    assert metadata_rss - idle < MARGIN_MB, (idle, metadata_rss)


def _edit(folder: Path, change) -> None:
    """Rewrite every DICOM file under ``folder`` with ``change(ds)``."""
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path)


def _graded_rss(two_stage, studies, tmp_path) -> int:
    """The worker's peak RSS (MB) grading the same studies as they are: the baseline of the hostile ones."""
    with orthanc_server() as orthanc:
        for study in studies:
            _upload(orthanc, two_stage, study, tmp_path / "plain")
        status, out, err, rss = _worker(two_stage, orthanc.dicomweb, tmp_path, "--all-dates")
    assert status == 0 and f"{len(studies)} reported" in out, err[-3000:]
    return rss


def test_hostile_studies_on_orthanc_are_reported_from_the_prior_or_skipped_with_one_line(study_model, study_store,
                                                                                         tmp_path, record_property):
    """A deflate bomb slice (12000 x 12000, 288 MB inflated), a series of 1 x 1 pixel slices, a series whose
    PixelSpacing is 0\\0, a JPEG 2000 slice that does not decode, and a study whose series no model reads."""
    two_stage = study_store
    studies = _held_out(two_stage, 5)
    series = pd.read_csv(two_stage.data_dir / "train_series_descriptions.csv")
    kinds = {(str(r.study_id), str(r.series_id)): r.series_description for r in series.itertuples()}
    with orthanc_server() as orthanc, tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for k, study in enumerate(studies):
            folder = work / "source" / study
            for series_folder in sorted((two_stage.data_dir / "train_images" / study).iterdir()):
                kind = kinds[(study, series_folder.name)]
                target = folder / series_folder.name
                target.mkdir(parents=True)
                for path in sorted(series_folder.glob("*.dcm")):
                    ds = pydicom.dcmread(path)
                    ds.StudyDate = dt.date.today().strftime("%Y%m%d")
                    if k == 0 and kind == "Sagittal T1" and path == min(series_folder.glob("*.dcm")):
                        (target / path.name).write_bytes(deflated_dicom(12000, 12000, like=ds))  # the bomb
                        continue
                    if k == 1 and kind == "Sagittal T2/STIR":  # slices of 1 x 1 pixels
                        ds.Rows = ds.Columns = 1
                        ds.PixelData = b"\0\0"
                    if k == 2 and kind == "Sagittal T2/STIR":
                        ds.PixelSpacing = [0, 0]
                    if k == 3 and kind == "Axial T2" and path == min(series_folder.glob("*.dcm")):
                        ds.compress(JPEG2000Lossless)
                        ds.PixelData = ds.PixelData[:64] + bytes(len(ds.PixelData) - 64)  # does not decode
                    if k == 4:  # nothing to read a series type from
                        for keyword in ("SeriesDescription", "ProtocolName", "ImageOrientationPatient",
                                        "RepetitionTime", "EchoTime", "ScanningSequence", "ImageType"):
                            if keyword in ds:
                                delattr(ds, keyword)
                    ds.save_as(target / path.name)
            for path in sorted(folder.rglob("*.dcm")):
                orthanc.upload(path)
        uids = {str(pydicom.dcmread(p, stop_before_pixels=True).get(tag))
                for p in (work / "source").rglob("*.dcm") if p.stat().st_size < (1 << 20)
                for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
        keys = [study_key(str(pydicom.dcmread(next((work / "source" / s).rglob("*.dcm")),
                                              stop_before_pixels=True).StudyInstanceUID)) for s in studies]
        status, out, err, rss = _worker(two_stage, orthanc.dicomweb, tmp_path, "--all-dates")
        reports = orthanc.reports()
    assert status == 0, err[-4000:]
    assert "5 MR studies, 4 reported, 0 already reported, 1 of no series type the models read, 0 failed" in out, \
        out + err[-4000:]
    assert len(reports) == 4
    client = mlflow.MlflowClient(two_stage.tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string="tags.role = 'pacs'", order_by=["attributes.start_time DESC"],
                               max_results=1)
    rows = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="pacs/studies.csv",
                                                           tracking_uri=two_stage.tracking_uri)).set_index("study")
    bomb, tiny, flat, j2k, untyped = (rows.loc[k] for k in keys)
    assert bomb["status"] == "reported" and bomb["from_prior"] >= 10  # the Sagittal T1 rows
    assert "inflates to more than" in bomb["reason"] and "a file" in bomb["reason"]
    assert tiny["status"] == "reported" and "smaller than 16 pixels a side" in tiny["reason"]
    assert flat["status"] == "reported" and "PixelSpacing 0\\0, not two positive sizes in mm" in flat["reason"]
    assert j2k["status"] == "reported" and j2k["from_prior"] >= 10 and "unreadable" in j2k["reason"]
    assert untyped["status"] == "unread" and "MR series is of a type the models read" in untyped["reason"]
    _no_uid(out + err, *uids)
    assert "spinemri-pacs-" not in out + err  # no temporary path either
    for noise in ("pylibjpeg", "pillow", "BytesIO", "tensorflow:", "retracing"):  # no library's own lines or text
        assert noise not in out + err, noise
    plain = _graded_rss(two_stage, studies, tmp_path)
    record_property("peak_rss_mb_plain_studies", plain)
    record_property("peak_rss_mb_hostile_studies", rss)
    assert rss - plain < MARGIN_MB, (plain, rss)


def test_the_served_study_model_refuses_a_ct_study_and_grades_a_degenerate_series_from_the_prior(study_model,
                                                                                                study_store, tmp_path):
    from spinemri.serving.inputs import InputError
    from tests.study.test_two_stage import zip_study

    two_stage = study_store
    [study] = _held_out(two_stage, 1)
    source = two_stage.data_dir / "train_images" / study
    model = mlflow.pyfunc.load_model("models:/spinemri-study@champion")
    series = pd.read_csv(two_stage.data_dir / "train_series_descriptions.csv")
    sagittal_t2 = str(series[(series["study_id"] == int(study)) &
                             (series["series_description"] == "Sagittal T2/STIR")]["series_id"].iloc[0])

    for kind in ("ct", "tiny", "flat"):  # a CT study; a Sagittal T2 of 1 x 1 pixel slices; one of PixelSpacing 0\0
        target = tmp_path / kind / study
        for path in sorted(source.rglob("*.dcm")):
            ds = pydicom.dcmread(path)
            if kind == "ct":
                ds.Modality = "CT"
            elif path.parent.name == sagittal_t2 and kind == "tiny":
                ds.Rows = ds.Columns = 1
                ds.PixelData = b"\0\0"
            elif path.parent.name == sagittal_t2 and kind == "flat":
                ds.PixelSpacing = [0, 0]
            (target / path.parent.name).mkdir(parents=True, exist_ok=True)
            ds.save_as(target / path.parent.name / path.name)
    with pytest.raises(InputError, match=r"the study holds no MR series \(\d series of Modality CT\)"):
        model.predict(pd.DataFrame({"study_zip_b64": [zip_study(tmp_path / "ct" / study)]}))
    for kind in ("tiny", "flat"):  # its spinal rows (read on the Sagittal T2) from the prior, the others graded
        rows = model.predict(pd.DataFrame({"study_zip_b64": [zip_study(tmp_path / kind / study)]}))
        spinal = rows["row_id"].str.contains("spinal_canal")
        assert len(rows) == 25 and (rows.loc[spinal, "source"] == "prior").all(), kind
        assert (rows.loc[~spinal, "source"] == "model").any(), kind


# --- the client and the retries on their own (no study model needed) ------------------------------------------

def _search(url: str, **settings):
    from spinemri.pacs.server import Settings, client_for, search_studies

    options = Settings(url, **{"timeout": 2.0, "retry_for": 3.0, **settings})
    return search_studies(options, client_for(options), {"ModalitiesInStudy": "MR"})


@pytest.mark.parametrize("mode, message", [
    ("deep", "JSON nested too deeply to parse"),
    ("two_arrays", "more after the list"),
])
def test_json_nested_too_deeply_or_followed_by_more_is_malformed(mode, message):
    from spinemri.pacs.server import PacsUnavailable

    with hostile_dicomweb(mode) as (url, _), pytest.raises(PacsUnavailable, match=message):
        _search(url)


def test_a_server_dripping_an_announced_answer_is_cut_off_at_its_deadline():
    from spinemri.pacs.server import PacsUnavailable

    started = time.monotonic()
    with hostile_dicomweb("drip") as (url, _), pytest.raises(PacsUnavailable, match="did not answer the study search"):
        _search(url)
    assert time.monotonic() - started < 30  # two tries of a 2 s deadline (+1 s a MB), not the 50 s of the drip


@pytest.mark.parametrize("mode, message", [
    ("bad_gzip", "Content-Encoding does not decode"),
    ("redirect_loop", "a redirect the worker does not follow"),
    ("redirect_file", "a redirect the worker does not follow"),
])
def test_a_bad_encoding_or_a_redirect_is_one_clear_error_without_its_target(mode, message):
    from spinemri.pacs.server import PacsUnavailable, ServerAnswer

    with hostile_dicomweb(mode) as (url, _), pytest.raises((PacsUnavailable, ServerAnswer), match=message) as caught:
        _search(url)
    assert "passwd" not in str(caught.value) and "file:" not in str(caught.value)


def test_a_series_of_more_parts_than_a_study_may_hold_is_refused_without_writing_them(tmp_path, monkeypatch):
    import requests

    from spinemri.pacs.dicomweb import AnswerTooLarge, DicomWeb

    monkeypatch.setenv("SPINEMRI_MAX_STUDY_FILES", "100")
    with hostile_dicomweb("many_parts") as (url, _), pytest.raises(AnswerTooLarge, match="more parts than"):
        DicomWeb(url, requests.Session(), timeout=5).save_series(STUDY, "1.2.3", tmp_path)
    assert len(list(tmp_path.iterdir())) <= 100


def test_reasons_name_no_temporary_path():
    from spinemri.pacs.study import _no_paths

    assert _no_paths("/tmp/spinemri-pacs-uwzwdp6d/1624143560 mixes image sizes [(512, 512)] in one series") == \
        "a series mixes image sizes [(512, 512)] in one series"
    assert _no_paths("Sagittal T1: /tmp/spinemri-pacs-ab12/1.2.3/00001.dcm inflates to more than 144 MB") == \
        "Sagittal T1: a file inflates to more than 144 MB"
