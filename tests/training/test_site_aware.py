"""A model that grades the site a row names: whole slices carrying five levels with different grades.

The phantom variant here keeps the phantom's mid-sagittal slices and grades each of its five levels by the
level alone (L1/L2 and L2/L3 normal, L3/L4 moderate, L4/L5 severe, L5/S1 moderate): one image, five rows,
five different grades. Only a per-site severity output can reach the per-site prior's score on it; one
distribution per image (the single head) cannot tell the rows apart.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spinemri.config import load_experiment
from spinemri.data import schema
from spinemri.data.readers import load_samples
from spinemri.phantom import PhantomConfig, synthesize

GRADE_BY_LEVEL = {"L1/L2": "Normal/Mild", "L2/L3": "Normal/Mild", "L3/L4": "Moderate", "L4/L5": "Severe",
                  "L5/S1": "Moderate"}
SETTINGS = {"arch": "tiny", "img_size": 48, "epochs": 2, "batch_size": 16, "mode": "slice",
            "split.fractions": [0.5, 0.2, 0.3], "mlflow.system_metrics_interval": 0,
            "train.monitor": "val_severity_loss"}


@pytest.fixture(scope="module")
def level_graded(tmp_path_factory):
    """A flat CSV of 24 phantom mid-sagittal slices, each graded at all five levels by the level alone."""
    root = tmp_path_factory.mktemp("level_graded")
    synthesize(root / "phantom", PhantomConfig(studies=24, seed=11), workers=2)
    samples = load_samples(root / "phantom")
    slices = samples[samples["condition"] == "spinal_canal_stenosis"].groupby("study_id")["path"].first()
    rows = [(study, 1, 1, path, schema.SAGITTAL_T2, "Spinal Canal Stenosis", level, "", "",
             schema.SEVERITY_INDEX[grade], grade) for study, path in slices.items()
            for level, grade in GRADE_BY_LEVEL.items()]
    table = root / "level_graded.csv"
    pd.DataFrame(rows, columns=list(schema.FLAT_COLUMNS)).to_csv(table, index=False)
    return table


@pytest.fixture(scope="module")
def per_site_model(level_graded, store_template, tmp_path_factory):
    """A per-site model trained one epoch on the level-graded slices, in a store of its own: its model URI."""
    from spinemri.api.classifier import train
    from tests.conftest import copy_store, isolated_tracking

    root = tmp_path_factory.mktemp("per_site_store")
    uri = copy_store(store_template, root / "mlflow.db")
    with isolated_tracking(uri, root / "cache"):
        result = train(load_experiment("quick", {**SETTINGS, "data_dir": str(level_graded), "epochs": 1,
                                                 "mlflow.allow_below_floor": True}))
    return uri, result.model_uri


def _use(store, monkeypatch) -> str:
    import mlflow

    uri, model_uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return model_uri


def test_one_image_with_different_grades_per_level_is_learned_per_site(level_graded, tracking):
    from spinemri.api.classifier import train

    per_site = train(load_experiment("quick", {**SETTINGS, "data_dir": str(level_graded)}))
    single = train(load_experiment("quick", {**SETTINGS, "data_dir": str(level_graded),
                                             "model.severity_head": "single"}), log_model=False)
    floor = per_site.metrics["test_floor_severity_weighted_log_loss"]
    assert floor == pytest.approx(single.metrics["test_floor_severity_weighted_log_loss"])
    # the per-site output reaches its floor (it starts there); one output per image stays far above it
    assert per_site.metrics["test_severity_weighted_log_loss"] < floor + 0.05
    assert single.metrics["test_severity_weighted_log_loss"] > floor + 0.3
    assert per_site.verdict is not None and per_site.verdict.outcome != "worse"
    assert single.verdict.outcome == "worse" and single.verdict.sentence.startswith("Worse than the per-site prior")
    assert per_site.metrics["test_severity_roc_auc"] > 0.9  # the level alone separates the grades


def test_the_served_per_site_model_needs_the_site_and_grades_it(level_graded, per_site_model, monkeypatch):
    import base64

    from spinemri.serving.classifier import load_classifier
    from spinemri.serving.inputs import InputError

    classifier = load_classifier(_use(per_site_model, monkeypatch))
    assert classifier.per_site and classifier.meta["severity_head"] == "per_site"
    image = pd.read_csv(level_graded)["image_path"].iloc[0]
    b64 = base64.b64encode(open(image, "rb").read()).decode()
    with pytest.raises(InputError, match="row 1: no level; this model grades the site a row names"):
        classifier.predict(None, pd.DataFrame([
            {"dicom_b64": b64, "condition": "spinal_canal_stenosis", "level": "L1/L2"},
            {"dicom_b64": b64, "condition": "spinal_canal_stenosis"}]))
    with pytest.raises(InputError, match="row 0: no condition and level"):
        classifier.predict(None, pd.DataFrame([{"dicom_b64": b64}]))
    answer = classifier.predict(None, pd.DataFrame([
        {"dicom_b64": b64, "condition": "spinal_canal_stenosis", "level": level} for level in GRADE_BY_LEVEL]))
    severe = answer["severity:Severe"].to_numpy()
    # the same image, five sites: five different answers, the most severe at L4/L5 (its prior already says so)
    assert len(set(np.round(severe, 6))) == 5 and severe.argmax() == 3
    with pytest.raises(InputError, match="level 'L6/L7' is not one of"):
        classifier.predict(None, pd.DataFrame([{"dicom_b64": b64, "condition": "spinal_canal_stenosis",
                                               "level": "L6/L7"}]))


def test_predict_asks_a_per_site_model_for_the_sites_each_file_names(level_graded, per_site_model, monkeypatch,
                                                                     tmp_path):
    from types import SimpleNamespace

    from click.testing import CliRunner

    from spinemri.cli import main as cli

    result = SimpleNamespace(model_uri=_use(per_site_model, monkeypatch))
    image = pd.read_csv(level_graded)["image_path"].iloc[0]
    without = CliRunner().invoke(cli, ["predict", "--model", result.model_uri, "--input", image,
                                       "--out", str(tmp_path / "none.csv")])
    assert without.exit_code == 1 and "has no site to grade" in without.output and "path,condition,level" in \
        without.output
    assert not (tmp_path / "none.csv").exists()
    sites = tmp_path / "sites.csv"
    pd.DataFrame({"path": [image] * 2, "condition": ["Spinal Canal Stenosis"] * 2,
                  "level": ["L1/L2", "L4/L5"]}).to_csv(sites, index=False)
    done = CliRunner().invoke(cli, ["predict", "--model", result.model_uri, "--input", image, "--sites", str(sites),
                                    "--out", str(tmp_path / "out.csv")])
    assert done.exit_code == 0, done.output
    table = pd.read_csv(tmp_path / "out.csv")
    assert table["site_level"].tolist() == ["L1/L2", "L4/L5"] and (table["site_condition"] == "spinal_canal_stenosis").all()
    assert table["severity:Severe"].iloc[1] > table["severity:Severe"].iloc[0]
    pd.DataFrame({"path": [image], "condition": ["spinal"], "level": ["L1/L2"]}).to_csv(sites, index=False)
    bad = CliRunner().invoke(cli, ["predict", "--model", result.model_uri, "--input", image, "--sites", str(sites),
                                   "--out", str(tmp_path / "bad.csv")])
    assert bad.exit_code == 1 and "line 2: condition 'spinal' and level 'L1/L2' must name a site" in bad.output
