"""`spinemri ablation` and the localizers' cross-validation, on a 16-study phantom with 2 folds (tiny
backbones, 32 px, one epoch), in a store of their own (one worker: xdist_group "ablation")."""

from __future__ import annotations

import math

from click.testing import CliRunner
import mlflow
import numpy as np
import pandas as pd
import pytest

from spinemri.api.ablation import cross_fitted
from spinemri.cli import main as cli
from spinemri.phantom import PhantomConfig, synthesize
from tests.conftest import copy_store, isolated_tracking

pytestmark = pytest.mark.xdist_group("ablation")

TINY = ["--folds", "2", "--epochs", "1", "--img-size", "32", "--set", "train.deterministic=false",
        "--set", "data.workers=1", "--localizer-set", "train.epochs=1", "--localizer-set", "localize.img_size=32"]
STEPS = ("current", "stack", "jitter", "calibrated", "ensemble")


@pytest.fixture(scope="module")
def ablated(tmp_path_factory, store_template):
    root = tmp_path_factory.mktemp("ablation")
    data = root / "data"
    synthesize(data, PhantomConfig(studies=16, seed=3), workers=2)
    uri = copy_store(store_template, root / "mlflow.db")
    with isolated_tracking(uri, root / "cache"):
        result = CliRunner().invoke(cli, ["ablation", "--data-dir", str(data), *TINY])
        assert result.exit_code == 0, result.output
        yield result, uri, root, data


@pytest.fixture
def store(ablated, monkeypatch):
    result, uri, root, data = ablated
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SPINEMRI_CACHE_DIR", str(root / "cache"))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("spinemri-ablation")
    summary = client.search_runs([experiment.experiment_id], filter_string="tags.role = 'ablation'")
    assert len(summary) == 1
    return result, summary[0], client, experiment, data


def _csv(run_id: str, path: str, **kwargs) -> pd.DataFrame:
    return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path), **kwargs)


def test_ablation_logs_every_step_with_intervals_and_paired_differences(store):
    result, summary, client, _, _ = store
    metrics = summary.data.metrics
    assert "| + ensemble (2 seeds) |" in result.output and "Weight-aware prior" in result.output
    for previous, step in zip((None, *STEPS), STEPS):
        value = metrics[f"{step}_rsna_score"]
        assert metrics[f"{step}_rsna_score_ci_low"] <= value <= metrics[f"{step}_rsna_score_ci_high"]
        assert math.isclose(metrics[f"{step}_ratio_to_prior"], value / metrics["prior_rsna_score"], rel_tol=1e-9)
        if step != "current":
            difference = metrics[f"{step}_vs_current"]
            assert math.isclose(difference, value - metrics["current_rsna_score"], abs_tol=1e-9)
            assert metrics[f"{step}_vs_current_ci_low"] <= difference <= metrics[f"{step}_vs_current_ci_high"]
            step_gain = metrics[f"{step}_vs_previous"]
            assert math.isclose(step_gain, value - metrics[f"{previous}_rsna_score"], abs_tol=1e-9)
            assert metrics[f"{step}_vs_previous_ci_low"] <= step_gain <= metrics[f"{step}_vs_previous_ci_high"]
    table = _csv(summary.info.run_id, "ablation/table.csv")
    assert list(table["step"]) == list(STEPS) and (table["studies"] == metrics["n_studies"]).all()
    artifacts = {a.path for a in client.list_artifacts(summary.info.run_id, "plots")}
    assert "plots/ablation.png" in artifacts


def test_every_training_shares_one_fold_table_and_never_sees_its_held_out_fold(store):
    _, summary, client, experiment, _ = store
    folds = _csv(summary.info.run_id, "data/folds.csv", dtype={"study_id": str})
    fold_of = dict(zip(folds["study_id"], folds["fold"]))
    locked = {s for s, f in fold_of.items() if f < 0}
    assert locked and set(folds["fold"]) == {-1, 0, 1}
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary.info.run_id}'")
    # three localizer cross-validations and four classifier ones (current, stack, jitter, its second seed)
    assert sorted(r.data.tags.get("localize.series", "classifier") for r in children) == \
        ["axial_t2", "classifier", "classifier", "classifier", "classifier", "sagittal_t1", "sagittal_t2"]
    for cv in children:
        theirs = _csv(cv.info.run_id, "data/folds.csv", dtype={"study_id": str})
        assert dict(zip(theirs["study_id"], theirs["fold"])) == fold_of
        fold_runs = client.search_runs([experiment.experiment_id],
                                       filter_string=f"tags.mlflow.parentRunId = '{cv.info.run_id}'")
        assert sorted(r.data.tags["fold"] for r in fold_runs) == ["0", "1"]
        for run in fold_runs:
            k = int(run.data.tags["fold"])
            split = _csv(run.info.run_id, "data/splits.csv", dtype={"study_id": str})
            trained = set(split.loc[split["split"] == "train", "study_id"])
            held = set(split.loc[split["split"] == "val", "study_id"])
            assert held and all(fold_of[s] == k for s in held)
            assert trained and all(fold_of[s] not in (k, -1) for s in trained)


def test_every_cv_study_is_graded_once_per_step_and_no_locked_study_ever(store):
    _, summary, _, _, _ = store
    folds = _csv(summary.info.run_id, "data/folds.csv", dtype={"study_id": str})
    cv = set(folds.loc[folds["fold"] >= 0, "study_id"])
    for step in (*STEPS, "ensemble_uncalibrated", "jitter_seed1"):
        submission = _csv(summary.info.run_id, f"ablation/{step}_submission.csv")
        studies = submission["row_id"].str.split("_", n=1).str[0]
        assert set(studies) == cv and len(submission) == 25 * len(cv) and submission["row_id"].is_unique
        # each study graded by the models of the fold that held it out
        assert (submission["fold"] == studies.map(dict(zip(folds["study_id"], folds["fold"])))).all()
        probs = submission[["normal_mild", "moderate", "severe"]].to_numpy()
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_ensemble_step_is_the_mean_of_its_members_before_calibration(store):
    _, summary, _, _, _ = store
    columns = ["normal_mild", "moderate", "severe"]
    members = [_csv(summary.info.run_id, f"ablation/{k}_submission.csv") for k in ("jitter", "jitter_seed1")]
    mean = _csv(summary.info.run_id, "ablation/ensemble_uncalibrated_submission.csv")
    assert not np.allclose(members[0][columns], members[1][columns])  # two seeds, two models
    assert np.abs(mean[columns].to_numpy() - (members[0][columns].to_numpy() + members[1][columns].to_numpy()) / 2
                  ).max() < 2e-6
    calibrated = _csv(summary.info.run_id, "ablation/ensemble_submission.csv")
    prior_rows = (mean["source"] == "prior").to_numpy()
    assert np.allclose(calibrated[columns].to_numpy()[prior_rows], mean[columns].to_numpy()[prior_rows])


def test_jitter_step_reads_the_localizers_out_of_fold_errors(store):
    _, summary, client, experiment, _ = store
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary.info.run_id}'")
    localizers = {r.data.tags["localize.series"]: r for r in children if "localize.series" in r.data.tags}
    jittered = [r for r in children if "site_jitter.source" in r.data.params
                and r.data.params["site_jitter.source"] != "config"]
    assert len(jittered) == 2  # the jitter step and its second seed
    for run in jittered:
        for series, loc in localizers.items():
            assert loc.info.run_id[:8] in run.data.params["site_jitter.source"]
            error = loc.data.metrics[f"cv_{series}_point_error_mm"]
            assert float(run.data.params[f"site_jitter.{series}_sigma_mm"]) == pytest.approx(
                error / math.sqrt(math.pi / 2), abs=1e-4)
            exact = loc.data.metrics[f"cv_{series}_slice_exact"]
            assert float(run.data.params[f"site_jitter.{series}_slice_move"]) == pytest.approx(1 - exact, abs=1e-4)


def test_localizer_cross_validation_from_the_command_line(store, tmp_path):
    """`train --task localize --folds 2`: a parent run with OOF point errors (every held-out study once, with
    its fold) and a CI, and one unregistered model per fold."""
    _, _, client, _, data = store
    result = CliRunner().invoke(cli, ["train", "--experiment", "ablation_localize", "--data-dir", str(data),
                                      "--series", "axial_t2", "--folds", "2", "--epochs", "1",
                                      "--set", "localize.img_size=32", "--set", "data.workers=1",
                                      "--set", "mlflow.experiment=localizer-cv"])
    assert result.exit_code == 0, result.output
    experiment = client.get_experiment_by_name("localizer-cv")
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.role = 'cv'")[0]
    metrics = parent.data.metrics
    assert metrics["cv_axial_t2_point_error_mm_ci_low"] <= metrics["cv_axial_t2_point_error_mm"] \
        <= metrics["cv_axial_t2_point_error_mm_ci_high"]
    oof = _csv(parent.info.run_id, "localize/oof_errors.csv", dtype={"study_id": str})
    folds = _csv(parent.info.run_id, "data/folds.csv", dtype={"study_id": str})
    assert (oof.groupby("study_id")["fold"].nunique() == 1).all()
    assert set(oof["study_id"]) <= set(folds.loc[folds["fold"] >= 0, "study_id"])
    assert (oof["fold"] == oof["study_id"].map(dict(zip(folds["study_id"], folds["fold"])))).all()
    models = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/cv/fold_models.json")["folds"]
    assert len(models) == 2 and not client.search_registered_models()


def test_ablation_refuses_settings_it_cannot_run_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    flat = tmp_path / "flat.csv"
    flat.write_text("path,condition,level,severity\n")
    for args, message in ((["--folds", "0"], "split.folds must be >= 2"),
                          (["--slices", "4"], "odd number of slices >= 3"),
                          (["--set", "preprocess.mode=slice"], "preprocess.mode must be roi"),
                          (["--set", "preprocess.slices=5", "--set", "model.slice_pooling=attention",
                            "--arch", "vgg16", "--img-size", "16"], "below the minimum of 32 px for vgg16"),
                          (["--data-dir", str(flat)], "not an RSNA-layout folder with train.csv"),
                          (["--localizer-set", "train.epochs=abc"], "the localizers' settings (--localizer-experiment "
                                                                   "ablation_localize --localizer-set train.epochs=abc)")):
        result = CliRunner().invoke(cli, ["ablation", *args])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
    if (tmp_path / "mlflow.db").exists():
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_calibration_at_predicted_sites_never_fits_a_study_on_itself():
    """Changing the labels of one half of a fold's studies changes only the other half's calibrated rows."""
    rng = np.random.default_rng(0)
    studies = [f"{s}" for s in range(100, 140)]
    conditions = ["spinal_canal_stenosis", "left_neural_foraminal_narrowing"]
    rows = pd.DataFrame([(f"{s}_{c}_l{lv}_l{lv + 1}", s, c, lv % 2) for s in studies for c in conditions
                         for lv in range(1, 5)], columns=["row_id", "study_id", "condition", "fold"])
    rows["fold"] = (rows["study_id"].astype(int) % 2).to_numpy()
    rows["target"] = rng.integers(0, 3, len(rows))
    logits = rng.normal(size=(len(rows), 3)) * 3
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    source = np.where(np.arange(len(rows)) % 7 == 0, "prior", "model")  # rows the prior graded stay as they are
    submission = pd.DataFrame({"row_id": rows["row_id"], "normal_mild": p[:, 0], "moderate": p[:, 1], "severe": p[:, 2],
                               "source": source})
    before = cross_fitted(submission, rows, severity_weights=True)
    columns = ["normal_mild", "moderate", "severe"]
    assert np.array_equal(before[columns].to_numpy()[source == "prior"], p[source == "prior"])
    assert not np.allclose(before[columns].to_numpy()[source == "model"], p[source == "model"])
    fold0 = sorted(rows.loc[rows["fold"] == 0, "study_id"].unique())
    first_half = rows["study_id"].isin(fold0[::2]).to_numpy()
    changed = rows.assign(target=np.where(first_half, 2 - rows["target"], rows["target"]))
    after = cross_fitted(submission, changed, severity_weights=True)
    assert np.allclose(before[columns].to_numpy()[first_half], after[columns].to_numpy()[first_half])
    other = ((rows["fold"] == 0) & ~rows["study_id"].isin(fold0[::2])).to_numpy()
    assert not np.allclose(before[columns].to_numpy()[other], after[columns].to_numpy()[other])
    assert np.allclose(before[columns].to_numpy()[(rows["fold"] == 1).to_numpy()],
                       after[columns].to_numpy()[(rows["fold"] == 1).to_numpy()])
