"""`spinemri predict`, `export` and `score`: a served classifier on files, exported, and a submission scored.
"""

from __future__ import annotations

from dataclasses import asdict
import json
import sys
import time

import click

from spinemri.cli.common import settings_checked, user_errors
from spinemri.quiet import start_tensorflow


@click.command()
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
    start_tensorflow()
    from spinemri.serving.classifier import load_classifier
    from spinemri.serving.predict import check_out, predict_files

    started = time.perf_counter()
    check_out(out, overwrite)  # before the model loads
    classifier = load_classifier(model_uri)
    summary = predict_files(classifier, input_path, out, on_bad_file=on_bad_file, sites=sites,
                            batch_size=batch_size, progress=sys.stderr.isatty(), overwrite=overwrite)
    for file, reason in summary.skipped:
        click.echo(f"skipped: {file} {reason}", err=True)
    click.echo(f"wrote {summary.predicted} prediction(s) to {summary.out} ({len(summary.skipped)} file(s) skipped) "
               f"in {time.perf_counter() - started:.1f} s")


@click.command("export")
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
    start_tensorflow()
    from spinemri.serving.export import export_classifier

    result = export_classifier(model_uri, fmt, out, count=samples, tolerance=tolerance, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps({**asdict(result), "path": str(result.path)}, indent=2))
        return
    click.echo(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, {result.format}) in {result.seconds} s")
    click.echo(f"parity on {result.samples} phantom images ({result.runtime}): max abs difference "
               f"{result.max_abs_diff:.2e} (" + ", ".join(f"{h} {d:.2e}" for h, d in
                                                         result.per_head_max_abs_diff.items()) + ")")


@click.command()
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
