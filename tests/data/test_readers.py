"""Tests of spinemri.data.readers: the layouts (RSNA folder, flat CSV, folder of studies), detect_layout, load_samples and check_dataset."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner

from spinemri.cli import main as cli
from spinemri.data import readers, schema

PATIENT_TAGS = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-12345",
    "PatientBirthDate": "19700101",
    "InstitutionName": "General Hospital",
}
PATIENT_STRINGS = ("Doe^Jane", "Doe", "PID-12345", "19700101", "General Hospital")


# --- helpers -------------------------------------------------------------------------------------

def read_rows(path: Path) -> list[list[str]]:
    """A CSV as raw rows; rows[0] is the header, rows[i] is CSV line i + 1."""
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def write_rows(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def set_cell(path: Path, line: int, column: str, value: str) -> None:
    """Set one cell of a CSV, addressed by line number (header = line 1) and column name."""
    rows = read_rows(path)
    rows[line - 1][rows[0].index(column)] = value
    write_rows(path, rows)


def coordinates(root: Path) -> pd.DataFrame:
    """train_label_coordinates.csv with a `line` column (its CSV line number)."""
    frame = pd.read_csv(root / schema.COORDINATES_CSV)
    return frame.assign(line=frame.index + 2)


def labelled_path(root: Path, row: pd.Series) -> Path:
    return (root / schema.IMAGES_DIR / str(row["study_id"]) / str(row["series_id"])
            / f"{int(row['instance_number'])}.dcm")


def load_error(root: Path) -> str:
    with pytest.raises(readers.DatasetError) as caught:
        readers.load_samples(root)
    return str(caught.value)


# --- the phantom, as generated -------------------------------------------------------------------

def test_phantom_samples_have_the_schema_columns_in_order(phantom_dir):
    samples = readers.load_samples(phantom_dir)
    assert tuple(samples.columns) == schema.SAMPLE_COLUMNS


def test_phantom_has_one_sample_per_coordinate_row(phantom_dir):
    samples = readers.load_samples(phantom_dir)
    coords = pd.read_csv(phantom_dir / schema.COORDINATES_CSV)
    assert len(coords) > 0
    assert len(samples) == len(coords)
    key = ["study_id", "series_id", "instance_number", "level"]
    got = samples.assign(condition=samples["condition"].map(schema.CONDITION_NAMES))[key + ["condition"]]
    assert sorted(map(tuple, got.to_numpy().tolist())) == sorted(map(tuple, coords[key + ["condition"]].to_numpy().tolist()))


def test_phantom_severity_is_nullable_int_in_0_1_2(phantom_dir):
    samples = readers.load_samples(phantom_dir)
    assert samples["severity"].dtype == pd.Int64Dtype()
    assert set(samples["severity"].dropna().unique()) <= {0, 1, 2}
    assert samples["severity"].notna().any()


def test_phantom_paths_exist_and_conditions_levels_are_known(phantom_dir):
    samples = readers.load_samples(phantom_dir)
    assert all(Path(p).is_file() for p in samples["path"])
    assert set(samples["condition"]) <= set(schema.CONDITIONS)
    assert set(samples["level"]) <= set(schema.LEVELS)
    assert set(samples["series_description"]) <= set(schema.SERIES_DESCRIPTIONS)


def test_phantom_severity_agrees_with_train_csv(phantom_dir):
    samples = readers.load_samples(phantom_dir)
    train = pd.read_csv(phantom_dir / schema.TRAIN_CSV).set_index("study_id")
    for row in samples.itertuples():
        cell = train.loc[row.study_id, schema.label_column(row.condition, row.level)]
        expected = pd.NA if pd.isna(cell) else schema.SEVERITY_INDEX[cell]
        if expected is pd.NA:
            assert pd.isna(row.severity), row
        else:
            assert row.severity == expected, row


def test_phantom_check_is_ok_and_counts_match(phantom_dir):
    report = readers.check_dataset(phantom_dir)
    assert report.ok, report.problems
    assert report.layout == "rsna"
    train = pd.read_csv(phantom_dir / schema.TRAIN_CSV)
    series = pd.read_csv(phantom_dir / schema.SERIES_CSV)
    assert report.summary["studies"] == len(train)
    assert report.summary["series"] == len(series)
    assert report.summary["files_unreadable"] == 0
    assert sum(report.summary["labelled_points"].values()) == len(pd.read_csv(phantom_dir / schema.COORDINATES_CSV))
    assert json.loads(report.to_json())["ok"] is True


# --- the real data's quirks ----------------------------------------------------------------------

def test_blank_label_loads_with_missing_severity(phantom_copy):
    before = readers.check_dataset(phantom_copy).summary
    coords = coordinates(phantom_copy)
    samples = readers.load_samples(phantom_copy)
    train = pd.read_csv(phantom_copy / schema.TRAIN_CSV)
    # A graded cell that has a coordinate row: blank it in train.csv.
    for target in coords.itertuples():
        key = schema.CONDITION_KEYS[target.condition]
        column = schema.label_column(key, target.level)
        index = train.index[train["study_id"] == target.study_id][0]
        if pd.notna(train.loc[index, column]):
            break
    set_cell(phantom_copy / schema.TRAIN_CSV, index + 2, column, "")

    after = readers.load_samples(phantom_copy)
    assert len(after) == len(samples)
    hit = (after["study_id"] == target.study_id) & (after["condition"] == key) & (after["level"] == target.level)
    assert hit.sum() >= 1
    assert after.loc[hit, "severity"].isna().all()
    assert samples.loc[hit, "severity"].notna().all()  # it was graded before
    assert after.loc[~hit, "severity"].equals(samples.loc[~hit, "severity"])

    report = readers.check_dataset(phantom_copy)
    assert report.ok, report.problems
    assert report.summary["blank_labels"] == before["blank_labels"] + 1
    assert report.summary["graded_points"] == before["graded_points"] - int(hit.sum())


def test_study_with_two_axial_series_has_subarticular_samples_from_both(phantom_dir):
    series = pd.read_csv(phantom_dir / schema.SERIES_CSV)
    axial = series[series["series_description"] == schema.AXIAL_T2]
    two_axial = axial.groupby("study_id")["series_id"].apply(set)
    two_axial = two_axial[two_axial.map(len) == 2]
    assert len(two_axial) >= 1, "the fixture should contain a study with two Axial T2 series"

    samples = readers.load_samples(phantom_dir)
    subarticular = samples[samples["condition"].str.contains("subarticular")]
    for study_id, series_ids in two_axial.items():
        used = set(subarticular.loc[subarticular["study_id"] == study_id, "series_id"])
        assert used == series_ids, study_id
        assert set(samples.loc[samples["series_id"].isin(series_ids), "series_description"]) == {schema.AXIAL_T2}


def test_study_missing_a_series_still_loads(phantom_dir):
    series = pd.read_csv(phantom_dir / schema.SERIES_CSV)
    descriptions = series.groupby("study_id")["series_description"].apply(set)
    incomplete = descriptions[descriptions.map(lambda d: d != set(schema.SERIES_DESCRIPTIONS))]
    assert len(incomplete) >= 1, "the fixture should contain a study missing one of its series"

    samples = readers.load_samples(phantom_dir)
    for study_id, present in incomplete.items():
        rows = samples[samples["study_id"] == study_id]
        assert len(rows) > 0
        assert set(rows["series_description"]) <= present
    report = readers.check_dataset(phantom_dir)
    assert report.ok, report.problems
    assert report.summary["graded_labels_without_coordinates"] > 0


def test_non_contiguous_instance_numbers_load(phantom_copy):
    before = readers.check_dataset(phantom_copy).summary["series_with_non_contiguous_instances"]
    coords = pd.read_csv(phantom_copy / schema.COORDINATES_CSV)
    # A labelled series numbered 1..n, renumbered to 3*i + 100.
    for (study_id, series_id), _ in coords.groupby(["study_id", "series_id"]):
        folder = phantom_copy / schema.IMAGES_DIR / str(study_id) / str(series_id)
        numbers = sorted(int(p.stem) for p in folder.glob("*.dcm"))
        if numbers == list(range(1, len(numbers) + 1)):
            break
    else:
        pytest.fail("the fixture should contain a labelled series numbered 1..n")
    renumber = {n: 3 * n + 100 for n in numbers}
    staged = folder.with_name(folder.name + ".renumbered")
    staged.mkdir()
    for old, new in renumber.items():
        ds = pydicom.dcmread(folder / f"{old}.dcm")
        ds.InstanceNumber = new
        ds.save_as(staged / f"{new}.dcm")
    shutil.rmtree(folder)
    staged.rename(folder)
    mask = (coords["study_id"] == study_id) & (coords["series_id"] == series_id)
    coords.loc[mask, "instance_number"] = coords.loc[mask, "instance_number"].map(renumber)
    coords.to_csv(phantom_copy / schema.COORDINATES_CSV, index=False, float_format="%.6f")

    samples = readers.load_samples(phantom_copy)
    assert all(Path(p).is_file() for p in samples["path"])
    moved = samples[samples["series_id"] == series_id]
    assert len(moved) == mask.sum()
    assert set(moved["instance_number"]) <= set(renumber.values())
    report = readers.check_dataset(phantom_copy)
    assert report.ok, report.problems
    assert report.summary["files_unreadable"] == 0
    assert report.summary["series_with_non_contiguous_instances"] == before + 1


# --- structural errors ---------------------------------------------------------------------------

def _missing_train_csv(root):
    (root / schema.TRAIN_CSV).unlink()
    return schema.TRAIN_CSV, None


def _missing_coordinate_column(root):
    rows = [row[:4] + row[5:] for row in read_rows(root / schema.COORDINATES_CSV)]  # drop "level"
    write_rows(root / schema.COORDINATES_CSV, rows)
    return schema.COORDINATES_CSV, None


def _unknown_condition(root):
    set_cell(root / schema.COORDINATES_CSV, 7, "condition", "Spinal Stenosis")
    return schema.COORDINATES_CSV, 7


def _unknown_level(root):
    set_cell(root / schema.COORDINATES_CSV, 12, "level", "L6/L7")
    return schema.COORDINATES_CSV, 12


def _unknown_severity(root):
    set_cell(root / schema.TRAIN_CSV, 5, "spinal_canal_stenosis_l4_l5", "Very Bad")
    return schema.TRAIN_CSV, 5


def _series_not_described(root):
    set_cell(root / schema.COORDINATES_CSV, 10, "series_id", "123456789")
    return schema.COORDINATES_CSV, 10


def _non_integer_study_id(root):
    set_cell(root / schema.TRAIN_CSV, 4, "study_id", "abc")
    return schema.TRAIN_CSV, 4


def _non_integer_instance_number(root):
    set_cell(root / schema.COORDINATES_CSV, 9, "instance_number", "2.5")
    return schema.COORDINATES_CSV, 9


def _empty_series_csv(root):
    (root / schema.SERIES_CSV).write_text("")
    return schema.SERIES_CSV, None


def _garbage_coordinates_csv(root):
    (root / schema.COORDINATES_CSV).write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00garbage")
    return schema.COORDINATES_CSV, None


@pytest.mark.parametrize("damage", [
    _missing_train_csv, _missing_coordinate_column, _unknown_condition, _unknown_level, _unknown_severity,
    _series_not_described, _non_integer_study_id, _non_integer_instance_number, _empty_series_csv,
    _garbage_coordinates_csv,
], ids=lambda f: f.__name__.strip("_"))
def test_structural_error_names_file_and_row(phantom_copy, damage):
    name, line = damage(phantom_copy)
    report = readers.check_dataset(phantom_copy)
    assert not report.ok
    message = load_error(phantom_copy)
    assert str(phantom_copy / name) in message
    assert "\n".join(report.problems) == message
    if line is not None:
        assert f"{name} row {line}:" in message
        for other in (line - 1, line + 1):
            assert f"row {other}:" not in message


def test_missing_column_message_names_the_column(phantom_copy):
    _missing_coordinate_column(phantom_copy)
    assert "missing column(s) level" in load_error(phantom_copy)


def test_unknown_values_are_quoted_in_the_message(phantom_copy):
    _unknown_condition(phantom_copy)
    _unknown_level(phantom_copy)
    _unknown_severity(phantom_copy)
    message = load_error(phantom_copy)
    assert "'Spinal Stenosis'" in message
    assert "'L6/L7'" in message
    assert "spinal_canal_stenosis_l4_l5 = 'Very Bad'" in message


def test_deleted_labelled_instance_names_file_and_rows(phantom_copy):
    coords = coordinates(phantom_copy)
    target = coords.iloc[len(coords) // 2]
    path = labelled_path(phantom_copy, target)
    path.unlink()
    same_file = coords[(coords["study_id"] == target["study_id"]) & (coords["series_id"] == target["series_id"])
                       & (coords["instance_number"] == target["instance_number"])]

    assert not readers.check_dataset(phantom_copy).ok
    message = load_error(phantom_copy)
    for line in same_file["line"]:
        assert f"{schema.COORDINATES_CSV} row {line}: labelled instance {path} does not exist" in message
    assert message.count("does not exist") == len(same_file)


def test_deleted_series_folder_is_named(phantom_copy):
    coords = coordinates(phantom_copy)
    target = coords.iloc[-1]
    folder = phantom_copy / schema.IMAGES_DIR / str(target["study_id"]) / str(target["series_id"])
    shutil.rmtree(folder)

    assert not readers.check_dataset(phantom_copy).ok
    message = load_error(phantom_copy)
    assert f"absent series folder {folder}" in message
    assert "labelled instance" not in message  # one line for the folder, not one per instance


def test_series_description_typo_is_reported(phantom_copy):
    set_cell(phantom_copy / schema.SERIES_CSV, 3, "series_description", "Sagittal T2")
    message = load_error(phantom_copy)
    assert f"{schema.SERIES_CSV} row 3: unknown series_description 'Sagittal T2'" in message


def test_many_problems_of_one_kind_are_capped(phantom_copy):
    rows = read_rows(phantom_copy / schema.COORDINATES_CSV)
    column = rows[0].index("level")
    for row in rows[1:]:
        row[column] = "L9/L9"
    write_rows(phantom_copy / schema.COORDINATES_CSV, rows)
    problems = readers.check_dataset(phantom_copy).problems
    assert len(problems) == readers.MAX_LISTED + 1
    assert problems[-1] == f"... and {len(rows) - 1 - readers.MAX_LISTED} more of the same kind"


def test_a_point_outside_its_image_is_a_problem_naming_the_row(phantom_copy):
    coords_csv = phantom_copy / schema.COORDINATES_CSV
    set_cell(coords_csv, 6, "x", "99999")
    set_cell(coords_csv, 6, "y", "-500")
    for decode in (False, True):
        report = readers.check_dataset(phantom_copy, decode=decode)
        assert not report.ok
        assert report.problems[0].startswith(f"{coords_csv} row 6: the point (x=99999, y=-500) lies outside the ")
        assert "fix the coordinate" in report.problems[0] and len(report.problems) == 1


def test_a_repeated_coordinate_row_is_a_problem_naming_both_rows(phantom_copy):
    coords_csv = phantom_copy / schema.COORDINATES_CSV
    rows = read_rows(coords_csv)
    write_rows(coords_csv, rows + [rows[4]])  # line 5 again, as line len(rows) + 1
    expected = f"{coords_csv} row {len(rows) + 1} repeats row 5"
    report = readers.check_dataset(phantom_copy)
    assert not report.ok and report.problems[0].startswith(expected), report.problems
    assert "drop the repeated row" in report.problems[0]
    assert expected in load_error(phantom_copy)  # prepare refuses it the same way


def test_a_level_labelled_on_two_images_is_a_warning(phantom_copy):
    coords_csv = phantom_copy / schema.COORDINATES_CSV
    rows = read_rows(coords_csv)
    header = rows[0]
    twin = list(rows[4])
    other = next(r for r in rows[1:] if r[header.index("series_id")] == twin[header.index("series_id")]
                 and r[header.index("instance_number")] != twin[header.index("instance_number")])
    twin[header.index("instance_number")] = other[header.index("instance_number")]
    write_rows(coords_csv, rows + [twin])
    report = readers.check_dataset(phantom_copy)
    assert report.ok, report.problems
    assert any(w.startswith(f"{coords_csv} rows 5, {len(rows) + 1}: study ") and "labelled on 2 images" in w
               for w in report.warnings), report.warnings


# --- unreadable files ----------------------------------------------------------------------------

def test_unreadable_dicom_is_a_warning_not_a_problem(phantom_copy):
    coords = coordinates(phantom_copy)
    path = labelled_path(phantom_copy, coords.iloc[3])
    path.write_bytes(b"not a dicom")

    report = readers.check_dataset(phantom_copy)
    assert report.ok, report.problems
    assert report.summary["files_unreadable"] == 1
    assert len(report.warnings) == 1
    assert str(path) in report.warnings[0]
    assert len(readers.load_samples(phantom_copy)) == len(coords)


def test_dicom_truncated_in_pixel_data_is_found_only_when_decoding(phantom_copy):
    coords = coordinates(phantom_copy)
    path = labelled_path(phantom_copy, coords.iloc[0])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])

    assert readers.check_dataset(phantom_copy).summary["files_unreadable"] == 0
    decoded = readers.check_dataset(phantom_copy, decode=True)
    assert decoded.ok
    assert decoded.summary["files_unreadable"] == 1
    assert str(path) in decoded.warnings[0]


def test_dicom_truncated_in_its_header_is_reported_not_raised(phantom_copy):
    coords = coordinates(phantom_copy)
    path = labelled_path(phantom_copy, coords.iloc[0])
    path.write_bytes(path.read_bytes()[:141])  # inside the first file-meta element's value

    report = readers.check_dataset(phantom_copy)
    assert report.ok
    assert report.summary["files_unreadable"] == 1


def test_check_never_prints_patient_tags(phantom_copy):
    coords = coordinates(phantom_copy)
    paths = list(dict.fromkeys(labelled_path(phantom_copy, row) for _, row in coords.iterrows()))
    tagged, truncated, garbage = paths[0], paths[1], paths[2]
    for path in (tagged, truncated):
        ds = pydicom.dcmread(path)
        for tag, value in PATIENT_TAGS.items():
            setattr(ds, tag, value)
        ds.save_as(path)
    assert b"PID-12345" in tagged.read_bytes()
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # patient tags intact, pixel data cut
    garbage.write_bytes(b"not a dicom")

    report = readers.check_dataset(phantom_copy, decode=True)
    text = report.to_json()
    assert json.loads(text)["summary"]["files_unreadable"] == 2
    result = CliRunner().invoke(cli, ["data", "check", str(phantom_copy), "--json", "--decode"])
    plain = CliRunner().invoke(cli, ["data", "check", str(phantom_copy), "--decode"])
    assert result.exit_code == 0 and plain.exit_code == 0, result.output + plain.output
    assert json.loads(result.output)["summary"]["files_unreadable"] == 2
    for output in (text, result.output, plain.output):
        for secret in PATIENT_STRINGS:
            assert secret not in output


# --- the thesis's flat CSV -----------------------------------------------------------------------

FLAT_ROWS = [
    # study_id, series_id, instance_number, image_path, scan_type, condition, level, x, y, label, label_name
    ["1", "10", "3", "images/a.png", "Sagittal T2/STIR", "Spinal Canal Stenosis", "L4/L5", "30.5", "32", "1", "Moderate"],
    ["1", "11", "5", "images/b.png", "Axial T2", "Left Subarticular Stenosis", "L5/S1", "20", "40", "2", "Severe"],
    ["2", "20", "4", "images/c.png", "Sagittal T1", "Right Neural Foraminal Narrowing", "L3/L4", "12", "50.25", "0",
     "Normal/Mild"],
    ["2", "21", "7", "images/d.png", "Sagittal T2/STIR", "", "", "", "", "0", "Normal"],
]


@pytest.fixture
def flat_csv(tmp_path) -> Path:
    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for row in FLAT_ROWS:
        assert cv2.imwrite(str(root / row[3]), rng.integers(0, 256, (64, 64), dtype=np.uint8))
    path = root / "labels.csv"
    write_rows(path, [list(schema.FLAT_COLUMNS), *FLAT_ROWS])
    return path


def test_flat_csv_loads_as_the_sample_table(flat_csv):
    samples = readers.load_samples(flat_csv)
    assert tuple(samples.columns) == schema.SAMPLE_COLUMNS
    assert samples["study_id"].tolist() == [1, 1, 2, 2]
    assert samples["series_id"].tolist() == [10, 11, 20, 21]
    assert samples["instance_number"].tolist() == [3, 5, 4, 7]
    assert samples["series_description"].tolist() == ["Sagittal T2/STIR", "Axial T2", "Sagittal T1", "Sagittal T2/STIR"]
    assert samples["condition"].tolist()[:3] == [
        "spinal_canal_stenosis", "left_subarticular_stenosis", "right_neural_foraminal_narrowing"]
    assert pd.isna(samples["condition"].iloc[3])
    assert samples["level"].tolist()[:3] == ["L4/L5", "L5/S1", "L3/L4"]
    assert pd.isna(samples["level"].iloc[3])
    assert samples["severity"].dtype == pd.Int64Dtype()
    assert samples["severity"].tolist() == [1, 2, 0, 0]
    assert samples["x"].tolist()[:3] == [30.5, 20.0, 12.0]
    assert samples["y"].tolist()[:3] == [32.0, 40.0, 50.25]
    assert np.isnan(samples["x"].iloc[3]) and np.isnan(samples["y"].iloc[3])
    assert samples["path"].tolist() == [str(flat_csv.parent / row[3]) for row in FLAT_ROWS]


def test_flat_csv_accepts_condition_keys_and_level_spellings(flat_csv):
    rows = read_rows(flat_csv)
    rows[1][5], rows[1][6] = "spinal_canal_stenosis", "l4_l5"
    rows[2][10] = "severe"
    write_rows(flat_csv, rows)
    samples = readers.load_samples(flat_csv)
    assert samples["condition"].iloc[0] == "spinal_canal_stenosis"
    assert samples["level"].iloc[0] == "L4/L5"
    assert samples["severity"].iloc[1] == 2


def test_detect_layout(flat_csv, phantom_dir, tmp_path):
    assert readers.detect_layout(flat_csv) == "flat"
    assert readers.detect_layout(flat_csv.parent) == "flat"
    assert readers.detect_layout(phantom_dir) == "rsna"
    assert readers.load_samples(flat_csv.parent).equals(readers.load_samples(flat_csv))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(readers.DatasetError, match="no train.csv"):
        readers.detect_layout(empty)
    with pytest.raises(readers.DatasetError, match="does not exist"):
        readers.detect_layout(tmp_path / "nowhere")


def test_detect_layout_on_a_non_csv_file_does_not_claim_it_is_missing(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("study_id\n1\n")
    with pytest.raises(readers.DatasetError) as caught:
        readers.detect_layout(path)
    assert str(path) in str(caught.value)
    assert "does not exist" not in str(caught.value)


def test_check_flat_csv(flat_csv):
    report = readers.check_dataset(flat_csv)
    assert report.ok, report.problems
    assert report.layout == "flat"
    assert report.summary["studies"] == 2
    assert report.summary["series"] == 4
    assert report.summary["graded_points"] == 4
    assert report.summary["labelled_points"]["none (normal slice)"] == 1
    assert report.summary["files_unreadable"] == 0


def test_flat_csv_unreadable_png_is_a_warning(flat_csv):
    (flat_csv.parent / FLAT_ROWS[1][3]).write_bytes(b"not a png")
    report = readers.check_dataset(flat_csv)
    assert report.ok
    assert report.summary["files_unreadable"] == 1
    assert "b.png" in report.warnings[0]


def test_flat_csv_missing_image_names_the_row(flat_csv):
    (flat_csv.parent / FLAT_ROWS[2][3]).unlink()
    message = load_error(flat_csv)
    assert f"{flat_csv} row 4: image {flat_csv.parent / FLAT_ROWS[2][3]} does not exist" in message
    assert not readers.check_dataset(flat_csv).ok


def test_flat_csv_unknown_label_name_names_the_row(flat_csv):
    set_cell(flat_csv, 3, "label_name", "Very Bad")
    message = load_error(flat_csv)
    assert f"{flat_csv} row 3: unknown label_name 'Very Bad'" in message
    assert "row 2" not in message and "row 4" not in message


def test_flat_csv_unknown_condition_and_level_name_the_row(flat_csv):
    set_cell(flat_csv, 2, "condition", "Spinal Stenosis")
    set_cell(flat_csv, 4, "level", "L6/L7")
    message = load_error(flat_csv)
    assert f"{flat_csv} row 2: unknown condition 'Spinal Stenosis'" in message
    assert f"{flat_csv} row 4: unknown level 'L6/L7'" in message


def test_flat_csv_missing_column_is_named(flat_csv):
    rows = [row[:3] + row[4:] for row in read_rows(flat_csv)]  # drop image_path
    write_rows(flat_csv, rows)
    with pytest.raises(readers.DatasetError, match="missing column"):
        readers.load_flat_csv(flat_csv)


def test_duplicated_series_row_is_reported_or_harmless(phantom_copy):
    rows = read_rows(phantom_copy / schema.SERIES_CSV)
    write_rows(phantom_copy / schema.SERIES_CSV, [*rows, rows[1]])
    coords = pd.read_csv(phantom_copy / schema.COORDINATES_CSV)
    try:
        samples = readers.load_samples(phantom_copy)
    except readers.DatasetError as exc:
        assert f"{schema.SERIES_CSV} row {len(rows) + 1}" in str(exc)
    else:
        assert len(samples) == len(coords)


def test_flat_csv_non_numeric_point_names_the_row(flat_csv):
    set_cell(flat_csv, 3, "x", "left-ish")
    message = load_error(flat_csv)
    assert f"{flat_csv} row 3: x/y ('left-ish'" in message
    assert "row 2" not in message


def test_whitespace_only_label_cells_count_as_blank(phantom_copy):
    before = readers.check_dataset(phantom_copy).summary["blank_labels"]
    train = pd.read_csv(phantom_copy / schema.TRAIN_CSV)
    column = schema.LABEL_COLUMNS[3]
    graded_row = int(train[column].first_valid_index())
    train[column] = train[column].astype(object)
    train.loc[graded_row, column] = "   "
    train.to_csv(phantom_copy / schema.TRAIN_CSV, index=False)
    report = readers.check_dataset(phantom_copy)
    assert report.ok, report.problems
    assert report.summary["blank_labels"] == before + 1


def test_flat_csv_rows_without_a_point_are_accepted_for_whole_slices(flat_csv):
    for line in (2, 3):
        set_cell(flat_csv, line, "x", "")
        set_cell(flat_csv, line, "y", "")
    samples = readers.load_samples(flat_csv)
    assert samples["condition"].notna().sum() == 3
    assert samples["x"].isna().tolist() == [True, True, False, True]
    report = readers.check_dataset(flat_csv)
    assert report.ok, report.problems
    assert report.summary["graded_without_point"] == 2
    assert any("2 labelled row(s) have no x/y (rows 2, 3)" in w and "--mode slice" in w for w in report.warnings)
    result = CliRunner().invoke(cli, ["data", "check", str(flat_csv)])
    assert result.exit_code == 0 and "OK" in result.output, result.output


def test_flat_csv_half_a_point_names_the_row(flat_csv):
    set_cell(flat_csv, 3, "y", "")
    message = load_error(flat_csv)
    assert f"{flat_csv} row 3: x/y (20.0, blank) must be two finite numbers" in message
    assert "both blank" in message and "row 2" not in message


def test_roi_mode_refuses_rows_without_a_point_and_slice_mode_takes_them(flat_csv, tmp_path):
    from spinemri.data.cache import prepare
    from spinemri.data.preprocess import PreprocessConfig

    set_cell(flat_csv, 3, "x", "")
    set_cell(flat_csv, 3, "y", "")
    with pytest.raises(readers.DatasetError) as caught:
        prepare(flat_csv, PreprocessConfig(img_size=32, mode="roi"), cache_dir=tmp_path / "cache",
                split_fractions=(0.5, 0.0, 0.5))
    message = str(caught.value)
    assert f"{flat_csv} row 3: no x/y point; roi mode" in message and "--mode slice" in message
    assert f"{flat_csv} row 5: no x/y point" in message  # a normal slice without a point: no ROI either
    assert "row 2:" not in message and "row 4:" not in message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    dataset = prepare(flat_csv, PreprocessConfig(img_size=32, mode="slice"), cache_dir=tmp_path / "cache",
                      split_fractions=(0.5, 0.0, 0.5))
    assert dataset.manifest["samples"] == len(FLAT_ROWS)


def test_check_finds_what_decoding_will_refuse_from_the_headers(phantom_copy):
    from tests.hostile import oversized_dicom

    files = sorted({labelled_path(phantom_copy, row) for _, row in coordinates(phantom_copy).iterrows()})
    huge, frames, colour, tiny = files[:4]
    huge.write_bytes(oversized_dicom(65535, 65535))  # declares 8 GB of pixels in a few hundred bytes
    ds = pydicom.dcmread(frames)
    ds.NumberOfFrames = 5
    ds.PixelData = ds.PixelData * 5
    ds.save_as(frames)
    ds = pydicom.dcmread(colour)
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
    ds.PixelData = ds.PixelData * 3
    ds.save_as(colour)
    ds = pydicom.dcmread(tiny)
    ds.Rows = ds.Columns = 1
    ds.PixelData = b"\0\0"
    ds.save_as(tiny)
    report = readers.check_dataset(phantom_copy)
    assert report.summary["files_unreadable"] == 4, report.warnings
    text = "\n".join(report.warnings)
    assert f"{huge} declares a 65535 x 65535 image" in text
    assert f"{frames} is a multi-frame file with 5 frames" in text
    assert f"{colour} is a RGB image; spinemri reads grayscale MR" in text
    assert f"{tiny} is a 1 x 1 image, smaller than 16 pixels a side" in text
    checked = CliRunner().invoke(cli, ["data", "check", str(phantom_copy)])  # its last line says prepare will stop
    last = checked.output.strip().splitlines()[-1]
    assert "4 labelled file(s) do not read: `data prepare` stops at the first" in last and last != "OK", last
    # what prepare then refuses, file by file
    result = CliRunner().invoke(cli, ["data", "prepare", str(phantom_copy), "--img-size", "32", "--cache-dir",
                                      str(phantom_copy.parent / "cache")])
    assert result.exit_code == 1 and any(str(p) in result.output for p in (huge, frames, colour, tiny)), result.output


def test_a_folder_of_studies_is_detected_checked_and_refused_as_samples_by_its_layout(phantom_dir, tmp_path):
    studies = tmp_path / "studies"
    shutil.copytree(phantom_dir / schema.IMAGES_DIR, studies)  # <study>/<series>/*.dcm, no labels
    assert readers.detect_layout(studies) == "studies"
    report = readers.check_dataset(studies)
    assert report.layout == "studies" and report.series and report.ok
    with pytest.raises(readers.DatasetError, match="without labels.*predict-study"):
        readers.load_samples(studies)


def test_detection_loading_and_check_all_read_the_one_list_of_layouts(phantom_dir, tmp_path, monkeypatch):
    marked = tmp_path / "my-layout"
    marked.mkdir()
    (marked / "LAYOUT").write_text("mine")
    table = readers.load_samples(phantom_dir).head(3)
    mine = readers.Layout("mine", "no LAYOUT file", lambda p: (p / "LAYOUT").is_file(),
                          lambda p: table, lambda p, decode, workers: readers.CheckReport(str(p), "mine"))
    with pytest.raises(readers.DatasetError, match="none of the dataset layouts"):
        readers.detect_layout(marked)
    monkeypatch.setattr(readers, "LAYOUTS", (mine, *readers.LAYOUTS))
    assert readers.detect_layout(marked) == "mine"
    assert readers.load_samples(marked) is table
    assert readers.check_dataset(marked).layout == "mine"
    assert readers.detect_layout(phantom_dir) == "rsna"  # the others still match after it
