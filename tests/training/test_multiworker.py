"""One model trained by two worker processes on 127.0.0.1 (train.strategy: multiworker): the same weights on
both, one MLflow run (the chief's), a killed worker named on the chief's FAILED run, TF_CONFIG checked."""

from __future__ import annotations

import os
from pathlib import Path
import re
import signal
import socket
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from spinemri.api.classifier import train
from spinemri.config import load_experiment
from spinemri.errors import ConfigError
from spinemri.training.cluster import Cluster, read_cluster, stopped_worker
from spinemri.training.data import make_dataset, split_data

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--arch", "tiny", "--img-size", "32", "--batch-size", "16", "--strategy", "multiworker",
        "--set", "mlflow.experiment=multiworker"]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tf_config(workers: list[str], index: int) -> str:
    return ('{"cluster": {"worker": [%s]}, "task": {"type": "worker", "index": %d}}'
            % (", ".join(f'"{w}"' for w in workers), index))


def start_workers(tmp_path: Path, workers: list[str], tracking: str, args: list[str], count: int | None = None):
    """``spinemri train ARGS`` as worker 0..count-1 of ``workers``, each in its own folder with its own cache
    (as separate machines would have); stdout and stderr go to files there."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    processes = []
    for index in range(len(workers) if count is None else count):
        home = tmp_path / f"worker{index}"
        home.mkdir()
        env = {**inherited, "TF_CONFIG": tf_config(workers, index), "MLFLOW_TRACKING_URI": tracking,
               "SPINEMRI_CACHE_DIR": str(home / "cache"),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        with open(home / "stdout", "w") as out, open(home / "stderr", "w") as err:
            processes.append(subprocess.Popen([sys.executable, "-m", "spinemri", "train", *args], cwd=home, env=env,
                                              stdout=out, stderr=err))
    return processes


def output(tmp_path: Path, index: int, stream: str) -> str:
    return (tmp_path / f"worker{index}" / stream).read_text()


def only_run(tracking: str):
    client = mlflow.MlflowClient(tracking)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


@pytest.mark.xdist_group("multiworker")
def test_two_workers_train_one_model_with_the_same_weights_and_only_the_chief_logs_it(phantom_dir, tracking, tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    chief, worker = start_workers(tmp_path, workers, tracking, ["--data-dir", str(phantom_dir), "--epochs", "1", *TINY])
    for index, process in enumerate((worker, chief)):
        assert process.wait(timeout=600) == 0, output(tmp_path, 1 - index, "stderr")[-3000:]

    client, run = only_run(tracking)  # the other worker, on the same store, created no run
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["strategy"], tags["replicas"], tags["workers"], tags["cluster"]) == \
        ("multiworker", "2", "2", ",".join(workers))
    assert [str(v.version) for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")] == ["1"]
    assert tags["registered_version"] == "1"
    printed = re.search(r"weights_sha256 ([0-9a-f]{64})", output(tmp_path, 1, "stdout"))
    assert printed and printed.group(1) == tags["weights_sha256"]  # the same weights on both workers
    assert not re.search(r"^run \w+ finished", output(tmp_path, 1, "stdout"), re.M)  # the chief's line only
    assert f"run {run.info.run_id} finished" in output(tmp_path, 0, "stdout")


@pytest.mark.xdist_group("multiworker")
def test_a_killed_worker_fails_the_chiefs_run_naming_it_within_two_minutes(phantom_dir, tracking, tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    chief, worker = start_workers(tmp_path, workers, tracking, [
        "--data-dir", str(phantom_dir), "--epochs", "50", "--set", "train.early_stopping_patience=50", *TINY])
    try:
        deadline = time.monotonic() + 600
        store = mlflow.MlflowClient(tracking)
        # training together: the other worker's first epoch is done, the chief's run exists
        while "epoch 1/50: " not in output(tmp_path, 1, "stdout") or \
                not store.search_runs([e.experiment_id for e in store.search_experiments()]):
            assert worker.poll() is None and chief.poll() is None, output(tmp_path, 0, "stderr")[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(2)
        worker.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = chief.wait(timeout=120)
        waited = time.monotonic() - killed
    finally:
        for process in (chief, worker):
            if process.poll() is None:
                process.kill()
    assert code != 0 and waited < 120
    message = f"worker {workers[1]} stopped responding"
    assert message in output(tmp_path, 0, "stderr")
    _, run = only_run(tracking)
    assert run.info.status == "FAILED"
    assert run.data.tags["fail_reason"].startswith(message)


@pytest.mark.xdist_group("multiworker")
def test_a_worker_whose_peers_never_join_gives_up_after_worker_timeout_s(tracking, tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    [chief] = start_workers(tmp_path, workers, tracking, ["--epochs", "1", "--set", "train.worker_timeout_s=3", *TINY],
                            count=1)
    assert chief.wait(timeout=120) == -signal.SIGKILL  # TensorFlow's wait can only be ended from outside
    assert "waited train.worker_timeout_s=3 s for the other workers" in output(tmp_path, 0, "stderr")
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_multiworker_without_tf_config_says_what_to_set_before_any_run(tracking, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match=r"TF_CONFIG environment variable, which is not set.*e\.g\. TF_CONFIG="):
        train(load_experiment("quick", {"arch": "tiny", "img_size": 32, "strategy": "multiworker"}))
    assert mlflow.search_runs(search_all_experiments=True).empty


@pytest.mark.parametrize("value, message", [
    ("{not json", "not valid JSON"),
    ('{"cluster": {}, "task": {"type": "worker", "index": 0}}', "no cluster.worker list"),
    ('{"cluster": {"worker": ["h:1"], "chief": ["h:2"]}, "task": {"type": "worker", "index": 0}}',
     "has chief besides worker"),
    ('{"cluster": {"worker": ["h"]}, "task": {"type": "worker", "index": 0}}', "'h', not a host:port"),
    ('{"cluster": {"worker": ["h:1", "h:1"]}, "task": {"type": "worker", "index": 0}}', "lists an address twice"),
    ('{"cluster": {"worker": ["h:1", "h:2"]}, "task": {"type": "worker", "index": 2}}', "i from 0 to 1"),
    ('{"cluster": {"worker": ["h:1", "h:2"]}}', "task must be"),
])
def test_a_bad_tf_config_names_the_problem_and_the_form(value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_cluster({"TF_CONFIG": value})


def test_tf_config_gives_the_workers_and_this_ones_place():
    cluster = read_cluster({"TF_CONFIG": tf_config(["a:1", "b:2", "c:3"], 1)})
    assert cluster == Cluster(("a:1", "b:2", "c:3"), 1)
    assert not cluster.is_chief and cluster.address == "b:2" and cluster.others() == ["a:1", "c:3"]


def test_multiworker_refuses_the_trainings_that_are_several_runs():
    for setting in ({"folds": 3}, {"trials": 2}, {"task": "localize"}):
        with pytest.raises(ConfigError, match="multiworker trains one classifier in one run"):
            load_experiment("quick", {"strategy": "multiworker", **setting})


def test_tensorflows_peer_errors_become_messages_naming_the_worker():
    cluster = Cluster(("h0:1", "h1:2"), 0)
    lost = tf.errors.UnavailableError(None, None, "Collective ops is aborted by: The following tasks are unhealthy "
                                      "(stopped sending heartbeats):\n/job:worker/replica:0/task:1")
    assert stopped_worker(lost, cluster, 300).startswith(
        "worker h1:2 stopped responding: it stopped sending heartbeats")
    slow = tf.errors.DeadlineExceededError(None, None, "Collective has timed out during execution.")
    assert "waited train.worker_timeout_s=300 s" in stopped_worker(slow, cluster, 300)
    leader = tf.errors.UnavailableError(None, None, "Graph execution error:\n\nCollective ops is aborted by: Failed to "
                                        "send RPC to coordination service. Either the leader task was preempted/died")
    assert stopped_worker(leader, Cluster(("h0:1", "h1:2", "h2:3"), 2), 300).startswith(
        "worker h0:1 (the chief) stopped responding: the cluster's coordination service on it stopped answering")
    assert stopped_worker(tf.errors.InvalidArgumentError(None, None, "shapes differ"), cluster, 300) is None


def test_each_worker_reads_only_its_replicas_share_of_every_global_batch(tmp_path):
    images = tmp_path / "images.npy"
    np.save(images, np.arange(11, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8))  # row i: i
    samples = pd.DataFrame({"index": range(11), "split": "train", "severity": 0, "condition": None, "level": "L1/L2",
                            "series_description": "Sagittal T2/STIR"})
    split = split_data(samples, "train")

    def batches(part):  # the rows of each element, read back from the pixels
        ds = make_dataset(images, split, 6, shuffle=True, seed=1, min_batch=4, replica_batches=part)
        return [x[:, 0, 0, 0].numpy().astype(int).tolist() for x, _, _ in ds]

    whole = batches(None)  # 11 rows in batches of 6 and 5, each trimmed to a multiple of the 4 replicas
    assert [len(batch) for batch in whole] == [4, 4]
    first, second = batches((0, 2)), batches((2, 2))  # two workers of two replicas: one row per replica batch
    assert [first[2 * i] + first[2 * i + 1] + second[2 * i] + second[2 * i + 1] for i in range(2)] == whole
