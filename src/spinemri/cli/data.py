"""`spinemri data`: create, validate and preprocess datasets.
"""

from __future__ import annotations

from dataclasses import asdict
import json
import os
import sys
import time

import click

from spinemri.api.settings import experiment_config
from spinemri.cli.common import SET_OPTION, setting_options, settings_checked, user_errors
from spinemri.config import PREPARE_SHORTCUTS


@click.group()
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
                                 progress=not as_json)
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
        unreadable = report.summary.get("files_unreadable", 0)
        if not report.ok:
            click.echo(f"{len(report.problems)} problem line(s): fix them and run check again")
        elif unreadable:
            click.echo(f"OK in structure, but {unreadable} labelled file(s) do not read: `data prepare` stops at the "
                       "first of them unless --on-bad-file=skip leaves their samples out")
        else:
            click.echo("OK")
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
    config = experiment_config(experiment, flags, settings, PREPARE_SHORTCUTS)
    started = time.perf_counter()
    dataset = prepare_cache(path, config.preprocess, cache_dir=cache_dir, workers=config.data.workers,
                            on_bad_file=on_bad_file, split_fractions=config.split.fractions,
                            split_seed=config.split.seed, progress=not as_json)
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
