"""`spinemri export` on a logged, registered model: the parity check is printed and the file kept."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from spinemri.cli import main as cli

# One worker runs all serving tests: one trained model and one server instead of two of each.
pytestmark = pytest.mark.xdist_group("serving")


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_export_the_champion_with_a_parity_check(store, tmp_path, fmt):
    out = tmp_path / f"spinemri.{fmt}"
    result = CliRunner().invoke(cli, ["export", "--model", "models:/spinemri@champion", "--format", fmt,
                                      "--out", str(out), "--samples", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["path"] == str(out) and out.stat().st_size == report["size_bytes"] > 10_000
    assert report["samples"] == 8 and 0 <= report["max_abs_diff"] < 1e-4
    assert set(report["per_head_max_abs_diff"]) == {"condition", "level", "severity"}

    again = CliRunner().invoke(cli, ["export", "--format", fmt, "--out", str(out)])
    assert again.exit_code == 1 and "already exists; choose another path or pass --overwrite" in again.output


def test_export_errors_name_the_fix(store, tmp_path):
    missing = CliRunner().invoke(cli, ["export", "--format", "tflite", "--out", str(tmp_path / "no" / "m.tflite")])
    assert missing.exit_code == 1 and "does not exist; create it first" in missing.output
    unknown = CliRunner().invoke(cli, ["export", "--model", "models:/nope@champion", "--format", "tflite",
                                       "--out", str(tmp_path / "m.tflite")])
    assert unknown.exit_code == 1 and "cannot load classifier 'models:/nope@champion'" in unknown.output
    assert not (tmp_path / "m.tflite").exists()
