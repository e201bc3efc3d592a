"""`spinemri predict` on a folder: one row per readable file, bad files skipped or stopping the job."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from spinemri.cli import main as cli
from spinemri.data.schema import HEAD_CLASSES
from spinemri.serving.inputs import file_row

# One worker runs all serving tests: one trained model and one server instead of two of each.
pytestmark = pytest.mark.xdist_group("serving")


def _folder(store, tmp_path, count: int = 6):
    series = next((store.data_dir / "train_images").glob("*/*"))
    files = sorted(series.glob("*.dcm"))[:count]
    target = tmp_path / "scans"
    target.mkdir()
    for f in files:
        shutil.copy(f, target / f.name)
    return target, files


def test_predict_a_folder_matches_the_pyfunc(store, tmp_path):
    folder, files = _folder(store, tmp_path)
    (folder / "notes.txt").write_text("not an image, not even looked at")
    out = tmp_path / "preds.csv"
    result = CliRunner().invoke(cli, ["predict", "--model", "models:/spinemri@champion", "--input", str(folder),
                                      "--out", str(out), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert f"wrote {len(files)} prediction(s)" in result.output
    table = pd.read_csv(out)
    assert len(table) == len(files) and table.columns[0] == "file"
    for head, classes in HEAD_CLASSES.items():
        np.testing.assert_allclose(table[[f"{head}:{c}" for c in classes]].sum(axis=1), 1.0, atol=1e-5)
    # The same numbers as the pyfunc on the same files (image centre as the site).
    served = mlflow.pyfunc.load_model(store.model_uri).predict(pd.DataFrame([file_row(f) for f in sorted(
        folder.glob("*.dcm"))]))
    np.testing.assert_allclose(table.iloc[:, 4:].to_numpy(float), served.iloc[:, 3:].to_numpy(float), atol=1e-5)
    assert table["refer"].tolist() == served["refer"].tolist()  # the same referral flag


def test_sites_move_the_crop(store, tmp_path):
    folder, files = _folder(store, tmp_path, count=2)
    sites = tmp_path / "sites.csv"
    pd.DataFrame({"path": [files[0].name], "x": [10.0], "y": [12.0]}).to_csv(sites, index=False)
    out_default, out_sites = tmp_path / "a.csv", tmp_path / "b.csv"
    for out, extra in ((out_default, []), (out_sites, ["--sites", str(sites)])):
        result = CliRunner().invoke(cli, ["predict", "--input", str(folder), "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
    a, b = pd.read_csv(out_default), pd.read_csv(out_sites)
    assert not np.allclose(a.iloc[0, 4:].to_numpy(float), b.iloc[0, 4:].to_numpy(float))
    np.testing.assert_allclose(a.iloc[1, 4:].to_numpy(float), b.iloc[1, 4:].to_numpy(float), atol=1e-6)


def test_bad_files_stop_without_output_or_are_skipped(store, tmp_path):
    folder, files = _folder(store, tmp_path, count=3)
    (folder / "broken.dcm").write_bytes(b"not a dicom file at all")
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "preds.csv"
    stopped = CliRunner().invoke(cli, ["predict", "--input", str(folder), "--out", str(out)])
    assert stopped.exit_code == 1
    assert "broken.dcm: is not a DICOM file" in stopped.output and "nothing was written" in stopped.output
    assert not out.exists() and not list(tmp_path.glob("*.partial"))

    skipped = CliRunner().invoke(cli, ["predict", "--input", str(folder), "--out", str(out), "--on-bad-file", "skip"])
    assert skipped.exit_code == 0, skipped.output
    assert "(2 file(s) skipped)" in skipped.output
    assert "skipped: " in skipped.output and "empty.png is empty" in skipped.output
    assert len(pd.read_csv(out)) == len(files)


def test_predict_input_errors_are_clear(store, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli, ["predict", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "p.csv")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(cli, ["predict", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "p.csv")])
    assert empty.exit_code == 1 and "holds no .dcm/.png/.jpg/.jpeg files" in empty.output
    folder, _ = _folder(store, tmp_path, count=1)
    no_dir = runner.invoke(cli, ["predict", "--input", str(folder), "--out", str(tmp_path / "x" / "p.csv")])
    assert no_dir.exit_code == 1 and "does not exist; create it first" in no_dir.output
    bad_model = runner.invoke(cli, ["predict", "--model", "models:/spinemri@nosuchalias", "--input", str(folder),
                                    "--out", str(tmp_path / "p.csv")])
    assert bad_model.exit_code == 1 and "cannot load classifier 'models:/spinemri@nosuchalias'" in bad_model.output
    assert "Traceback" not in bad_model.output


def test_an_existing_out_file_is_kept_unless_overwrite_is_given(store, tmp_path):
    folder, files = _folder(store, tmp_path, count=2)
    out = tmp_path / "preds.csv"
    out.write_text("someone's earlier results\n")
    command = ["predict", "--model", "models:/spinemri@champion", "--input", str(folder), "--out", str(out)]
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 1 and f"--out {out} already exists" in result.output and "--overwrite" in result.output
    assert out.read_text() == "someone's earlier results\n"
    result = CliRunner().invoke(cli, [*command, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out)) == len(files)
