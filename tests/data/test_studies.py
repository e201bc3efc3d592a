"""Studies read from dataset folders and from uploaded zips: series types, layouts, limits, damaged archives."""

from __future__ import annotations

import tracemalloc

import pandas as pd
import pydicom
import pytest

from spinemri.data.schema import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2
from spinemri.data.studies import find_studies, study_from_zip
from spinemri.errors import StudyError
from tests import hostile


def test_find_studies_reads_descriptions_and_names_missing_studies(phantom_dir):
    studies = find_studies(phantom_dir)
    assert len(studies) == 8
    described = {s.description for study in studies for s in study.series}
    assert described == {SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2}
    with pytest.raises(StudyError, match="no study folder 42"):
        find_studies(phantom_dir, ["42"])


def test_find_studies_falls_back_to_the_series_description_tag(phantom_dir, phantom_copy):
    (phantom_copy / "train_series_descriptions.csv").unlink()
    table = pd.read_csv(phantom_dir / "train_series_descriptions.csv").set_index("series_id")["series_description"]
    for study in find_studies(phantom_copy):
        for series in study.series:
            assert series.description == table[series.series_id]


def test_a_zipped_study_is_grouped_by_series_whatever_its_layout(phantom_dir, tmp_path):
    study = find_studies(phantom_dir)[0]
    files = {}
    for k, series in enumerate(study.series):
        for j, path in enumerate(series.files):
            files[f"export/{'nested/' * (k % 2)}s{k}_{j}.dcm"] = path.read_bytes()
    files["export/README.txt"] = b"not dicom"
    work = tmp_path / "w"
    work.mkdir()
    unzipped = study_from_zip(hostile.zip_of(files), None, work)
    assert unzipped.study_id == "export"
    assert sorted(len(s.files) for s in unzipped.series) == sorted(len(s.files) for s in study.series)
    assert sorted(s.description for s in unzipped.series) == sorted(s.description for s in study.series)
    (tmp_path / "w2").mkdir()
    named = study_from_zip(hostile.zip_of({f"{study.study_id}/{s.series_id}/{p.name}": p.read_bytes()
                                 for s in study.series for p in s.files}), "77", tmp_path / "w2")
    assert named.study_id == "77"
    assert sorted(s.series_id for s in named.series) == sorted(s.series_id for s in study.series)


def test_bad_archives_are_refused_by_name(tmp_path):
    with pytest.raises(StudyError, match="is not a zip archive"):
        study_from_zip(b"plain bytes", None, tmp_path)
    with pytest.raises(StudyError, match="holds no files"):
        study_from_zip(hostile.zip_of({}), None, tmp_path)
    with pytest.raises(StudyError, match="none of the 1 files in the archive is a DICOM file"):
        study_from_zip(hostile.zip_of({"a.txt": b"hello"}), None, tmp_path)


@pytest.mark.parametrize("damage, message", [
    ("encrypted", "study/1/1.dcm is encrypted; send the study's files unencrypted"),
    ("bad_crc", "study/1/1.dcm is damaged (Bad CRC-32"),
    ("unknown_method", "study/1/1.dcm uses a compression method this server cannot unpack"),
])
def test_damaged_archive_members_get_their_own_message(tmp_path, damage, message):
    with pytest.raises(StudyError) as info:
        study_from_zip(hostile.zip_with(damage), None, tmp_path, name="row 0: study_zip_b64")
    assert str(info.value).startswith("row 0: study_zip_b64: ") and message in str(info.value), str(info.value)


def test_zip_bombs_are_refused_before_they_are_unpacked(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    one_gib = hostile.zip_of_zeros([1 << 30])  # 1 GiB of zeros in under 5 MB
    assert len(one_gib) < 5 << 20
    tracemalloc.start()
    with pytest.raises(StudyError, match=r"unpacks to 1\.0 GB, over the limit of 128 MB per file in a study "
                                         r"archive \(SPINEMRI_MAX_STUDY_FILE_MB"):
        study_from_zip(one_gib, None, work)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 << 20 and not any(work.iterdir()), "nothing may be unpacked or held in memory"
    monkeypatch.setenv("SPINEMRI_MAX_STUDY_MB", "8")
    with pytest.raises(StudyError, match=r"the archive unpacks to 12 MB, over the limit of 8 MB .*SPINEMRI_MAX_STUDY_MB"):
        study_from_zip(hostile.zip_of_zeros([4 << 20] * 3), None, work)
    with pytest.raises(StudyError, match=r"holds 5,001 files, over the limit of 5,000 files per study archive"):
        study_from_zip(hostile.zip_of({f"s/{k}.dcm": b"" for k in range(5001)}), None, work)


def test_a_dicom_bomb_inside_a_study_zip_is_refused(tmp_path, monkeypatch):
    archive = hostile.zip_of({"study/1/1.dcm": hostile.deflated_dicom(12000, 12000)})
    with pytest.raises(StudyError, match="study/1/1.dcm is a deflated DICOM .*SPINEMRI_MAX_IMAGE_MB"):
        study_from_zip(archive, None, tmp_path)


def test_the_archive_limits_are_environment_variables(phantom_dir, tmp_path, monkeypatch):
    study = find_studies(phantom_dir)[0]
    files = {f"{study.study_id}/{s.series_id}/{p.name}": p.read_bytes() for s in study.series for p in s.files}
    archive = hostile.zip_of(files)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert len(study_from_zip(archive, None, tmp_path / "a").series) == len(study.series)
    size = sum(len(v) for v in files.values())
    monkeypatch.setenv("SPINEMRI_MAX_STUDY_MB", str(size / 2 / (1 << 20)))
    with pytest.raises(StudyError, match="SPINEMRI_MAX_STUDY_MB"):
        study_from_zip(archive, None, tmp_path / "b")


def test_predict_study_refuses_a_folder_without_studies(tmp_path):
    with pytest.raises(StudyError, match="holds no study folders"):
        find_studies(tmp_path)
    with pytest.raises(StudyError, match="is not a folder"):
        find_studies(tmp_path / "missing")
