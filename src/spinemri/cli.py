"""The `spinemri` command: thin shells over library functions (see `spinemri COMMAND --help`)."""

from __future__ import annotations

from dataclasses import asdict
import functools
import json
import os
from pathlib import Path
import re
import sys
import time

import click

from spinemri.config import PREPARE_SHORTCUTS, SHORTCUTS, setting_help
from spinemri.errors import DatasetError, UserError
from spinemri.redact import redact

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of the output


def exit_on_interrupt(command):
    """Ctrl-C or `kill` during training: the run is already marked KILLED; leave at once.

    A plain interpreter shutdown can wait forever on tf.data worker threads that are blocked in a
    Python callback, so the process ends with os._exit(130) after flushing its output.
    """
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted: the MLflow run is marked KILLED", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
    return wrapper


def user_errors(command):
    """Turn the errors a user can cause into one clear message and exit status 1, no traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            raise click.ClickException(redact(str(exc))) from None
    return wrapper


def settings_checked(command):
    """A command that reads images: every setting spinemri takes from the environment is checked at its start
    (within :func:`user_errors`: a bad one is one clear message naming the variable)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from spinemri.data.environment import check_environment

        check_environment()
        return command(*args, **kwargs)
    return wrapper


def tracked(command):
    """A command that uses the MLflow store: create or upgrade its tables first, one process at a time,
    and mark FAILED the runs of dead spinemri processes."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from spinemri.tracking.store import open_tracking_store

        open_tracking_store()
        return command(*args, **kwargs)
    return wrapper


def setting_options(shortcuts: dict[str, str], *names: str):
    """Flags for config settings: ``--arch`` for SHORTCUTS["arch"] (model.arch), with the setting's help.

    Each flag's default is None: a flag left out keeps the experiment's value. ``--img-size`` is also
    accepted as ``--img_size``, the form ``mlflow run -P img_size=96`` passes it in.
    """
    def decorate(command):
        for name in reversed(names):
            spellings = dict.fromkeys((f"--{name.replace('_', '-')}", f"--{name}"))
            command = click.option(*spellings, name, default=None, help=setting_help(shortcuts[name]))(command)
        return command
    return decorate


SET_OPTION = click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
                          help="Any other setting as a dotted key, e.g. --set train.freeze_epochs=2 "
                               "--set model.dropout=0.5 (docs/experiments.md lists them).")


def load_config(experiment: str, flags: dict, settings, shortcuts: dict[str, str] | None = None):
    """The experiment with the flags given and --set KEY=VALUE applied, validated.

    ``flags`` are short names: with ``shortcuts`` they are translated to config keys here, else
    load_experiment translates them (SHORTCUTS). A bad value's error names the flag it came from.
    """
    from spinemri.config import load_experiment, parse_override
    from spinemri.errors import ConfigError

    given = {k: v for k, v in flags.items() if v not in (None, "")}
    key_of = shortcuts or SHORTCUTS
    changes, origin = {}, {}  # config key -> value, and the flag or --set that gave it (the last one wins)
    for name, value in given.items():
        key = shortcuts[name] if shortcuts else name
        changes[key], origin[key_of.get(name, name)] = value, f"--{name.replace('_', '-')} {value}"
    for item in settings:
        if item.strip():  # MLproject passes --set ''
            key, value = parse_override(item)
            changes[key], origin[SHORTCUTS.get(key, key)] = value, f"--set {item.strip()}"
    try:
        return load_experiment(experiment, changes)
    except ConfigError as exc:
        raise ConfigError(_with_origin(str(exc), changes, origin, key_of)) from None


def _with_origin(message: str, changes: dict, origin: dict[str, str], key_of: dict[str, str]) -> str:
    """A settings error with the flag or --set that gave the refused value: the one whose setting the message
    names and whose value it quotes (an error in the experiment file itself names no flag)."""
    if not re.search(r"[;,] got ", message):  # not a refused value (a YAML syntax error, an unknown experiment)
        return message
    values = {key_of.get(k, k): v for k, v in changes.items()}
    named = [key for key in origin if key in message or f"{key.rsplit('.', 1)[-1]} " in message]
    quoted = [key for key in named if repr(values.get(key)) in message or str(values.get(key)) in message]
    sources = [origin[key] for key in (quoted or named)]
    return f"{message} (from {', '.join(sources)})" if sources else message


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spinemri")
def main() -> None:
    """spinemri: lumbar-spine MRI datasets, models and experiments tracked with MLflow.

    Start with `spinemri data synth --out data/phantom` to get a synthetic dataset in the
    RSNA 2024 layout, `spinemri data check` to validate a dataset, and `spinemri data prepare`
    to build the preprocessed cache that training reads.
    """
    # On a tracking server (never on a sqlite store) MLflow writes "View run … at: http://…" to stdout
    # whenever a run ends, the reaper's included: stdout stays the command's own, and --json stays JSON.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@main.group()
def data() -> None:
    """Create, validate and preprocess datasets."""


@data.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to create (RSNA layout: train.csv, ..., train_images/).")
@click.option("--studies", default=40, show_default=True, type=click.IntRange(min=1), help="Number of studies.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, identical files.")
@click.option("--profile", default="fast", show_default=True,
              help="fast: short series (about 55 files a study) of 256-512 px, quick to write and train on; "
                   "rsna: the real data's series lengths (Axial T2 5-192 slices, mostly 24-44), image sizes "
                   "(256-1024 px) and shares of extra and missing series (about 76 files a study; docs/data.md).")
@click.option("--workers", default=min(4, os.cpu_count() or 1), show_default=True, type=click.IntRange(min=1),
              help="Processes writing studies in parallel (the output does not depend on it).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier phantom in --out.")
@click.option("--force", is_flag=True, help="With --overwrite: replace --out even if it is not a phantom "
              "(everything in it is deleted).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def synth(out_dir, studies, seed, profile, workers, overwrite, force, as_json) -> None:
    """Write a synthetic lumbar-spine MRI dataset (real DICOM files) in the RSNA 2024 layout.

    Sagittal T1, Sagittal T2/STIR and Axial T2 series whose anatomy changes with each label:
    stenosis narrows the canal, foraminal narrowing shrinks the foramen, subarticular stenosis
    narrows the recess, at the coordinate given in train_label_coordinates.csv.
    """
    from spinemri import phantom

    started = time.perf_counter()
    summary = phantom.synthesize(out_dir, phantom.profile(profile, studies=studies, seed=seed),
                                 workers=workers, overwrite=overwrite, force=force,
                                 progress=not as_json and sys.stderr.isatty())
    result = {**asdict(summary), "seconds": round(time.perf_counter() - started, 2)}
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"wrote {result['studies']} studies, {result['series']} series, {result['images']} DICOM files, "
                   f"{result['labelled_points']} labelled points to {out_dir} in {result['seconds']} s")


@data.command("flat")
@click.argument("table", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The flat CSV to write.")
@click.option("--scan-type", default="Sagittal T1", show_default=True,
              type=click.Choice(["Sagittal T1", "Sagittal T2/STIR", "Axial T2"]), help="Series type of the images.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@user_errors
def flat(table, out, scan_type, overwrite) -> None:
    """Write a table of graded sites per image (study_id, condition_level, severity, file) as a flat CSV.

    Each row of TABLE grades one site (condition_level: a train.csv column such as
    left_neural_foraminal_narrowing_l4_l5) on an image (file, relative to TABLE's folder). The flat
    CSV has no x/y: train on it with --mode slice, which grades the site each row names.
    """
    from spinemri.data.site_table import write_flat_csv

    rows = write_flat_csv(table, out, scan_type=scan_type, overwrite=overwrite)
    click.echo(f"wrote {len(rows)} graded sites on {rows['image_path'].nunique()} images of "
               f"{rows['study_id'].nunique()} studies to {out}; train with --data-dir {out} --mode slice")


@data.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--decode", is_flag=True, help="Decode every labelled image (slower), not only its header.")
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=1), help="Threads reading files.")
@user_errors
@settings_checked
def check(path, as_json, decode, workers) -> None:
    """Validate a dataset: an RSNA-layout folder, the thesis's flat CSV, or a folder of studies.

    For a folder of <study>/<series>/*.dcm, prints each series' type and why (the RSNA name, or the
    plane, contrast and rule read from its images; skipped series say what they are).

    Prints studies, series per description, labelled points per condition, blank labels,
    missing and unreadable files. Exits with status 1 on structural problems (missing CSV or
    column, labels pointing at absent series/instances, unknown condition or level), each named
    with its file, row and fix. Never prints patient-identifying DICOM tags.
    """
    from spinemri.data.readers import check_dataset

    report = check_dataset(path, decode=decode, workers=workers)
    if as_json:
        click.echo(report.to_json())
    else:
        click.echo(f"{report.path} ({report.layout} layout)")
        for key, value in report.summary.items():
            click.echo(f"  {key}: {value}")
        for row in report.series:
            click.echo(f"  series {row['study_id']}/{row['series_id']} ({row['files']} files): {row['type']} - {row['why']}")
        for line in report.warnings:
            click.echo(f"warning: {line}")
        for line in report.problems:
            click.echo(f"error: {line}", err=True)
        click.echo("OK" if report.ok else f"{len(report.problems)} problem line(s): fix them and run check again")
    sys.exit(0 if report.ok else 1)


@data.command()
@click.argument("path", type=click.Path())
@click.option("--experiment", default="quick", show_default=True,
              help="Experiment YAML whose preprocessing and split the cache gets (a name under experiments/ or a path).")
@setting_options(PREPARE_SHORTCUTS, "img_size", "mode", "roi_mm", "slices", "equalize", "dicom_window", "workers",
                 "split", "split_seed")
@SET_OPTION
@click.option("--on-bad-file", default="stop", show_default=True, type=click.Choice(["stop", "skip"]),
              help="stop at the first unreadable file, or skip its samples and list them in the manifest.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where caches live [default: $SPINEMRI_CACHE_DIR or ~/.cache/spinemri/prepared].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@user_errors
@settings_checked
def prepare(path, experiment, img_size, mode, roi_mm, slices, equalize, dicom_window, workers, split, split_seed,
            settings, on_bad_file, cache_dir, as_json) -> None:
    """Preprocess a dataset into the on-disk cache that training streams from.

    The cache gets the experiment's preprocessing and split (what `spinemri train --experiment` with
    the same settings reads), changed by the flags and --set. The same command reuses the cache;
    changing the data or any preprocessing setting builds a new one. Prints the cache folder and the
    samples per split (study-level, stratified by each study's worst grade).
    """
    from spinemri.data.cache import prepare as prepare_cache

    flags = dict(img_size=img_size, mode=mode, roi_mm=roi_mm, slices=slices, equalize=equalize,
                 dicom_window=dicom_window, workers=workers, split=split.split(",") if split else split,
                 split_seed=split_seed)
    config = load_config(experiment, flags, settings, PREPARE_SHORTCUTS)
    started = time.perf_counter()
    dataset = prepare_cache(path, config.preprocess, cache_dir=cache_dir, workers=config.data.workers,
                            on_bad_file=on_bad_file, split_fractions=config.split.fractions,
                            split_seed=config.split.seed, progress=not as_json and sys.stderr.isatty())
    result = {**dataset.summary(config.split.fractions, config.split.seed),
              "seconds": round(time.perf_counter() - started, 2)}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{'reused' if result['reused'] else 'built'} cache {result['cache']} in {result['seconds']} s")
    click.echo(f"  samples: {result['samples']} ({result['skipped']} skipped), tensor shape {result['shape']}")
    click.echo("  samples per split: " + ", ".join(f"{k} {v}" for k, v in result["samples_per_split"].items()))
    for failure in dataset.manifest["skipped"][:10]:
        click.echo(f"  skipped: {failure['path']} {failure['reason']}")


TRAIN_FLAGS = ("arch", "data_dir", "img_size", "mode", "epochs", "batch_size", "lr", "weights", "seed", "trials",
               "storage", "workers", "task", "series", "strategy", "mixed_precision", "folds")


@main.command()
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
    config = load_config(experiment, flags, settings)
    if config.task == "localize":
        if config.tuning.trials > 0:
            raise click.UsageError("tuning a localizer (--task localize with --trials) is not implemented; "
                                   "train it with --trials 0 and set its hyperparameters with --set")
        if config.split.folds:
            from spinemri.training.localizer_cv import cross_validate_localizer

            localizers = cross_validate_localizer(config)
            click.echo(f"cross-validation run {localizers.run_id} finished: {len(localizers.fold_models)} fold "
                       "localizers (not registered)")
            for key, value in sorted(localizers.metrics.items()):
                click.echo(f"  {key}: {value:.4f}")
            return
        from spinemri.training.localizer import train_localizer

        result = train_localizer(config)
        click.echo(f"run {result.run_id} finished: {result.epochs_trained} epoch(s), localizer {result.model_uri}")
    elif config.tuning.trials > 0:
        from spinemri.tuning import tune as run_study

        study = run_study(config)
        click.echo(f"study {study.study_name}: {study.counts}, best {config.train.monitor} {study.best_value:.4f} "
                   f"with {study.best_params}")
        click.echo(f"parent run {study.parent_run_id}; the best configuration retrained as run {study.final.run_id}")
        result = study.final
        _echo_verdict(result.verdict)
        click.echo(f"run {result.run_id} finished: {result.epochs_trained} epoch(s), model {result.model_uri}")
    else:
        from spinemri.training.train import train as run_training

        result = run_training(config)
        if not result.run_id:  # a worker of a multi-worker training other than the chief: the chief has the run
            return
        _echo_verdict(result.verdict)
        click.echo(f"run {result.run_id} finished: {result.epochs_trained} epoch(s), model {result.model_uri}")
    for key, value in sorted(result.metrics.items()):
        click.echo(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")


def _echo_verdict(verdict) -> None:
    """The first line of a training's summary: how the model compares with its floor."""
    click.echo(verdict.sentence if verdict is not None else "No verdict against the per-site prior (see above why).")


@main.command()
@click.option("--experiment", default="quick", show_default=True, help="Experiment YAML (name or path).")
@click.option("--trials", required=True, type=click.IntRange(min=1), help="Finished trials the study should reach.")
@setting_options(SHORTCUTS, "arch", "storage", "study_name", "pruner", "workers", "data_dir", "epochs")
@SET_OPTION
@click.pass_context
def tune(ctx, experiment, trials, settings, **flags) -> None:
    """Tune hyperparameters with Optuna (search space: the experiment's tuning.search_space).

    Each trial is a nested MLflow run under one parent run; pruned by hyperband (or the median)
    pruner on the validation monitor; re-running the same command after a crash resumes the study
    until --trials trials have finished. The best configuration is then trained and logged with
    its model like `spinemri train`.
    """
    extra = [f"tuning.{k}={flags.pop(k)}" for k in ("study_name", "pruner") if flags.get(k)]
    flags = {k: v for k, v in flags.items() if k not in ("study_name", "pruner")}
    ctx.invoke(train, experiment=experiment, trials=str(trials), settings=tuple(settings) + tuple(extra),
               **{k: flags.get(k) for k in TRAIN_FLAGS if k != "trials"})


@main.group()
def registry() -> None:
    """The MLflow Model Registry: versions, the `champion` alias, promotion by hand.

    Training registers every model as a new version of the experiment's registered model
    (default `spinemri`); `champion` moves to it only if it beats the champion's held-out metric
    on the same held-out set, otherwise it becomes `challenger`.
    """


@registry.command("list")
@click.option("--name", default="spinemri", show_default=True, help="Registered model.")
@click.option("--json", "as_json", is_flag=True, help="Print the versions as JSON.")
@user_errors
@tracked
def registry_list(name, as_json) -> None:
    """Versions of a registered model, newest first: aliases, metric, the paired difference to the champion
    it was judged against, held-out set, architecture, run."""
    from spinemri.tracking.registry import list_versions

    rows = list_versions(name)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"{name} has no versions yet")
        return
    def interval(paired: dict) -> str:
        return (f"{paired['difference']:+.4f} [{paired['ci_low']:+.4f}, {paired['ci_high']:+.4f}], "
                f"{paired['studies']}") if len(paired) == 4 else "-"

    click.echo(f"{'version':>7}  {'aliases':<20} {'metric':<32} {'value':>8}  {'vs floor [95% CI], studies':<34} "
               f"{'vs champion [95% CI], studies':<34} {'eval set':<16} {'arch':<14} {'run':<32}  created")
    for row in rows:
        value = "" if row["metric_value"] is None else f"{row['metric_value']:.4f}"
        click.echo(f"{row['version']:>7}  {','.join(row['aliases']) or '-':<20} {row['metric_name'] or '-':<32} "
                   f"{value:>8}  {interval(row['floor']):<34} {interval(row['paired']):<34} "
                   f"{row['eval_set'] or '-':<16} {row['arch'] or '-':<14} {row['run_id']:<32}  {row['created']}")
    click.echo("")
    for row in rows:
        click.echo(f"v{row['version']}: {row['verdict_sentence'] or 'not judged against the per-site prior'}")
        if row["decision"]:
            click.echo(f"  decision: {row['decision']}")


@registry.command("promote")
@click.argument("version")
@click.option("--reason", required=True, help="Why this version should serve (kept as a tag on the version).")
@click.option("--name", default="spinemri", show_default=True, help="Registered model.")
@user_errors
@tracked
def registry_promote(version, reason, name) -> None:
    """Point `champion` at VERSION whatever the metrics say (an explicit, recorded override).

    A running `mlflow models serve -m models:/NAME@champion` keeps the model it loaded at
    start-up: restart it to serve the new champion.
    """
    from spinemri.tracking.registry import promote

    click.echo(str(promote(name, version, reason)))


@main.group()
def runs() -> None:
    """MLflow runs of spinemri commands."""


@runs.command("reap")
@click.option("--json", "as_json", is_flag=True, help="Print the run ids as JSON.")
@user_errors
def runs_reap(as_json) -> None:
    """Mark FAILED the runs left RUNNING by spinemri processes of this machine that have died.

    A process killed with SIGKILL (or by the out-of-memory killer) cannot end its run. Every
    spinemri command that opens the store does this first; this command does only this.
    """
    from spinemri.tracking.runs import reap_dead_runs
    from spinemri.tracking.store import open_tracking_store

    open_tracking_store(reap=False)
    reaped = reap_dead_runs()
    if as_json:
        click.echo(json.dumps({"reaped": reaped}))
        return
    click.echo(f"marked {len(reaped)} run(s) FAILED" + (": " + ", ".join(reaped) if reaped else ""))


@main.command()
@click.option("--model", "model_uri", default="models:/spinemri@champion", show_default=True,
              help="Logged model URI: models:/NAME@ALIAS, models:/NAME/VERSION, models:/<model id>, runs:/<run>/model.")
@click.option("--input", "input_path", required=True, type=click.Path(),
              help="A DICOM/PNG/JPEG file or a folder searched recursively.")
@click.option("--out", default="predictions.csv", show_default=True, type=click.Path(dir_okay=False),
              help="CSV to write: file, predicted condition/level/severity, one probability column per class.")
@click.option("--sites", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Optional CSV: path with x,y (the site centre in pixels) and/or condition,level (the site "
                   "graded there; needed by a model trained on whole slices), one row per site [default: the "
                   "image centre].")
@click.option("--on-bad-file", default="stop", show_default=True, type=click.Choice(["stop", "skip"]),
              help="stop at the first unreadable file (nothing written), or skip and list it.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per batch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file (once every prediction succeeded).")
@user_errors
@settings_checked
def predict(model_uri, input_path, out, sites, on_bad_file, batch_size, overwrite) -> None:
    """Predict many image files locally with a logged model (the same code the served model runs)."""
    from spinemri.serving.predict import check_out, predict_files
    from spinemri.serving.classifier import load_classifier

    started = time.perf_counter()
    check_out(out, overwrite)  # before the model loads
    classifier = load_classifier(model_uri)
    summary = predict_files(classifier, input_path, out, on_bad_file=on_bad_file, sites=sites,
                            batch_size=batch_size, progress=sys.stderr.isatty(), overwrite=overwrite)
    for file, reason in summary.skipped:
        click.echo(f"skipped: {file} {reason}", err=True)
    click.echo(f"wrote {summary.predicted} prediction(s) to {summary.out} ({len(summary.skipped)} file(s) skipped) "
               f"in {time.perf_counter() - started:.1f} s")


@main.command("export")
@click.option("--model", "model_uri", default="models:/spinemri@champion", show_default=True, help="Logged model URI.")
@click.option("--format", "fmt", required=True, type=click.Choice(["tflite", "onnx"]), help="Mobile format.")
@click.option("--out", required=True, type=click.Path(), help="File to write, e.g. spinemri.tflite.")
@click.option("--samples", default=16, show_default=True, type=click.IntRange(min=1),
              help="Phantom images for the parity check.")
@click.option("--tolerance", default=1e-3, show_default=True, type=click.FloatRange(min=0),
              help="Largest allowed |exported - Keras| probability.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file (only once the new one passes).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@user_errors
@settings_checked
def export_command(model_uri, fmt, out, samples, tolerance, overwrite, as_json) -> None:
    """Export a logged model to TFLite or ONNX for mobile use, with a parity check against Keras.

    The exported file is run with its own runtime on phantom images preprocessed like the model's
    training data; the file is kept only if every probability is within --tolerance of the Keras
    model's. Inputs are model-ready images (float32 N x S x S x C, 0..255): on the device, apply
    the preprocessing recorded in the model's meta.json first.
    """
    from spinemri.serving.export import export_classifier

    result = export_classifier(model_uri, fmt, out, count=samples, tolerance=tolerance, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps({**asdict(result), "path": str(result.path)}, indent=2))
        return
    click.echo(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.format}) in {result.seconds} s")
    click.echo(f"parity on {result.samples} phantom images ({result.runtime}): max abs difference "
               f"{result.max_abs_diff:.2e} (" + ", ".join(f"{h} {d:.2e}" for h, d in
                                                         result.per_head_max_abs_diff.items()) + ")")


@main.command()
@click.option("--labels", "labels_csv", required=True, type=click.Path(dir_okay=False),
              help="Labels in train.csv's layout (study_id + 25 <condition>_<level> columns).")
@click.option("--submission", "submission_csv", required=True, type=click.Path(dir_okay=False),
              help="Predictions in sample_submission.csv's layout (row_id,normal_mild,moderate,severe).")
@click.option("--json", "as_json", is_flag=True, help="Print the score and its four terms as JSON.")
@user_errors
def score(labels_csv, submission_csv, as_json) -> None:
    """The RSNA 2024 LSDC competition score of a submission (lower is better).

    The mean of four weighted log losses (weights 1/2/4 for normal_mild/moderate/severe): spinal,
    foraminal and subarticular rows, and "any severe spinal" per study. Only the studies in the
    submission are scored; blank labels are ignored.
    """
    from spinemri.metrics.competition import score_files

    parts = score_files(labels_csv, submission_csv)
    if as_json:
        click.echo(json.dumps(parts, indent=2))
        return
    click.echo(f"score {parts['score']:.4f} (lower is better)")
    for key in ("spinal", "foraminal", "subarticular", "any_severe_spinal"):
        click.echo(f"  {key}: {parts[key]:.4f} over {parts['rows'][key]} {'studies' if key.startswith('any') else 'rows'}")


@main.command()
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
    from spinemri.config import load_experiment, parse_override, resolve_experiment
    from spinemri.errors import ConfigError
    from spinemri.evaluation.compare import build_table, compare_link, log_table, train_all, verdicts

    overrides = dict(parse_override(item) for item in settings)
    if folds and do_train:
        overrides["split.folds"] = folds
    try:
        resolve_experiment(experiment)
    except ConfigError:
        if do_train or overrides:
            raise
        config, mlflow_experiment, archs = None, experiment, None  # not a YAML: an MLflow experiment name
    else:
        config = load_experiment(experiment, overrides)
        mlflow_experiment, archs = config.mlflow.experiment, config.compare.archs
    if do_train:
        train_all(config, skip_existing=skip_existing)
    comparison = build_table(mlflow_experiment, head, archs, folds)
    link = compare_link(comparison, config.mlflow.ui_url if config else "")
    run_id = log_table(comparison, link)
    for line in verdicts(comparison.table):
        click.echo(line)
    click.echo(comparison.markdown())
    click.echo(f"logged compare/table.md, table.csv and chart.png to run {run_id} in {mlflow_experiment}")
    click.echo(f"compare them in the MLflow UI: {link}")


@main.command("evaluate")
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
    from spinemri.evaluation.logged_model import evaluate_run
    from spinemri.metrics.report import evaluation_markdown

    report = evaluate_run(run_id, split, n_boot=n_boot)
    click.echo(json.dumps(report, indent=2) if as_json else evaluation_markdown(report, split))


@main.command("predict-study")
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
    competition metric; their number and reasons are printed and listed in <out>.sites.csv.
    """
    from spinemri.study.submission import predict_submission

    started = time.perf_counter()
    summary = predict_submission(data_dir, out, localizer_uris=localizers, classifier_uri=classifier,
                                 study_ids=study_ids, split=split, progress=sys.stderr.isatty())
    click.echo(f"wrote {summary.rows} rows for {summary.studies} studies to {summary.out} (sites: {summary.sites}) "
               f"in {time.perf_counter() - started:.1f} s")
    click.echo(f"  {summary.from_prior} row(s) from the prior ({summary.prior_source})")
    for reason, count in sorted(summary.reasons.items(), key=lambda r: -r[1]):
        click.echo(f"    {count:>4}  {reason}")


@main.command()
@click.option("--url", required=True, help="The DICOMweb server's root, e.g. http://127.0.0.1:8042/dicom-web "
              "(basic auth from SPINEMRI_PACS_USER and SPINEMRI_PACS_PASSWORD).")
@click.option("--model", "model_uri", default="models:/spinemri-study@champion", show_default=True,
              help="A registered study model (spinemri package-study), models:/NAME@ALIAS or models:/NAME/VERSION.")
@click.option("--once", is_flag=True, help="One pass over the studies there, then exit (default: poll).")
@click.option("--poll-seconds", default=60.0, show_default=True, type=click.FloatRange(min=1),
              help="Between passes, without --once.")
@click.option("--since", type=click.DateTime(["%Y-%m-%d", "%Y%m%d"]), default=None,
              help="Studies from this StudyDate on [default: from the day before the last complete pass, or the "
              "last --days days on the first pass].")
@click.option("--until", type=click.DateTime(["%Y-%m-%d", "%Y%m%d"]), default=None, help="... up to this StudyDate.")
@click.option("--days", default=7, show_default=True, type=click.IntRange(min=1),
              help="The first pass's window without --since: the last DAYS days, today included; and how long a "
              "study that failed for a reason that may pass (a partial transfer, a server error) is taken again.")
@click.option("--all-dates", is_flag=True, help="Every MR study on the server, whatever its date.")
@click.option("--retry-for", default=300.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to keep retrying (with backoff) a server that refuses connections or answers 5xx.")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds one request may wait for the server to connect or to send the next bytes (and, per "
                   "megabyte of the answer, for all of it).")
@click.option("--max-pages", default=100, show_default=True, type=click.IntRange(min=1),
              help="Pages of 100 studies one pass reads of the study search at most; the rest wait for the next "
                   "pass.")
@user_errors
@settings_checked
@tracked
def pacs(url, model_uri, once, poll_seconds, since, until, days, all_dates, retry_for, timeout, max_pages) -> None:
    """Grade new MR studies of a DICOMweb server and store each one's findings back as a DICOM SR.

    Finds MR studies with QIDO-RS, fetches the series the study model reads with WADO-RS (series
    types from the images), runs the model and stores a Comprehensive SR (TID 1500) with STOW-RS:
    per condition and level the grade, its three probabilities and the site on its source image. A
    study is reported once per model version. Log lines name studies by a digest of their UID,
    never by a patient attribute.
    """
    import logging

    from spinemri.pacs.worker import Settings, work

    if all_dates and (since or until):
        raise click.UsageError("--all-dates takes every date; leave out --since and --until")
    if since and until and since > until:
        raise click.UsageError(f"--since {since:%Y-%m-%d} is after --until {until:%Y-%m-%d}; swap them")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    settings = Settings(url=url, model_uri=model_uri, since=since.date() if since else None,
                        until=until.date() if until else None, retry_for=retry_for, timeout=timeout,
                        max_pages=max_pages)
    work(settings, once=once, poll_seconds=poll_seconds, days=days, every_date=all_dates, echo=click.echo)


@main.command("evaluate-study")
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
    from spinemri.errors import MetricError
    from spinemri.study.evaluate import evaluate_study_files, log_study_evaluation

    labels_path = os.path.join(data_dir, "train.csv")
    if not os.path.isfile(labels_path):
        raise MetricError(f"{labels_path} is missing; evaluate-study needs the studies' labels")
    report = evaluate_study_files(labels_path, submission, prior_labels_path=prior_labels, classifier_uri=classifier)
    sites_path = sites or os.path.join(os.path.dirname(submission) or ".",
                                       os.path.splitext(os.path.basename(submission))[0] + ".sites.csv")
    run_id = None if no_log else log_study_evaluation(report, Path(labels_path), Path(submission), Path(sites_path),
                                                      {"data_dir": str(data_dir)})
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


@main.command()
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
    from spinemri.training.ensemble import build_ensemble

    result = build_ensemble(list(run_ids), registered_model=name, register=not no_register, policy=policy)
    click.echo(f"run {result.run_id}: ensemble {result.model_uri}")
    for key in sorted(k for k in result.metrics if k.count("_") <= 3 or k.startswith("test_severity_weighted")):
        click.echo(f"  {key}: {result.metrics[key]:.4f}")
    if result.registered is not None:
        click.echo(f"  {result.registered}")


@main.command("package-study")
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


@main.command()
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
    from spinemri.config import load_experiment, parse_override
    from spinemri.errors import ConfigError
    from spinemri.study.ablation import ablation_configs, run_ablation

    if studies is not None:
        settings = (*settings, f"data.phantom_studies={studies}")
    config = load_config(experiment, flags, settings)
    try:
        localizer_changes = dict(parse_override(item) for item in localizer_settings if item.strip())
        localizer = load_experiment(localizer_experiment, localizer_changes)
    except ConfigError as exc:
        given = " ".join(f"--localizer-set {item}" for item in localizer_settings)
        raise ConfigError(f"the localizers' settings (--localizer-experiment {localizer_experiment} {given}): "
                          f"{exc}") from None
    classifier, localizer = ablation_configs(config, localizer, mlflow_experiment)
    result = run_ablation(classifier, localizer, slices=slices, members=members)
    click.echo(f"logged ablation/table.md, table.csv and plots/ablation.png to run {result.run_id} in "
               f"{mlflow_experiment} ({result.seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
