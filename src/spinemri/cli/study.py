"""`spinemri study`: the two-stage pipeline's products (predict, evaluate, package, ablation).
"""

from __future__ import annotations

import json
import sys
import time

import click

from spinemri.cli.common import SET_OPTION, exit_on_interrupt, setting_options, settings_checked, tracked, user_errors
from spinemri.config import SHORTCUTS
from spinemri.quiet import start_tensorflow


@click.group()
def study() -> None:
    """The two-stage study pipeline: grade studies, score a submission, package the served model, ablate it.

    Each command also answers to its older name (predict-study, evaluate-study, package-study, ablation)."""


@click.command("predict-study")
@click.option("--data", "data_dir", required=True, type=click.Path(),
              help="Dataset folder (train_images/ or test_images/ + *_series_descriptions.csv) or <study>/<series>/*.dcm.")
@click.option("--study", "study_ids", multiple=True, help="Study id to predict (repeatable) [default: every study].")
@click.option("--split", default="all", show_default=True, type=click.Choice(["all", "train", "val", "test"]),
              help="Only the studies of this split of the classifier's own study-level split (checked against "
                   "the localizers' training studies); 'all': every study in --data.")
@click.option("--localizer", "localizers", multiple=True, default=("models:/spinemri-localizer",), show_default=True,
              help="Localizer model URI (repeatable); models:/NAME means its aliases sagittal_t2, sagittal_t1, axial_t2.")
@click.option("--classifier", default="models:/spinemri@champion", show_default=True, help="ROI classifier model URI.")
@click.option("--out", default="submission.csv", show_default=True, type=click.Path(dir_okay=False),
              help="Submission CSV (row_id,normal_mild,moderate,severe); the sites go to <out>.sites.csv.")
@user_errors
@settings_checked
@tracked
def predict_study(data_dir, study_ids, split, localizers, classifier, out) -> None:
    """Two-stage study-level diagnosis: localize the 25 sites, grade each, write the submission.

    Writes sample_submission.csv's format, 25 rows per study. Rows whose series is missing or
    unreadable (or whose series type has no localizer) get the prior, the best constant under the
    competition metric; their number and reasons are printed and listed in <out>.sites.csv. For a
    classifier with referral thresholds, <out>.sites.csv also says of each finding whether it is referred.
    """
    start_tensorflow()
    from spinemri.study.submission import predict_submission

    started = time.perf_counter()
    summary = predict_submission(data_dir, out, localizer_uris=localizers, classifier_uri=classifier,
                                 study_ids=study_ids, split=split, progress=sys.stderr.isatty())
    click.echo(f"wrote {summary.rows} rows for {summary.studies} studies to {summary.out} (sites: {summary.sites}) "
               f"in {time.perf_counter() - started:.1f} s")
    click.echo(f"  {summary.from_prior} row(s) from the prior ({summary.prior_source})")
    for reason, count in sorted(summary.reasons.items(), key=lambda r: -r[1]):
        click.echo(f"    {count:>4}  {reason}")
    if summary.referred is None:
        click.echo("  no referral flags: the classifier carries no referral thresholds")
    else:
        click.echo(f"  {summary.referred} of {summary.rows} finding(s) referred at the classifier's thresholds "
                   f"(the refer column of {summary.sites.name})")


@click.command("evaluate-study")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Dataset folder whose train.csv labels the submitted studies.")
@click.option("--submission", required=True, type=click.Path(exists=True, dir_okay=False), help="Submission CSV.")
@click.option("--sites", default=None, type=click.Path(dir_okay=False),
              help="predict-study's sites table [default: <submission>.sites.csv if present].")
@click.option("--prior-labels", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Labels (train.csv layout) of other studies for the prior baseline [default: the studies of "
                   "--data's train.csv that are not submitted].")
@click.option("--classifier", default="models:/spinemri@champion", show_default=True,
              help="Where train.csv labels no other study: the classifier whose recorded training prior is the "
                   "baseline.")
@click.option("--no-log", is_flag=True, help="Print only; do not log a run to the spinemri-study experiment.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
@settings_checked
@tracked
def evaluate_study(data_dir, submission, sites, prior_labels, classifier, no_log, as_json) -> None:
    """Score a submission on its studies with the competition metric, next to the prior baseline.

    The baseline is the best constant prediction under the metric (p ∝ class count x weight 1/2/4
    per condition), learnt from the labels of every study NOT in the submission (or --prior-labels;
    or, where no other study is labelled, the prior recorded with --classifier).
    """
    start_tensorflow()
    from spinemri.api.study import evaluate_study as evaluate

    evaluation = evaluate(data_dir, submission, sites=sites, prior_labels=prior_labels, classifier=classifier,
                          log=not no_log)
    report, run_id = evaluation.report, evaluation.run_id
    if as_json:
        click.echo(json.dumps({**report, "run_id": run_id}, indent=2))
        return
    model, base = report["model"], report["prior_baseline"]
    click.echo(report["verdict"]["sentence"])
    click.echo(f"{report['studies']} studies scored; the per-site prior from {report['prior_source']}")
    click.echo(f"  {'term':<20} {'model':>8} {'prior':>8}")
    for key in ("spinal", "foraminal", "subarticular", "any_severe_spinal", "score"):
        click.echo(f"  {key:<20} {model[key]:>8.4f} {base[key]:>8.4f}")
    if run_id:
        click.echo(f"logged to run {run_id} in spinemri-study")


@click.command("package-study")
@click.option("--localizer", "localizers", multiple=True, default=("models:/spinemri-localizer",), show_default=True,
              help="Localizer model URI (repeatable); models:/NAME means its per-series aliases.")
@click.option("--classifier", default="models:/spinemri@champion", show_default=True, help="ROI classifier model URI.")
@click.option("--data", "data_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Evaluate on this dataset's --split studies first (their score decides the champion alias).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["val", "test"]),
              help="Held-out split of the classifier's study-level split.")
@click.option("--name", default="spinemri-study", show_default=True, help="Registered model name.")
@click.option("--no-register", is_flag=True, help="Log the model without registering it.")
@click.option("--champion-policy", "policy", default="paired", show_default=True,
              type=click.Choice(["paired", "strict"]),
              help="paired: champion only if a paired bootstrap over the held-out studies shows the score "
                   "better; strict: any better score.")
@click.option("--allow-below-floor", is_flag=True,
              help="Let a version that is not significantly better than its floor (the per-site prior on the same "
                   "studies), or that was not evaluated (no --data), become champion.")
@user_errors
@settings_checked
@tracked
def package_study(localizers, classifier, data_dir, split, name, no_register, policy, allow_below_floor) -> None:
    """Log the two-stage model as one pyfunc (a zipped DICOM study in, 25 rows out) and register it.

    Serve it with `mlflow models serve -m models:/spinemri-study@champion --env-manager local`.
    """
    start_tensorflow()
    from spinemri.study.package import package_study as package

    result = package(list(localizers), classifier, data_dir=data_dir, split=split, name=name,
                     register=not no_register, policy=policy, allow_below_floor=allow_below_floor)
    if "verdict" in result:
        click.echo(result["verdict"]["sentence"])
    click.echo(f"logged the study model {result['model_uri']} (run {result['run_id']}), localizing "
               f"{', '.join(result['series_localized'])}")
    if "score" in result:
        click.echo(f"  held-out {split}: {result['studies']} studies, rsna_score {result['score']:.4f} vs prior "
                   f"{result['prior_score']:.4f}; {result['rows_from_prior']} row(s) from the prior")
    if "decision" in result:
        click.echo(f"  {result['decision']}")


@click.command()
@click.option("--experiment", default="ablation", show_default=True,
              help="The classifier's experiment YAML (its data, split, backbone and training settings).")
@click.option("--localizer-experiment", default="ablation_localize", show_default=True,
              help="The localizers' experiment YAML (data and split come from --experiment).")
@setting_options(SHORTCUTS, "data_dir", "folds", "arch", "img_size", "epochs")
@click.option("--studies", default=None, type=click.IntRange(min=3),
              help="Studies of the built-in phantom (without --data-dir) [default: the experiment's data.phantom_studies].")
@click.option("--slices", default=5, show_default=True, type=click.IntRange(min=3),
              help="Slices of the 2.5D step's stack (odd).")
@click.option("--members", default=2, show_default=True, type=click.IntRange(min=2),
              help="Models (training seeds) the ensemble step averages.")
@click.option("--mlflow-experiment", default="spinemri-ablation", show_default=True,
              help="MLflow experiment of the summary run and its nested cross-validations.")
@SET_OPTION
@click.option("--localizer-set", "localizer_settings", multiple=True, metavar="KEY=VALUE",
              help="A setting of the localizers, e.g. --localizer-set train.epochs=8.")
@user_errors
@settings_checked
@exit_on_interrupt
@tracked
def ablation(experiment, localizer_experiment, studies, slices, members, mlflow_experiment, settings,
             localizer_settings, **flags) -> None:
    """Cross-validate the study pipeline and each addition on the same folds; log one summary run.

    Steps: the current pipeline (one slice, labelled sites, uncalibrated, one model), then + a 2.5D
    stack, + site jitter from the localizers' out-of-fold errors, + calibration at the predicted
    sites, + an ensemble of seeds. Each is scored out of fold at the sites the fold's localizers
    find, with 95 % CIs and the paired difference to the current pipeline (docs/study.md).
    """
    start_tensorflow()
    from spinemri.api.study import ablation as run

    result = run(experiment, localizer_experiment, flags=flags, settings=tuple(settings),
                 localizer_settings=tuple(localizer_settings), studies=studies, slices=slices, members=members,
                 mlflow_experiment=mlflow_experiment)
    click.echo(f"logged ablation/table.md, table.csv and plots/ablation.png to run {result.run_id} in "
               f"{mlflow_experiment} ({result.seconds / 60:.1f} min)")


for _name, _command in (("predict", predict_study), ("evaluate", evaluate_study), ("package", package_study),
                        ("ablation", ablation)):
    study.add_command(_command, _name)
