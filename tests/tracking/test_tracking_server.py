"""spinemri against a team's tracking server: `mlflow server` on PostgreSQL with proxied artifacts.

`spinemri train` runs as a process of its own with MLFLOW_TRACKING_URI=http://…, as on any machine
of the team (docs/scaling.md, "Several machines"); the run, the registry and the served model are
then read back through the server only.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import os
from pathlib import Path
import signal
import subprocess
import sys

from click.testing import CliRunner
import mlflow
from mlflow import MlflowClient
import numpy as np
import pandas as pd
import pytest

from spinemri.cli import main as cli
from spinemri.data.schema import HEAD_CLASSES
from spinemri.metrics.paired import PREDICTIONS_ARTIFACT
from spinemri.tracking import registry
from spinemri.serving.inputs import file_row
from spinemri.tracking.reports import table_artifact
from tests.serving.server import post, serve_model

# One worker runs every test on the tracking server: one PostgreSQL, one server, one training.
pytestmark = pytest.mark.xdist_group("tracking_server")

EXPERIMENT = "team"
MODEL = "spinemri-team"  # a registered model of its own: other tests on this server may register `spinemri`
METRIC = "test_severity_weighted_log_loss"


@dataclass
class Training:
    run_id: str
    stdout: str
    workdir: Path
    cache_dir: Path


@pytest.fixture(scope="module")
def trained_on_server(tracking_server, phantom_dir, tmp_path_factory) -> Training:
    """`spinemri train` in a process of its own, pointed at the server by MLFLOW_TRACKING_URI only."""
    root = tmp_path_factory.mktemp("team")
    workdir = root / "workdir"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=tracking_server, SPINEMRI_CACHE_DIR=str(root / "cache"))
    command = [sys.executable, "-m", "spinemri", "train", "--arch", "tiny", "--data-dir", str(phantom_dir),
               "--img-size", "32", "--epochs", "1", "--batch-size", "32",
               "--set", f"mlflow.experiment={EXPERIMENT}", "--set", f"mlflow.registered_model={MODEL}",
               # one held-out study cannot show a model better than its floor: allowed, to have a champion
               "--set", "mlflow.allow_below_floor=true"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    client = MlflowClient(tracking_server)
    [run] = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    return Training(run_id=run.info.run_id, stdout=done.stdout, workdir=workdir, cache_dir=root / "cache")


@pytest.fixture
def on_server(tracking_server, monkeypatch) -> str:
    """This process's MLflow calls go to the server for one test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(tracking_server)
    yield tracking_server
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # back to the environment's store, which monkeypatch then restores


def test_a_training_elsewhere_is_read_back_through_the_server(trained_on_server, on_server):
    client = MlflowClient(tracking_uri=on_server)
    run = client.get_run(trained_on_server.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: the trainer needs no storage access
    assert run.data.params["arch"] == "tiny" and run.data.params["img_size"] == "32"
    assert np.isfinite(run.data.metrics[METRIC])
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 1
    assert {d.dataset.name.rsplit("-", 1)[1] for d in run.inputs.dataset_inputs} == {"train", "val", "test"}

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data", "evaluation", "plots"} <= artifacts
    table = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{table_artifact('test')}")
    assert table["columns"] and table["data"]
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")

    version = client.get_model_version(MODEL, "1")
    assert version.run_id == run.info.run_id
    model = mlflow.models.get_model_info(version.source)  # the model's files, fetched through the server
    assert "python_function" in model.flavors

    # The training machine kept nothing of the run: no local store, lock file or ./mlruns.
    assert list(trained_on_server.workdir.iterdir()) == []


def test_a_finished_run_is_evaluated_again_through_the_server(trained_on_server, on_server, monkeypatch):
    monkeypatch.setenv("SPINEMRI_CACHE_DIR", str(trained_on_server.cache_dir))  # the machine that trained it
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")  # another experiment active: the run's own is used
    client = MlflowClient(tracking_uri=on_server)
    before = client.get_run(trained_on_server.run_id).info
    result = CliRunner().invoke(cli, ["evaluate", "--run", before.run_id, "--split", "val", "--n-boot", "100",
                                      "--json"])
    assert result.exit_code == 0, result.output
    # The run was reopened and ended on the server twice: MLflow's run links stay out of the JSON.
    report = json.loads(result.stdout)
    assert report["run_id"] == before.run_id and report["split"] == "val"
    after = client.get_run(before.run_id).info
    assert (after.status, after.end_time) == ("FINISHED", before.end_time)
    table = mlflow.artifacts.load_dict(f"runs:/{before.run_id}/{table_artifact('val')}")
    assert table["columns"] and table["data"]


def test_the_first_model_is_champion_and_the_alias_moves_by_the_policy(trained_on_server, on_server):
    client = MlflowClient(tracking_uri=on_server)
    first = client.get_model_version_by_alias(MODEL, "champion")
    assert first.version == "1" and first.tags["decision"].startswith("first version")
    assert f"{MODEL} version 1 -> champion" in trained_on_server.stdout
    assert client.get_run(trained_on_server.run_id).data.tags["alias_when_registered"] == "champion"

    # Later versions of the same model, judged as training judges them (no second training needed; like the
    # training above, allowed below their floor, which one held-out study cannot show them above).
    predictions = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=first.run_id,
                                                                  artifact_path=PREDICTIONS_ARTIFACT),
                              dtype={c: str for c in ("study_id", "series_id", "instance_number")})
    value, eval_set = float(first.tags["metric_value"]), first.tags["eval_set"]
    same = registry.register(first.source, MODEL, metric=METRIC, value=value, eval_set=eval_set,
                             evidence=predictions, allow_below_floor=True)
    # The champion's predictions came through the server: the paired rule got as far as counting studies.
    assert same.alias == "challenger" and "too few for a paired decision" in same.reason, same.reason
    better = registry.register(first.source, MODEL, metric=METRIC, value=value - 0.1, eval_set=eval_set,
                               policy="strict", allow_below_floor=True)
    assert better.alias == "champion" and better.reason.startswith("beats")
    elsewhere = registry.register(first.source, MODEL, metric=METRIC, value=0.0, eval_set="other-held-out-set",
                                  allow_below_floor=True)
    assert elsewhere.alias == "challenger" and "not comparable" in elsewhere.reason

    def aliases() -> dict[str, str]:
        return {alias: str(v) for alias, v in client.get_registered_model(MODEL).aliases.items()}

    assert aliases() == {"champion": "3", "challenger": "4"}
    promoted = CliRunner().invoke(cli, ["registry", "promote", "1", "--name", MODEL, "--reason", "team review"])
    assert promoted.exit_code == 0, promoted.output
    assert aliases() == {"champion": "1", "challenger": "4"}
    assert client.get_model_version(MODEL, "1").tags["promoted_over"] == "v3"
    listed = CliRunner().invoke(cli, ["registry", "list", "--name", MODEL, "--json"])
    assert listed.exit_code == 0, listed.output
    assert [row["version"] for row in json.loads(listed.stdout)] == ["4", "3", "2", "1"]


def test_the_runs_of_a_killed_process_are_reaped_on_the_server(on_server):
    code = ("import os, signal, mlflow\n"
            "from spinemri.tracking.runs import start_run\n"
            "mlflow.set_experiment('team-ghosts')\n"
            "print(start_run(run_name='doomed').info.run_id, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    ghost = done.stdout.split()[0]
    result = CliRunner().invoke(cli, ["runs", "reap", "--json"])
    assert result.exit_code == 0, result.output
    # Ending a run on a server makes MLflow print the run's link: not into the JSON.
    assert ghost in json.loads(result.stdout)["reaped"]
    assert MlflowClient(on_server).get_run(ghost).info.status == "FAILED"


def test_the_champion_is_served_from_the_server(trained_on_server, tracking_server, phantom_dir, tmp_path):
    site = pd.read_csv(phantom_dir / "train_label_coordinates.csv").iloc[0]
    dicom = phantom_dir / "train_images" / str(site.study_id) / str(site.series_id) / f"{site.instance_number}.dcm"
    with serve_model(f"models:/{MODEL}@champion", tracking_server, tmp_path / "serve.log") as (url, _):
        status, body = post(url, {"dataframe_records": [file_row(dicom, site.x, site.y)]})
    assert status == 200, body
    [prediction] = body["predictions"]
    for head, classes in HEAD_CLASSES.items():
        assert sum(prediction[f"{head}:{c}"] for c in classes) == pytest.approx(1.0, abs=1e-5)
        assert prediction[head] in classes
