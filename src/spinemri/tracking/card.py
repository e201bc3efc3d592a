"""A model card from a registered version's MLflow record alone: RSNA ATLAS's JSON (schema version 2025-11)
for machines, and one page of Markdown, with a CLAIM-style checklist, for people.

Everything a card says comes from the version (its tags, aliases and description), its source run (params,
metrics, tags, dataset inputs) and that run's artifacts (the referral operating points); every number it
quotes is named by the metric it comes from. A version whose run lacks what a card must say (a held-out
evaluation with its verdict against the floor) is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
import json
import math
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.utils.models import get_model_name_and_version

from spinemri.atomic import atomic_path
from spinemri.data.schema import HEADS, REFERRAL_POINTS
from spinemri.errors import CardError
from spinemri.metrics import operating
from spinemri.metrics.floor import FLOOR
from spinemri.metrics.headline import headline
from spinemri.tracking.lineage import DATA_KIND_TAG
from spinemri.tracking.links import ui_base_url

ATLAS_SCHEMA = "https://atlas.rsna.org/schemas/2025-11/model.json"  # the card's "$schema", a constant there
# Values of the schema's enumerations that a spinemri card uses.
ATLAS_CONTENT = ("MK", "NR")  # musculoskeletal, neuroradiology
ATLAS_MRI = "Magnetic resonance imaging (RID10312)"
ATLAS_METRICS = {  # spinemri metric suffix -> the schema's metric name
    "roc_auc": "area under the receiver operating characteristic curve",
    "balanced_accuracy": "balanced accuracy",
    "ece": "expected calibration error",
    "weighted_log_loss": "cross-entropy",
    "rsna_score": "competition performance metric",
    "sensitivity": "sensitivity", "specificity": "specificity",
    "ppv": "positive predictive value", "npv": "negative predictive value",
}
# The field's published anchors a card quotes as its limits (spinemri's docs, clinical.md).
FIELD_LIMITS = (
    "Published lumbar grading models (48 studies) pooled sensitivity 0.80 and specificity 0.91, with mild and "
    "moderate grades near 0.50 accuracy; radiologists disagree on foraminal narrowing in 35-46 % of cases.",
    "Top RSNA 2022 challenge models fell from ROC-AUC 0.96 to 0.89 on external scans: expect a drop on another "
    "site's scanners and protocols until it is measured there.",
)
INTENDED = ("research on lumbar spine MRI grading", "method comparison against a per-site prior")
NOT_INTENDED = ("clinical diagnosis or triage", "use on another site's scans without local validation")


@dataclass(frozen=True)
class Card:
    """A card's two forms: ``atlas`` (the ATLAS JSON document) and ``markdown``; ``name`` and ``version`` of
    the registered version it describes."""

    name: str
    version: str
    atlas: dict
    markdown: str


def build_card(model_uri: str, ui_url: str = "") -> Card:
    """The card of the registered version ``model_uri`` (``models:/<name>/<version>`` or ``models:/<name>@<alias>``)."""
    client = mlflow.MlflowClient()
    version = _version(client, model_uri)
    try:
        run = client.get_run(version.run_id)
    except MlflowException as exc:
        raise CardError(f"{model_uri}: its source run {version.run_id} cannot be read ({exc.message}); a card "
                        "describes a version from its run's record") from None
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    shown = headline(metrics, version.tags.get("metric_name"))
    missing = [what for what, ok in (
        ("held-out metrics (test_* or cv_*)", bool(shown)),
        ("a verdict against the floor (run tag verdict_sentence)", bool(tags.get("verdict_sentence"))),
    ) if not ok]
    if missing:
        raise CardError(f"{model_uri} (run {run.info.run_id}) lacks what a model card must state: {'; '.join(missing)}. "
                        "Register a model from `spinemri train` (or a cross-validation, or `package-study`), "
                        "which evaluates it on held-out studies against its floor")
    points = _logged_dict(run.info.run_id, operating.ARTIFACT)
    link = f"{ui_base_url(mlflow.get_tracking_uri(), ui_url).rstrip('/')}/#/models/{version.name}/versions/" \
           f"{version.version}?workflowType=machine_learning"
    facts = _Facts(version, run, shown, points, link)
    return Card(version.name, str(version.version), facts.atlas(), facts.markdown())


def write_card(card: Card, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``<name>-v<version>.model.json`` and ``.md`` into ``out_dir`` (each whole or not at all)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{card.name}-v{card.version}"
    paths = out / f"{stem}.model.json", out / f"{stem}.md"
    for path, text in zip(paths, (json.dumps(card.atlas, indent=2) + "\n", card.markdown)):
        with atomic_path(path) as partial:
            partial.write_text(text)
    return paths


CARD_FOLDER = "card"  # where a registered version's card is attached, in its source run's artifacts


def attach_card(name: str, version: str) -> str:
    """Write the card of version ``version`` of ``name`` into its source run's artifacts (``card/<name>-v<version>``
    ``.model.json`` and ``.md``) and name them in the version's description; returns the Markdown card's URI."""
    made = build_card(f"models:/{name}/{version}")
    client = mlflow.MlflowClient()
    found = client.get_model_version(name, version)
    stem = f"{CARD_FOLDER}/{name}-v{version}"
    client.log_text(found.run_id, json.dumps(made.atlas, indent=2) + "\n", f"{stem}.model.json")
    client.log_text(found.run_id, made.markdown, f"{stem}.md")
    uri = f"runs:/{found.run_id}/{stem}.md"
    client.update_model_version(name, version, description=f"{found.description or ''}\n\nModel card: {uri} "
                                f"(RSNA ATLAS JSON: runs:/{found.run_id}/{stem}.model.json)".lstrip())
    return uri


def _version(client: mlflow.MlflowClient, model_uri: str):
    """The registered version a models:/ URI names (by number, alias or stage, as MLflow resolves it)."""
    if not model_uri.startswith("models:/"):
        raise CardError(f"{model_uri!r} is not a registered version; give models:/<name>/<version> or "
                        "models:/<name>@<alias> (`spinemri registry list` shows them)")
    try:
        found = get_model_name_and_version(client, model_uri)
        if len(found) == 2:
            return client.get_model_version(*found)
    except MlflowException as exc:
        raise CardError(f"{model_uri}: no such registered version ({exc.message}); `spinemri registry list` shows "
                        "the versions and aliases") from None
    raise CardError(f"{model_uri!r} names no version (a logged model, not a registered one); give "
                    "models:/<name>/<version> or models:/<name>@<alias>")


def _logged_dict(run_id: str, path: str) -> dict | None:
    """A JSON artifact of the run, None where it logged none."""
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
    except (MlflowException, OSError, ValueError):
        return None


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


class _Facts:
    """What the record says, in the words of each form."""

    def __init__(self, version, run, shown: dict[str, float], points: dict | None, link: str):
        self.version, self.run, self.shown, self.points, self.link = version, run, shown, points, link
        self.metrics, self.params, self.tags = run.data.metrics, run.data.params, run.data.tags
        self.alias = ", ".join(version.aliases) or "no alias"
        self.split = next(iter(shown)).split("_", 1)[0]
        table = _logged_dict(run.info.run_id, f"evaluation/{self.split}_operating_points.json")
        self.rates = {(row["point"], row["rate"]): row for row in
                      (dict(zip(table["columns"], values)) for values in table["data"])} if table else {}
        self.kind = self.tags.get(DATA_KIND_TAG, "unknown")
        self.study = "classifier" in version.tags  # a packaged two-stage study model names its classifier
        self.inputs = {}
        for entry in run.inputs.dataset_inputs if run.inputs else []:
            context = next((t.value for t in entry.tags if t.key == "mlflow.data.context"), "")
            self.inputs[context] = (entry.dataset.name, entry.dataset.digest, json.loads(entry.dataset.profile or "{}"))

    def quoted(self, name: str) -> str:
        """A metric as the card quotes it: its value (signed for a difference), its 95 % CI when logged, its name."""
        value = self.metrics.get(name)
        low, high = self.metrics.get(f"{name}_ci_low"), self.metrics.get(f"{name}_ci_high")
        ci = f" [95 % CI {_number(low)}, {_number(high)}]" if low is not None and high is not None else ""
        shown = f"{value:+.3f}" if name.endswith("_vs_floor") and value is not None and math.isfinite(value) \
            else _number(value)
        return f"{shown}{ci} (`{name}`)"

    @property
    def beats_floor(self) -> bool:
        return self.tags.get("verdict") == "better"

    def floor_line(self) -> str:
        if self.beats_floor:
            return "**It beats its floor**: the paired difference's 95 % interval lies on the better side of zero."
        return (f"**It does not beat its floor** (verdict: {self.tags.get('verdict', 'not recorded')}): as far as "
                f"these held-out studies can tell, it predicts no better than {FLOOR}.")

    def data_lines(self) -> list[str]:
        about = {"phantom": "the synthetic phantom spinemri writes; it cannot show that a model learned anatomy",
                 "real": "images from a dataset folder, not the phantom"}.get(self.kind, "not recorded by this run")
        lines = [f"- Kind: **{self.kind}** ({about}); folder `{self.params.get('data_dir', 'not recorded')}`."]
        for context, (name, digest, profile) in self.inputs.items():
            counted = ", ".join(f"{profile[k]} {k}" for k in ("studies", "samples", "slices") if k in profile)
            lines.append(f"- {context}: `{name}` (digest `{digest}`), {counted}")
        if self.params.get("folds") not in (None, "0"):
            lines.append(f"- Cross-validation: {self.params['folds']} folds by study; rates out of fold.")
        lines.append("- Split by study (patient level): no study is in two splits; split fractions and seed in "
                     "each input's profile.")
        return lines

    def point_lines(self) -> list[str]:
        if not self.points:
            return ["Not recorded: this version's run logged no referral operating points."]
        def rate(name: str, which: str, floor: bool = False) -> str:
            row = self.rates.get((name, which))
            if row is None:
                return "n/a"
            value, low, high = (row[k] for k in (("floor", "floor_ci_low", "floor_ci_high") if floor
                                                 else ("value", "ci_low", "ci_high")))
            return "n/a" if value is None or not math.isfinite(value) else \
                f"{_number(value, 2)} [{_number(low, 2)}, {_number(high, 2)}]"

        lines = [f"Thresholds chosen on the `{self.points['fitted_on']}` rows (never the held-out ones) for each "
                 f"target sensitivity; rates on the held-out rows ({self.split}) with 95 % intervals over studies, "
                 f"from the run's table `evaluation/{self.split}_operating_points.json`; the floor with its own "
                 "thresholds refers every site of a kind or none.", "",
                 "| point | target | threshold | fitted on (referable) | sensitivity | specificity | PPV | NPV | "
                 "referral rate | floor's sensitivity | floor's referral rate |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        uncertified = []
        for name in REFERRAL_POINTS:
            point = self.points["points"].get(name, {})
            events, target = point.get("events"), point.get("target")
            short = (point.get("threshold") is not None and isinstance(events, int) and target is not None
                     and events < operating.certifying_events(target))  # a point without a threshold refers nothing
            if short:
                uncertified.append(f"{name} ({events} referable, {operating.certifying_events(target):.0f} needed "
                                   f"for {target:.2f})")
            lines.append(f"| {name} | {_number(target, 2)} | {_number(point.get('threshold'))} | "
                         f"{point.get('fitted_on', '?')} ({events if events is not None else '?'}{'*' if short else ''}) | "
                         + " | ".join(rate(name, r) for r in operating.RATES) + " | "
                         + " | ".join(rate(name, r, floor=True) for r in ("sensitivity", "referral_rate")) + " |")
        if uncertified:
            lines.append(f"\n\\* Too few referable cases to promise the target from the cases alone: "
                         f"{'; '.join(uncertified)}. Such a threshold is a prediction bound that assumes the "
                         "referable scores' logits normal (with one referable case, its score); its held-out "
                         "sensitivity may fall well short of the target or overshoot it.")
        for rate in ("sensitivity", "referral_rate"):
            name = f"{self.split}_refer_any_{rate}"
            if name in self.metrics:
                lines.append(f"\nany_moderate_or_severe on the held-out rows, {rate}: {self.quoted(name)}")
        return lines

    def checklist(self) -> list[tuple[str, str]]:
        """CLAIM-style items: (item, answer); an answer of ``open`` is one only a person can give."""
        p, t = self.params, self.tags
        return [
            ("Study design", f"retrospective evaluation on held-out studies ({self.split} split) of one dataset"),
            ("Data source", f"{self.kind} data, folder `{p.get('data_dir', '?')}`, digests in the data section"),
            ("Eligibility criteria of patients and studies", "open"),
            ("Data preprocessing", f"mode {p.get('mode', '?')}, {p.get('img_size', '?')} px, "
                                   f"{p.get('preprocess.slices', '?')} slice(s), one function for training and serving"),
            ("Reference standard", "the dataset's own grades (RSNA 2024: the competition's labels); "
                                   "their rationale and readers: open"),
            ("Data partitions", "by study (patient level); counts per split in the data section"),
            ("Model", f"{t.get('arch', p.get('arch', '?'))}, {_number(self.metrics.get('model_params'), 0)} "
                      f"parameters (`model_params`), three heads (condition, level, severity)"),
            ("Training", f"{_number(self.metrics.get('epochs_trained'), 0)} epochs (`epochs_trained`), "
                         f"optimizer {p.get('train.optimizer', '?')}, lr {p.get('lr', '?')}, seed {p.get('seed', '?')}"),
            ("Metrics and statistics", "95 % bootstrap intervals over studies; paired difference to the floor"),
            ("Calibration", self.quoted(f"{self.split}_severity_ece") if f"{self.split}_severity_ece" in self.metrics
             else "not recorded"),
            ("Operating point", "referral thresholds recorded" if self.points else "not recorded"),
            ("Failure analysis", f"per condition and level breakdowns in `evaluation/{self.split}_table.json`; "
                                 "review of failed cases: open"),
            ("External validation", "none: one dataset; expect a drop elsewhere (limits)"),
            ("Explainability", "Grad-CAM heatmaps logged with the run (`gradcam/`)"),
            ("Software and code", f"spinemri {t.get('version.spinemri', '?')}, commit {t.get('git_commit', '?')}"),
            ("Ethics approval and data use agreements", "open"),
            ("Funding and conflicts of interest", "open"),
            ("Intended clinical use and users", "research use only; clinical use: open"),
        ]

    def markdown(self) -> str:
        v, head = self.version, self.shown
        metric_lines = [f"- {self.quoted(name)}" for name in head if "_floor_" not in name and not name.endswith("_vs_floor")]
        floor_lines = [f"- {self.quoted(name)}" for name in head if "_floor_" in name]
        lines = [
            f"# Model card: {v.name} version {v.version} ({self.alias})", "",
            f"{self.tags['verdict_sentence']}", "",
            f"Registry: [{v.name} v{v.version}]({self.link}); run `{self.run.info.run_id}`; "
            f"card from the MLflow record of {datetime.now(timezone.utc):%Y-%m-%d}.", "",
            "## Intended use", "", *[f"- {u}" for u in INTENDED], "",
            "## Not intended use", "", *[f"- {u}" for u in NOT_INTENDED], "",
            "## Data", "", *self.data_lines(), "",
            "## Reference standard", "",
            "The dataset's own severity grades per site (Normal/Mild, Moderate, Severe); unlabelled sites are left out.", "",
            f"## Results on the held-out studies ({self.split})", "", *metric_lines, "",
            f"## The floor: {FLOOR}", "", self.floor_line(), "", *floor_lines,
            f"- difference to the floor: {self.quoted(f'{self.split}_vs_floor')}" if f"{self.split}_vs_floor" in self.metrics
            else "- difference to the floor: not recorded", "",
            f"Decision in the registry: {v.tags.get('decision', 'not recorded')}", "",
            "## Calibration", "",
            f"- {self.quoted(f'{self.split}_severity_ece')}" if f"{self.split}_severity_ece" in self.metrics
            else "- not recorded", "",
            "## Referral operating points", "", *self.point_lines(), "",
            "## Known failure modes and limits", "",
            "- Mild and moderate grades are the hardest to tell apart, for models and readers alike.",
            *[f"- {line}" for line in FIELD_LIMITS],
            *(["- Trained and evaluated on the synthetic phantom: these numbers say nothing about anatomy."]
              if self.kind == "phantom" else []), "",
            "## Licence and version", "",
            f"- spinemri {self.tags.get('version.spinemri', '?')} (commit {self.tags.get('git_commit', '?')}); the "
            "model's licence follows the data it was trained on (RSNA 2024: research use only).", "",
            "## CLAIM checklist", "", "| item | answer |", "|---|---|",
            *[f"| {item} | {answer} |" for item, answer in self.checklist()], "",
        ]
        return "\n".join(lines)

    def atlas(self) -> dict:
        used = sorted({ATLAS_METRICS[suffix] for name in list(self.shown) + [f"{self.split}_severity_ece"]
                       for suffix in ATLAS_METRICS if name.endswith(suffix) and name in self.metrics})
        if self.points:
            used = sorted({*used, *(ATLAS_METRICS[r] for r in ("sensitivity", "specificity", "ppv", "npv"))})
        comments = "; ".join(f"{name} {_number(value)}" for name, value in self.shown.items())
        thresholds = ("; ".join(f"{name} {_number(point.get('threshold'))} (target sensitivity "
                                f"{_number(point.get('target'), 2)})" for name, point in self.points["points"].items())
                      + f"; chosen on {self.points['fitted_on']} rows") if self.points else "not recorded"
        model = {
            "Name": f"spinemri {self.version.name} version {self.version.version}",
            "Link": self.link,
            "Summary": self.tags["verdict_sentence"][:250],
            "Indexing": {"Content": list(ATLAS_CONTENT), "Keywords": ["lumbar spine", "degenerative disease",
                                                                      "stenosis", "MRI grading"]},
            "Descriptors": {
                "Version": str(self.version.version),
                "Date": {"Created": datetime.fromtimestamp(self.version.creation_timestamp / 1000,
                                                           timezone.utc).strftime("%Y-%m-%d")},
                "License": {"Text": "research use only, as the data it was trained on"},
                "Comments": f"run {self.run.info.run_id}; alias {self.alias}; data {self.kind}",
            },
            "Model properties": {
                **({"Architecture": "two stages: a localizer per series type finds each site, then the classifier "
                                    f"{self.version.tags['classifier']} grades it",
                    "Input": "a zipped DICOM study (sagittal T1, sagittal T2/STIR, axial T2)",
                    "Output": {"Description": "the study's 25 findings (5 conditions at 5 levels), each with "
                                              "severity probabilities"}} if self.study else
                   {"Architecture": f"{self.tags.get('arch', self.params.get('arch', '?'))} backbone with three "
                                    f"heads ({', '.join(HEADS)})",
                    "Input": f"a DICOM slice and a site ({self.params.get('mode', '?')} mode, "
                             f"{self.params.get('img_size', '?')} px)",
                    "Output": {"Description": "per site: condition, level and severity probabilities, and a refer "
                                              "flag at the decision thresholds"}}),
                "Decision threshold": thresholds,
                "Limitations": " ".join((self.floor_line().replace("**", ""), *FIELD_LIMITS)),
                "Indications for use": "research only; not for diagnosis",
                "Use": {"Intended": list(INTENDED), "Out-of-scope": list(NOT_INTENDED)},
                "User": {"Intended": ["radiology AI researchers"]},
                "Regulatory information": {"FDA cleared": False, "CE marked": False},
                "Reproducibility": f"spinemri {self.tags.get('version.spinemri', '?')}, commit "
                                   f"{self.tags.get('git_commit', '?')}, data digest "
                                   f"{next(iter(self.inputs.values()))[1] if self.inputs else '?'}",
            },
            "Imaging": {"Modalities": [ATLAS_MRI], "File format": ["DICOM"],
                        "Comments": "sagittal T1, sagittal T2/STIR and axial T2 series of the lumbar spine"},
            "Model performance": {"Metrics": used, "Comments": comments},
        }
        return {"$schema": ATLAS_SCHEMA, "Model": model}
