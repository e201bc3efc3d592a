"""`spinemri compare` and `evaluate`: trained runs side by side, and a run's model evaluated again.
"""

from __future__ import annotations

import json

import click

from spinemri.cli.common import settings_checked, tracked, user_errors
from spinemri.quiet import start_tensorflow


@click.command()
@click.option("--experiment", default="seed_table_quick", show_default=True,
              help="Experiment YAML (its mlflow.experiment holds the runs), or an MLflow experiment name.")
@click.option("--train", "do_train", is_flag=True, help="First train every backbone in compare.archs.")
@click.option("--skip-existing", is_flag=True, help="With --train: skip backbones that already have a finished run.")
@click.option("--head", default="condition", show_default=True, type=click.Choice(["condition", "level", "severity"]),
              help="Head whose accuracy and ROC-AUC fill the table (the thesis reported condition).")
@click.option("--folds", default=0, show_default=True, type=click.IntRange(min=0),
              help="K >= 2: compare K-fold cross-validations (trained with --train): each backbone's out-of-fold "
                   "study score with its CI and its paired difference to the best; 0: single-split test runs.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Config overrides for --train, e.g. --set compare.archs=tiny,mobilenet_v2 --set data.data_dir=...")
@user_errors
@tracked
def compare(experiment, do_train, skip_existing, head, folds, settings) -> None:
    """The thesis's Table 3.1 from MLflow runs: one row per backbone, under one protocol.

    Reads the latest finished training run per architecture in the experiment (with --folds K, the
    latest K-fold cross-validation) and logs the table (Markdown, CSV, PNG chart) to a summary run;
    prints the Markdown table.
    """
    if folds == 1:
        raise click.BadParameter("cross-validation needs at least 2 folds (0: single-split runs)", param_hint="--folds")
    start_tensorflow()
    from spinemri.api.compare import compare_runs

    outcome = compare_runs(experiment, train=do_train, skip_existing=skip_existing, head=head, folds=folds,
                           settings=tuple(settings))
    for line in outcome.verdicts:
        click.echo(line)
    click.echo(outcome.comparison.markdown())
    click.echo(f"logged compare/table.md, table.csv and chart.png to run {outcome.run_id} in {outcome.experiment}")
    click.echo(f"compare them in the MLflow UI: {outcome.link}")


@click.command("evaluate")
@click.option("--run", "run_id", required=True, help="MLflow run id of a training run (one with a logged model).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]),
              help="Split to evaluate (the run's own study-level split).")
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(min=100),
              help="Bootstrap resamples of studies for the 95% confidence intervals.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON instead of Markdown.")
@user_errors
@settings_checked
@tracked
def evaluate_command(run_id, split, n_boot, as_json) -> None:
    """Evaluate a run's model on a split and log everything to that run.

    Per head: accuracy, balanced accuracy, macro ROC-AUC, F1/precision/recall (macro and per class),
    log loss (and the weighted log loss for severity), each with a 95% bootstrap confidence interval
    over studies and beside a majority-class and a class-prior baseline; expected calibration error
    with reliability diagrams; severity per condition and per level. Training runs this on the test
    split automatically.
    """
    start_tensorflow()
    from spinemri.api.evaluate import evaluate_run
    from spinemri.metrics.report import evaluation_markdown

    report = evaluate_run(run_id, split, n_boot=n_boot)
    click.echo(json.dumps(report, indent=2) if as_json else evaluation_markdown(report, split))
