"""`spinemri card`: an RSNA ATLAS model card (schema 2025-11) and a Markdown card from a version's record alone."""

from __future__ import annotations

import json
import re

from click.testing import CliRunner
import jsonschema
import mlflow
import pytest

from spinemri.cli import main as cli
from spinemri.errors import CardError
from spinemri.metrics import operating
from spinemri.tracking.card import ATLAS_SCHEMA, build_card

pytestmark = pytest.mark.xdist_group("serving")  # the serving tests' trained model, on their worker


def _strings(low: int, high: int) -> dict:
    return {"type": "string", "minLength": low, "maxLength": high}


def _closed(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": list(required)}


_LIST = {"type": "array", "minItems": 1, "uniqueItems": True, "items": _strings(4, 64)}
# What RSNA ATLAS's model schema (repository RSNA/ATLAS, model.json, version 2025-11, JSON Schema draft 2020-12)
# demands of the parts a spinemri card fills, stated here: every object closed to other keys, the required
# keys, the types and lengths, and the enumerations (Content, File format; of Modalities and Metrics the values
# that can describe a lumbar MRI grading model).
ATLAS_2025_11 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    **_closed({
        "$schema": {"type": "string", "const": "https://atlas.rsna.org/schemas/2025-11/model.json"},
        "Model": _closed({
            "Name": _strings(4, 256),
            "Link": {**_strings(4, 256), "format": "uri"},
            "Summary": {"type": "string"},
            "Indexing": _closed({
                "Content": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": [
                    "BR", "BQ", "CA", "CH", "CT", "ED", "ER", "GI", "GU", "HN", "HP", "IN", "IR", "LM", "MI", "MK",
                    "MR", "NM", "NR", "OB", "OI", "OT", "PD", "PH", "PR", "SQ", "RO", "RS", "US", "VA"]}},
                "Keywords": {"type": "array", "minItems": 1, "uniqueItems": True, "items": _strings(2, 64)},
            }),
            "Descriptors": _closed({
                "Version": {"type": "string"},
                "Date": _closed({"Created": {"anyOf": [{"type": "string", "format": "date"}, {"type": "integer"}]}}),
                "License": _closed({"Text": {"type": "string"}, "URL": {"type": "string", "format": "uri"}}) |
                {"minProperties": 1},
                "Comments": {"type": "string"},
            }),
            "Model properties": _closed({
                **{key: {"type": "string"} for key in ("Architecture", "Input", "Decision threshold", "Limitations",
                                                       "Indications for use", "Reproducibility")},
                "Output": _closed({"Description": {"type": "string"}}) | {"minProperties": 1},
                "Use": _closed({"Intended": _LIST, "Out-of-scope": _LIST, "Excluded": _LIST}),
                "User": _closed({"Intended": _LIST, "Out-of-scope": _LIST, "Excluded": _LIST}),
                "Regulatory information": _closed({"FDA cleared": {"type": "boolean"},
                                                   "CE marked": {"type": "boolean"}}),
            }),
            "Imaging": _closed({
                "Modalities": {"type": "array", "minItems": 1, "items": {"enum": [
                    "Magnetic resonance imaging (RID10312)", "Diffusion tensor imaging (RID38778)",
                    "Magnetic resonance angiography (RID10319)", "Functional magnetic resonance imaging (RID10317)"]}},
                "File format": {"type": "array", "minItems": 1, "items": {"enum": ["DICOM", "JPEG", "NiFTI", "PNG",
                                                                                    "Other"]}},
                "Comments": {"type": "string"},
            }),
            "Model performance": _closed({
                "Metrics": {"type": "array", "uniqueItems": True, "items": {"enum": [
                    "area under the receiver operating characteristic curve", "balanced accuracy",
                    "expected calibration error", "cross-entropy", "competition performance metric", "sensitivity",
                    "specificity", "positive predictive value", "negative predictive value"]}},
                "Comments": {"type": "string"},
            }),
        }, required=("Name", "Link")),
    }, required=("$schema", "Model")),
}


def test_the_card_of_a_registered_version_validates_and_quotes_the_run(store, tmp_path):
    result = CliRunner().invoke(cli, ["card", "models:/spinemri@champion", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    paths = [line for line in result.output.splitlines() if line]
    assert [p.rsplit(".", 2)[-2:] for p in paths][0] == ["model", "json"] and paths[1].endswith(".md")
    atlas = json.loads(open(paths[0]).read())
    jsonschema.Draft202012Validator.check_schema(ATLAS_2025_11)
    jsonschema.Draft202012Validator(ATLAS_2025_11, format_checker=jsonschema.FormatChecker()).validate(atlas)
    assert atlas["$schema"] == ATLAS_SCHEMA

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("spinemri", "champion")
    run = client.get_run(version.run_id)
    markdown = open(paths[1]).read()
    # every number it quotes is named by its metric, and is the run's
    for value, name in re.findall(r"([-+]?\d+\.\d+) (?:\[95 % CI [^\]]+\] )?\(`(\w+)`\)", markdown):
        assert name in run.data.metrics, name
        assert float(value) == pytest.approx(run.data.metrics[name], abs=0.0015), name
    assert run.data.tags["verdict_sentence"] in markdown and version.tags["decision"] in markdown
    assert "## Referral operating points" in markdown and "any_moderate_or_severe" in markdown
    assert "**phantom**" in markdown  # what the data was, from the run's record
    points = mlflow.artifacts.load_dict(f"runs:/{version.run_id}/clinical/operating_points.json")["points"]
    short = [name for name, p in points.items()
             if p["threshold"] is not None and p["events"] < operating.certifying_events(p["target"])]
    assert ("Too few referable cases to promise the target" in markdown) == bool(short)
    for name in short:  # each point fitted on too few referable cases is named, with how many it had
        assert f"{name} ({points[name]['events']} referable" in markdown
    beats = run.data.tags["verdict"] == "better"
    assert ("**It beats its floor**" if beats else "**It does not beat its floor**") in markdown
    # the CLAIM checklist: answered from the run where the platform can, open where only a person can
    checklist = markdown.split("## CLAIM checklist", 1)[1]
    assert "| Reference standard |" in checklist and "| Ethics approval and data use agreements | open |" in checklist
    assert "ROC-AUC 0.96 to 0.89" in markdown  # the field's external drop, among the limits

    # registration attached the card to the version: in its run's artifacts, named in its description
    stem = f"runs:/{version.run_id}/card/spinemri-v{version.version}"
    assert f"Model card: {stem}.md" in version.description, version.description
    attached = json.loads(mlflow.artifacts.load_text(f"{stem}.model.json"))
    jsonschema.Draft202012Validator(ATLAS_2025_11, format_checker=jsonschema.FormatChecker()).validate(attached)
    assert mlflow.artifacts.load_text(f"{stem}.md").startswith(f"# Model card: spinemri version {version.version}")


def test_a_version_without_a_held_out_evaluation_gets_no_card(store, tmp_path):
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("card-bare")
    run = client.create_run(experiment)
    client.set_terminated(run.info.run_id)
    client.create_registered_model("bare")
    client.create_model_version("bare", source=str(tmp_path), run_id=run.info.run_id)
    with pytest.raises(CardError, match="lacks what a model card must state: held-out metrics .*; a verdict"):
        build_card("models:/bare/1")
    result = CliRunner().invoke(cli, ["card", "models:/bare/1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.startswith("Error: models:/bare/1") and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing half-written
    for uri, message in (("models:/bare/9", "no such registered version"), ("runs:/abc/model", "not a registered version"),
                         ("models:/bare", "names no version")):
        with pytest.raises(CardError, match=message):
            build_card(uri)
