"""`spinemri compare`: the thesis's Table 3.1 rebuilt from MLflow runs, one row per backbone.

``train_all(config)`` trains every backbone of ``compare.archs`` under one protocol (the
experiment's split, preprocessing and budget; only the architecture changes). ``build_table``
reads the latest finished training run per architecture from the experiment's MLflow experiment,
and ``log_table`` writes the table as Markdown, CSV and a PNG chart into a summary run
(tag ``role=summary``) of the same experiment.

With ``folds=K`` (``spinemri compare --folds K``) each backbone is cross-validated instead
(spinemri.api.cv) and the table holds each one's out-of-fold study-level score with its 95 % CI
over all CV studies, and its paired difference to the best backbone's score on the same studies.
"""

from __future__ import annotations

from dataclasses import dataclass
import math

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
import numpy as np
import pandas as pd

from spinemri.config import param_name
from spinemri.data.schema import HEADS
from spinemri.errors import CompareError
from spinemri.metrics.paired import paired_difference, terms_artifact
from spinemri.metrics.plots import plt
from spinemri.tracking import lineage, links
from spinemri.tracking.artifacts import logged_csv
from spinemri.tracking.reports import prior_site_score, table_artifact
from spinemri.tracking.runs import CV_ROLE, CV_SCORE, FOLD_ROLE, log_figure, logged_table, start_run

NON_TRAINING_ROLES = ("trial", "study", "summary", CV_ROLE, FOLD_ROLE, "ensemble")


@dataclass
class Comparison:
    experiment: str
    head: str
    table: pd.DataFrame  # one row per architecture, numbers as numbers

    def markdown(self) -> str:
        return markdown_table(self.table, self.head)


def build_table(experiment: str, head: str = "condition", archs: tuple[str, ...] | None = None,
                folds: int = 0) -> Comparison:
    if head not in HEADS:
        raise CompareError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    runs = latest_runs(experiment, folds)
    if archs:
        runs = {arch: run for arch, run in runs.items() if arch in archs}
    if not runs:
        kind = f"{folds}-fold cross-validation" if folds else "training"
        raise CompareError(f"no finished {kind} runs in the MLflow experiment {experiment!r} "
                           f"({mlflow.get_tracking_uri()}); train them first with `spinemri compare --train"
                           f"{f' --folds {folds}' if folds else ''}`")
    if folds:
        return _cv_table(experiment, head, runs)
    client = MlflowClient()
    rows = []
    for arch, run in runs.items():
        m, p = run.data.metrics, run.data.params
        losses = client.get_metric_history(run.info.run_id, "loss")
        rows.append({
            "arch": arch,
            "accuracy": m.get(f"test_{head}_accuracy", math.nan),
            "accuracy_ci_low": m.get(f"test_{head}_accuracy_ci_low", math.nan),
            "accuracy_ci_high": m.get(f"test_{head}_accuracy_ci_high", math.nan),
            "majority_accuracy": _baseline(run.info.run_id, "test", head, "accuracy"),
            "roc_auc": m.get(f"test_{head}_roc_auc", math.nan),
            "roc_auc_ci_low": m.get(f"test_{head}_roc_auc_ci_low", math.nan),
            "roc_auc_ci_high": m.get(f"test_{head}_roc_auc_ci_high", math.nan),
            "epochs": int(m.get("epochs_trained", 0)),
            "batch_size": int(p.get(param_name("train.batch_size"), 0)),
            "img_size": int(p.get(param_name("preprocess.img_size"), 0)),
            "training_time_s": m.get("training_time_s", math.nan),
            "final_loss": max(losses, key=lambda x: x.step).value if losses else math.nan,
            "final_val_loss": m.get("val_loss", math.nan),
            "params": int(m.get("model_params", 0)),
            "inference_ms_per_image": m.get("inference_ms_per_image", math.nan),
            **_floor_columns(run, "test", head),
            "run_id": run.info.run_id,
        })
    table = pd.DataFrame(rows).sort_values("accuracy", ascending=False, na_position="last").reset_index(drop=True)
    return Comparison(experiment=experiment, head=head, table=table)


def _floor_columns(run, split: str, head: str) -> dict:
    """A run's comparison with its floor: the champion metric and the floor's value of it, the paired
    difference with its CI, the verdict and its sentence; and the floor's accuracy and ROC-AUC for ``head``
    (for condition and level, training frequencies: the majority class and chance)."""
    m, tags = run.data.metrics, run.data.tags
    metric = tags.get("verdict_metric", "")
    name = metric.removeprefix(f"{split}_")
    # severity: the per-site prior's accuracy is not a headline metric (its predictions are the run's artifact)
    floor_accuracy = math.nan if head == "severity" else _baseline(run.info.run_id, split, head, "accuracy")
    return {"floor_metric": metric, "metric_value": m.get(metric, math.nan),
            "floor_value": m.get(f"{split}_floor_{name}", math.nan),
            "vs_floor": m.get(f"{split}_vs_floor", math.nan), "vs_floor_ci_low": m.get(f"{split}_vs_floor_ci_low", math.nan),
            "vs_floor_ci_high": m.get(f"{split}_vs_floor_ci_high", math.nan), "verdict": tags.get("verdict", ""),
            "verdict_sentence": tags.get("verdict_sentence", ""), "floor_accuracy": floor_accuracy,
            "floor_roc_auc": m.get(f"{split}_floor_{head}_roc_auc", math.nan) if head == "severity" else 0.5}


def _cv_table(experiment: str, head: str, runs: dict[str, mlflow.entities.Run]) -> Comparison:
    """One row per backbone's latest CV run: its OOF scores with CIs and the paired difference to the best."""
    rows, terms = [], {}
    for arch, run in runs.items():
        m = run.data.metrics
        row = {"arch": arch, "folds": int(run.data.tags.get("folds", 0)),
               "studies": int(lineage.logged_profile(run, "cv").get("studies", 0))}
        for name, key in (("rsna_score", CV_SCORE), ("accuracy", f"cv_{head}_accuracy"),
                          ("roc_auc", f"cv_{head}_roc_auc")):
            row.update({name: m.get(key, math.nan), f"{name}_ci_low": m.get(f"{key}_ci_low", math.nan),
                        f"{name}_ci_high": m.get(f"{key}_ci_high", math.nan)})
        row.update(prior_rsna_score=prior_site_score(run.info.run_id, "cv"),
                   epochs=m.get("epochs_trained", math.nan), training_time_s=m.get("training_time_s", math.nan),
                   **_floor_columns(run, "cv", head), run_id=run.info.run_id)
        rows.append(row)
        terms[arch] = _terms(run.info.run_id)
    table = pd.DataFrame(rows).sort_values("rsna_score", na_position="last").reset_index(drop=True)
    best = table["arch"].iloc[0]
    differences = []
    for arch in table["arch"]:
        try:
            if arch == best or terms[arch] is None or terms[best] is None:
                found = None
            else:
                found = paired_difference(terms[arch], terms[best], CV_SCORE)
        except ValueError as exc:  # other folds or studies: not a paired comparison
            print(f"{arch}: no paired difference to {best} ({exc})", flush=True)
            found = None
        differences.append(found)
    table["vs_best"] = [d.difference if d else (0.0 if a == best else math.nan) for a, d in zip(table["arch"], differences)]
    table["vs_best_ci_low"] = [d.ci_low if d else math.nan for d in differences]
    table["vs_best_ci_high"] = [d.ci_high if d else math.nan for d in differences]
    # Clear of zero on either side: this backbone is worse than the best beyond the studies' noise.
    table["vs_best_significant"] = [bool(d and d.enough_studies and (d.ci_low > 0 or d.ci_high < 0))
                                    for d in differences]
    return Comparison(experiment=experiment, head=head, table=table)


def _baseline(run_id: str, split: str, head: str, metric: str, kind: str = "majority") -> float:
    """A constant baseline's value of a head metric, from the run's evaluation table (NaN where absent)."""
    table = logged_table(run_id, table_artifact(split))
    if table is None:
        return math.nan
    row = table[(table["head"] == head) & (table["scope"] == "head") & (table["metric"] == metric)]
    return float(row[kind].iloc[0]) if len(row) and row[kind].notna().iloc[0] else math.nan


def _terms(run_id: str) -> pd.DataFrame | None:
    """The run's per-study terms of its CV score; None when it logged none (no score: a group was missing)."""
    try:
        return logged_csv(run_id, terms_artifact(CV_SCORE))
    except (MlflowException, OSError):
        return None


def _ci(row, name) -> str:
    value, low, high = row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"]
    if math.isnan(value):
        return "—"
    return f"{value:.3f}" + ("" if math.isnan(low) else f" [{low:.3f}, {high:.3f}]")


def _versus_floor(row) -> str:
    """'−0.189 [−0.250, −0.130] better' for a row's paired difference to its floor."""
    if not isinstance(row.get("vs_floor"), float) or math.isnan(row["vs_floor"]):
        return "—"
    return (f"{row['vs_floor']:+.3f} [{row['vs_floor_ci_low']:+.3f}, {row['vs_floor_ci_high']:+.3f}] "
            f"{row['verdict'] or ''}").strip()


def _value(value: float) -> str:
    return "—" if not isinstance(value, float) or math.isnan(value) else f"{value:.3f}"


def _floor_row(table: pd.DataFrame, cells: dict[str, str], header: list[str]) -> str:
    """The floor's row: one, since every run of a comparison has the same held-out studies."""
    return "| " + " | ".join(cells.get(column, "") for column in header) + " |"


def verdicts(table: pd.DataFrame) -> list[str]:
    """Each backbone's verdict sentence, in the table's order."""
    return [f"{row['arch']}: {row['verdict_sentence']}" for _, row in table.iterrows() if row.get("verdict_sentence")]


def markdown_table(table: pd.DataFrame, head: str) -> str:
    if "rsna_score" in table.columns:
        return _cv_markdown(table, head)
    metric = next((m for m in table.get("floor_metric", ()) if m), "the champion metric")
    header = ["architecture", f"{head} accuracy [95% CI]", f"{head} ROC-AUC [95% CI]", metric,
              "vs floor [95% CI], paired", "epochs", "batch", "input px", "training time (s)", "final loss",
              "parameters", "inference ms/image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [row["arch"], _ci(row, "accuracy"), _ci(row, "roc_auc"), _value(row.get("metric_value", math.nan)),
                 _versus_floor(row), str(row["epochs"]), str(row["batch_size"]), str(row["img_size"]),
                 f"{row['training_time_s']:.0f}", f"{row['final_loss']:.3f}", f"{row['params'] / 1e6:.1f} M",
                 f"{row['inference_ms_per_image']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    floor_accuracy = table.get("floor_accuracy", pd.Series(dtype=float)).dropna()
    floor_value = table.get("floor_value", pd.Series(dtype=float)).dropna()
    if len(floor_accuracy) or len(floor_value):  # the same held-out set for every run: one floor
        roc = table["floor_roc_auc"].dropna()
        lines.append(_floor_row(table, {
            "architecture": "*floor: the per-site prior*",
            f"{head} accuracy [95% CI]": _value(floor_accuracy.iloc[0]) if len(floor_accuracy) else "—",
            f"{head} ROC-AUC [95% CI]": _value(roc.iloc[0]) if len(roc) else "—",
            metric: _value(floor_value.iloc[0]) if len(floor_value) else "—", "vs floor [95% CI], paired": "0"},
            header))
    return "\n".join(lines) + "\n"


def _cv_markdown(table: pd.DataFrame, head: str) -> str:
    header = ["architecture", "CV study score [95% CI] (lower is better)", "vs best [95% CI], paired",
              "vs floor [95% CI], paired", f"{head} accuracy [95% CI]", f"{head} ROC-AUC [95% CI]", "folds",
              "studies", "epochs (mean)", "training time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in table.iterrows():
        if i == 0:
            versus = "best"
        elif math.isnan(row["vs_best"]):
            versus = "—"
        else:
            versus = (f"{row['vs_best']:+.3f} [{row['vs_best_ci_low']:+.3f}, {row['vs_best_ci_high']:+.3f}]"
                      + (" (significant)" if row["vs_best_significant"] else " (within noise)"))
        cells = [row["arch"], _ci(row, "rsna_score"), versus, _versus_floor(row), _ci(row, "accuracy"),
                 _ci(row, "roc_auc"), str(row["folds"]), str(row["studies"]), f"{row['epochs']:.1f}",
                 f"{row['training_time_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    prior = table["prior_rsna_score"].dropna()
    if len(prior):  # the same studies and folds for every run: one floor
        accuracy = table.get("floor_accuracy", pd.Series(dtype=float)).dropna()
        roc = table.get("floor_roc_auc", pd.Series(dtype=float)).dropna()
        lines.append(_floor_row(table, {
            "architecture": "*floor: the per-site prior*", "CV study score [95% CI] (lower is better)":
                f"{prior.iloc[0]:.3f}", "vs floor [95% CI], paired": "0",
            f"{head} accuracy [95% CI]": _value(accuracy.iloc[0]) if len(accuracy) else "",
            f"{head} ROC-AUC [95% CI]": _value(roc.iloc[0]) if len(roc) else ""}, header))
    return "\n".join(lines) + "\n"


def chart(comparison: Comparison):
    table = comparison.table
    cv = "rsna_score" in table.columns
    panels = (("rsna_score", "study score, lower is better", "prior_rsna_score", "floor: the per-site prior"),
              ("roc_auc", "macro ROC-AUC", None, "chance")) if cv else \
        (("accuracy", "accuracy", "majority_accuracy", "majority-class baseline"),
         ("roc_auc", "macro ROC-AUC", None, "majority-class baseline"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(table))
    for ax, (name, title, baseline_column, baseline_label) in zip(axes, panels):
        values = table[name].to_numpy(float)
        low = np.nan_to_num(values - table[f"{name}_ci_low"].to_numpy(float), nan=0.0)
        high = np.nan_to_num(table[f"{name}_ci_high"].to_numpy(float) - values, nan=0.0)
        ax.bar(x, values, yerr=[low, high], capsize=4, color="#4c72b0")
        baseline = table[baseline_column].dropna() if baseline_column else pd.Series([0.5])
        if len(baseline):
            ax.axhline(baseline.iloc[0], color="#c44e52", linestyle="--", label=baseline_label)
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(x, table["arch"], rotation=30, ha="right")
        top = np.nanmax(np.concatenate([values + high, baseline.to_numpy(float)])) if name == "rsna_score" else 1
        ax.set_ylim(0, top * 1.1 if name == "rsna_score" else 1)
        where = "out-of-fold" if cv else "test"
        ax.set_title(f"{where} {'study' if name == 'rsna_score' else comparison.head} {title} (95% CI, studies resampled)",
                     fontsize=9)
    fig.suptitle(f"Backbones in {comparison.experiment}")
    fig.tight_layout()
    return fig


def compare_link(comparison: Comparison, ui_url: str = "") -> str:
    """The MLflow UI's compare-runs page for the runs of the table (mlflow.ui_url, or where the UI of the
    tracking store is served: spinemri.tracking.links)."""
    experiment = MlflowClient().get_experiment_by_name(comparison.experiment)
    return links.compare_runs_url(links.ui_base_url(mlflow.get_tracking_uri(), ui_url),
                                  list(comparison.table["run_id"]), [experiment.experiment_id])


def log_table(comparison: Comparison, link: str = "") -> str:
    """A summary run in the same experiment with the table as Markdown, CSV and PNG and (``link``) the UI's
    compare page of its runs as the tag ``compare.link`` and the run's description; returns its id."""
    experiment = MlflowClient().get_experiment_by_name(comparison.experiment)
    tags = {"role": "summary", "compare.head": comparison.head}
    if link:
        tags.update({"compare.link": link, "mlflow.note.content": f"[Compare these runs in the MLflow UI]({link})"})
    with start_run(experiment_id=experiment.experiment_id, run_name=f"compare-{comparison.head}", tags=tags) as run:
        mlflow.log_text(comparison.markdown(), "compare/table.md")
        mlflow.log_text(comparison.table.to_csv(index=False), "compare/table.csv")
        log_figure(chart(comparison), "compare/chart.png")
        mlflow.log_params({"compare.archs": ",".join(comparison.table["arch"]), "compare.head": comparison.head,
                           "compare.folds": int(comparison.table["folds"].iloc[0]) if "folds" in comparison.table else 0})
    return run.info.run_id


def latest_runs(experiment: str, folds: int = 0) -> dict[str, mlflow.entities.Run]:
    """The latest finished run per backbone: single-split training runs, or with ``folds`` the parent
    runs of cross-validations with that many folds."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise CompareError(f"no MLflow experiment {experiment!r} in {mlflow.get_tracking_uri()}; "
                           "train the backbones first with `spinemri compare --experiment ... --train`")
    latest: dict[str, mlflow.entities.Run] = {}
    for run in client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=5000):
        tags = run.data.tags
        if "arch" not in tags or "epochs_trained" not in run.data.metrics:
            continue
        if folds and (tags.get("role") != CV_ROLE or tags.get("folds") != str(folds)):
            continue
        if not folds and tags.get("role") in NON_TRAINING_ROLES:
            continue
        latest.setdefault(tags["arch"], run)
    return latest
