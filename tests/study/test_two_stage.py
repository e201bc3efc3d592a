"""The two-stage pipeline on a phantom: localizers learn, predict-study writes the competition file,
evaluate-study beats the prior baseline, the packaged study model is served over HTTP."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
import io
import json
from pathlib import Path
import shutil
import zipfile

from click.testing import CliRunner
import mlflow
from mlflow.tracking import MlflowClient
import numpy as np
import pandas as pd
import pytest

from spinemri.cli import main
from spinemri.data.dicom import series_order
from spinemri.data.preprocess import stack_neighbours
from spinemri.data.schema import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, SEVERITIES, parse_label_column
from spinemri.data.studies import find_studies
from spinemri.errors import ConfigError
from spinemri.metrics import operating
from spinemri.metrics.competition import PROBABILITY_COLUMNS
from spinemri.serving.classifier import load_classifier
from spinemri.serving.localizer import load_localizer
from spinemri.tracking.reports import prior_site_score
from tests import hostile

pytestmark = pytest.mark.xdist_group("study")


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def _valid(submission: pd.DataFrame, studies) -> None:
    assert len(submission) == 25 * len(studies)
    assert set(submission["row_id"].str.split("_", n=1).str[0]) == {str(s) for s in studies}
    assert submission.groupby(submission["row_id"].str.split("_", n=1).str[0]).size().eq(25).all()
    probs = submission[list(PROBABILITY_COLUMNS)].to_numpy(float)
    assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_localizer_error_shrinks_with_training_and_beats_the_mean_position(study_store):
    client = MlflowClient()
    descriptions = pd.read_csv(study_store.data_dir / "train_series_descriptions.csv")
    series_per_study = {name: descriptions[descriptions["series_description"] == description].groupby("study_id").size()
                        for name, description in (("sagittal_t2", SAGITTAL_T2), ("sagittal_t1", SAGITTAL_T1),
                                                  ("axial_t2", AXIAL_T2))}
    for series, result in study_store.localizers.items():
        steps = [m.value for m in sorted(client.get_metric_history(result.run_id, "val_point_error_mm"),
                                         key=lambda m: m.step)]
        assert steps[0] == pytest.approx(result.metrics["val_point_error_mm_untrained"])
        assert min(steps[1:]) < 0.5 * steps[0], (series, steps)  # error at least halves with training
        m = result.metrics
        assert m[f"test_{series}_point_error_mm"] < m[f"test_{series}_baseline_point_error_mm"], (series, m)
        assert 0 <= m[f"test_{series}_within_5mm"] <= m[f"test_{series}_within_10mm"] <= 1
        # Slice accuracy. Every study's series of the type form one stack, so levels split over two
        # axial series are placed right (they were not while a slice's position input was its place
        # in its own series). A site found on the study's other axial series (two series split by
        # side) cannot be measured on the labelled one and counts as a miss; those are the only misses.
        errors = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.run_id,
                                                                 artifact_path="localize/test_errors.csv"))
        assert m[f"test_{series}_slice_accuracy"] == pytest.approx(errors["slice_ok"].mean())
        # The mean error taken apart by study, for paired champion decisions between localizers.
        terms = pd.read_csv(mlflow.artifacts.download_artifacts(
            run_id=result.run_id, artifact_path=f"evaluation/test_{series}_point_error_mm.terms.csv"))
        assert set(terms["study_id"]) == set(errors["study_id"])
        assert terms["point_error_mm:sum"].sum() / terms["point_error_mm:weight"].sum() == \
            pytest.approx(m[f"test_{series}_point_error_mm"])
        measured = errors[errors["error_mm"].notna()]
        assert len(measured) >= 0.8 * len(errors) and measured["slice_ok"].mean() >= 0.9, (series, errors)
        several = measured[measured["study_id"].map(series_per_study[series]) > 1]  # two axial series
        assert several.empty or several["slice_ok"].mean() >= 0.9, (series, several)
        run = client.get_run(result.run_id)
        assert run.data.tags["localize.series"] == series and run.data.tags["task"] == "localize"
        assert result.registered.alias == series  # the first version of each series type
        artifacts = {a.path for a in client.list_artifacts(result.run_id, "plots")}
        assert {"plots/localizer_curves.png", "plots/test_sites.png"} <= artifacts


def test_a_logged_localizer_finds_sites_on_base64_slices(study_store):
    localizer = load_localizer("models:/spinemri-localizer@sagittal_t2")
    study = find_studies(study_store.data_dir)[0]
    series = next(s for s in study.series if s.description == "Sagittal T2/STIR")
    rows = pd.DataFrame({"dicom_b64": [base64.b64encode(p.read_bytes()).decode() for p in reversed(series.files)]})
    model = mlflow.pyfunc.load_model("models:/spinemri-localizer@sagittal_t2")
    sites = model.predict(rows)
    assert list(sites["level"]) == ["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"]
    assert sites["instance_number"].nunique() == 1  # the mid-sagittal slice
    assert localizer.task.name == "sagittal_t2"


def _held_out(study_store, tmp_path):
    out = tmp_path / "submission.csv"
    result = _cli("predict-study", "--data", study_store.data_dir, "--split", "test", "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_predict_study_writes_25_rows_per_held_out_study(study_store, tmp_path):
    out, output = _held_out(study_store, tmp_path)
    submission = pd.read_csv(out, dtype={"row_id": str})
    splits = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=study_store.classifier.run_id,
                                                             artifact_path="data/splits.csv"))
    held_out = splits.loc[splits["split"] == "test", "study_id"]
    _valid(submission, held_out)
    sites = pd.read_csv(out.with_name("submission.sites.csv"), dtype={"row_id": str})
    assert (sites["source"] == "model").all(), output  # every held-out study has its three series
    assert "0 row(s) from the prior" in output
    # Each finding's referral is the classifier's threshold applied to its written probabilities.
    points = load_classifier("models:/spinemri@champion").meta["operating_points"]
    conditions = [parse_label_column(r.split("_", 1)[1])[0] for r in submission["row_id"]]
    expected = operating.refer(points, conditions, submission[list(PROBABILITY_COLUMNS)].to_numpy(float))
    assert sites["refer"].tolist() == expected.tolist()
    assert f"{int(expected.sum())} of {len(submission)} finding(s) referred at the classifier's thresholds" in output


def test_a_study_missing_a_series_or_with_two_axials_still_gets_25_rows(study_store, tmp_path):
    data = tmp_path / "studies"
    images = study_store.data_dir / "train_images"
    series = pd.read_csv(study_store.data_dir / "train_series_descriptions.csv")
    two_axial = series[series["series_description"] == AXIAL_T2].groupby("study_id").size()
    two_axial = int(two_axial[two_axial == 2].index[0])
    other = next(int(s) for s in sorted(series["study_id"].unique()) if s != two_axial)
    for study in (two_axial, other):
        shutil.copytree(images / str(study), data / "train_images" / str(study))
    series[series["study_id"].isin([two_axial, other])].to_csv(data / "train_series_descriptions.csv", index=False)
    t1 = series[(series["study_id"] == other) & (series["series_description"] == SAGITTAL_T1)]["series_id"].iloc[0]
    shutil.rmtree(data / "train_images" / str(other) / str(t1))
    # One file of one of the two axial series cut short: that series is dropped when the localizer
    # reads it, and the study's other axial series gives the subarticular sites.
    axials = sorted(series[(series["study_id"] == two_axial) & (series["series_description"] == AXIAL_T2)]["series_id"])
    broken = sorted((data / "train_images" / str(two_axial) / str(axials[0])).glob("*.dcm"))[1]
    broken.write_bytes(broken.read_bytes()[:-200])

    out = tmp_path / "sub.csv"
    result = _cli("predict-study", "--data", data, "--out", out)
    assert result.exit_code == 0, result.output
    submission = pd.read_csv(out, dtype={"row_id": str})
    _valid(submission, [two_axial, other])
    sites = pd.read_csv(tmp_path / "sub.sites.csv", dtype={"row_id": str}).set_index("row_id")
    foraminal = sites[sites.index.str.startswith(f"{other}_") & sites.index.str.contains("foraminal")]
    assert len(foraminal) == 10 and (foraminal["source"] == "prior").all()
    assert (foraminal["reason"] == "no Sagittal T1 series").all()
    assert "10 row(s) from the prior" in result.output
    # The foraminal rows hold the prior, which is the classifier's weight-aware training prior.
    from spinemri.metrics.prior import prior_at
    from spinemri.serving.classifier import load_classifier

    prior = load_classifier("models:/spinemri@champion").meta["severity_prior"]
    row = submission.set_index("row_id").loc[f"{other}_left_neural_foraminal_narrowing_l4_l5"]
    assert row.to_numpy(float) == pytest.approx(prior_at(prior, "left_neural_foraminal_narrowing", "L4/L5"), abs=1e-6)
    subarticular = sites[sites.index.str.startswith(f"{two_axial}_") & sites.index.str.contains("subarticular")]
    assert (subarticular["source"] == "model").all()
    assert set(subarticular["series_id"].astype(int)) == {int(axials[1])}


def test_the_classifier_learns_the_phantom(two_stage):
    # The image-level check of learnability (tiny backbone, 64 px, 20 epochs, deterministic): seen at
    # 0.89 severity and 0.96 condition macro ROC-AUC on its 8 test studies (5 slices trained on jittered
    # sites; one slice at the labelled sites: 0.99 and 0.99).
    metrics = two_stage.classifier.metrics
    assert metrics["test_severity_roc_auc"] > 0.8, metrics
    assert metrics["test_condition_roc_auc"] > 0.85, metrics
    # Stage 2 alone: the competition score at the labelled sites, below the prior's, with its interval.
    assert metrics["test_rsna_score_ci_low"] <= metrics["test_rsna_score"] <= metrics["test_rsna_score_ci_high"]
    assert metrics["test_rsna_score"] < prior_site_score(two_stage.classifier.run_id, "test"), metrics


def test_site_jitter_reads_each_localizers_held_out_error(study_store):
    from spinemri.config import load_experiment
    from spinemri.data.schema import SERIES_TYPES
    from spinemri.training.jitter import site_jitter

    config = load_experiment("quick", {"train.site_jitter_from": "models:/spinemri-localizer", "preprocess.slices": 5})
    jitter = site_jitter(config.train, config.preprocess)
    for series, description in SERIES_TYPES.items():
        run = MlflowClient().get_run(study_store.localizers[series].run_id).data.metrics
        assert jitter.sigma_mm[description] == pytest.approx(run[f"test_{series}_point_error_mm"] / np.sqrt(np.pi / 2))
        assert jitter.slice_move[description] == pytest.approx(1 - run[f"test_{series}_slice_exact"])
    assert 0 < min(jitter.sigma_mm.values()) and "spinemri-localizer" in jitter.source
    with pytest.raises(ConfigError, match="has none of the aliases sagittal_t2, sagittal_t1, axial_t2"):
        site_jitter_of(load_experiment("quick", {"train.site_jitter_from": "models:/spinemri"}))


def test_held_out_score_beats_the_prior_baseline_and_is_logged(study_store, tmp_path):
    out, _ = _held_out(study_store, tmp_path)
    result = _cli("evaluate-study", "--data", study_store.data_dir, "--submission", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["model"]["score"] < report["prior_baseline"]["score"], report
    run = MlflowClient().get_run(report["run_id"])
    # The names every run uses; the prior is the score table's baseline, not a metric.
    metrics = run.data.metrics
    assert metrics["test_rsna_score"] == pytest.approx(report["model"]["score"])
    assert metrics["test_rsna_score_ci_low"] <= metrics["test_rsna_score"] <= metrics["test_rsna_score_ci_high"]
    assert metrics["test_rsna_spinal"] == pytest.approx(report["model"]["spinal"])
    assert prior_site_score(run.info.run_id, "test") == pytest.approx(report["prior_baseline"]["score"])
    assert metrics["test_rows_from_prior"] == 0 and "prior_rsna_score" not in metrics


def test_evaluate_study_on_labels_of_the_submitted_studies_only(study_store, tmp_path):
    out, _ = _held_out(study_store, tmp_path)
    studies = set(pd.read_csv(out, dtype={"row_id": str})["row_id"].str.split("_", n=1).str[0])
    labels = pd.read_csv(study_store.data_dir / "train.csv", dtype={"study_id": str})
    own = tmp_path / "own"
    own.mkdir()
    labels[labels["study_id"].isin(studies)].to_csv(own / "train.csv", index=False)  # a user's validation labels

    result = _cli("evaluate-study", "--data", own, "--submission", out, "--no-log", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert "the classifier's training labels (models:/spinemri@champion)" in report["prior_source"]
    classifier = mlflow.pyfunc.load_model("models:/spinemri@champion").unwrap_python_model()
    assert report["prior"] == classifier.meta["severity_prior"]

    refused = _cli("evaluate-study", "--data", own, "--submission", out, "--no-log", "--classifier", "")
    assert refused.exit_code == 1 and "--prior-labels FILE" in refused.output and "Traceback" not in refused.output

    others = tmp_path / "others.csv"
    labels[~labels["study_id"].isin(studies)].to_csv(others, index=False)
    given = _cli("evaluate-study", "--data", own, "--submission", out, "--no-log", "--json", "--prior-labels", others)
    assert given.exit_code == 0, given.output
    report = json.loads(given.output[given.output.index("{"):])
    assert report["prior_studies"] == len(labels) - len(studies) and "--prior-labels" in report["prior_source"]


def test_predict_study_refuses_localizers_that_trained_on_the_held_out_studies(study_store, tmp_path):
    from spinemri.api.localizer import train_localizer
    from spinemri.config import load_experiment
    from tests.study.conftest import LOCALIZER

    config = load_experiment("localize", {**LOCALIZER, "train.epochs": 1, "data_dir": str(study_store.data_dir),
                                          "series": "axial_t2", "split.seed": 7, "mlflow.register": False})
    leaky = train_localizer(config)
    result = _cli("predict-study", "--data", study_store.data_dir, "--split", "test", "--out", tmp_path / "x.csv",
                  "--localizer", leaky.model_uri, "--localizer", "models:/spinemri-localizer@sagittal_t2")
    assert result.exit_code == 1
    assert "trained on" in result.output and "same split.seed" in result.output
    assert not (tmp_path / "x.csv").exists()


def test_predict_study_errors_name_the_problem(study_store, tmp_path):
    result = _cli("predict-study", "--data", study_store.data_dir, "--study", "123", "--out", tmp_path / "x.csv")
    assert result.exit_code == 1 and "no study folder 123" in result.output
    result = _cli("predict-study", "--data", study_store.data_dir, "--out", tmp_path / "x.csv",
                  "--localizer", "models:/spinemri@champion")
    assert result.exit_code == 1 and "not a spinemri localizer" in result.output
    result = _cli("predict-study", "--data", study_store.data_dir, "--out", tmp_path / "x.csv",
                  "--localizer", "models:/no-such-model")
    assert result.exit_code == 1 and "cannot load localizer 'models:/no-such-model'" in result.output
    result = _cli("predict-study", "--data", study_store.data_dir, "--out", tmp_path / "x.csv",
                  "--localizer", "models:/spinemri")
    assert result.exit_code == 1 and "registered model spinemri has no alias sagittal_t2" in result.output
    assert not (tmp_path / "x.csv").exists()


def zip_study(folder: Path, top: str | None = None) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*.dcm")):
            name = path.relative_to(folder.parent if top is None else folder).as_posix()
            archive.write(path, name if top is None else f"{top}/{name}")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_five_slice_request_to_the_served_classifier_matches_predict_study(study_store, tmp_path):
    """The classifier is a 5-slice stack: a request with the site's slice and its 4 neighbours, sent to
    `mlflow models serve`, gets the probabilities predict-study gave that site."""
    from tests.serving.server import post, serve_model

    out, _ = _held_out(study_store, tmp_path)
    sites = pd.read_csv(out.with_name("submission.sites.csv"), dtype={"row_id": str})
    submission = pd.read_csv(out, dtype={"row_id": str}).set_index("row_id")
    chosen = sites[sites["source"] == "model"].drop_duplicates("series_id").head(4)  # sagittal T2, T1, axial
    rows = []
    for site in chosen.itertuples():
        study, column = site.row_id.split("_", 1)
        folder = study_store.data_dir / "train_images" / study / str(int(site.series_id))
        order = [p for _, p, _ in series_order(sorted(folder.glob("*.dcm")))]
        i = order.index(str(folder / f"{int(site.instance_number)}.dcm"))
        encoded = [base64.b64encode(Path(order[j]).read_bytes()).decode() for j in stack_neighbours(i, len(order), 5)]
        rows.append({"dicom_b64": base64.b64encode(Path(order[i]).read_bytes()).decode(), "neighbors_b64": encoded,
                     "x": site.x, "y": site.y, "condition": parse_label_column(column)[0]})
    uri = f"runs:/{study_store.classifier.run_id}/model"
    assert load_classifier(uri).preprocessing.slices == 5
    with serve_model(uri, study_store.tracking_uri, tmp_path / "serve.log") as (url, _):
        status, body = post(url, {"dataframe_records": rows})
    assert status == 200, body
    served = pd.DataFrame(body["predictions"])[[f"severity:{c}" for c in SEVERITIES]].to_numpy(float)
    expected = submission.loc[chosen["row_id"], list(PROBABILITY_COLUMNS)].to_numpy(float)
    # The request's x/y come from the sites table, rounded to 6 decimals: a crop at the rounded point can move
    # a pixel across a uint8 step, which a trained model turns into up to ~1e-5 of probability.
    np.testing.assert_allclose(served, expected, atol=5e-5)


def test_packaged_study_model_matches_predict_study(study_store, study_model, tmp_path):
    assert "spinemri-study version 1 -> champion" in study_model
    out, _ = _held_out(study_store, tmp_path)
    model = mlflow.pyfunc.load_model("models:/spinemri-study@champion")
    expected = pd.read_csv(out, dtype={"row_id": str}).set_index("row_id")
    study = expected.index[0].split("_", 1)[0]
    rows = model.predict(pd.DataFrame({"study_zip_b64": [zip_study(study_store.data_dir / "train_images" / study)]}))
    assert len(rows) == 25 and set(rows["source"]) == {"model"}
    got = rows.set_index("row_id")[list(PROBABILITY_COLUMNS)]
    assert np.allclose(got.to_numpy(float), expected.loc[got.index].to_numpy(float), atol=1e-5)
    sites = pd.read_csv(out.with_name("submission.sites.csv"), dtype={"row_id": str}).set_index("row_id")
    assert rows["refer"].tolist() == sites.loc[rows["row_id"], "refer"].tolist()

    # The classifier's thresholds judged on the held-out studies as the study model flags them: the logged
    # any-level sensitivity is the threshold applied to predict-study's probabilities against train.csv.
    version = MlflowClient().get_model_version_by_alias("spinemri-study", "champion")
    run = MlflowClient().get_run(version.run_id)
    carried = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/clinical/operating_points.json")
    assert carried["fitted_on"] == "classifier's val"
    assert carried["points"] == load_classifier("models:/spinemri@champion").meta["operating_points"]
    labels = pd.read_csv(study_store.data_dir / "train.csv", dtype={"study_id": str}).set_index("study_id")
    cells = [(rid.split("_", 1)[0], *parse_label_column(rid.split("_", 1)[1]), rid) for rid in expected.index]
    levels = pd.DataFrame({"study_id": [c[0] for c in cells], "level": [c[2] for c in cells],
                           "grade": [labels.loc[c[0], c[3].split("_", 1)[1]] for c in cells],
                           "score": expected["moderate"] + expected["severe"]})
    levels = levels[levels["grade"].notna()].groupby(["study_id", "level"]).agg(
        event=("grade", lambda g: g.isin(["Moderate", "Severe"]).any()), score=("score", "max"))
    flagged = levels["score"] >= carried["points"]["any_moderate_or_severe"]["threshold"]
    assert run.data.metrics["test_refer_any_sensitivity"] == pytest.approx(flagged[levels["event"]].mean())
    card = mlflow.artifacts.load_text(f"runs:/{version.run_id}/card/spinemri-study-v{version.version}.md")
    assert "## Referral operating points" in card and "`classifier's val` rows" in card
    version = MlflowClient().get_model_version_by_alias("spinemri-study", "champion")
    assert float(version.tags["metric_value"]) == pytest.approx(
        MlflowClient().get_run(version.run_id).data.metrics["test_rsna_score"])
    terms = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=version.run_id,
                                                            artifact_path="evaluation/test_rsna_score.terms.csv"))
    parts = [terms[f"{t}:sum"].sum() / terms[f"{t}:weight"].sum()
             for t in ("spinal", "foraminal", "subarticular", "any_severe_spinal")]
    assert np.mean(parts) == pytest.approx(float(version.tags["metric_value"]))


def test_the_study_model_is_served_over_http(study_store, study_model, tmp_path):
    from tests.serving.server import PeakRss, post, serve_model

    study = sorted(p.name for p in (study_store.data_dir / "train_images").iterdir())[0]
    with serve_model("models:/spinemri-study@champion", study_store.tracking_uri, tmp_path / "serve.log") as (url,
                                                                                                          process):
        payload = {"dataframe_records": [{"study_zip_b64": zip_study(study_store.data_dir / "train_images" / study,
                                                                     top="anything"), "study_id": study}]}
        status, body = post(url, payload)
        assert status == 200, body
        rows = pd.DataFrame(body["predictions"])
        _valid(rows, [study])
        assert rows["refer"].map(type).eq(bool).all(), rows["refer"]  # JSON true / false per finding
        status, body = post(url, {"dataframe_records": [{"study_zip_b64": base64.b64encode(b"not a zip").decode()}]})
        assert status == 400 and "row 0: study_zip_b64 is not a zip archive" in body["message"]
        status, body = post(url, {"dataframe_records": [{"study_id": "1"}]})
        assert status == 400 and "study_zip_b64" in body["message"]

        # Bombs, several of each kind at once: refused from their declared sizes, in bounded memory.
        bombs = {"zeros": (base64.b64encode(hostile.zip_of_zeros([1 << 30])).decode(), "SPINEMRI_MAX_STUDY_FILE_MB"),
                 "dicom": (base64.b64encode(hostile.zip_of({"s/1/1.dcm": hostile.deflated_dicom(23170, 23170)})
                                            ).decode(), "SPINEMRI_MAX_IMAGE_MB")}
        kinds = [kind for kind in bombs for _ in range(3)]
        with PeakRss(process.pid) as rss, ThreadPoolExecutor(len(kinds)) as pool:
            answers = list(pool.map(lambda k: post(url, {"dataframe_records": [{"study_zip_b64": bombs[k][0]}]},
                                                   timeout=120), kinds))
        for kind, (status, body) in zip(kinds, answers):
            assert status == 400 and bombs[kind][1] in body["message"], (kind, body)
        growth = (rss.peak - rss.idle) / (1 << 30)
        print(f"{len(kinds)} study bombs at once: +{growth:.2f} GB over {rss.idle / (1 << 20):.0f} MB idle")
        assert growth < 1.5
        status, body = post(url, payload)
        assert status == 200 and process.poll() is None, body


def test_mlflow_run_trains_a_localizer(study_store, tmp_path):
    from tests.test_mlproject import _mlflow_run

    result = _mlflow_run("main", {"experiment": "localize", "task": "localize", "series": "sagittal_t1",
                                  "data_dir": study_store.data_dir, "img_size": 48, "epochs": 1},
                         study_store.tracking_uri, {"SPINEMRI_CACHE_DIR": str(study_store.cache_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(study_store.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("data").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["localize.series"] == "sagittal_t1" and run.data.params["img_size"] == "48"
    assert "test_sagittal_t1_point_error_mm" in run.data.metrics


def site_jitter_of(config):
    """The site jitter an experiment's training and preprocessing settings ask for."""
    from spinemri.training.jitter import site_jitter

    return site_jitter(config.train, config.preprocess)
