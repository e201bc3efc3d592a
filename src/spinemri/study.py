"""Study-level diagnosis: a DICOM study in, the competition's 25 graded findings out.

    study folder -> series by description -> stage 1: each series type's localizer finds its sites
    (spinemri.localization) -> stage 2: the ROI classifier grades a crop at each site, with its own
    preprocessing unchanged (spinemri.models.pyfunc) -> 25 rows ``row_id,normal_mild,moderate,severe``

Where nothing can be seen — the study lacks the series type, its files do not decode, no localizer
for that type was given, or a site falls outside the image — the row gets the *prior*: the best
constant prediction under the competition metric, ``p(c) ∝ n(c) · w(c)`` with the class counts of
the classifier's training labels and the metric's weights w = 1/2/4. Every such row is counted
and its reason kept in the sites table written next to the submission.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import tempfile
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import mlflow
import numpy as np
import pandas as pd

from spinemri.data import limits, schema
from spinemri.data.dicom import (DicomImage, ImageReadError, ImageTooLarge, SeriesStack, decode_dicom_bytes, read_header,
                                 read_series)
from spinemri.data.schema import CONDITIONS, LEVELS
from spinemri.errors import UserError
from spinemri.localization.locate import SpineLocalizer, load_localizer
from spinemri.localization.sites import BY_DESCRIPTION, SERIES_NAMES, get_task, site_of
from spinemri.metrics import PROBABILITY_COLUMNS, SEVERITY_WEIGHTS, SUBMISSION_COLUMNS, label_rows, rsna_score
from spinemri.models.pyfunc import SpineClassifier, load_classifier
from spinemri.runs import start_run

# Normal/Mild, Moderate, Severe frequencies in the RSNA 2024 training labels (FACTS.md): the prior
# of a classifier logged before it recorded its own.
RSNA_FREQUENCIES = {
    "spinal_canal_stenosis": (0.878, 0.075, 0.048),
    "left_neural_foraminal_narrowing": (0.78, 0.18, 0.04),
    "right_neural_foraminal_narrowing": (0.78, 0.18, 0.04),
    "left_subarticular_stenosis": (0.714, 0.19, 0.095),
    "right_subarticular_stenosis": (0.714, 0.19, 0.095),
}


class StudyError(UserError):
    """A study request that cannot be met (no such study, no images, bad archive, ...)."""


def row_id(study_id, condition: str, level: str) -> str:
    return f"{study_id}_{schema.label_column(condition, level)}"


# --- the prior -----------------------------------------------------------------------------------

def weighted_prior(counts: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """Per condition, the constant prediction that minimises the metric's weighted log loss.

    With n_k labels of class k weighted w_k, ``sum_k n_k w_k (-log p_k)`` is smallest at
    ``p_k ∝ n_k w_k``. Counts get +1 so that an unseen class keeps a finite loss.
    """
    prior = {}
    for condition in CONDITIONS:
        mass = (np.asarray(counts.get(condition, (0, 0, 0)), float) + 1.0) * SEVERITY_WEIGHTS
        prior[condition] = (mass / mass.sum()).tolist()
    return prior


def prior_from_samples(samples: pd.DataFrame) -> dict[str, list[float]]:
    """The prior from a sample table's graded points (the classifier's training split)."""
    graded = samples[samples["severity"].notna() & samples["condition"].isin(CONDITIONS)]
    counts = {c: np.bincount(g["severity"].astype(int), minlength=3) for c, g in graded.groupby("condition")}
    return weighted_prior(counts)


def prior_from_labels(labels: pd.DataFrame) -> dict[str, list[float]]:
    """The prior from labels in train.csv's layout."""
    rows = label_rows(labels).dropna(subset=["severity"])
    counts = {c: np.bincount(g["severity"].astype(int), minlength=3) for c, g in rows.groupby("condition")}
    return weighted_prior(counts)


def classifier_prior(classifier: SpineClassifier) -> tuple[dict[str, list[float]], str]:
    """The prior recorded with the classifier (its training labels), else the RSNA label frequencies."""
    if "severity_prior" in classifier.meta:
        return classifier.meta["severity_prior"], "the classifier's training labels"
    n = {c: np.asarray(f) * 1e4 for c, f in RSNA_FREQUENCIES.items()}
    return weighted_prior(n), "the RSNA 2024 training label frequencies (the classifier recorded none)"


def prior_submission(study_ids: Sequence, prior: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    rows = [(row_id(s, c, lv), *prior[c]) for s in study_ids for c in CONDITIONS for lv in LEVELS]
    return pd.DataFrame(rows, columns=list(SUBMISSION_COLUMNS))


# --- reading studies ------------------------------------------------------------------------------

@dataclass(frozen=True)
class StudySeries:
    series_id: int
    description: str | None  # None: unknown (not listed and no SeriesDescription tag we recognise)
    files: tuple[Path, ...]


@dataclass(frozen=True)
class Study:
    study_id: str
    series: tuple[StudySeries, ...]


def find_studies(data_dir: str | Path, study_ids: Sequence | None = None) -> list[Study]:
    """Studies of an RSNA-layout folder (``train_images/`` or ``test_images/``), or a folder of study
    folders. Series types come from ``*_series_descriptions.csv`` when present, else each series'
    SeriesDescription tag."""
    root = Path(data_dir)
    if not root.is_dir():
        raise StudyError(f"{root} is not a folder; pass a dataset folder (with train_images/ or test_images/) "
                         "or a folder of <study_id>/<series_id>/*.dcm")
    images = next((root / d for d in (schema.IMAGES_DIR, "test_images") if (root / d).is_dir()), root)
    descriptions = {}
    for name in (schema.SERIES_CSV, "test_series_descriptions.csv"):
        if (root / name).is_file():
            table = pd.read_csv(root / name)
            descriptions.update({(str(s), int(se)): d for s, se, d in
                                 table[list(schema.SERIES_COLUMNS)].itertuples(index=False)})
    folders = sorted((p for p in images.iterdir() if p.is_dir()), key=lambda p: p.name)
    if study_ids:
        wanted = [str(s) for s in study_ids]
        present = {p.name for p in folders}
        missing = [s for s in wanted if s not in present]
        if missing:
            raise StudyError(f"{images} has no study folder {', '.join(missing[:5])}; "
                             f"{len(present)} studies are there (e.g. {', '.join(sorted(present)[:3])})")
        folders = [images / s for s in wanted]
    if not folders:
        raise StudyError(f"{images} holds no study folders (<study_id>/<series_id>/*.dcm)")
    return [_study(folder, descriptions) for folder in folders]


def _study(folder: Path, descriptions: Mapping) -> Study:
    series = []
    for series_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = tuple(sorted(series_folder.glob("*.dcm")))
        try:
            series_id = int(series_folder.name)
        except ValueError:
            series_id = abs(hash(series_folder.name)) % 10**9
        description = descriptions.get((folder.name, series_id))
        if description is None and files:
            description = _header_description(files[0])
        series.append(StudySeries(series_id, description, files))
    return Study(folder.name, tuple(series))


def _header_description(path: Path) -> str | None:
    """A known series type from the SeriesDescription tag ('Sagittal T2/STIR', 'SAG T1', 'AX T2 ...')."""
    try:
        text = str(read_header(path).get("SeriesDescription", "")).lower()
    except ImageTooLarge:
        raise
    except ImageReadError:
        return None
    if text in (d.lower() for d in BY_DESCRIPTION):
        return next(d for d in BY_DESCRIPTION if d.lower() == text)
    sagittal, axial = "sag" in text, "ax" in text
    if sagittal and ("t2" in text or "stir" in text):
        return schema.SAGITTAL_T2
    if sagittal and "t1" in text:
        return schema.SAGITTAL_T1
    if axial and "t2" in text:
        return schema.AXIAL_T2
    return None


def study_from_zip(data: bytes, study_id: str | None, workdir: Path, name: str = "study_zip_b64") -> Study:
    """Unpack a zip of one study's DICOM files (any folder layout) and group them by series.

    Series are grouped by SeriesInstanceUID; the series id is the folder name when numeric, else
    the SeriesNumber. The study id is ``study_id``, else the archive's single top folder. Members
    are streamed to ``workdir`` with a running byte count, never read whole into memory; the
    archive is refused as soon as it exceeds the limits of :mod:`spinemri.data.limits`.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise StudyError(f"{name} is not a zip archive ({exc}); zip the study's DICOM files and "
                         "base64-encode the archive") from None
    members = [m for m in archive.infolist() if not m.is_dir() and not Path(m.filename).name.startswith(".")]
    if not members:
        raise StudyError(f"{name}: the archive holds no files")
    _check_declared(members, name)
    groups: dict[str, list[Path]] = {}
    meta: dict[str, tuple[int, str | None]] = {}
    unpacked = 0
    for k, member in enumerate(members):
        target = workdir / f"{k:06d}.dcm"
        unpacked += _extract(archive, member, target, unpacked, name)
        try:
            header = read_header(target)
        except ImageTooLarge as exc:
            raise StudyError(f"{name}: {member.filename} {exc.reason}") from None
        except ImageReadError:
            continue  # not DICOM (a README, a DICOMDIR without pixels, ...)
        uid = str(header.get("SeriesInstanceUID", "") or Path(member.filename).parent)
        parent = Path(member.filename).parent.name
        series_id = int(parent) if parent.isdigit() else int(header.get("SeriesNumber", 0) or 0)
        groups.setdefault(uid, []).append(target)
        meta.setdefault(uid, (series_id, _header_description(target)))
    if not groups:
        raise StudyError(f"{name}: none of the {len(members)} files in the archive is a DICOM file")
    if study_id in (None, ""):
        tops = {Path(m.filename).parts[0] for m in members if len(Path(m.filename).parts) > 1}
        study_id = tops.pop() if len(tops) == 1 else "study"
    series = [StudySeries(meta[uid][0], meta[uid][1], tuple(paths)) for uid, paths in groups.items()]
    return Study(str(study_id), tuple(sorted(series, key=lambda s: s.series_id)))


def _check_declared(members: Sequence[zipfile.ZipInfo], name: str) -> None:
    """Refuse an archive whose directory already declares too many files or bytes."""
    if len(members) > limits.STUDY_FILES.value:
        raise StudyError(f"{name}: the archive holds {len(members):,} files, over {limits.STUDY_FILES.describe()}")
    biggest = max(members, key=lambda m: m.file_size)
    if biggest.file_size > limits.STUDY_FILE_BYTES.value:
        raise StudyError(f"{name}: {biggest.filename} unpacks to {limits.human_size(biggest.file_size)}, over "
                         f"{limits.STUDY_FILE_BYTES.describe()}")
    total = sum(m.file_size for m in members)
    if total > limits.STUDY_BYTES.value:
        raise StudyError(f"{name}: the archive unpacks to {limits.human_size(total)}, over {limits.STUDY_BYTES.describe()}")


def _extract(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, unpacked: int, name: str) -> int:
    """Stream one member to ``target`` in 1 MB chunks, counting bytes against the limits; returns its size."""
    label = f"{name}: {member.filename}"
    written = 0
    try:
        with archive.open(member) as source, open(target, "wb") as out:
            while chunk := source.read(1 << 20):
                written += len(chunk)
                if written > limits.STUDY_FILE_BYTES.value:
                    raise StudyError(f"{label} unpacks to more than {limits.human_size(limits.STUDY_FILE_BYTES.value)}, "
                                     f"over {limits.STUDY_FILE_BYTES.describe()}")
                if unpacked + written > limits.STUDY_BYTES.value:
                    raise StudyError(f"{name}: the archive unpacks to more than "
                                     f"{limits.human_size(limits.STUDY_BYTES.value)}, over {limits.STUDY_BYTES.describe()}")
                out.write(chunk)
    except NotImplementedError as exc:
        raise StudyError(f"{label} uses a compression method this server cannot unpack ({exc}); zip the study "
                         "with the standard 'deflate' or 'store' method") from None
    except RuntimeError as exc:  # zipfile's word for an encrypted member
        if "encrypted" in str(exc) or member.flag_bits & 0x1:
            raise StudyError(f"{label} is encrypted; send the study's files unencrypted") from None
        raise StudyError(f"{label} cannot be unpacked ({exc})") from None
    except zipfile.BadZipFile as exc:
        raise StudyError(f"{label} is damaged ({exc}); zip the study again") from None
    except (zlib.error, EOFError) as exc:
        raise StudyError(f"{label} is damaged: its compressed data ends early or is corrupt ({exc}); "
                         "zip the study again") from None
    return written


def stack_from_bytes(values: Sequence) -> SeriesStack:
    """Base64 DICOM files of one series (any order) -> a stack ordered along the slice normal."""
    from spinemri.models.pyfunc import InputError

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for k, value in enumerate(values):
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError, TypeError) as exc:
                raise InputError(f"row {k}: dicom_b64 is not valid base64 ({exc})") from None
            try:
                decode_dicom_bytes(data, f"row {k}: dicom_b64")
            except ImageReadError as exc:
                raise InputError(f"row {k}: dicom_b64 {exc.reason}") from None
            path = Path(tmp) / f"{k:06d}.dcm"
            path.write_bytes(data)
            paths.append(path)
        try:
            return read_series(paths)
        except ImageReadError as exc:
            raise InputError(f"the series cannot be stacked: {exc.reason}") from None


# --- prediction ------------------------------------------------------------------------------------

@dataclass
class StudyPrediction:
    rows: pd.DataFrame  # 25 rows: row_id, normal_mild, moderate, severe
    sites: pd.DataFrame  # 25 rows: row_id, source (model|prior), reason, series_id, instance_number, x, y

    @property
    def from_prior(self) -> int:
        return int((self.sites["source"] == "prior").sum())


@dataclass
class StudyPredictor:
    """Stage 1 (localizers, one per series type; any may be absent) + stage 2 (the ROI classifier)."""

    localizers: Mapping[str, SpineLocalizer]
    classifier: SpineClassifier
    prior: Mapping[str, Sequence[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prior:
            self.prior = classifier_prior(self.classifier)[0]
        missing = [c for c in CONDITIONS if c not in self.prior]
        if missing:
            raise StudyError(f"the prior lacks condition(s) {', '.join(missing)}")
        window = self.classifier.preprocessing.dicom_window
        for name, localizer in self.localizers.items():
            if localizer.preprocessing.dicom_window != window:
                raise StudyError(f"the {name} localizer and the classifier read DICOM windows differently "
                                 f"(dicom_window {localizer.preprocessing.dicom_window} vs {window}); "
                                 "train them with the same preprocess.dicom_window")

    def predict(self, study: Study) -> StudyPrediction:
        found: dict[tuple[str, str], tuple] = {}  # (condition, level) -> (site, stack)
        reasons: dict[str, str] = {}  # series type -> why its rows fall back to the prior
        for name in SERIES_NAMES:
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
                except ImageTooLarge:
                    raise  # refused, not guessed around: the limit and how to raise it reach the user
                except ImageReadError as exc:
                    unreadable.append(f"{exc.path} {exc.reason}")
            if not stacks:
                reasons[name] = f"{task.description} unreadable: {unreadable[0]}"
                continue
            by_id = dict(stacks)
            for site in self.localizers[name].locate(stacks):
                found[(site.condition, site.level)] = (site, by_id[site.series_id])
        return self._grade(study.study_id, found, reasons)

    def _grade(self, study_id: str, found: Mapping, reasons: Mapping[str, str]) -> StudyPrediction:
        crops, keys, site_rows = [], [], {}
        for (condition, level), (site, stack) in found.items():
            i = site.slice_index
            n = len(stack.instance_numbers)

            def image(j):
                return DicomImage(stack.pixels[j], "", int(stack.instance_numbers[j]), None, None, stack.pixel_spacing)

            try:
                crops.append(self.classifier.prepare_image(image(i), [image(max(i - 1, 0)), image(min(i + 1, n - 1))],
                                                           site.x, site.y))
                keys.append((condition, level))
            except ValueError as exc:
                site_rows[(condition, level)] = dict(source="prior", reason=str(exc))
                continue
            site_rows[(condition, level)] = dict(source="model", reason="", series_id=site.series_id,
                                                 instance_number=site.instance_number, x=round(site.x, 2),
                                                 y=round(site.y, 2), slice_score=round(site.slice_score, 4))
        probs = {}
        if crops:
            severity = self.classifier.predict_images(np.stack(crops))["severity"].astype(np.float64)
            for key, p in zip(keys, severity):
                probs[key] = p
        rows, sites = [], []
        for condition in CONDITIONS:
            for level in LEVELS:
                key = (condition, level)
                p = probs.get(key)
                info = site_rows.get(key)
                if p is None or not np.isfinite(p).all() or p.sum() <= 0:
                    p = np.asarray(self.prior[condition], float)
                    if info is None or info.get("source") == "model":
                        series_type = site_of(condition).name
                        info = dict(source="prior", reason=reasons.get(series_type, f"no site found on the {series_type} series"))
                p = np.clip(p / p.sum(), 0.0, 1.0)
                rid = row_id(study_id, condition, level)
                rows.append((rid, *p))
                sites.append({"row_id": rid, **info})
        sites_frame = pd.DataFrame(sites).reindex(columns=["row_id", "source", "reason", "series_id", "instance_number",
                                                           "x", "y", "slice_score"])
        return StudyPrediction(pd.DataFrame(rows, columns=list(SUBMISSION_COLUMNS)), sites_frame)


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
            found = [f"models:/{name}@{s}" for s in SERIES_NAMES if s in aliases]
            if not found:
                raise StudyError(f"registered model {name} has no alias {', '.join(SERIES_NAMES)} (its aliases: "
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
    _atomic_csv(submission, out, float_format="%.6f")
    _atomic_csv(site_table, sites_path)
    reasons = Counter(r for r, src in zip(site_table["reason"], site_table["source"]) if src == "prior")
    return PredictSummary(out, sites_path, len(studies), len(submission), int((site_table["source"] == "prior").sum()),
                          dict(reasons), prior_source)


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


def _atomic_csv(frame: pd.DataFrame, path: Path, **kwargs) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        frame.to_csv(tmp, index=False, **kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- evaluation -------------------------------------------------------------------------------------

def evaluate_submission(labels: pd.DataFrame, submission: pd.DataFrame, prior_labels: pd.DataFrame | None = None, *,
                        prior: Mapping[str, Sequence[float]] | None = None, prior_source: str = "") -> dict:
    """rsna_score of ``submission`` on the studies it covers, beside the weight-aware prior baseline.

    The baseline learns from ``prior_labels`` (train.csv layout; none of the scored studies), or is
    ``prior`` as given (a classifier's recorded training prior, named by ``prior_source``).
    """
    rows = submission["row_id"].astype(str)
    studies = sorted(rows.str.split("_", n=1).str[0].unique())
    scored = labels[labels["study_id"].astype(str).isin(studies)]
    missing = sorted(set(studies) - set(scored["study_id"].astype(str)))
    if missing:
        raise StudyError(f"the labels do not have {len(missing)} submitted study(ies): {', '.join(missing[:5])}")
    prior_studies = 0
    if prior is None:
        if prior_labels is None:
            raise StudyError("the prior baseline needs labels of other studies or a recorded prior")
        overlap = set(prior_labels["study_id"].astype(str)) & set(studies)
        if overlap:
            raise StudyError(f"the prior's labels include {len(overlap)} scored study(ies); the baseline must not "
                             "see them")
        prior = prior_from_labels(prior_labels)
        prior_studies = int(prior_labels["study_id"].nunique())
        prior_source = prior_source or f"the labels of {prior_studies} other studies"
    model = rsna_score(scored, submission, return_parts=True)
    baseline = rsna_score(scored, prior_submission(studies, prior), return_parts=True)
    return {"studies": len(studies), "model": model, "prior_baseline": baseline, "prior": dict(prior),
            "prior_studies": prior_studies, "prior_source": prior_source}


def evaluate_study_files(labels_path: str | Path, submission_path: str | Path, *,
                         prior_labels_path: str | Path | None = None, classifier_uri: str | None = None) -> dict:
    """:func:`evaluate_submission` for files: the labels (train.csv layout) and a submission CSV.

    The baseline's prior comes from ``prior_labels_path``, else from the labelled studies of
    ``labels_path`` that are not submitted, else (none left: the labels hold only the submitted
    studies) from the prior recorded with ``classifier_uri``, and the report says which.
    """
    labels = _read_labels(labels_path, "labels")
    table = _read_table(submission_path, "submission", dtype={"row_id": str})
    if "row_id" not in table.columns:
        raise StudyError(f"{submission_path} has no row_id column; expected row_id,normal_mild,moderate,severe")
    studies = set(table["row_id"].astype(str).str.split("_", n=1).str[0])
    if prior_labels_path is not None:
        return evaluate_submission(labels, table, _read_labels(prior_labels_path, "--prior-labels"),
                                   prior_source=f"--prior-labels {prior_labels_path}")
    others = labels[~labels["study_id"].isin(studies)]
    if not label_rows(others)["severity"].notna().any():
        if not classifier_uri:
            raise StudyError(f"{labels_path} labels only the {len(studies)} submitted studies, so no other study is "
                             "left to learn the prior baseline from; pass --prior-labels FILE (labels of other "
                             "studies) or --classifier URI (use the prior recorded with that classifier)")
        try:
            prior, source = classifier_prior(load_classifier(classifier_uri))
        except UserError as exc:
            raise StudyError(f"{labels_path} labels only the submitted studies, and the fallback prior could not be "
                             f"read: {exc}; pass --prior-labels FILE (labels of other studies) or another "
                             "--classifier") from None
        return evaluate_submission(labels, table, prior=prior,
                                   prior_source=f"{source} ({classifier_uri}): {labels_path} labels no other study")
    return evaluate_submission(labels, table, others)


def _read_table(path, what: str, **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except FileNotFoundError:
        raise StudyError(f"{what} {path} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise StudyError(f"{what} {path} is not a readable CSV ({type(exc).__name__}: {exc})") from None


def _read_labels(path, what: str) -> pd.DataFrame:
    labels = _read_table(path, what, dtype={"study_id": str})
    if "study_id" not in labels.columns:
        raise StudyError(f"{what} {path} has no study_id column; expected train.csv's layout")
    return labels


def log_study_evaluation(report: Mapping, submission_path: Path, sites_path: Path | None, tags: Mapping[str, str]) -> str:
    """One MLflow run in ``spinemri-study`` with the score, its terms, the baseline and the files."""
    mlflow.set_experiment("spinemri-study")
    with start_run(run_name=f"study-evaluation-{report['studies']}-studies") as run:
        mlflow.set_tags({"role": "study-evaluation", **tags})
        mlflow.set_tag("prior_source", report.get("prior_source", ""))
        metrics = {"studies": report["studies"], "prior_studies": report["prior_studies"]}
        for prefix, parts in (("study", report["model"]), ("prior", report["prior_baseline"])):
            metrics[f"{prefix}_rsna_score"] = parts["score"]
            metrics.update({f"{prefix}_{k}": v for k, v in parts.items() if k not in ("score", "rows")})
        if sites_path is not None and sites_path.is_file():
            sites = pd.read_csv(sites_path)
            metrics["rows_from_prior"] = int((sites["source"] == "prior").sum())
            mlflow.log_artifact(str(sites_path), "study")
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(submission_path), "study")
        mlflow.log_text(json.dumps(report, indent=2), "study/evaluation.json")
        return run.info.run_id


__all__ = ["StudyPredictor", "find_studies", "predict_studies", "resolve_localizers", "evaluate_submission",
           "weighted_prior", "load_classifier"]
