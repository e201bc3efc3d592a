"""`spinemri data flat`: a table of graded sites per image written as the flat CSV, without points."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from spinemri.cli import main as cli
from spinemri.data import readers, schema
from spinemri.data.site_table import flat_from_site_table
from spinemri.errors import DatasetError


@pytest.fixture
def site_table(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        cv2.imwrite(str(tmp_path / "images" / name), np.full((40, 40), 128, np.uint8))
    rows = [("7", "left_neural_foraminal_narrowing_l4_l5", "Moderate", "images/a.png"),
            ("7", "left_neural_foraminal_narrowing_l5_s1", "Severe", "images/a.png"),
            ("7", "right_neural_foraminal_narrowing_l4_l5", "Normal/Mild", "images/b.png"),
            ("9", "spinal_canal_stenosis_l1_l2", "normal/mild", "images/c.png")]
    path = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["study_id", "condition_level", "severity", "file"]).to_csv(path, index=False)
    return path


def test_a_site_table_becomes_a_flat_csv_without_points(site_table, tmp_path):
    flat = flat_from_site_table(site_table)
    assert list(flat.columns) == list(schema.FLAT_COLUMNS)
    assert flat["instance_number"].tolist() == [1, 1, 2, 1]  # the images of a study, numbered
    assert flat["label_name"].tolist() == ["Moderate", "Severe", "Normal/Mild", "Normal/Mild"]
    out = tmp_path / "flat.csv"
    result = CliRunner().invoke(cli, ["data", "flat", str(site_table), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 4 graded sites on 3 images of 2 studies" in result.output and "--mode slice" in result.output
    samples = readers.load_samples(out)
    assert samples["condition"].tolist()[:2] == ["left_neural_foraminal_narrowing"] * 2
    assert samples["level"].tolist() == ["L4/L5", "L5/S1", "L4/L5", "L1/L2"]
    assert samples["severity"].tolist() == [1, 2, 0, 0] and samples["x"].isna().all()
    again = CliRunner().invoke(cli, ["data", "flat", str(site_table), "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output and "--overwrite" in again.output


def test_bad_rows_of_a_site_table_are_named(site_table):
    table = pd.read_csv(site_table, dtype=str)
    table.loc[1, "condition_level"] = "left_foramen_l4_l5"
    table.loc[2, "severity"] = "Awful"
    table.loc[3, "file"] = "images/missing.png"
    table.to_csv(site_table, index=False)
    with pytest.raises(DatasetError) as caught:
        flat_from_site_table(site_table)
    message = str(caught.value)
    assert f"{site_table} row 3: condition_level 'left_foramen_l4_l5' is not a train.csv column" in message
    assert f"{site_table} row 4: severity 'Awful' is not one of Normal/Mild, Moderate, Severe" in message
    assert f"{site_table} row 5: image {site_table.parent / 'images/missing.png'} does not exist" in message
    assert "row 2:" not in message
    pd.DataFrame({"study_id": [1]}).to_csv(site_table, index=False)
    result = CliRunner().invoke(cli, ["data", "flat", str(site_table), "--out", str(site_table.parent / "x.csv")])
    assert result.exit_code == 1 and "lacks column(s) condition_level, severity, file" in result.output
    assert "Traceback" not in result.output and not (site_table.parent / "x.csv").exists()
