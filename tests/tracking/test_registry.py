"""The alias policy: the first version and better ones become champion, others challenger; promote overrides."""

from __future__ import annotations

import json
import uuid

from click.testing import CliRunner
from mlflow import MlflowClient
import pytest

from spinemri.cli import main as cli
from spinemri.metrics.floor import judge
from spinemri.metrics.paired import PairedDifference
from spinemri.tracking import registry

# One worker runs all serving tests: one trained model and one server instead of two of each.
pytestmark = pytest.mark.xdist_group("serving")


# A version whose verdict against its floor is "better": the champion rules below apply to it.
BEATS_FLOOR = judge(PairedDifference(metric="test_severity_weighted_log_loss", candidate=0.5, reference=0.8,
                                     difference=-0.3, ci_low=-0.4, ci_high=-0.2, studies=40, resamples=2000))


def _register(*args, **kwargs):
    """registry.register for a version that beats its floor (unless the test gives another verdict)."""
    kwargs.setdefault("verdict", BEATS_FLOOR)
    return registry.register(*args, **kwargs)


def _name() -> str:
    return f"policy-{uuid.uuid4().hex[:8]}"


def _aliases(name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in MlflowClient().get_registered_model(name).aliases.items()}


def test_training_registers_its_model_as_the_first_champion(store):
    client = MlflowClient()
    champion = client.get_model_version_by_alias("spinemri", "champion")
    assert champion.run_id == store.run_id
    tags = champion.tags
    assert tags["metric_name"] == "test_severity_weighted_log_loss"
    assert tags["metric_goal"] == "minimize"
    run = client.get_run(store.run_id)
    assert float(tags["metric_value"]) == pytest.approx(run.data.metrics["test_severity_weighted_log_loss"])
    assert len(tags["eval_set"]) == 16 and tags["arch"] == "tiny"
    assert int(tags["eval_set_samples"]) > 0
    assert tags["decision"].startswith("first version")
    # 1 held-out study cannot show a model better than its floor: the fixture allows it (to have a champion to serve)
    assert "allowed by mlflow.allow_below_floor" in tags["decision"]
    assert tags["verdict"] == "indistinguishable" == run.data.tags["verdict"]
    assert champion.description.startswith(run.data.tags["verdict_sentence"])
    assert run.data.tags["mlflow.note.content"].startswith("Not distinguishable from the per-site prior")
    assert run.data.tags["alias_when_registered"] == "champion"
    assert run.data.tags["registered_version"] == str(champion.version)


def test_champion_moves_only_for_a_better_metric_on_the_same_eval_set(store):
    name, metric = _name(), "test_severity_weighted_log_loss"
    first = _register(store.model_uri, name, metric=metric, value=0.90, eval_set="aaaa")
    assert (first.version, first.alias) == ("1", "champion")

    worse = _register(store.model_uri, name, metric=metric, value=0.95, eval_set="aaaa")
    assert worse.alias == "challenger" and "does not beat" in worse.reason
    assert _aliases(name) == {"champion": "1", "challenger": "2"}

    tie = _register(store.model_uri, name, metric=metric, value=0.90, eval_set="aaaa")
    assert tie.alias == "challenger"  # a tie does not beat the champion

    better = _register(store.model_uri, name, metric=metric, value=0.70, eval_set="aaaa")
    assert better.alias == "champion" and "beats" in better.reason
    assert _aliases(name) == {"champion": "4", "challenger": "3"}

    other_data = _register(store.model_uri, name, metric=metric, value=0.10, eval_set="bbbb")
    assert other_data.alias == "challenger" and "not comparable" in other_data.reason
    other_metric = _register(store.model_uri, name, metric="test_severity_roc_auc", value=0.99,
                                     eval_set="aaaa")
    assert other_metric.alias == "challenger" and "not comparable" in other_metric.reason
    no_value = _register(store.model_uri, name, metric=metric, value=float("nan"), eval_set="aaaa")
    assert no_value.alias == "challenger"
    assert _aliases(name)["champion"] == "4"
    assert MlflowClient().get_model_version(name, "5").tags["decision"] == other_data.reason


def test_higher_is_better_for_scores():
    assert registry.metric_goal("test_severity_roc_auc") == "maximize"
    assert registry.metric_goal("test_severity_weighted_log_loss") == "minimize"


def test_an_auc_champion_moves_up(store):
    name = _name()
    _register(store.model_uri, name, metric="test_severity_roc_auc", value=0.7, eval_set="e")
    assert _register(store.model_uri, name, metric="test_severity_roc_auc", value=0.6, eval_set="e").alias \
        == "challenger"
    assert _register(store.model_uri, name, metric="test_severity_roc_auc", value=0.8, eval_set="e").alias \
        == "champion"


def test_promote_overrides_and_records_the_reason(store):
    name, metric = _name(), "test_severity_weighted_log_loss"
    _register(store.model_uri, name, metric=metric, value=0.5, eval_set="e")
    _register(store.model_uri, name, metric=metric, value=0.9, eval_set="e")
    result = CliRunner().invoke(cli, ["registry", "promote", "2", "--name", name, "--reason", "radiologist review"])
    assert result.exit_code == 0, result.output
    assert _aliases(name) == {"champion": "2"}  # no longer also the challenger
    tags = MlflowClient().get_model_version(name, "2").tags
    assert tags["promotion_reason"] == "radiologist review"
    assert tags["promoted_over"] == "v1"
    assert "promoted by hand over v1" in tags["decision"]

    listed = CliRunner().invoke(cli, ["registry", "list", "--name", name, "--json"])
    rows = json.loads(listed.output)
    assert [(r["version"], r["aliases"]) for r in rows] == [("2", ["champion"]), ("1", [])]
    assert rows[1]["metric_value"] == pytest.approx(0.5) and rows[1]["metric_name"] == metric
    table = CliRunner().invoke(cli, ["registry", "list", "--name", name])
    assert "champion" in table.output and "0.5000" in table.output


def test_registry_errors_are_clear(store):
    name = _name()
    _register(store.model_uri, name, metric="test_severity_weighted_log_loss", value=0.5, eval_set="e")
    missing = CliRunner().invoke(cli, ["registry", "promote", "7", "--name", name, "--reason", "x"])
    assert missing.exit_code == 1 and "has no version 7; versions: 1" in missing.output
    blank = CliRunner().invoke(cli, ["registry", "promote", "1", "--name", name, "--reason", " "])
    assert blank.exit_code == 1 and "give a reason" in blank.output
    unknown = CliRunner().invoke(cli, ["registry", "list", "--name", "no-such-model"])
    assert unknown.exit_code == 1 and "no registered model 'no-such-model'" in unknown.output
    assert "Traceback" not in unknown.output


def test_eval_set_hash_depends_on_samples_and_labels_only(store):
    import pandas as pd

    table = pd.DataFrame({"study_id": [1, 2], "series_id": [3, 4], "instance_number": [5, 6],
                          "condition": ["a", "b"], "level": ["L1/L2", "L2/L3"], "severity": [0, 2], "x": [1.0, 2.0]})
    same = table[::-1].assign(x=[9.0, 9.0])  # order and coordinates do not matter
    assert registry.eval_set_hash(table) == registry.eval_set_hash(same)
    assert registry.eval_set_hash(table) != registry.eval_set_hash(table.assign(severity=[0, 1]))


def _champion_predictions(store):
    import mlflow
    import pandas as pd

    from spinemri.metrics.paired import PREDICTIONS_ARTIFACT

    path = mlflow.artifacts.download_artifacts(run_id=store.run_id, artifact_path=PREDICTIONS_ARTIFACT)
    return pd.read_csv(path, dtype={"study_id": str, "series_id": str, "instance_number": str})


def test_training_logs_the_test_predictions_a_paired_decision_needs(store):
    from spinemri.metrics.paired import paired_difference

    table = _champion_predictions(store)
    metrics = MlflowClient().get_run(store.run_id).data.metrics
    assert len(table) == int(MlflowClient().get_model_version_by_alias("spinemri", "champion").tags["eval_set_samples"])
    same = paired_difference(table, table, "test_severity_weighted_log_loss", resamples=10)
    assert same.candidate == pytest.approx(metrics["test_severity_weighted_log_loss"], rel=1e-6)


def _version_with_predictions(table):
    """A model in a run of its own whose logged test predictions are ``table``: what training leaves."""
    import mlflow

    from spinemri.metrics.paired import PREDICTIONS_ARTIFACT

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    mlflow.set_experiment("paired-policy")
    with mlflow.start_run():
        mlflow.log_text(table.to_csv(index=False), PREDICTIONS_ARTIFACT)
        return mlflow.pyfunc.log_model(name="model", python_model=Echo()).model_uri


def test_the_paired_policy_moves_the_champion_only_for_a_significant_improvement(store):
    import numpy as np

    from spinemri.metrics.paired import paired_difference, prediction_table
    from tests.metrics.test_paired import _reference, _sharpen

    name, metric = _name(), "test_severity_weighted_log_loss"
    samples, targets, proba = _reference()  # 40 held-out studies
    study = samples["study_id"].to_numpy()
    y = targets["severity"]

    def register(severity, policy="paired", keep=slice(None)):
        table = prediction_table(samples[keep].reset_index(drop=True), {h: t[keep] for h, t in targets.items()},
                                 {**{h: p[keep] for h, p in proba.items()}, "severity": severity[keep]})
        value = paired_difference(table, table, metric, resamples=1).candidate
        decision = _register(_version_with_predictions(table), name, metric=metric, value=value,
                                     eval_set="forty", evidence=table, policy=policy)
        return decision, value, MlflowClient().get_model_version(name, decision.version).tags

    first, reference_value, _ = register(proba["severity"])
    assert first.alias == "champion"

    # Much better on one study, a little worse on the 39 others: better on average, within the noise.
    lucky = _sharpen(proba["severity"], y, np.flatnonzero(study == 1000), 0.9)
    rest = np.flatnonzero(study != 1000)
    lucky[rest] = 0.97 * lucky[rest] + 0.03 * np.random.default_rng(5).dirichlet(np.ones(3), len(rest))
    refused, lucky_value, tags = register(lucky)
    assert lucky_value < reference_value
    assert refused.alias == "challenger" and "not significantly better than champion v1" in refused.reason
    assert tags["champion_policy"] == "paired" and tags["paired_studies"] == "40"
    assert float(tags["paired_ci_low"]) < 0 < float(tags["paired_ci_high"])
    assert float(tags["paired_difference"]) == pytest.approx(lucky_value - reference_value)
    # The strict rule promotes the same predictions.
    strict, _, _ = register(lucky, policy="strict")
    assert strict.alias == "champion" and strict.reason.startswith("beats") and "paired" not in strict.reason

    # Better on every study: the interval of the improvement excludes zero.
    promoted, _, tags = register(_sharpen(lucky, y, np.arange(len(y)), 0.3))
    assert promoted.alias == "champion" and "paired bootstrap" in promoted.reason, promoted.reason
    assert float(tags["paired_ci_high"]) < 0

    rows = json.loads(CliRunner().invoke(cli, ["registry", "list", "--name", name, "--json"]).output)
    assert rows[0]["paired"]["studies"] == 40 and rows[0]["policy"] == "paired"
    table = CliRunner().invoke(cli, ["registry", "list", "--name", name]).output
    assert "vs champion [95% CI], studies" in table and "], 40" in table

    # Without predictions to pair, the strict rule decides and says why.
    unpaired = _register(store.model_uri, name, metric=metric, value=0.0, eval_set="forty")
    assert unpaired.alias == "champion" and "strict rule: this version has no per-study evidence to pair" in \
        unpaired.reason
    with pytest.raises(registry.RegistryError, match="unknown champion policy 'lenient'"):
        _register(store.model_uri, name, metric=metric, value=0.0, eval_set="forty", policy="lenient")


def test_a_paired_decision_needs_enough_studies(store):
    import numpy as np

    from tests.metrics.test_paired import _reference, _sharpen

    name, metric = _name(), "test_severity_weighted_log_loss"
    samples, targets, proba = _reference()
    few = samples["study_id"].isin([1000, 1001, 1002, 1003]).to_numpy()  # the demo phantom's 4 test studies
    from spinemri.metrics.paired import prediction_table

    def table(severity):
        return prediction_table(samples[few].reset_index(drop=True), {h: t[few] for h, t in targets.items()},
                                {**{h: p[few] for h, p in proba.items()}, "severity": severity[few]})

    first = table(proba["severity"])
    _register(_version_with_predictions(first), name, metric=metric, value=0.9, eval_set="four",
                      evidence=first)
    better = table(_sharpen(proba["severity"], targets["severity"], np.arange(len(samples)), 0.5))
    decision = _register(_version_with_predictions(better), name, metric=metric, value=0.5,
                                 eval_set="four", evidence=better)
    assert decision.alias == "challenger", decision.reason
    assert "4 held-out studies are too few for a paired decision (at least 5)" in decision.reason


def _verdict(low: float, high: float, studies: int = 40):
    return judge(PairedDifference(metric="test_severity_weighted_log_loss", candidate=0.8, reference=0.8,
                                  difference=(low + high) / 2, ci_low=low, ci_high=high, studies=studies,
                                  resamples=2000))


def test_a_version_not_better_than_its_floor_never_becomes_champion(store):
    name, metric = _name(), "test_severity_weighted_log_loss"
    same = _verdict(-0.02, 0.03)
    refused = _register(store.model_uri, name, metric=metric, value=0.8, eval_set="e", verdict=same)
    assert refused.alias == "challenger" and _aliases(name) == {"challenger": "1"}
    assert refused.reason.startswith("not champion: it is not significantly better than its floor (the per-site "
                                     "prior; difference +0.0050, 95% CI -0.0200 to +0.0300 over 40 studies)")
    assert "mlflow.allow_below_floor=true" in refused.reason
    version = MlflowClient().get_model_version(name, "1")
    assert version.description.startswith(same.sentence) and refused.reason in version.description
    assert version.tags["verdict"] == "indistinguishable" and version.tags["floor_studies"] == "40"

    worse = _register(store.model_uri, name, metric=metric, value=0.9, eval_set="e", verdict=_verdict(0.05, 0.1))
    assert worse.alias == "challenger" and "it is worse than its floor" in worse.reason
    assert "promote" not in worse.reason and "allow_below_floor" not in worse.reason

    unjudged = _register(store.model_uri, name, metric=metric, value=0.1, eval_set="e", verdict=None)
    assert unjudged.alias == "challenger" and "not judged against its floor" in unjudged.reason

    allowed = _register(store.model_uri, name, metric=metric, value=0.8, eval_set="e", verdict=same,
                        allow_below_floor=True)
    assert allowed.alias == "champion" and "allowed by mlflow.allow_below_floor" in allowed.reason
    better = _register(store.model_uri, name, metric=metric, value=0.7, eval_set="e")
    assert better.alias == "champion" and "floor" not in better.reason

    # promoting by hand stays possible, and the decision keeps the verdict
    promoted = CliRunner().invoke(cli, ["registry", "promote", "1", "--name", name, "--reason", "reader study"])
    assert promoted.exit_code == 0, promoted.output
    assert "its verdict against the per-site prior: indistinguishable" in \
        MlflowClient().get_model_version(name, "1").tags["decision"]
    listed = CliRunner().invoke(cli, ["registry", "list", "--name", name]).output
    assert "vs floor [95% CI], studies" in listed and f"v1: {same.sentence}" in listed
    rows = json.loads(CliRunner().invoke(cli, ["registry", "list", "--name", name, "--json"]).output)
    assert rows[-1]["floor"] == pytest.approx({"difference": 0.005, "ci_low": -0.02, "ci_high": 0.03, "studies": 40})


def test_no_decision_suggests_promoting_a_version_shown_worse(store):
    import numpy as np

    from spinemri.metrics.paired import prediction_table
    from tests.metrics.test_paired import _reference, _sharpen

    name, metric = _name(), "test_severity_weighted_log_loss"
    samples, targets, proba = _reference()

    def table(keep, severity):
        return prediction_table(samples[keep].reset_index(drop=True), {h: t[keep] for h, t in targets.items()},
                                {**{h: p[keep] for h, p in proba.items()}, "severity": severity[keep]})

    everything = np.ones(len(samples), bool)
    good = table(everything, _sharpen(proba["severity"], targets["severity"], np.arange(len(samples)), 0.3))
    _register(_version_with_predictions(good), name, metric=metric, value=0.5, eval_set="forty", evidence=good)
    bad = table(everything, proba["severity"])
    worse = _register(_version_with_predictions(bad), name, metric=metric, value=0.9, eval_set="forty", evidence=bad)
    assert worse.alias == "challenger" and worse.reason.startswith("worse than champion v1"), worse.reason
    assert "promote" not in worse.reason
    # over too few studies the interval may still show it worse: no promotion offered either
    few = samples["study_id"].isin([1000, 1001, 1002, 1003]).to_numpy()
    name = _name()
    good, bad = table(few, _sharpen(proba["severity"], targets["severity"], np.arange(len(samples)), 0.2)), \
        table(few, proba["severity"])
    _register(_version_with_predictions(good), name, metric=metric, value=0.3, eval_set="four", evidence=good)
    decision = _register(_version_with_predictions(bad), name, metric=metric, value=0.9, eval_set="four",
                         evidence=bad)
    assert decision.alias == "challenger" and "too few for a paired decision" in decision.reason
    assert "promote" not in decision.reason, decision.reason
