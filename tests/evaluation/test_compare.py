"""`spinemri compare` on two small backbones: trains them under one protocol and builds the table."""

from __future__ import annotations

import mlflow
import pandas as pd
from click.testing import CliRunner

from spinemri.cli import main as cli


def test_compare_trains_two_backbones_and_logs_the_table(phantom_dir, tracking, tmp_path):
    settings = ["--set", "compare.archs=tiny,mobilenet_v2", "--set", f"data.data_dir={phantom_dir}",
                "--set", "preprocess.img_size=32", "--set", "train.epochs=1", "--set", "train.batch_size=32",
                "--set", "mlflow.register=false"]
    result = CliRunner().invoke(cli, ["compare", "--experiment", "seed_table_quick", "--train", *settings])
    assert result.exit_code == 0, result.output
    table_text = result.output[result.output.index("| architecture | condition accuracy [95% CI]"):]
    rows = [line for line in table_text.splitlines()[2:] if line.startswith("| ")]
    assert {line.split(" | ")[0].strip("| ") for line in rows} == {"tiny", "mobilenet_v2", "*majority-class baseline*"}

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("spinemri-seed-table-quick")
    summary = client.search_runs([experiment.experiment_id], filter_string="tags.role = 'summary'")
    assert len(summary) == 1
    folder = mlflow.artifacts.download_artifacts(run_id=summary[0].info.run_id, artifact_path="compare",
                                                 dst_path=str(tmp_path))
    table = pd.read_csv(f"{folder}/table.csv")
    assert sorted(table["arch"]) == ["mobilenet_v2", "tiny"]
    assert (table["epochs"] == 1).all() and (table["batch_size"] == 32).all() and (table["img_size"] == 32).all()
    assert (table["params"] > 0).all() and (table["inference_ms_per_image"] > 0).all()
    assert table["accuracy"].between(0, 1).all() and table["final_loss"].notna().all()
    assert table["majority_accuracy"].nunique() == 1  # one held-out set, one baseline
    assert table.loc[table["arch"] == "mobilenet_v2", "params"].item() > table.loc[table["arch"] == "tiny", "params"].item()
    with open(f"{folder}/chart.png", "rb") as png:
        assert png.read(4) == b"\x89PNG"

    # Re-running without --train only rebuilds the table (by the MLflow experiment's name too).
    again = CliRunner().invoke(cli, ["compare", "--experiment", "spinemri-seed-table-quick", "--head", "severity"])
    assert again.exit_code == 0, again.output
    assert "severity accuracy" in again.output
    assert len(client.search_runs([experiment.experiment_id], filter_string="tags.role = 'summary'")) == 2


def test_compare_without_runs_says_what_to_do(tracking):
    result = CliRunner().invoke(cli, ["compare", "--experiment", "no-such-experiment"])
    assert result.exit_code == 1
    assert "no MLflow experiment 'no-such-experiment'" in result.output and "--train" in result.output
    bad = CliRunner().invoke(cli, ["compare", "--experiment", "seed_table_quick", "--train",
                                   "--set", "compare.archs=tiny,alexnet"])
    assert bad.exit_code == 1 and "compare.archs must list backbones" in bad.output
