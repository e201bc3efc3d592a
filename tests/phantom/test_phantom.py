"""The synthetic phantom: RSNA layout and schemas, determinism, label statistics, visible severity."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from spinemri.data import schema
from spinemri.data.dicom import read_dicom
from spinemri.phantom import (MARKER, PROFILES, PhantomConfig, image_size, profile, sample_labels, series_plan,
    synthesize)
from spinemri.errors import ConfigError
from spinemri.data.schema import RSNA_SEVERITY_FREQUENCIES as SEVERITY_PRIORS


def test_layout_and_csv_schemas_match_the_competition(phantom_dir):
    assert sorted(p.name for p in phantom_dir.iterdir()) == sorted(
        [schema.TRAIN_CSV, schema.SERIES_CSV, schema.COORDINATES_CSV, schema.IMAGES_DIR, MARKER])
    train = pd.read_csv(phantom_dir / schema.TRAIN_CSV)
    assert list(train.columns) == ["study_id", *schema.LABEL_COLUMNS]
    assert set(train[list(schema.LABEL_COLUMNS)].stack().dropna().unique()) <= set(schema.SEVERITIES)
    series = pd.read_csv(phantom_dir / schema.SERIES_CSV)
    assert list(series.columns) == list(schema.SERIES_COLUMNS)
    assert set(series["series_description"]) == set(schema.SERIES_DESCRIPTIONS)
    coords = pd.read_csv(phantom_dir / schema.COORDINATES_CSV)
    assert list(coords.columns) == list(schema.COORDINATE_COLUMNS)
    assert set(coords["condition"]) == set(schema.CONDITION_NAMES.values())
    assert set(coords["level"]) == set(schema.LEVELS)
    assert coords["x"].dtype == float and coords["y"].dtype == float
    for column in ("study_id", "series_id", "instance_number"):
        assert pd.api.types.is_integer_dtype(coords[column])
    for study_id, series_id in zip(series["study_id"], series["series_id"]):
        folder = phantom_dir / schema.IMAGES_DIR / str(study_id) / str(series_id)
        assert folder.is_dir() and any(folder.glob("*.dcm"))


def test_dicom_files_carry_the_required_tags_and_nothing_identifying(phantom_dir):
    path = next((phantom_dir / schema.IMAGES_DIR).rglob("*.dcm"))
    ds = pydicom.dcmread(path)
    assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.MRImageStorage
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SeriesDescription",
                    "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "SliceThickness", "Rows", "Columns", "RescaleSlope", "RescaleIntercept"):
        assert keyword in ds, keyword
    assert ds.BitsStored in (12, 16) and ds.BitsAllocated == 16
    assert str(ds.PatientName) == "Anonymous"
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "InstitutionName",
                    "ReferringPhysicianName", "StudyDate", "OtherPatientIDs"):
        assert keyword not in ds, keyword
    assert not ds.get("PatientID")
    assert path.stem == str(ds.InstanceNumber)


def test_coordinates_follow_the_real_conventions(phantom_dir):
    samples = pd.read_csv(phantom_dir / schema.COORDINATES_CSV).merge(
        pd.read_csv(phantom_dir / schema.SERIES_CSV), on=["study_id", "series_id"])
    for name, key in schema.CONDITION_KEYS.items():
        assert set(samples.loc[samples["condition"] == name, "series_description"]) == {schema.CONDITION_SERIES[key]}
    # Spinal canal points: all five levels of a study on one (mid-sagittal) instance.
    spinal = samples[samples["condition"] == "Spinal Canal Stenosis"]
    assert (spinal.groupby("study_id")["instance_number"].nunique() == 1).all()
    # Foraminal points: left and right on different parasagittal instances, both off the middle.
    foraminal = samples[samples["condition"].str.contains("Foraminal")]
    for study_id, group in foraminal.groupby("study_id"):
        left = set(group.loc[group["condition"].str.startswith("Left"), "instance_number"])
        right = set(group.loc[group["condition"].str.startswith("Right"), "instance_number"])
        assert left and right and not left & right
        mid = set(spinal.loc[spinal["study_id"] == study_id, "instance_number"])
        assert not (left | right) & mid
    # Every point lies inside its image.
    for row in samples.itertuples():
        ds = pydicom.dcmread(phantom_dir / schema.IMAGES_DIR / str(row.study_id) / str(row.series_id)
                             / f"{row.instance_number}.dcm", stop_before_pixels=True)
        assert 0 <= row.x < ds.Columns and 0 <= row.y < ds.Rows


def test_real_data_quirks_appear(phantom_dir):
    series = pd.read_csv(phantom_dir / schema.SERIES_CSV)
    per_study = series.groupby("study_id").size()
    assert (per_study == 3).sum() >= 1
    assert (per_study == 4).any(), "expected a study with a second axial series"
    assert (per_study == 2).any(), "expected a study missing a series"
    axial_pairs = series[series["series_description"] == schema.AXIAL_T2].groupby("study_id").size()
    assert (axial_pairs == 2).any()


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    config = PhantomConfig(studies=2, seed=11, image_sizes=(96,), median_sagittal_slices=9)
    synthesize(tmp_path / "a", config, workers=1)
    synthesize(tmp_path / "b", config, workers=2)  # the worker count must not matter
    synthesize(tmp_path / "c", PhantomConfig(studies=2, seed=12, image_sizes=(96,), median_sagittal_slices=9))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_refuses_to_overwrite_and_leaves_no_partial_folder(tmp_path):
    out = tmp_path / "p"
    config = PhantomConfig(studies=1, seed=0, image_sizes=(64,), median_sagittal_slices=9)
    synthesize(out, config)
    with pytest.raises(FileExistsError, match="--overwrite"):
        synthesize(out, config)
    synthesize(out, config, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_label_frequencies_follow_the_real_priors():
    rng = np.random.default_rng(0)
    draws = [sample_labels(rng) for _ in range(3000)]
    for condition, prior in SEVERITY_PRIORS.items():
        grades = np.array([d[(condition, level)] for d in draws for level in schema.LEVELS])
        observed = np.bincount(grades, minlength=3) / grades.size
        assert np.allclose(observed, prior, atol=0.02), (condition, observed, prior)


def test_neighbouring_levels_are_correlated():
    rng = np.random.default_rng(1)
    draws = [sample_labels(rng) for _ in range(3000)]
    grades = np.array([[d[("spinal_canal_stenosis", level)] for level in schema.LEVELS] for d in draws])
    neighbours = np.corrcoef(grades[:, 2], grades[:, 3])[0, 1]
    far = np.corrcoef(grades[:, 0], grades[:, 4])[0, 1]
    assert neighbours > 0.25 and neighbours > far


def _canal_width_mm(phantom: Path, row) -> float:
    """Width of the bright CSF band along the image row through a spinal canal label."""
    image = read_dicom(phantom / schema.IMAGES_DIR / str(row.study_id) / str(row.series_id)
                       / f"{row.instance_number}.dcm")
    r, c = int(round(row.y)), int(round(row.x))
    profile = image.pixels[r, :]
    background = np.median(image.pixels)
    bright = profile > background + 0.5 * (np.percentile(image.pixels, 99.5) - background)
    # Walk outward from the label point while the CSF stays bright.
    left = c
    while left > 0 and bright[left - 1]:
        left -= 1
    right = c
    while right < len(profile) - 1 and bright[right + 1]:
        right += 1
    return (right - left + int(bright[c])) * image.pixel_spacing[1]


@pytest.fixture(scope="module")
def graded_phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graded") / "p"
    synthesize(out, PhantomConfig(studies=12, seed=5, p_blank=0, p_missing_series=0), workers=2)
    return out


def _grades(out: Path, condition_name: str):
    coords = pd.read_csv(out / schema.COORDINATES_CSV)
    coords = coords[coords["condition"] == condition_name]
    labels = pd.read_csv(out / schema.TRAIN_CSV).set_index("study_id")
    key = schema.CONDITION_KEYS[condition_name]
    for row in coords.itertuples():
        yield row, schema.SEVERITY_INDEX[labels.loc[row.study_id, schema.label_column(key, row.level)]]


def test_spinal_canal_stenosis_narrows_the_canal_at_the_labelled_point(graded_phantom):
    out = graded_phantom
    widths = {0: [], 1: [], 2: []}
    for row, grade in _grades(out, "Spinal Canal Stenosis"):
        widths[grade].append(_canal_width_mm(out, row))
    assert widths[0] and widths[2], "the sample needs Normal/Mild and Severe levels"
    normal, severe = np.median(widths[0]), np.median(widths[2])
    assert normal > 10 and severe < 0.5 * normal, (normal, severe)
    if widths[1]:
        assert severe < np.median(widths[1]) < normal


def _bright_area_mm2(phantom: Path, row, radius_mm: float = 9.0) -> float:
    """Area of fat/CSF-bright pixels within radius_mm of a labelled point."""
    image = read_dicom(phantom / schema.IMAGES_DIR / str(row.study_id) / str(row.series_id)
                       / f"{row.instance_number}.dcm")
    spacing = image.pixel_spacing[0]
    rows, cols = np.indices(image.pixels.shape)
    near = (rows - row.y) ** 2 + (cols - row.x) ** 2 <= (radius_mm / spacing) ** 2
    background = np.median(image.pixels)
    threshold = background + 0.5 * (np.percentile(image.pixels, 99.5) - background)
    return float((image.pixels[near] > threshold).sum() * spacing**2)


@pytest.mark.parametrize("condition_name, radius_mm", [
    ("Left Neural Foraminal Narrowing", 9.0), ("Right Neural Foraminal Narrowing", 9.0),
    ("Left Subarticular Stenosis", 4.5), ("Right Subarticular Stenosis", 4.5),
])
def test_foraminal_and_subarticular_grades_shrink_the_bright_space_at_the_point(graded_phantom, condition_name,
                                                                                radius_mm):
    areas = {0: [], 1: [], 2: []}
    for row, grade in _grades(graded_phantom, condition_name):
        areas[grade].append(_bright_area_mm2(graded_phantom, row, radius_mm))
    normal = np.median(areas[0])
    worse = np.median(areas[1] + areas[2])
    assert areas[1] or areas[2], "the sample needs a Moderate or Severe level"
    assert worse < 0.75 * normal, (condition_name, normal, worse)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_synth_workers_die_with_a_killed_parent_and_its_partial_is_removed_later(tmp_path):
    from tests.data.test_cache import kill_when_workers_run, running

    command = [sys.executable, "-m", "spinemri", "data", "synth", "--out", str(tmp_path / "big"), "--studies", "12",
               "--workers", "2"]
    workers = kill_when_workers_run(command, 2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(running(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if running(pid)], "worker processes outlived their killed parent"
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name], "a staging folder should be left"
    synthesize(tmp_path / "small", PhantomConfig(studies=1, seed=0, image_sizes=(64,), median_sagittal_slices=9))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]


def test_overwrite_refuses_a_folder_that_is_not_a_phantom(tmp_path):
    config = PhantomConfig(studies=1, seed=0, image_sizes=(64,), median_sagittal_slices=9)
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "notes.txt").write_text("a year of work")
    with pytest.raises(FileExistsError, match="does not look like a spinemri phantom .* --overwrite --force"):
        synthesize(mine, config, overwrite=True)
    assert (mine / "notes.txt").read_text() == "a year of work"
    synthesize(mine, config, overwrite=True, force=True)
    assert not (mine / "notes.txt").exists() and (mine / MARKER).is_file()
    synthesize(mine, config, overwrite=True)  # a phantom now: --overwrite alone replaces it


# --- profiles ----------------------------------------------------------------------------------

def test_fast_is_the_default_profile_and_an_unknown_one_names_the_choices():
    assert PROFILES["fast"] == PhantomConfig()
    assert profile("fast", studies=3, seed=7) == PhantomConfig(studies=3, seed=7)
    with pytest.raises(ConfigError, match=r"'rsn' \(--profile\): choose one of fast, rsna"):
        profile("rsn")


def test_rsna_profile_slice_counts_follow_the_real_series():
    """Many draws of the sampler, no files: the real data's axial quartiles 24/29/44 and mean 34 in
    5-192, sagittal means 17 in 10-38 (T1) and 8-29 (T2/STIR)."""
    counts = PROFILES["rsna"].slice_counts
    rng = np.random.default_rng(0)
    axial = np.array([counts[schema.AXIAL_T2].draw(rng) for _ in range(20_000)])
    q1, median, q3 = np.percentile(axial, [25, 50, 75])
    assert 21.5 <= q1 <= 26.5 and 26 <= median <= 32 and 40 <= q3 <= 48, (q1, median, q3)
    assert 32 <= axial.mean() <= 36
    assert axial.min() >= 5 and axial.max() <= 192 and (axial > 100).any()  # a long tail, clipped
    for description, (low, high) in ((schema.SAGITTAL_T1, (10, 38)), (schema.SAGITTAL_T2, (8, 29))):
        sagittal = np.array([counts[description].draw(rng) for _ in range(5_000)])
        assert 16 <= sagittal.mean() <= 18 and sagittal.min() >= low and sagittal.max() <= high, description


def test_rsna_profile_series_shares_and_image_sizes_follow_the_real_data():
    """17 % of studies with two or more axial series (a few three or four), 0.15 % missing a series
    type, images from 256 to 1024 px, most 384-640."""
    config = PROFILES["rsna"]
    rng = np.random.default_rng(1)
    plans = [series_plan(rng, config) for _ in range(20_000)]
    axial = np.array([[d for d, *_ in plan].count(schema.AXIAL_T2) for plan in plans])
    assert 0.155 <= (axial >= 2).mean() <= 0.185
    assert 0.008 <= (axial >= 3).mean() <= 0.03 and axial.max() == 4
    missing = np.mean([len({d for d, *_ in plan}) < 3 for plan in plans])
    assert 0.0006 <= missing <= 0.003, missing
    # However many axial series there are, together they carry every subarticular label once.
    for plan in (series_plan(rng, profile("rsna", p_missing_series=0)) for _ in range(2_000)):
        carried = [(k, side) for d, levels, sides in plan if d == schema.AXIAL_T2 for k in levels for side in sides]
        assert sorted(carried) == sorted((k, side) for k in range(5) for side in ("left", "right"))
    sizes = np.array([image_size(rng, config) for _ in range(20_000)])
    assert sizes.min() == 256 and sizes.max() == 1024
    assert ((sizes >= 384) & (sizes <= 640)).mean() >= 0.7
    assert 0.03 <= (sizes == 1024).mean() <= 0.07


@pytest.fixture(scope="module")
def rsna_phantom(tmp_path_factory) -> Path:
    """10 rsna-profile studies with small images (the profile's 256-1024 px take minutes to write)."""
    out = tmp_path_factory.mktemp("rsna") / "p"
    synthesize(out, profile("rsna", studies=10, seed=2, image_sizes=(48,), image_size_weights=(), p_second_axial=0.3,
                            p_blank=0),
               workers=2)
    return out


def test_rsna_profile_phantom_puts_every_label_on_a_slice_of_its_long_series(rsna_phantom):
    from spinemri.data.readers import check_dataset

    series = pd.read_csv(rsna_phantom / schema.SERIES_CSV)
    files = {(s, se): sorted(int(p.stem) for p in (rsna_phantom / schema.IMAGES_DIR / str(s) / str(se)).glob("*.dcm"))
             for s, se in zip(series["study_id"], series["series_id"])}
    lengths = series.assign(slices=[len(files[(s, se)]) for s, se in zip(series["study_id"], series["series_id"])])
    axial = lengths.loc[lengths["series_description"] == schema.AXIAL_T2, "slices"]
    assert axial.between(5, 192).all() and axial.max() > 40  # longer than any fast-profile series (<= 25)
    assert (series.groupby("study_id").size() >= 4).any()
    coords = pd.read_csv(rsna_phantom / schema.COORDINATES_CSV)
    assert len(coords) == 10 * 25  # no blank label, no missing series here: every label has its point
    for row in coords.itertuples():
        assert row.instance_number in files[(row.study_id, row.series_id)]
        assert 0 <= row.x < 48 and 0 <= row.y < 48
    report = check_dataset(rsna_phantom)
    assert report.ok, report.problems
