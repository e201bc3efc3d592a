"""`spinemri train`, `tune` and `ensemble`: fit models and log their runs.
"""

from __future__ import annotations

import click

from spinemri.api.settings import experiment_config
from spinemri.cli.common import SET_OPTION, exit_on_interrupt, setting_options, settings_checked, tracked, user_errors
from spinemri.config import SHORTCUTS
from spinemri.metrics.headline import POINT_ERROR, baseline_name, floor_name, headline, judged_split
from spinemri.quiet import start_tensorflow

TRAIN_FLAGS = ("arch", "data_dir", "img_size", "mode", "epochs", "batch_size", "lr", "weights", "seed", "trials",
               "storage", "workers", "task", "series", "strategy", "mixed_precision", "folds")


@click.command()
@click.option("--experiment", default="quick", show_default=True,
              help="Experiment YAML: a name under experiments/ (quick, rsna, localize, ...) or a path.")
@setting_options(SHORTCUTS, *TRAIN_FLAGS)
@SET_OPTION
@user_errors
@settings_checked
@exit_on_interrupt
@tracked
def train(experiment, settings, **flags) -> None:
    """Train a backbone with the three heads (or, with --task localize, a stage-1 localizer) and log the run.

    Flags left out (or empty) keep the experiment's value; an experiment without a data_dir trains
    on the built-in phantom, generated once and cached. With --trials N an Optuna study of N trials
    runs first. The tracking store is $MLFLOW_TRACKING_URI (default: ./mlflow.db). Prints the run
    id and the test metrics.
    """
    config = experiment_config(experiment, flags, settings)  # refused before TensorFlow is imported
    start_tensorflow()
    from spinemri.api.train import run_experiment

    echo_outcome(run_experiment(config))


def echo_outcome(outcome) -> None:
    """A training's summary, at most a dozen lines: the verdict first (a classifier), the run, its headline
    metrics rounded with their intervals and floors, and the run's page in the MLflow UI."""
    result = outcome.result
    if not result.run_id:  # a worker of a multi-worker training other than the chief: the chief has the run
        return
    if outcome.kind == "localizer_cv":
        click.echo(f"cross-validation run {result.run_id} finished: {len(result.fold_models)} fold localizers "
                   "(not registered)")
    elif outcome.kind == "localizer":
        click.echo(f"run {result.run_id} finished: {result.epochs_trained} epoch(s), localizer {result.model_uri}")
    else:
        if outcome.study is not None:
            study = outcome.study
            click.echo(f"study {study.study_name}: {study.counts}, best {study.monitor} {study.best_value:.4g} "
                       f"(parent run {study.parent_run_id}); the best configuration retrained:")
        _echo_verdict(result.verdict)
        click.echo(f"run {result.run_id} finished: {result.epochs_trained} epoch(s), model {result.model_uri}")
    for line in headline_lines(result.metrics):
        click.echo(f"  {line}")
    if outcome.link:
        click.echo(f"MLflow UI: {outcome.link} (every metric: its Model metrics tab)")


def headline_lines(metrics: dict[str, float]) -> list[str]:
    """The few numbers a training is judged by (spinemri.metrics.headline), rounded: a classifier's with their
    95 % CIs beside the floor's, the difference to the floor, each head's ROC-AUC; a localizer's point error
    beside its mean-position baseline."""
    def ci(name: str) -> str:
        low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
        return f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""

    shown = headline(metrics)
    split = judged_split(metrics)
    lines, aucs = [], []
    for name, value in shown.items():
        if name.endswith("_roc_auc"):
            aucs.append(f"{name.removeprefix(f'{split}_').removesuffix('_roc_auc')} {value:.3f}")
        elif name.endswith(POINT_ERROR):
            if "_baseline_" not in name:
                base = shown.get(baseline_name(name))
                lines.append(f"{name} {value:.2f}" + (f", mean-position baseline {base:.2f}" if base is not None else ""))
        elif name == f"{split}_vs_floor":
            lines.append(f"difference to the floor {value:+.3f}{ci(name)}")
        elif not name.startswith(f"{split}_floor_"):
            floor = shown.get(floor_name(name, split))
            lines.append(f"{name} {value:.3f}{ci(name)}" + (f", floor {floor:.3f}" if floor is not None else ""))
    if aucs:
        lines.append("ROC-AUC " + ", ".join(aucs))
    return lines


def _echo_verdict(verdict) -> None:
    """The first line of a classifier's summary: how the model compares with its floor."""
    click.echo(verdict.sentence if verdict is not None else "No verdict against the per-site prior (see above why).")


@click.command()
@click.option("--experiment", default="quick", show_default=True, help="Experiment YAML (name or path).")
@click.option("--trials", required=True, type=click.IntRange(min=1), help="Finished trials the study should reach.")
@setting_options(SHORTCUTS, "arch", "storage", "study_name", "pruner", "workers", "data_dir", "epochs")
@SET_OPTION
@user_errors
@settings_checked
@exit_on_interrupt
@tracked
def tune(experiment, trials, settings, **flags) -> None:
    """Tune hyperparameters with Optuna (search space: the experiment's tuning.search_space).

    Each trial is a nested MLflow run under one parent run; pruned by hyperband (or the median)
    pruner on the validation monitor; re-running the same command after a crash resumes the study
    until --trials trials have finished. The best configuration is then trained and logged with
    its model like `spinemri train`.
    """
    settings = (*settings, *(f"tuning.{k}={flags.pop(k)}" for k in ("study_name", "pruner") if flags.get(k)))
    flags = {k: v for k, v in flags.items() if k not in ("study_name", "pruner")}
    config = experiment_config(experiment, {**flags, "trials": str(trials)}, settings)
    start_tensorflow()
    from spinemri.api.train import run_experiment

    echo_outcome(run_experiment(config))


@click.command()
@click.option("--run", "run_ids", multiple=True, required=True,
              help="A cross-validation run (the parent run of `spinemri train --folds K`); repeat to mix backbones.")
@click.option("--name", default=None, help="Registered model (default: the runs' mlflow.registered_model, spinemri).")
@click.option("--no-register", is_flag=True, help="Log the ensemble without registering it.")
@click.option("--champion-policy", "policy", default=None, type=click.Choice(["paired", "strict"]),
              help="How it must beat the champion (default: the runs' mlflow.champion_policy).")
@user_errors
@settings_checked
@tracked
def ensemble(run_ids, name, no_register, policy) -> None:
    """Serve the fold models of cross-validation runs as one model: the mean of their calibrated probabilities.

    The ensemble is evaluated on the locked test split (no fold trained on it), logged as a run of
    the runs' experiment and registered like any classifier; `mlflow models serve`, `spinemri
    predict` and `predict-study` take it unchanged.
    """
    start_tensorflow()
    from spinemri.api.ensemble import build_ensemble

    result = build_ensemble(list(run_ids), registered_model=name, register=not no_register, policy=policy)
    click.echo(f"run {result.run_id}: ensemble {result.model_uri}")
    for key in sorted(k for k in result.metrics if k.count("_") <= 3 or k.startswith("test_severity_weighted")):
        click.echo(f"  {key}: {result.metrics[key]:.4f}")
    if result.registered is not None:
        click.echo(f"  {result.registered}")
