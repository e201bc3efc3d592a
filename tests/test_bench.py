"""The benchmarks in bench/: their --quick paths print one JSON line and one summary line whose
ratios follow from their own raw numbers, the peak-RSS measurement sees a child's memory, and the GPU
training-speed script refuses a machine without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
# One worker runs them all: the quick phantom is written once per module.
pytestmark = pytest.mark.xdist_group("bench")


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env.update(SPINEMRI_BENCH_DIR=str(tmp / "work"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'unused.db'}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def run_quick(name: str, env: dict, *extra: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick", *extra],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout  # exactly: the JSON line and the summary line
    record = json.loads(lines[0])
    assert record["benchmark"] == name
    assert record["machine"]["cores"] >= 1 and record["machine"]["tensorflow"]
    assert name in lines[1]
    return record, lines[1]


def test_preprocess_quick_reports_ratios_of_its_own_timings(bench_env):
    record, summary = run_quick("preprocess", bench_env)
    seconds, ratios = record["seconds"], record["ratios"]
    assert record["dicom_files"] > 0 and record["samples"] >= record["dicom_files"]
    assert ratios["prepare_vs_naive"]["value"] == pytest.approx(seconds["naive"] / seconds["prepare_2"], rel=0.01)
    assert ratios["per_worker_vs_bare_decode"]["value"] == pytest.approx(
        seconds["prepare_1"] / seconds["bare_decode"], rel=0.01)
    assert ratios["prepare_vs_naive"]["result"] == ("pass" if ratios["prepare_vs_naive"]["value"] >= 1.8 else "miss")
    assert ratios["prepare_vs_naive"]["result"] in summary


def test_pipeline_quick_compares_cache_and_memory_feeds(bench_env):
    record, _ = run_quick("pipeline", bench_env, "--archs", "tiny")  # the smallest model: the feeds are under test
    [result] = record["results"]
    rates = result["images_per_s"]
    assert rates["cache"] > 0 and rates["memory"] > 0
    assert result["ratio"] == pytest.approx(rates["cache"] / rates["memory"], rel=0.01)
    assert result["result"] == ("pass" if result["ratio"] >= 0.9 else "miss")


def test_scale_quick_fits_the_exponents_of_its_own_measurements(bench_env):
    import numpy as np

    record, summary = run_quick("scale", bench_env)
    rows, fits = record["rows"], record["fits"]
    assert [r["studies"] for r in rows] == [3, 6] and record["steps"] == ["synth", "prepare", "localizer_caches"]
    files = [r["files"] for r in rows]
    assert files[0] < files[1] and all(r["cache_bytes"] > 0 and r["phantom_bytes"] > 0 for r in rows)
    for step in record["steps"]:
        for measure, exponent_name in (("cpu_s", "cpu_exponent"), ("seconds", "wall_exponent")):
            exponent = np.polyfit(np.log(files), np.log([r[step][measure] for r in rows]), 1)[0]
            assert fits[step][exponent_name] == pytest.approx(exponent, abs=1e-3)
        assert fits[step]["exponent_result"] == ("pass" if fits[step]["cpu_exponent"] <= 1.05 else "miss")
        ratio = rows[1][step]["peak_rss_mb"] / rows[0][step]["peak_rss_mb"]
        assert fits[step]["rss_ratio"] == pytest.approx(ratio, abs=1e-3)
        assert 50 < rows[0][step]["peak_rss_mb"] < 4000  # a process's peak, in MB
    localizer_slices = sum(rows[1]["localizer_caches"]["slices"].values())
    assert localizer_slices == files[1]  # every slice of every labelled series: here, every file
    full = record["full_dataset"]
    assert full["files"] == 147_218
    assert full["prepare_cpu_s"] == pytest.approx(sum(fits[s]["full_dataset_cpu_s"] for s in ("prepare", "localizer_caches")),
                                                  abs=0.2)
    assert Path(record["plot"]).is_file() and "scale" in summary
    assert not list(Path(bench_env["SPINEMRI_BENCH_DIR"]).glob("scale-rsna-*"))  # phantoms deleted


@pytest.mark.slow
def test_scale_quick_with_the_model_steps(bench_env):
    record, _ = run_quick("scale", bench_env, "--steps", "all")
    for row in record["rows"]:
        assert row["train"]["seconds"] > 0 and row["predict"]["studies_per_s"] > 0
    assert set(record["fits"]) >= {"train", "predict", "cache_bytes"}


def test_feed_quick_measures_one_core_and_all_and_leaves_the_gpu_side_unmeasured(bench_env):
    record, summary = run_quick("feed", bench_env)
    [result] = record["results"]
    cores = record["machine"]["cores"]
    assert result["cpus"]["1_core"] == [min(result["cpus"]["all_cores"])]  # the 1-core process was pinned
    assert len(result["cpus"]["all_cores"]) == record["cores"] <= cores
    assert result["images_per_s"]["1_core"] > 0 and result["images_per_s"]["all_cores"] > 0
    assert result["per_core"] == result["images_per_cpu_s"]["1_core"]
    assert result["extrapolated_16_cores"] == round(16 * result["per_core"])
    assert result["ratio"] == {"densenet": None, "mobilenet_v2": None}
    assert record["result"] == result["result"] == "unmeasured" and "unmeasured" in summary
    assert record["gpu"]["measure_with"] == "python bench/gpu_train_speed.py"


def test_feed_ratio_is_the_16_core_capacity_over_the_gpu_table(monkeypatch):
    import feed

    monkeypatch.setattr(feed, "GPU_IMAGES_PER_S", {"densenet": {128: 1000.0}, "mobilenet_v2": {128: 2000.0}})
    one = {"images_per_s": 100.0, "images_per_cpu_s": 150.0, "cpu_busy": 0.7, "cpus": [0], "rounds": [100.0],
           "train_samples": 10}
    every = {**one, "images_per_s": 180.0, "images_per_cpu_s": 135.0, "cpus": [0, 1]}
    result = feed.summarize(128, 5, {1: one, 2: every}, 2)
    assert result["extrapolated_16_cores"] == 2400 and result["scaling"] == 0.9
    assert result["ratio"] == {"densenet": 2.4, "mobilenet_v2": 1.2} and result["result"] == "pass"
    assert feed.summarize(224, 5, {1: one, 2: every}, 2)["result"] == "unmeasured"  # no GPU figure at 224
    monkeypatch.setattr(feed, "GPU_IMAGES_PER_S", {"mobilenet_v2": {128: 2500.0}})
    assert feed.summarize(128, 5, {1: one, 2: every}, 2)["result"] == "miss"


def test_gpu_train_speed_refuses_without_a_gpu(bench_env):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train_speed.py")], capture_output=True,
                          text=True, env={**bench_env, "CUDA_VISIBLE_DEVICES": "-1"}, timeout=300, cwd=ROOT)
    assert done.returncode == 2 and done.stdout == ""
    assert "sees no GPU" in done.stderr and "--cpu-smoke" in done.stderr


def test_peak_rss_of_a_child_follows_what_it_allocates():
    from _common import peak_rss

    allocate = "import numpy as np; a = np.ones({} * 2**20, np.uint8); print(a.sum(), flush=True)"
    small, _, status_small = peak_rss([sys.executable, "-c", allocate.format(10)])
    large, _, status_large = peak_rss([sys.executable, "-c", allocate.format(210)])
    assert status_small == status_large == 0
    assert large - small > 150 * 2**20  # ~200 MiB more, seen in the child's own peak
    _, _, failed = peak_rss([sys.executable, "-c", "raise SystemExit(3)"])
    assert failed == 3


# The three below train models (1-2 min each); the serving, tuning and peak-RSS tests above and in
# tests/serving and tests/training cover the behaviour they measure.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["memory", "serve", "tune"])
def test_training_benchmarks_quick(name, bench_env):
    record, _ = run_quick(name, bench_env)
    assert record["result"] in ("pass", "miss")


# Minutes on a CPU (building a training graph); the feed and refusal tests above cover the rest.
@pytest.mark.slow
def test_gpu_train_speed_cpu_smoke_trains_and_compares(bench_env):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train_speed.py"), "--cpu-smoke", "--archs",
                           "mobilenet_v2"], capture_output=True, text=True, env=bench_env, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.splitlines()[0])
    [result] = record["results"]
    assert result["gpu_images_per_s"] > 0 and result["pipeline_images_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["pipeline_images_per_s"] / result["gpu_images_per_s"], rel=0.01)
