"""`spinemri ablation`: the study-level pipeline and each of its additions, cross-validated on the same folds.

The steps add up, in this order:

    current      one slice per site, trained at the labelled sites, uncalibrated, one model
    stack        + a 2.5D stack of ``slices`` slices around each site (slices as channels, or the
                   experiment's model.slice_pooling)
    jitter       + training sites moved the way the localizers err *out of fold*
                   (train.site_jitter_from: the localizers' cross-validation runs)
    calibrated   + temperatures per condition fitted at the predicted sites, cross-fitted: each half
                   of a fold's studies is scaled by temperatures fitted on the other half
    ensemble     + the mean of ``members`` models trained with different seeds, then calibrated so

Each step is judged the way a study is diagnosed: for every study outside the locked test split,
the localizers of the fold that held it out find its sites on its DICOM series (``predict-study``'s
code: :class:`~spinemri.serving.study_predictor.StudyPredictor`), and each step's classifier of that fold
grades them; one out-of-fold submission per step covers every CV study once. All trainings share
one fold table (``data/folds.csv``), so no model grades or locates a study it trained on, and the
locked test studies are never predicted. As in every spinemri cross-validation (and the RSNA
solutions), fold k's models also stop early and keep their best epoch by fold k, so the numbers are
slightly optimistic — alike for every step, which the paired differences compare — and the
localizers' out-of-fold errors that set the jitter pool all folds.

One summary run (tag ``role=ablation``) holds the localizers' and classifiers' cross-validations as
nested runs and logs, per step ``<key>``: ``<key>_rsna_score`` with ``_ci_low``/``_ci_high`` (95 %
bootstrap over studies), ``<key>_vs_current`` (the paired difference to the current pipeline) with
its CI, ``<key>_severity_ece`` and ``<key>_severity_log_loss`` (model-graded rows),
``<key>_labelled_rsna_score`` (the trained steps, at the labelled sites), and the fold priors'
``prior_rsna_score``; the table as ``ablation/table.md`` / ``.csv``, a chart, each step's submission
and per-study terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
import time

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd

from spinemri.api.cv import FOLD_MODELS_ARTIFACT, FOLDS_ARTIFACT, cross_validate
from spinemri.api.localizer_cv import cross_validate_localizer
from spinemri.api.source import prepare_data, resolve_data_dir
from spinemri.config import ExperimentConfig, with_values
from spinemri.data.readers import detect_layout
from spinemri.data.splits import fold_studies
from spinemri.data.studies import find_studies
from spinemri.errors import ConfigError
from spinemri.metrics import competition, heads, paired
from spinemri.metrics.prior import prior_submission
from spinemri.models import calibration
from spinemri.models.backbones import get_backbone
from spinemri.serving.classifier import load_classifier
from spinemri.serving.localizer import load_localizer
from spinemri.serving.study_predictor import StudyPredictor, check_submission, classifier_prior
from spinemri.tracking.runs import log_figure, run_tags, training_run
from spinemri.training.fit import check_devices

ABLATION_ROLE = "ablation"
DEFAULT_EXPERIMENT = "spinemri-ablation"
PROBABILITIES = ["normal_mild", "moderate", "severe"]


@dataclass(frozen=True)
class Step:
    key: str
    label: str


@dataclass
class AblationResult:
    run_id: str
    table: pd.DataFrame  # one row per step
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def markdown(self) -> str:
        return markdown_table(self.table)


def steps(slices: int, members: int) -> list[Step]:
    return [Step("current", "current pipeline (1 slice, labelled sites, uncalibrated, one model)"),
            Step("stack", f"+ 2.5D stack ({slices} slices)"),
            Step("jitter", "+ site jitter (out-of-fold localizer errors)"),
            Step("calibrated", "+ calibration at the predicted sites"),
            Step("ensemble", f"+ ensemble ({members} seeds)")]


def ablation_configs(config: ExperimentConfig, localizer: ExperimentConfig,
                     experiment: str) -> tuple[ExperimentConfig, ExperimentConfig]:
    """The classifier's and the localizers' configs: the localizers read the classifier's data, folds and
    DICOM window, and both log to ``experiment`` without registering."""
    if config.split.folds < 2:
        raise ConfigError(f"the ablation cross-validates: split.folds must be >= 2, got {config.split.folds} "
                          "(--folds K)")
    if config.preprocess.mode != "roi":
        raise ConfigError("the ablation grades crops at sites: preprocess.mode must be roi")
    if config.task != "classify":
        raise ConfigError(f"--experiment names the classifier's experiment (task classify), got task {config.task}; "
                          "the localizers' is --localizer-experiment")
    shared = {f"data.{k}": v for k, v in config.to_dict()["data"].items()}
    shared.update({f"split.{k}": v for k, v in config.to_dict()["split"].items()})
    shared.update({"mlflow.experiment": experiment, "mlflow.register": False,
                   "train.deterministic": config.train.deterministic,
                   # the localizers decode the DICOM the classifiers grade: one window for both
                   "preprocess.dicom_window": config.preprocess.dicom_window})
    localizer = with_values(localizer, {**shared, "task": "localize"})
    classifier = with_values(config, {"mlflow.experiment": experiment, "mlflow.register": False, "model.calibration": "none"})
    return classifier, localizer


def run_ablation(config: ExperimentConfig, localizer: ExperimentConfig, *, slices: int = 5,
                 members: int = 2) -> AblationResult:
    """Cross-validate the localizers and every trained step on one fold table, grade every CV study at its
    predicted sites with each step, and log the table to a summary run (see the module docstring)."""
    if slices < 3 or slices % 2 == 0:
        raise ConfigError(f"the 2.5D step needs an odd number of slices >= 3, got {slices}")
    if members < 2:
        raise ConfigError(f"the ensemble step needs at least 2 members, got {members}")
    started = time.perf_counter()
    # Settings that cannot run fail here, before hours of training: every step's config, sizes, devices.
    for changes in ({"preprocess.slices": 1, "model.slice_pooling": "channels"}, {"preprocess.slices": slices}):
        with_values(config, changes)
    get_backbone(config.model.arch).check_size(config.preprocess.img_size)
    get_backbone(localizer.model.arch).check_size(localizer.localize.img_size)
    check_devices(config.train)
    data_dir = resolve_data_dir(config)
    if detect_layout(data_dir) != "rsna" or not (data_dir / "train.csv").is_file():
        raise ConfigError(f"{data_dir} is not an RSNA-layout folder with train.csv: the ablation locates sites on "
                          "whole DICOM series and scores them against train.csv; give the competition folder")
    dataset, samples = prepare_data(with_values(config, {"preprocess.slices": 1, "model.slice_pooling": "channels"}))
    table = fold_studies(samples, config.split.folds, test_fraction=config.split.fractions[2], seed=config.split.seed)
    labels = pd.read_csv(data_dir / "train.csv", dtype={"study_id": str})
    cv_studies = sorted(table.loc[table["fold"] >= 0, "study_id"].astype(str))
    params = {"ablation.folds": config.split.folds, "ablation.cv_studies": len(cv_studies),
              "ablation.test_studies_locked": int((table["fold"] < 0).sum()), "ablation.slices": slices,
              "ablation.members": members, "ablation.data": str(config.data.data_dir or
                                                                  f"phantom {config.data.phantom_studies} studies"),
              **{f"classifier.{k}": v for k, v in config.flat().items() if k.split(".")[0] in ("model", "train", "preprocess")
                 and not k.startswith("train.augment.")},
              **{f"localizer.{k}": v for k, v in localizer.flat().items() if k.split(".")[0] in ("model", "train", "localize")
                 and not k.startswith("train.augment.")}}
    timings: dict[str, float] = {}
    tags = {**run_tags(dataset.fingerprint, config.model.arch, config.task), "role": ABLATION_ROLE,
            "folds": str(config.split.folds)}
    with training_run(experiment=config.mlflow.experiment, config=config.to_dict(redacted=True), tags=tags,
                      params=params,
                      run_name=f"ablation-{config.model.arch}-cv{config.split.folds}-{datetime.now():%Y%m%d-%H%M%S}") as run:
        mlflow.log_dict(localizer.to_dict(redacted=True), "localizer_config.yaml")
        mlflow.log_text(table.to_csv(index=False), FOLDS_ARTIFACT)

        clock = time.perf_counter()
        localizer_runs = {}
        for series in ("sagittal_t2", "sagittal_t1", "axial_t2"):
            localizer_runs[series] = cross_validate_localizer(with_values(localizer, {"localize.series": series}),
                                                              folds_table=table, nested=True)
        timings["localizers"] = time.perf_counter() - clock
        jitter_from = ",".join(f"runs:/{r.run_id}" for r in localizer_runs.values())

        trained = {"current": {"preprocess.slices": 1, "train.site_jitter_mm": 0.0, "train.site_jitter_slices": 0.0,
                               "train.site_jitter_from": "", "model.slice_pooling": "channels"},
                   "stack": {"preprocess.slices": slices, "train.site_jitter_mm": 0.0, "train.site_jitter_slices": 0.0,
                             "train.site_jitter_from": ""},
                   "jitter": {"preprocess.slices": slices, "train.site_jitter_from": jitter_from}}
        for m in range(1, members):
            trained[f"jitter_seed{m}"] = {**trained["jitter"], "train.seed": config.train.seed + m}
        cv_runs = {}
        for key, changes in trained.items():
            clock = time.perf_counter()
            print(f"== ablation: classifier {key} ==", flush=True)
            cv_runs[key] = cross_validate(with_values(config, changes), folds_table=table, nested=True)
            timings[key] = time.perf_counter() - clock

        clock = time.perf_counter()
        graded, priors = _grade_out_of_fold(config, data_dir, table, localizer_runs, cv_runs)
        timings["grading"] = time.perf_counter() - clock
        rows = label_table(labels, graded["current"])
        submissions = {"current": graded["current"], "stack": graded["stack"], "jitter": graded["jitter"],
                       "calibrated": cross_fitted(graded["jitter"], rows, config.model.severity_sample_weights)}
        mean = mean_submission([graded["jitter"], *(graded[f"jitter_seed{m}"] for m in range(1, members))])
        submissions["ensemble"] = cross_fitted(mean, rows, config.model.severity_sample_weights)
        submissions["ensemble_uncalibrated"] = mean
        submissions.update({f"jitter_seed{m}": graded[f"jitter_seed{m}"] for m in range(1, members)})

        cv_labels = labels[labels["study_id"].isin(cv_studies)]
        result_table = _score(steps(slices, members), submissions, cv_labels, rows, priors,
                              {k: r.run_id for k, r in cv_runs.items()})
        seconds = time.perf_counter() - started
        _log(result_table, submissions, cv_labels, priors, timings, seconds)
    result = AblationResult(run.info.run_id, result_table, seconds, timings)
    print(result.markdown())
    print(f"ablation run {run.info.run_id}: {len(cv_studies)} studies, {config.split.folds} folds, {seconds / 60:.1f} min",
          flush=True)
    return result


def _grade_out_of_fold(config: ExperimentConfig, data_dir: Path, table: pd.DataFrame, localizer_runs: dict,
                       cv_runs: dict) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Per trained step, the OOF submission at the predicted sites (with ``source`` and ``fold`` columns);
    and the fold priors' submission of the same studies."""
    fold_models = {key: {f["fold"]: f["model_uri"] for f in
                         mlflow.artifacts.load_dict(f"runs:/{r.run_id}/{FOLD_MODELS_ARTIFACT}")["folds"]}
                   for key, r in cv_runs.items()}
    out: dict[str, list[pd.DataFrame]] = {key: [] for key in cv_runs}
    priors = []
    for k in range(config.split.folds):
        studies = sorted(table.loc[table["fold"] == k, "study_id"].astype(str))
        localizers = {series: load_localizer(r.fold_models[k]) for series, r in localizer_runs.items()}
        predictors = {key: StudyPredictor(localizers, load_classifier(models[k])) for key, models in fold_models.items()}
        first = next(iter(predictors.values()))
        prior = classifier_prior(first.classifier)[0]  # the fold's training labels: the same for every step
        priors.append(prior_submission(studies, prior))
        print(f"== ablation: grading fold {k + 1}/{config.split.folds} ({len(studies)} studies) at predicted sites ==",
              flush=True)
        for study in find_studies(data_dir, studies):
            located = first.locate(study)
            for key, predictor in predictors.items():
                prediction = predictor.grade(study.study_id, located)
                out[key].append(prediction.rows.assign(source=prediction.sites["source"].to_numpy(), fold=k))
    graded = {key: pd.concat(parts, ignore_index=True) for key, parts in out.items()}
    cv = sorted(table.loc[table["fold"] >= 0, "study_id"].astype(str))
    for submission in graded.values():
        check_submission(submission, cv)  # every CV study graded once, by its own fold's models
    return graded, pd.concat(priors, ignore_index=True)


def label_table(labels: pd.DataFrame, submission: pd.DataFrame) -> pd.DataFrame:
    """Per submission row: study, condition, fold and the label's class (-1: unlabelled)."""
    rows = competition.label_rows(labels)[["row_id", "condition", "severity"]]
    table = submission[["row_id", "fold"]].merge(rows, on="row_id", how="left")
    table["study_id"] = table["row_id"].str.split("_", n=1).str[0]
    table["target"] = table["severity"].fillna(-1).astype(int)
    if table["condition"].isna().any():
        raise AssertionError("a submission row has no label row")  # train.csv lists every row of its studies
    return table.drop(columns="severity")


def cross_fitted(submission: pd.DataFrame, rows: pd.DataFrame, severity_weights: bool) -> pd.DataFrame:
    """``submission`` (with ``source``) with its model-graded rows scaled by per-condition temperatures fitted at
    the predicted sites of *other* studies (:func:`spinemri.models.calibration.cross_fitted`); the prior's
    rows stay as they are."""
    if not submission["row_id"].equals(rows["row_id"]):
        raise AssertionError("submission and label rows are not aligned")
    scaled = calibration.cross_fitted({"severity": rows["target"].to_numpy()},
                                      {"severity": submission[PROBABILITIES].to_numpy(np.float64)},
                                      rows["condition"].tolist(), rows["study_id"].tolist(), rows["fold"].to_numpy(),
                                      fitted_rows=(submission["source"] == "model").to_numpy(),
                                      severity_weights=severity_weights)["severity"]
    return submission.assign(**{c: scaled[:, i] for i, c in enumerate(PROBABILITIES)})


def mean_submission(members: list[pd.DataFrame]) -> pd.DataFrame:
    """The members' probabilities averaged row by row (same rows, same order)."""
    first = members[0]
    for other in members[1:]:
        if not other["row_id"].equals(first["row_id"]):
            raise AssertionError("ensemble members graded different rows")
    mean = np.mean([m[PROBABILITIES].to_numpy(np.float64) for m in members], axis=0)
    graded = np.any([(m["source"] == "model").to_numpy() for m in members], axis=0)  # a model's output in the mean
    return first.assign(source=np.where(graded, "model", "prior"), **{c: mean[:, i] for i, c in enumerate(PROBABILITIES)})


def _score(step_list: list[Step], submissions: dict[str, pd.DataFrame], labels: pd.DataFrame, rows: pd.DataFrame,
           priors: pd.DataFrame, cv_runs: dict[str, str]) -> pd.DataFrame:
    terms = {key: competition.score_terms(labels, sub).reset_index() for key, sub in submissions.items()}
    prior_terms = competition.score_terms(labels, priors).reset_index()
    prior_score = paired.score_intervals(prior_terms)["score"][0]
    labelled = rows["target"].to_numpy() >= 0
    records = []
    for i, step in enumerate(step_list):
        value, low, high = paired.score_intervals(terms[step.key])["score"]
        diff = paired.paired_difference(terms[step.key], terms["current"], "rsna_score")
        previous = paired.paired_difference(terms[step.key], terms[step_list[max(i - 1, 0)].key], "rsna_score")
        graded = labelled & (submissions[step.key]["source"] == "model").to_numpy()
        y = rows["target"].to_numpy()[graded]
        p = submissions[step.key][PROBABILITIES].to_numpy(np.float64)[graded]
        scores = heads.resample_scores(y, p, np.ones((1, len(y))), severity=True)
        run = mlflow.get_run(cv_runs[step.key]) if step.key in cv_runs else None
        records.append({
            "step": step.key, "label": step.label, "rsna_score": value, "ci_low": low, "ci_high": high,
            "vs_current": diff.difference, "vs_current_ci_low": diff.ci_low, "vs_current_ci_high": diff.ci_high,
            "vs_current_percent": 100.0 * diff.difference / diff.reference,
            "vs_previous": previous.difference, "vs_previous_ci_low": previous.ci_low,
            "vs_previous_ci_high": previous.ci_high,
            "ratio_to_prior": value / prior_score,
            "severity_ece": float(scores["ece"][0]), "severity_log_loss": float(scores["weighted_log_loss"][0]),
            "labelled_rsna_score": run.data.metrics.get("cv_rsna_score", np.nan) if run else np.nan,
            "studies": int(len(terms[step.key])), "prior_rsna_score": prior_score})
    return pd.DataFrame(records)


def markdown_table(table: pd.DataFrame) -> str:
    lines = ["| step | OOF study score at predicted sites [95 % CI] | vs current [95 % CI], paired | "
             "vs the step before [95 % CI] | × prior | severity ECE | at labelled sites |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in table.itertuples(index=False):
        versus = "—" if r.step == "current" else (f"{r.vs_current:+.3f} [{r.vs_current_ci_low:+.3f}, "
                                                   f"{r.vs_current_ci_high:+.3f}] ({r.vs_current_percent:+.1f} %)")
        before = "—" if r.step == "current" else (f"{r.vs_previous:+.3f} [{r.vs_previous_ci_low:+.3f}, "
                                                  f"{r.vs_previous_ci_high:+.3f}]")
        at_labels = "—" if not np.isfinite(r.labelled_rsna_score) else f"{r.labelled_rsna_score:.3f}"
        lines.append(f"| {r.label} | {r.rsna_score:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] | {versus} | {before} | "
                     f"{r.ratio_to_prior:.2f} | {r.severity_ece:.3f} | {at_labels} |")
    first = table.iloc[0]
    lines.append(f"\nWeight-aware prior (each fold's training labels): {first.prior_rsna_score:.3f}; "
                 f"{int(first.studies)} studies, every interval a 95 % bootstrap over them.")
    return "\n".join(lines)


def _log(table: pd.DataFrame, submissions: dict[str, pd.DataFrame], labels: pd.DataFrame, priors: pd.DataFrame,
         timings: dict[str, float], seconds: float) -> None:
    metrics = {"prior_rsna_score": float(table["prior_rsna_score"].iloc[0]),
               "n_studies": float(table["studies"].iloc[0]), "ablation_time_s": round(seconds, 1),
               **{f"time_{k}_s": round(v, 1) for k, v in timings.items()}}
    for r in table.itertuples(index=False):
        metrics.update({f"{r.step}_rsna_score": r.rsna_score, f"{r.step}_rsna_score_ci_low": r.ci_low,
                        f"{r.step}_rsna_score_ci_high": r.ci_high, f"{r.step}_ratio_to_prior": r.ratio_to_prior,
                        f"{r.step}_severity_ece": r.severity_ece, f"{r.step}_severity_log_loss": r.severity_log_loss})
        if r.step != "current":
            metrics.update({f"{r.step}_vs_current": r.vs_current, f"{r.step}_vs_current_ci_low": r.vs_current_ci_low,
                            f"{r.step}_vs_current_ci_high": r.vs_current_ci_high, f"{r.step}_vs_previous": r.vs_previous,
                            f"{r.step}_vs_previous_ci_low": r.vs_previous_ci_low,
                            f"{r.step}_vs_previous_ci_high": r.vs_previous_ci_high})
        if np.isfinite(r.labelled_rsna_score):
            metrics[f"{r.step}_labelled_rsna_score"] = r.labelled_rsna_score
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
    mlflow.log_text(markdown_table(table), "ablation/table.md")
    mlflow.log_text(table.to_csv(index=False), "ablation/table.csv")
    for key, submission in submissions.items():
        mlflow.log_text(submission.to_csv(index=False, float_format="%.6f"), f"ablation/{key}_submission.csv")
        terms = competition.score_terms(labels, submission).reset_index()
        mlflow.log_text(terms.to_csv(index=False), f"ablation/{key}_rsna_score.terms.csv")
    mlflow.log_text(priors.to_csv(index=False, float_format="%.6f"), "ablation/prior_submission.csv")
    log_figure(_chart(table), "plots/ablation.png")


def _chart(table: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    y = np.arange(len(table))[::-1]
    ax.errorbar(table["rsna_score"], y, xerr=[table["rsna_score"] - table["ci_low"], table["ci_high"] - table["rsna_score"]],
                fmt="o", capsize=3)
    ax.axvline(table["prior_rsna_score"].iloc[0], color="grey", linestyle="--", label="weight-aware prior")
    ax.set_yticks(y, [s for s in table["step"]])
    ax.set_xlabel("out-of-fold study score at predicted sites (lower wins), 95 % CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
