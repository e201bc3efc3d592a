"""`spinemri compare`: the thesis's Table 3.1 rebuilt from MLflow runs, one row per backbone.

``train_all(config)`` trains every backbone of ``compare.archs`` under one protocol (the
experiment's split, preprocessing and budget; only the architecture changes). ``build_table``
reads the latest finished training run per architecture from the experiment's MLflow experiment,
and ``log_table`` writes the table as Markdown, CSV and a PNG chart into a summary run
(tag ``role=summary``) of the same experiment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from spinemri.config import ExperimentConfig, with_values
from spinemri.data.schema import HEADS
from spinemri.errors import CompareError
from spinemri.tracking.runs import log_figure, start_run
from spinemri.training.plots import plt
from spinemri.training.train import train

NON_TRAINING_ROLES = ("trial", "study", "summary")


@dataclass
class Comparison:
    experiment: str
    head: str
    table: pd.DataFrame  # one row per architecture, numbers as numbers

    def markdown(self) -> str:
        return markdown_table(self.table, self.head)


def train_all(config: ExperimentConfig, *, skip_existing: bool = False) -> list[str]:
    """Train each backbone in ``config.compare.archs`` with otherwise identical settings; returns run ids."""
    done = set(_latest_runs(config.mlflow.experiment)) if skip_existing else set()
    run_ids = []
    for arch in config.compare.archs:
        if arch in done:
            print(f"{arch}: a finished run exists, skipped (--skip-existing)", flush=True)
            continue
        print(f"== training {arch} ({len(run_ids) + 1}/{len(config.compare.archs)}) ==", flush=True)
        result = train(with_values(config, {"model.arch": arch}))
        run_ids.append(result.run_id)
    return run_ids


def build_table(experiment: str, head: str = "condition", archs: tuple[str, ...] | None = None) -> Comparison:
    if head not in HEADS:
        raise CompareError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    runs = _latest_runs(experiment)
    if archs:
        runs = {arch: run for arch, run in runs.items() if arch in archs}
    if not runs:
        raise CompareError(f"no finished training runs in the MLflow experiment {experiment!r} "
                           f"({mlflow.get_tracking_uri()}); train them first with `spinemri compare --train`")
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
            "majority_accuracy": m.get(f"test_{head}_accuracy_majority", math.nan),
            "roc_auc": m.get(f"test_{head}_roc_auc", math.nan),
            "roc_auc_ci_low": m.get(f"test_{head}_roc_auc_ci_low", math.nan),
            "roc_auc_ci_high": m.get(f"test_{head}_roc_auc_ci_high", math.nan),
            "epochs": int(m.get("epochs_trained", 0)),
            "batch_size": int(p.get("train.batch_size", 0)),
            "img_size": int(p.get("preprocess.img_size", 0)),
            "training_time_s": m.get("training_time_s", math.nan),
            "final_loss": max(losses, key=lambda x: x.step).value if losses else math.nan,
            "final_val_loss": m.get("val_loss", math.nan),
            "params": int(m.get("model_params", 0)),
            "inference_ms_per_image": m.get("inference_ms_per_image", math.nan),
            "run_id": run.info.run_id,
        })
    table = pd.DataFrame(rows).sort_values("accuracy", ascending=False, na_position="last").reset_index(drop=True)
    return Comparison(experiment=experiment, head=head, table=table)


def markdown_table(table: pd.DataFrame, head: str) -> str:
    def ci(row, name):
        value, low, high = row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"]
        if math.isnan(value):
            return "—"
        return f"{value:.3f}" + ("" if math.isnan(low) else f" [{low:.3f}, {high:.3f}]")

    header = ["architecture", f"{head} accuracy [95% CI]", f"{head} ROC-AUC [95% CI]", "epochs", "batch",
              "input px", "training time (s)", "final loss", "parameters", "inference ms/image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [row["arch"], ci(row, "accuracy"), ci(row, "roc_auc"), str(row["epochs"]), str(row["batch_size"]),
                 str(row["img_size"]), f"{row['training_time_s']:.0f}", f"{row['final_loss']:.3f}",
                 f"{row['params'] / 1e6:.1f} M", f"{row['inference_ms_per_image']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    majority = table["majority_accuracy"].dropna()
    if len(majority):  # the same held-out set for every run: one constant-prediction baseline
        lines.append(f"| *majority-class baseline* | {majority.iloc[0]:.3f} | 0.500 | | | | | | | |")
    return "\n".join(lines) + "\n"


def chart(comparison: Comparison):
    table = comparison.table
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(table))
    for ax, name, title in ((axes[0], "accuracy", "accuracy"), (axes[1], "roc_auc", "macro ROC-AUC")):
        values = table[name].to_numpy(float)
        low = np.nan_to_num(values - table[f"{name}_ci_low"].to_numpy(float), nan=0.0)
        high = np.nan_to_num(table[f"{name}_ci_high"].to_numpy(float) - values, nan=0.0)
        ax.bar(x, values, yerr=[low, high], capsize=4, color="#4c72b0")
        baseline = table["majority_accuracy"].dropna() if name == "accuracy" else pd.Series([0.5])
        if len(baseline):
            ax.axhline(baseline.iloc[0], color="#c44e52", linestyle="--", label="majority-class baseline")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(x, table["arch"], rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"test {comparison.head} {title} (95% CI, studies resampled)")
    fig.suptitle(f"Backbones in {comparison.experiment}")
    fig.tight_layout()
    return fig


def log_table(comparison: Comparison) -> str:
    """A summary run in the same experiment with the table as Markdown, CSV and PNG; returns its id."""
    experiment = MlflowClient().get_experiment_by_name(comparison.experiment)
    with start_run(experiment_id=experiment.experiment_id, run_name=f"compare-{comparison.head}",
                          tags={"role": "summary", "compare.head": comparison.head}) as run:
        mlflow.log_text(comparison.markdown(), "compare/table.md")
        mlflow.log_text(comparison.table.to_csv(index=False), "compare/table.csv")
        log_figure(chart(comparison), "compare/chart.png")
        mlflow.log_params({"compare.archs": ",".join(comparison.table["arch"]), "compare.head": comparison.head})
    return run.info.run_id


def _latest_runs(experiment: str) -> dict[str, mlflow.entities.Run]:
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise CompareError(f"no MLflow experiment {experiment!r} in {mlflow.get_tracking_uri()}; "
                           "train the backbones first with `spinemri compare --experiment ... --train`")
    latest: dict[str, mlflow.entities.Run] = {}
    for run in client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=5000):
        tags = run.data.tags
        if "arch" not in tags or tags.get("role") in NON_TRAINING_ROLES or "epochs_trained" not in run.data.metrics:
            continue
        latest.setdefault(tags["arch"], run)
    return latest
