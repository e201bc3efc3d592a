"""Study-level diagnosis: a DICOM study in, the competition's 25 graded findings out.

    a Study (spinemri.data.studies) -> stage 1: each series type's localizer finds its sites
    (spinemri.localization) -> stage 2: the ROI classifier grades a crop at each site, with its own
    preprocessing unchanged (spinemri.serving.classifier) -> 25 rows ``row_id,normal_mild,moderate,severe``

Where nothing can be seen — the study lacks the series type, its files do not decode, no localizer
for that type was given, or a site falls outside the image — the row gets the *prior*, the best
constant prediction under the competition metric (spinemri.metrics.competition), from the class
counts of the classifier's training labels. Every such row is counted and its reason kept in the
sites table written next to the submission.

A classifier that carries referral thresholds (spinemri.metrics.operating) adds ``refer`` to each site:
the threshold of the row's condition applied to the row's probabilities, whatever their source. A prior row
is referred where the prior alone reaches the threshold (where nothing could be seen and the level is
likely enough to be graded moderate or severe); its ``source`` says that nothing was seen.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from spinemri.data.dicom import DicomImage, read_series
from spinemri.data.preprocess import stack_neighbours
from spinemri.data.schema import (CONDITIONS, LEVELS, PROBABILITY_COLUMNS, RSNA_SEVERITY_FREQUENCIES, SERIES_TYPES,
    SITES, SUBMISSION_COLUMNS, label_column, row_id)
from spinemri.data.studies import Study
from spinemri.errors import ImageReadError, ImageTooLarge, StudyError
from spinemri.atomic import write_csv
from spinemri.serving.localizer import SpineLocalizer, load_localizer
from spinemri.localization.sites import get_task, site_of
from spinemri.metrics import operating
from spinemri.metrics.prior import prior_at, weighted_prior
from spinemri.serving.classifier import SpineClassifier


def classifier_prior(classifier: SpineClassifier) -> tuple[dict[str, list[float]], str]:
    """The prior recorded with the classifier (its training labels), else the RSNA label frequencies."""
    if "severity_prior" in classifier.meta:
        return classifier.meta["severity_prior"], "the classifier's training labels"
    n = {c: np.asarray(f) * 1e4 for c, f in RSNA_SEVERITY_FREQUENCIES.items()}
    return weighted_prior(n), "the RSNA 2024 training label frequencies (the classifier recorded none)"


@dataclass
class StudyPrediction:
    rows: pd.DataFrame  # 25 rows: row_id, normal_mild, moderate, severe
    sites: pd.DataFrame  # 25 rows: row_id, source (model|prior), reason, series_id, instance_number, x, y,
    #                      slice_score and, for a classifier with referral thresholds, refer

    @property
    def from_prior(self) -> int:
        return int((self.sites["source"] == "prior").sum())


@dataclass
class Located:
    """Stage 1's answer for one study: (condition, level) -> (site, its decoded series stack), and per
    series type without sites the reason."""

    found: dict[tuple[str, str], tuple]
    reasons: dict[str, str]


@dataclass
class StudyPredictor:
    """Stage 1 (localizers, one per series type; any may be absent) + stage 2 (the ROI classifier)."""

    localizers: Mapping[str, SpineLocalizer]
    classifier: SpineClassifier
    prior: Mapping[str, Sequence[float]] = field(default_factory=dict)
    # A file over a size limit: "refuse" the study (a served model answers the request with the limit) or grade
    # its series from the "prior", like a file that does not decode (an unattended PACS worker).
    oversized: str = "refuse"

    def __post_init__(self) -> None:
        if not self.prior:
            self.prior = classifier_prior(self.classifier)[0]
        missing = [label_column(c, lv) for c, lv in SITES if label_column(c, lv) not in self.prior and c not in self.prior]
        if missing:
            raise StudyError(f"the prior lacks site(s) {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more"
                                                                                 if len(missing) > 5 else ""))
        window = self.classifier.preprocessing.dicom_window
        for name, localizer in self.localizers.items():
            if localizer.preprocessing.dicom_window != window:
                raise StudyError(f"the {name} localizer and the classifier read DICOM windows differently "
                                 f"(dicom_window {localizer.preprocessing.dicom_window} vs {window}); "
                                 "train them with the same preprocess.dicom_window")

    def predict(self, study: Study) -> StudyPrediction:
        return self.grade(study.study_id, self.locate(study))

    def locate(self, study: Study) -> Located:
        """Stage 1: the sites the localizers find on the study's series (decoded once), and why the other
        series types have none."""
        found: dict[tuple[str, str], tuple] = {}  # (condition, level) -> (site, stack)
        reasons: dict[str, str] = {}  # series type -> why its rows fall back to the prior
        for name in SERIES_TYPES:
            task = get_task(name)
            series = [s for s in study.series if s.description == task.description and s.files]
            if not series:
                reasons[name] = f"no {task.description} series"
                continue
            if name not in self.localizers:
                reasons[name] = f"no {name} localizer given"
                continue
            stacks, unreadable = [], []
            for s in series:
                try:
                    stacks.append((s.series_id, read_series(s.files, voi=self.classifier.preprocessing.dicom_window)))
                except ImageTooLarge as exc:
                    if self.oversized != "prior":
                        raise  # refused, not guessed around: the limit and how to raise it reach the user
                    unreadable.append(f"{exc.path} {exc.reason}")
                except ImageReadError as exc:
                    unreadable.append(f"{exc.path} {exc.reason}")
            if not stacks:
                reasons[name] = f"{task.description} unreadable: {unreadable[0]}"
                continue
            while stacks:  # slices are decoded as the localizer reads them: a bad file drops its series
                try:
                    sites = self.localizers[name].locate(stacks)
                    break
                except ImageTooLarge as exc:
                    if self.oversized != "prior":
                        raise
                    remaining = [(i, stack) for i, stack in stacks if not _holds(stack, exc.path)]
                    if len(remaining) == len(stacks):
                        raise
                    unreadable.append(f"{exc.path} {exc.reason}")
                    stacks = remaining
                except ImageReadError as exc:
                    remaining = [(i, stack) for i, stack in stacks if not _holds(stack, exc.path)]
                    if len(remaining) == len(stacks):
                        raise
                    unreadable.append(f"{exc.path} {exc.reason}")
                    stacks = remaining
            if not stacks:
                reasons[name] = f"{task.description} unreadable: {unreadable[0]}"
                continue
            by_id = dict(stacks)
            for site in sites:
                found[(site.condition, site.level)] = (site, by_id[site.series_id])
        return Located(found, reasons)

    def grade(self, study_id: str, located: Located) -> StudyPrediction:
        """Stage 2: this predictor's classifier grades the crops at ``located``'s sites (any classifier
        reading DICOM with the same window may grade what another predictor located); the prior elsewhere."""
        crops, keys, site_rows = [], [], {}
        found, reasons = located.found, located.reasons
        for (condition, level), (site, stack) in found.items():
            i = site.slice_index
            n = len(stack.instance_numbers)

            def image(j):
                return DicomImage(stack.pixels[j], "", int(stack.instance_numbers[j]), None, None, stack.pixel_spacing)

            try:
                neighbours = [image(j) for j in stack_neighbours(i, n, self.classifier.preprocessing.slices)]
                crops.append(self.classifier.prepare_image(image(i), neighbours, site.x, site.y))
                keys.append((condition, level))
            except ValueError as exc:
                site_rows[(condition, level)] = dict(source="prior", reason=str(exc))
                continue
            site_rows[(condition, level)] = dict(source="model", reason="", series_id=site.series_id,
                                                 instance_number=site.instance_number, x=round(site.x, 6),
                                                 y=round(site.y, 6), slice_score=round(site.slice_score, 4))
        probs = {}
        if crops:
            severity = self.classifier.predict_images(np.stack(crops), conditions=[c for c, _ in keys],
                                                      levels=[lv for _, lv in keys])["severity"].astype(np.float64)
            for key, p in zip(keys, severity):
                probs[key] = p
        rows, sites, graded = [], [], []
        for condition in CONDITIONS:
            for level in LEVELS:
                key = (condition, level)
                p = probs.get(key)
                info = site_rows.get(key)
                if p is None or not np.isfinite(p).all() or p.sum() <= 0:
                    p = np.asarray(prior_at(self.prior, condition, level), float)
                    if info is None or info.get("source") == "model":
                        series_type = site_of(condition).name
                        info = dict(source="prior", reason=reasons.get(series_type, f"no site found on the {series_type} series"))
                p = np.clip(p / p.sum(), 0.0, 1.0)
                rid = row_id(study_id, condition, level)
                rows.append((rid, *p))
                sites.append({"row_id": rid, **info})
                graded.append(condition)
        frame = pd.DataFrame(rows, columns=list(SUBMISSION_COLUMNS))
        sites_frame = pd.DataFrame(sites).reindex(columns=list(SITE_COLUMNS))
        points = self.classifier.meta.get("operating_points")
        if points:
            sites_frame["refer"] = operating.refer(points, graded, frame[list(PROBABILITY_COLUMNS)].to_numpy(float))
        return StudyPrediction(frame, sites_frame)


SITE_COLUMNS = ("row_id", "source", "reason", "series_id", "instance_number", "x", "y", "slice_score")


def _holds(stack, path) -> bool:
    """Whether ``path`` (a file, or the folder an error names) is one of the stack's files."""
    files = getattr(stack.pixels, "paths", ())
    return str(path) in files or any(str(Path(f).parent) == str(path) for f in files)


def resolve_localizer_uris(uris: Sequence[str]) -> list[str]:
    """``models:/NAME`` (no version or alias) stands for the registered model's per-series aliases
    ``models:/NAME@sagittal_t2`` etc., those that exist; other URIs stay as they are."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    expanded = []
    for uri in uris:
        name = uri[len("models:/"):] if uri.startswith("models:/") else ""
        if name and "@" not in name and "/" not in name:
            try:
                aliases = MlflowClient().get_registered_model(name).aliases or {}
            except MlflowException:  # not a registered model: a logged model id (models:/m-...)
                expanded.append(uri)
                continue
            found = [f"models:/{name}@{s}" for s in SERIES_TYPES if s in aliases]
            if not found:
                raise StudyError(f"registered model {name} has no alias {', '.join(SERIES_TYPES)} (its aliases: "
                                 f"{', '.join(aliases) or 'none'}); give its versions as models:/{name}/VERSION")
            expanded += found
        else:
            expanded.append(uri)
    return expanded


def resolve_localizers(uris: Sequence[str]) -> dict[str, SpineLocalizer]:
    """Localizer URIs (see :func:`resolve_localizer_uris`) -> {series type: localizer}."""
    localizers: dict[str, SpineLocalizer] = {}
    for uri in resolve_localizer_uris(uris):
        localizer = load_localizer(uri)
        series = localizer.task.name
        if series in localizers:
            raise StudyError(f"two localizers for {series} (the last: {uri}); give one per series type")
        localizers[series] = localizer
    return localizers


@dataclass
class PredictSummary:
    out: Path
    sites: Path
    studies: int
    rows: int
    from_prior: int
    reasons: dict[str, int]
    prior_source: str
    referred: int | None = None  # findings referred at the classifier's thresholds; None: it carries none


def predict_studies(predictor: StudyPredictor, studies: Sequence[Study], out: str | Path, *,
                    progress: bool = False, prior_source: str = "") -> PredictSummary:
    """Write the submission (and ``<out stem>.sites.csv``) for ``studies``; files appear only when complete."""
    out = Path(out)
    sites_path = out.with_name(out.stem + ".sites.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, sites = [], []
    iterator = studies
    if progress:
        from tqdm import tqdm

        iterator = tqdm(studies, desc="studies", unit="study")
    for study in iterator:
        prediction = predictor.predict(study)
        rows.append(prediction.rows)
        sites.append(prediction.sites)
    submission = pd.concat(rows, ignore_index=True)
    site_table = pd.concat(sites, ignore_index=True)
    check_submission(submission, [s.study_id for s in studies])
    write_csv(submission, out, float_format="%.6f")
    write_csv(site_table, sites_path)
    reasons = Counter(r for r, src in zip(site_table["reason"], site_table["source"]) if src == "prior")
    referred = int(site_table["refer"].sum()) if "refer" in site_table else None
    return PredictSummary(out, sites_path, len(studies), len(submission), int((site_table["source"] == "prior").sum()),
                          dict(reasons), prior_source, referred)


def check_submission(submission: pd.DataFrame, study_ids: Sequence) -> None:
    """25 rows per study, finite probabilities in [0, 1] summing to 1: else an error (a bug, not user input)."""
    expected = {row_id(s, c, lv) for s in study_ids for c in CONDITIONS for lv in LEVELS}
    got = set(submission["row_id"])
    probs = submission[list(PROBABILITY_COLUMNS)].to_numpy(float)
    if got != expected or len(submission) != len(expected):
        raise AssertionError(f"submission rows do not match 25 per study: {len(submission)} rows for {len(study_ids)} studies")
    if not (np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
            and np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)):
        raise AssertionError("submission probabilities are not finite distributions")
