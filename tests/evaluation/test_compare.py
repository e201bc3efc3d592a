"""`spinemri compare` on two small backbones: trains them under one protocol and builds the table."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from spinemri.tracking import lineage
from spinemri.tracking.links import compare_runs_url
from spinemri.cli import main as cli
from spinemri.data.schema import SEVERITIES, condition_key
from spinemri.data.splits import split_studies
from spinemri.metrics import operating
from spinemri.serving.inputs import file_row
from spinemri.serving.classifier import load_classifier
from tests.conftest import copy_store, isolated_tracking


def test_compare_trains_two_backbones_and_logs_the_table(phantom_dir, tracking, tmp_path):
    settings = ["--set", "compare.archs=tiny,vgg16", "--set", f"data.data_dir={phantom_dir}",
                "--set", "preprocess.img_size=32", "--set", "train.epochs=1", "--set", "train.batch_size=32",
                "--set", "mlflow.register=false"]
    result = CliRunner().invoke(cli, ["compare", "--experiment", "seed_table_quick", "--train", *settings])
    assert result.exit_code == 0, result.output
    table_text = result.output[result.output.index("| architecture | condition accuracy [95% CI]"):]
    rows = [line for line in table_text.splitlines()[2:] if line.startswith("| ")]
    assert {line.split(" | ")[0].strip("| ") for line in rows} == {"tiny", "vgg16", "*floor: the per-site prior*"}
    # every backbone's verdict against its floor, and the floor's row with the champion metric's value
    assert "test_severity_weighted_log_loss" in rows[0] or "test_severity_weighted_log_loss" in table_text
    assert result.output.count("than the per-site prior") + result.output.count("from the per-site prior") >= 2
    assert any(line.startswith("tiny: ") and "per-site prior" in line for line in result.output.splitlines())

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("spinemri-seed-table-quick")
    summary = client.search_runs([experiment.experiment_id], filter_string="tags.role = 'summary'")
    assert len(summary) == 1
    folder = mlflow.artifacts.download_artifacts(run_id=summary[0].info.run_id, artifact_path="compare",
                                                 dst_path=str(tmp_path))
    table = pd.read_csv(f"{folder}/table.csv")
    assert sorted(table["arch"]) == ["tiny", "vgg16"]
    assert (table["epochs"] == 1).all() and (table["batch_size"] == 32).all() and (table["img_size"] == 32).all()
    assert (table["params"] > 0).all() and (table["inference_ms_per_image"] > 0).all()
    assert table["accuracy"].between(0, 1).all() and table["final_loss"].notna().all()
    assert table["majority_accuracy"].nunique() == 1 and table["majority_accuracy"].between(0, 1).all()
    # the floor: one per held-out set, its condition accuracy the majority class's, its value of the champion metric
    assert (table["floor_accuracy"] == table["majority_accuracy"]).all() and table["floor_value"].nunique() == 1
    assert table["verdict"].isin(["better", "indistinguishable", "worse"]).all()
    floor_row = next(line for line in rows if line.startswith("| *floor"))
    assert f"{table['floor_value'].iloc[0]:.3f}" in floor_row and f"{table['floor_accuracy'].iloc[0]:.3f}" in floor_row
    for _, row in table.iterrows():
        assert f"{row['vs_floor']:+.3f} [{row['vs_floor_ci_low']:+.3f}, {row['vs_floor_ci_high']:+.3f}]" in table_text
    # The UI's compare page of the table's runs: printed and kept on the summary run.
    link = summary[0].data.tags["compare.link"]
    assert f"compare them in the MLflow UI: {link}" in result.output
    assert link == compare_runs_url("http://127.0.0.1:5000", list(table["run_id"]), [experiment.experiment_id])
    assert link in summary[0].data.tags["mlflow.note.content"]
    assert table.loc[table["arch"] == "vgg16", "params"].item() > table.loc[table["arch"] == "tiny", "params"].item()
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


@pytest.fixture(scope="module")
def cross_validated(phantom_dir, tmp_path_factory, store_template):
    """`compare --train --folds 2` of two backbones in a store of its own (one worker: xdist_group "cv")."""
    root = tmp_path_factory.mktemp("cross_validated")
    uri = copy_store(store_template, root / "mlflow.db")
    settings = ["--set", "compare.archs=tiny,vgg16", "--set", f"data.data_dir={phantom_dir}",
                "--set", "preprocess.img_size=32", "--set", "train.epochs=1", "--set", "train.batch_size=32",
                "--set", "train.site_jitter_mm=3", "--set", "train.site_jitter_slices=0.2",
                "--set", "model.calibration=temperature",
                # 1 test study cannot show the ensemble better than its floor: allowed, to have a champion
                "--set", "mlflow.allow_below_floor=true"]
    with isolated_tracking(uri, root / "cache"):
        result = CliRunner().invoke(cli, ["compare", "--experiment", "seed_table_quick", "--train", "--folds", "2",
                                          *settings])
        assert result.exit_code == 0, result.output
    yield result, uri, root / "cache"


@pytest.fixture
def cv_store(cross_validated, monkeypatch):
    """The cross-validations' store as this test's tracking URI and cache; returns compare's result."""
    result, uri, cache = cross_validated
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SPINEMRI_CACHE_DIR", str(cache))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(uri)
    return result


@pytest.mark.xdist_group("cv")
def test_compare_folds_cross_validates_each_backbone(cv_store, tmp_path):
    """--folds 2: one CV parent per backbone with a nested run per fold; every CV study predicted once, by the
    fold that never trained on it; the locked test studies never; the table pairs each backbone with the best."""
    result = cv_store
    assert "CV study score [95% CI]" in result.output and "*floor: the per-site prior*" in result.output
    assert "vs floor [95% CI], paired" in result.output

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("spinemri-seed-table-quick")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.role = 'cv'")
    assert sorted(r.data.tags["arch"] for r in parents) == ["tiny", "vgg16"]
    summary = client.search_runs([experiment.experiment_id], filter_string="tags.role = 'summary'")[0]
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=summary.info.run_id,
                                                            artifact_path="compare/table.csv"))
    assert table["rsna_score"].is_monotonic_increasing and table["vs_best"].iloc[0] == 0
    other = table.iloc[1]
    assert other["vs_best_ci_low"] <= other["vs_best"] <= other["vs_best_ci_high"]
    assert other["vs_best"] == pytest.approx(other["rsna_score"] - table["rsna_score"].iloc[0])

    parent = next(r for r in parents if r.data.tags["arch"] == "tiny")
    m = parent.data.metrics
    assert m["cv_rsna_score_ci_low"] <= m["cv_rsna_score"] <= m["cv_rsna_score_ci_high"]
    score = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/evaluation/cv_rsna_score_table.json")
    terms = {row[0]: dict(zip(score["columns"], row)) for row in score["data"]}
    for term in ("spinal", "foraminal", "subarticular", "any_severe_spinal"):
        assert m[f"cv_rsna_{term}"] == pytest.approx(terms[term]["value"], abs=1e-9)  # JSON keeps 10 digits
        assert terms[term]["ci_low"] <= terms[term]["value"] <= terms[term]["ci_high"]
    assert terms["score"]["prior"] == table.loc[table["arch"] == "tiny", "prior_rsna_score"].iloc[0]
    assert {"cv_severity_ece", "cv_severity_ece_uncalibrated", "cv_severity_weighted_log_loss_ci_low"} <= set(m)
    # the verdict against the per-site prior of each fold's training folds, on the same OOF rows
    assert m["cv_vs_floor_ci_low"] <= m["cv_vs_floor"] <= m["cv_vs_floor_ci_high"]
    assert m["cv_vs_floor"] == pytest.approx(m["cv_severity_weighted_log_loss"]
                                             - m["cv_floor_severity_weighted_log_loss"])
    assert parent.data.tags["mlflow.note.content"].startswith(parent.data.tags["verdict_sentence"])
    assert "cv_severity_weighted_log_loss" in parent.data.tags["verdict_sentence"]
    assert len([k for k in m if not k.startswith(("system/", "headline/"))]) <= 100
    # the parent run's page opens on the out-of-fold headline: rounded copies of the numbers it is judged by
    assert [k for k in m if k.startswith("headline/")][:1] and all(
        m[k] == round(m[k.removeprefix("headline/")], 4) for k in m if k.startswith("headline/"))
    assert {"headline/cv_severity_weighted_log_loss", "headline/cv_floor_severity_weighted_log_loss",
            "headline/cv_vs_floor"} <= set(m)
    assert {lineage.logged_profile(parent, s)["studies"] for s in ("cv", "test")} == \
        {table["studies"].iloc[0], int((pd.read_csv(mlflow.artifacts.download_artifacts(
            run_id=parent.info.run_id, artifact_path="data/folds.csv", dst_path=str(tmp_path)))["fold"] < 0).sum())}

    def artifact(run_id, path):
        return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                               dst_path=str(tmp_path / run_id)))

    folds = artifact(parent.info.run_id, "data/folds.csv")
    expected_test = split_studies(folds.rename(columns={"worst_severity": "severity"}), (0.8, 0.1, 0.1), 0)
    assert set(folds.loc[folds["fold"] < 0, "study_id"]) == \
        set(expected_test.loc[expected_test["split"] == "test", "study_id"])  # a single split's test studies
    folds = folds.astype({"study_id": str})
    oof = artifact(parent.info.run_id, "evaluation/oof_predictions.csv").astype({"study_id": str})
    cv_studies = set(folds.loc[folds["fold"] >= 0, "study_id"])
    assert set(oof["study_id"]) == cv_studies  # every CV study, no test study
    assert not oof.duplicated(["study_id", "series_id", "instance_number", "condition", "level"]).any()
    fold_of = dict(zip(folds["study_id"], folds["fold"]))
    assert (oof["fold"] == oof["study_id"].map(fold_of)).all()
    terms = artifact(parent.info.run_id, "evaluation/cv_rsna_score.terms.csv").astype({"study_id": str})
    assert set(terms["study_id"]) <= cv_studies and len(terms) == terms["study_id"].nunique()

    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["fold"] for r in children) == ["0", "1"]
    for child in children:
        k = int(child.data.tags["fold"])
        splits = artifact(child.info.run_id, "data/splits.csv").astype({"study_id": str})
        by_split = {name: set(part["study_id"]) for name, part in splits.groupby("split")}
        assert by_split["val"] == {s for s, f in fold_of.items() if f == k}
        assert by_split["train"] == {s for s, f in fold_of.items() if f >= 0 and f != k}
        assert not by_split["train"] & by_split["val"]
        temperatures = mlflow.artifacts.load_dict(f"runs:/{child.info.run_id}/calibration/temperatures.json")
        assert ["severity", ""] in [row[:2] for row in temperatures["data"]] and child.data.tags["role"] == "fold"
        assert child.data.params["site_jitter.axial_t2_sigma_mm"] == "3.0"  # training crops moved...
        assert child.data.params["site_jitter.axial_t2_slice_move"] == "0.0"  # ...in plane only: 1-slice crops
        held = artifact(child.info.run_id, "evaluation/fold_predictions.csv").astype({"study_id": str})
        assert set(held["study_id"]) == by_split["val"]




@pytest.mark.xdist_group("cv")
def test_an_ensemble_of_fold_models_is_served_as_one_model(cv_store, phantom_dir, tmp_path):
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("spinemri-seed-table-quick")
    parents = {r.data.tags["arch"]: r.info.run_id
               for r in client.search_runs([experiment.experiment_id], filter_string="tags.role = 'cv'")}
    not_cv = CliRunner().invoke(cli, ["ensemble", "--run", parents["tiny"], "--run", "0" * 32])
    assert not_cv.exit_code == 1 and f"no run '{'0' * 32}'" in not_cv.output

    result = CliRunner().invoke(cli, ["ensemble", "--run", parents["tiny"], "--run", parents["vgg16"]])
    assert result.exit_code == 0, result.output
    run = client.search_runs([experiment.experiment_id], filter_string="tags.role = 'ensemble'")[0]
    assert run.data.params["ensemble.members"] == "4"
    assert {"test_severity_weighted_log_loss", "test_severity_ece", "test_condition_roc_auc"} <= set(run.data.metrics)
    version = client.get_model_version_by_alias("spinemri", "champion")  # the first version of the name
    assert version.run_id == run.info.run_id and version.tags["arch"] == "ensemble"
    # The locked test split of the cross-validations is the ensemble's held-out set.
    folds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parents["tiny"], artifact_path="data/folds.csv",
                                                            dst_path=str(tmp_path / "folds")))
    predictions = pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="evaluation/test_predictions.csv", dst_path=str(tmp_path / "pred")))
    assert set(predictions["study_id"]) == set(folds.loc[folds["fold"] < 0, "study_id"])

    coords = pd.read_csv(phantom_dir / "train_label_coordinates.csv").head(3)
    rows = pd.DataFrame([{**file_row(phantom_dir / "train_images" / str(c.study_id) / str(c.series_id)
                                     / f"{c.instance_number}.dcm", c.x, c.y), "condition": c.condition}
                         for c in coords.itertuples()])
    model_uri = f"models:/spinemri/{version.version}"
    served = mlflow.pyfunc.load_model(model_uri).predict(rows)
    members = load_classifier(model_uri).meta["members"]
    assert len(members) == 4 and {m["arch"] for m in members} == {"tiny", "vgg16"}
    outputs = [load_classifier(f"runs:/{m['run_id']}/model").predict(None, rows) for m in members]
    columns = [c for c in served.columns if ":" in c]
    expected = np.mean([o[columns].to_numpy(np.float64) for o in outputs], axis=0)
    np.testing.assert_allclose(served[columns].to_numpy(np.float64), expected, atol=1e-6)
    assert all(m["temperature"] for m in members)  # each member calibrated on its own held-out fold

    # Its referral thresholds: chosen on the runs' out-of-fold rows, averaged over the runs, never on test.
    points = load_classifier(model_uri).meta["operating_points"]
    assert mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/clinical/operating_points.json")["fitted_on"] == \
        "out-of-fold"
    keys = ["study_id", "series_id", "instance_number", "condition", "level"]
    oof = [pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parents[arch], artifact_path=
                                                           "evaluation/oof_predictions.csv",
                                                           dst_path=str(tmp_path / arch))).fillna("-")
           for arch in ("tiny", "vgg16")]
    both = oof[0].merge(oof[1], on=keys, suffixes=("", "_b"), validate="one_to_one")
    assert len(both) == len(oof[0]) == len(oof[1])
    spinal = both[(both["condition"] == "spinal_canal_stenosis") & (both["severity:target"] >= 1)]
    scores = np.mean([spinal[f"severity:Moderate{s}"] + spinal[f"severity:Severe{s}"] for s in ("", "_b")], axis=0)
    fitted, _ = operating.fit_threshold(pd.DataFrame({"event": True, "score": scores}), 0.9)  # the rule: test_operating
    assert points["spinal_canal_stenosis"]["threshold"] == pytest.approx(fitted)
    named = [condition_key(c) for c in rows["condition"]]  # train_label_coordinates.csv's names, as served
    assert served["refer"].tolist() == operating.refer(
        points, named, served[[f"severity:{c}" for c in SEVERITIES]].to_numpy()).tolist()


def test_folds_are_refused_where_they_do_not_apply(tracking):
    bad = CliRunner().invoke(cli, ["train", "--folds", "1", "--arch", "tiny"])
    assert bad.exit_code != 0 and "split.folds must be 0 (one split) or a whole number >= 2" in bad.output
    tune = CliRunner().invoke(cli, ["train", "--folds", "2", "--trials", "2", "--arch", "tiny"])
    assert tune.exit_code != 0 and "tuning with cross-validation is not available" in tune.output
