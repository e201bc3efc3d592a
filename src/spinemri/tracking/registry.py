"""The MLflow Model Registry policy: every trained model becomes a version; `champion` moves only for a better one.

Each version carries, as tags, the held-out metric it was judged on (``metric_name``,
``metric_value``, ``metric_goal`` = minimize/maximize) and the identity of the held-out set
(``eval_set``: a hash of the test samples and their labels). A new version becomes ``champion`` when
there is none yet, or when it beats the champion on the same metric over the same held-out set;
otherwise it gets ``challenger``. Versions judged on another metric or other data cannot be
compared: they become ``challenger`` and the decision says so, and ``promote`` is the explicit way
over that. The decision is a tag on the version (``decision``) and is printed by training.

"Beats" depends on the policy (``mlflow.champion_policy``):

- ``paired`` (the default): both versions' evidence — the per-row test predictions
  (``evaluation/test_predictions.csv``) or the per-study terms of the metric
  (``evaluation/<metric>.terms.csv``) their runs logged — is scored on the same bootstrap
  resamples of the held-out studies; the candidate
  wins only when the 95 % interval of its improvement excludes zero, over at least
  ``MIN_PAIRED_STUDIES`` studies (:mod:`spinemri.metrics.paired`). The version is tagged with
  the difference, its interval and the number of studies. Where either version has no predictions
  to pair, or the metric cannot be recomputed on a resample, the strict rule decides and the
  decision says why.
- ``strict``: any improvement of the point value wins.

Before any of that, a version must beat its *floor*: the per-site prior of its own training rows,
scored on the same held-out studies (:mod:`spinemri.metrics.floor`). A version whose verdict is not
"better" never becomes ``champion`` (unless ``mlflow.allow_below_floor``, and then the decision says
so); the verdict's sentence and the decision are the version's description in the registry. No
decision ever suggests promoting a version that a paired interval shows worse.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
import hashlib
import math

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
import pandas as pd

from spinemri.errors import RegistryError
from spinemri.metrics.floor import BETTER, FLOOR, WORSE, Verdict
from spinemri.metrics.goals import is_better, lower_is_better, metric_goal
from spinemri.metrics.paired import (MIN_PAIRED_STUDIES, PREDICTIONS_ARTIFACT, PairedDifference, head_metric,
    paired_difference, terms_artifact)
from spinemri.quiet import REGISTRATION_LINES, stderr_without
from spinemri.tracking.artifacts import logged_csv

CHAMPION = "champion"
CHALLENGER = "challenger"
POLICIES = ("paired", "strict")
EVAL_SET_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level", "severity")


@dataclass(frozen=True)
class Decision:
    name: str
    version: str
    alias: str  # CHAMPION or CHALLENGER
    reason: str

    def __str__(self) -> str:
        return f"{self.name} version {self.version} -> {self.alias}: {self.reason}"


def eval_set_hash(samples: pd.DataFrame) -> str:
    """Identity of a held-out set: the same samples with the same labels give the same hash."""
    columns = [c for c in EVAL_SET_COLUMNS if c in samples.columns]
    table = samples[columns].astype(str).sort_values(columns).to_csv(index=False)
    return hashlib.sha256(table.encode()).hexdigest()[:16]


def register(model_uri: str, name: str, *, metric: str, value: float | None, eval_set: str,
             tags: dict[str, str] | None = None, champion: str = CHAMPION,
             challenger: str = CHALLENGER, policy: str = "paired",
             evidence: pd.DataFrame | None = None, verdict: Verdict | None = None,
             allow_below_floor: bool = False, needs_floor: bool = True) -> Decision:
    """Register ``model_uri`` as a new version of ``name`` and apply the alias policy.

    ``champion``/``challenger`` name the two aliases; the localizers keep one pair per series type
    in one registered model (``sagittal_t2`` / ``sagittal_t2-challenger``, ...). ``evidence``, for the
    paired policy: this model's :func:`~spinemri.metrics.paired.prediction_table` on the held-out set
    (per-head metrics), or its per-study terms of ``metric`` (what its run logged as
    :func:`~spinemri.metrics.paired.terms_artifact`). ``verdict``: how this model compares with its
    floor; without one (a model never judged against it) the version is treated as not better than it.
    ``needs_floor=False``: models that no per-site prior could stand in for (the localizers) skip that rule.
    """
    if policy not in POLICIES:
        raise RegistryError(f"unknown champion policy {policy!r}; choose one of {', '.join(POLICIES)}")
    client = MlflowClient()
    version_tags = {"metric_name": metric, "metric_goal": metric_goal(metric), "eval_set": eval_set,
                    "champion_policy": policy, **(verdict.tags() if verdict else {}), **(tags or {})}
    usable = value is not None and math.isfinite(value)
    if usable:
        version_tags["metric_value"] = repr(float(value))
    with stderr_without(REGISTRATION_LINES):
        version = mlflow.register_model(model_uri, name, tags=version_tags).version
    if str(version) == "1" and not client.get_registered_model(name).description:
        client.update_registered_model(name, description="spinemri lumbar-spine classifiers: champion = best held-out "
                                       f"{metric} (see the spinemri docs, serving.md)")
    rule = _Rule(policy, evidence, champion, challenger)
    alias, reason, paired = _decide(client, name, str(version), metric, float(value) if usable else None, eval_set,
                                    rule)
    if alias == champion and needs_floor:
        alias, reason = _floor_rule(verdict, reason, allow_below_floor, champion, challenger)
    client.set_registered_model_alias(name, alias, version)
    for key, text in {"decision": reason, **(paired.tags() if paired else {})}.items():
        client.set_model_version_tag(name, version, key, text)
    floor_line = verdict.sentence if verdict else (f"Not judged against {FLOOR}." if needs_floor else "")
    client.update_model_version(name, version, description="\n\n".join(filter(None, [floor_line, f"{alias}: {reason}"])))
    return Decision(name=name, version=str(version), alias=alias, reason=reason)


def _floor_rule(verdict: Verdict | None, reason: str, allow: bool, champion: str, challenger: str
                ) -> tuple[str, str]:
    """The alias and decision once a version that would be champion meets its floor."""
    if verdict is not None and verdict.better:
        return champion, reason
    if verdict is None:
        what = f"it was not judged against its floor ({FLOOR})"
    elif verdict.outcome == WORSE:
        what = f"it is worse than its floor ({FLOOR}; difference {verdict.paired.difference:+.4f}, 95% CI " \
               f"{verdict.paired.ci_low:+.4f} to {verdict.paired.ci_high:+.4f})"
    else:
        what = f"it is not significantly better than its floor ({FLOOR}; difference " \
               f"{verdict.paired.difference:+.4f}, 95% CI {verdict.paired.ci_low:+.4f} to " \
               f"{verdict.paired.ci_high:+.4f} over {verdict.paired.studies} studies)"
    if allow:
        return champion, f"{reason}; although {what}: allowed by mlflow.allow_below_floor"
    fix = "" if verdict is not None and verdict.outcome == WORSE else \
        (f"; train a model that beats it, or set mlflow.allow_below_floor=true to let such a version become "
         f"{champion}")
    return challenger, f"not {champion}: {what}{fix}"


@dataclass(frozen=True)
class _Rule:
    policy: str
    evidence: pd.DataFrame | None
    champion: str = CHAMPION
    challenger: str = CHALLENGER


def _decide(client: MlflowClient, name: str, version: str, metric: str, value: float | None,
            eval_set: str, rule: _Rule) -> tuple[str, str, PairedDifference | None]:
    CHAMPION, CHALLENGER = rule.champion, rule.challenger  # noqa: N806 - the policy below reads as for the defaults
    if value is None:
        return CHALLENGER, f"it has no finite {metric} to compare", None
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return CHAMPION, f"first version with a {CHAMPION} metric ({metric} = {value:.4f})", None
    tags = champion.tags
    if tags.get("metric_name") != metric:
        return CHALLENGER, (f"not comparable: champion v{champion.version} was judged on {tags.get('metric_name')}, "
                            f"this version on {metric}; use `spinemri registry promote {version}` to override"), None
    if tags.get("eval_set") != eval_set:
        return CHALLENGER, (f"not comparable: champion v{champion.version} was evaluated on another held-out set "
                            f"({tags.get('eval_set')} vs {eval_set}); use `spinemri registry promote {version}` "
                            "to override"), None
    try:
        best = float(tags["metric_value"])
    except (KeyError, ValueError):
        return CHAMPION, f"champion v{champion.version} has no {metric} value; {metric} = {value:.4f}", None
    strict_note = ""
    if rule.policy == "paired":
        paired, why_not = _paired(champion, metric, rule.evidence)
        if paired is not None:
            versus = f"champion v{champion.version}: {paired.describe()}"
            if paired.significant:
                return CHAMPION, "beats " + versus, paired
            if not paired.enough_studies:
                override = "" if _looks_worse(paired) else \
                    f", or use `spinemri registry promote {version}` or mlflow.champion_policy=strict"
                return CHALLENGER, (f"{paired.studies} held-out studies are too few for a paired decision (at least "
                                    f"{MIN_PAIRED_STUDIES}): {versus}; evaluate on more studies{override}"), paired
            if _looks_worse(paired):
                return CHALLENGER, f"worse than {versus}", paired
            return CHALLENGER, (f"not significantly better than {versus}; use `spinemri registry promote {version}` "
                                "to override"), paired
        strict_note = f" (strict rule: {why_not})"
    lower = lower_is_better(metric)
    better = is_better(value, best, metric)
    comparison = (f"{metric} {value:.4f} vs champion v{champion.version}'s {best:.4f} "
                  f"({'lower' if lower else 'higher'} wins){strict_note}")
    return (CHAMPION, "beats " + comparison, None) if better else (CHALLENGER, "does not beat " + comparison, None)


def _looks_worse(paired: PairedDifference) -> bool:
    """The 95 % interval of the difference lies wholly on the worse side (over any number of studies)."""
    return paired.ci_low > 0 if lower_is_better(paired.metric) else paired.ci_high < 0


def _paired(champion, metric: str, evidence: pd.DataFrame | None) -> tuple[PairedDifference | None, str]:
    """The paired comparison with the champion, or None and why it cannot be made."""
    artifact = PREDICTIONS_ARTIFACT if head_metric(metric) else terms_artifact(metric)
    if evidence is None:
        return None, f"this version has no per-study evidence to pair ({artifact})"
    try:
        theirs = logged_csv(champion.run_id, artifact,
                            dtype={c: str for c in ("study_id", "series_id", "instance_number")})
    except Exception:  # noqa: BLE001 - an older champion, a deleted run or artifact: the strict rule decides
        return None, f"champion v{champion.version} has no {artifact} to pair with"
    try:
        return paired_difference(evidence, theirs, metric), ""
    except ValueError as error:
        return None, str(error)


def promote(name: str, version: str | int, reason: str) -> Decision:
    """Point ``champion`` at ``version`` regardless of metrics, recording who was replaced and why."""
    if not reason.strip():
        raise RegistryError("give a reason for the promotion (--reason TEXT); it is kept as a tag on the version")
    client = MlflowClient()
    versions = {v["version"]: v for v in list_versions(name)}
    version = str(version)
    if version not in versions:
        raise RegistryError(f"{name} has no version {version}; versions: {', '.join(versions) or 'none'}")
    previous = next((v for v, row in versions.items() if CHAMPION in row["aliases"]), None)
    client.set_registered_model_alias(name, CHAMPION, version)
    if CHALLENGER in versions[version]["aliases"]:
        client.delete_registered_model_alias(name, CHALLENGER)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for key, value in {"promoted_at": now, "promotion_reason": reason,
                       "promoted_over": f"v{previous}" if previous else "none"}.items():
        client.set_model_version_tag(name, version, key, value)
    text = f"promoted by hand over v{previous}: {reason}" if previous and previous != version \
        else f"promoted by hand: {reason}"
    verdict = versions[version]["verdict"]
    if verdict != BETTER:
        text += f" (its verdict against {FLOOR}: {verdict or 'none recorded'})"
    client.set_model_version_tag(name, version, "decision", text)
    return Decision(name=name, version=version, alias=CHAMPION, reason=text)


def list_versions(name: str) -> list[dict]:
    """One dict per version, newest first: version, aliases, metric, eval set, run, architecture, decision,
    policy, and the paired comparison with the champion it was judged against (empty if none)."""
    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"no registered model {name!r} in {mlflow.get_tracking_uri()}; train a model first "
                            "(`make demo` or `spinemri train`), or set MLFLOW_TRACKING_URI to the store that has it"
                            ) from None
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        tags = mv.tags or {}
        rows.append({
            "version": str(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), [])),
            "metric_name": tags.get("metric_name", ""),
            "metric_value": float(tags["metric_value"]) if "metric_value" in tags else None,
            "eval_set": tags.get("eval_set", ""),
            "arch": tags.get("arch", ""),
            "run_id": mv.run_id or "",
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "decision": tags.get("decision", ""),
            "verdict": tags.get("verdict", ""),
            "verdict_sentence": tags.get("verdict_sentence", ""),
            "floor": {key: float(tags[f"floor_{key}"]) for key in ("difference", "ci_low", "ci_high")
                      if f"floor_{key}" in tags} | ({"studies": int(tags["floor_studies"])}
                                                    if "floor_studies" in tags else {}),
            "description": mv.description or "",
            "policy": tags.get("champion_policy", ""),
            "paired": {key: float(tags[f"paired_{key}"]) for key in ("difference", "ci_low", "ci_high")
                       if f"paired_{key}" in tags} | ({"studies": int(tags["paired_studies"])}
                                                      if "paired_studies" in tags else {}),
        })
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)
