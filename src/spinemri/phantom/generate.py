"""Write a phantom dataset: every study rendered and written in the RSNA 2024 LSDC layout, in parallel, whole
or not at all (built in a staging folder, then renamed into place). Same seed, same bytes.
"""

from __future__ import annotations

from dataclasses import asdict
import json
from pathlib import Path
import shutil
import sys

import numpy as np
import pandas as pd

from spinemri.data import schema
from spinemri.data.schema import AXIAL_T2
from spinemri.errors import OutputExists
from spinemri.phantom.anatomy import new_anatomy
from spinemri.phantom.labels import sample_labels, unique_ids
from spinemri.phantom.render import render_axial, render_sagittal, sequence_tags, series_plan, uid
from spinemri.phantom.settings import MARKER, PhantomConfig, PhantomSummary
from spinemri.processes import remove_stale_staging, staging_path, worker_pool


def synthesize(out_dir: str | Path, config: PhantomConfig = PhantomConfig(), *, workers: int = 1,
               overwrite: bool = False, force: bool = False, progress: bool = False) -> PhantomSummary:
    """Write a phantom dataset to ``out_dir`` (train.csv, train_series_descriptions.csv,
    train_label_coordinates.csv, train_images/<study>/<series>/<instance>.dcm, and MARKER).

    The folder appears only when complete: it is built beside ``out_dir`` and renamed into place.
    ``overwrite`` replaces an earlier phantom; a folder without MARKER also needs ``force``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExists(f"{out_dir} is a file; choose a folder for --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise OutputExists(f"{out_dir} already exists and is not empty; choose another --out or pass --overwrite")
        if not (out_dir / MARKER).is_file() and not force:
            raise OutputExists(f"{out_dir} does not look like a spinemri phantom (it has no {MARKER}); "
                                  "--overwrite would delete everything in it. Choose another --out, or pass "
                                  "--overwrite --force to delete it anyway")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir.parent)
    staging = staging_path(out_dir)
    (staging / schema.IMAGES_DIR).mkdir(parents=True)

    root = np.random.SeedSequence(config.seed)
    id_rng = np.random.default_rng(root.spawn(1)[0])
    ids = unique_ids(id_rng, config.studies * 7)
    study_ids = sorted(ids[: config.studies])
    series_pool = ids[config.studies:]
    jobs = [
        (staging, study_id, series_pool[6 * i: 6 * i + 6], seq, config)
        for i, (study_id, seq) in enumerate(zip(study_ids, root.spawn(config.studies + 1)[1:]))
    ]
    try:
        if workers > 1:
            with worker_pool(workers) as pool:
                results = list(_progress(pool.map(_write_study, jobs), len(jobs), progress))
        else:
            results = list(_progress(map(_write_study, jobs), len(jobs), progress))
        labels = pd.DataFrame([r["labels"] for r in results], columns=["study_id", *schema.LABEL_COLUMNS])
        series = pd.DataFrame([s for r in results for s in r["series"]], columns=list(schema.SERIES_COLUMNS))
        coords = pd.DataFrame([c for r in results for c in r["coordinates"]], columns=list(schema.COORDINATE_COLUMNS))
        coords = coords.sort_values(["study_id", "series_id", "instance_number", "condition", "level"])
        (staging / MARKER).write_text(json.dumps({"generator": "spinemri data synth", **asdict(config)}, indent=2))
        labels.to_csv(staging / schema.TRAIN_CSV, index=False)
        series.to_csv(staging / schema.SERIES_CSV, index=False)
        coords.to_csv(staging / schema.COORDINATES_CSV, index=False, float_format="%.6f")
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PhantomSummary(
        out_dir=str(out_dir),
        studies=len(labels),
        series=len(series),
        images=sum(r["images"] for r in results),
        labelled_points=len(coords),
        blank_labels=int(labels[list(schema.LABEL_COLUMNS)].isna().sum().sum()),
    )


def _write_study(job) -> dict:
    staging, study_id, series_ids, seed_seq, config = job
    rng = np.random.default_rng(seed_seq)
    severity = sample_labels(rng)
    blank = {key: rng.random() < config.p_blank for key in severity}
    anatomy = new_anatomy(rng, severity)
    acquisition = dict(
        scale=float(rng.uniform(700, 2200)),
        bits=int(rng.choice([12, 16])),
        slope=float(rng.choice([1.0, 1.0, 0.5, 2.0])),
        intercept=float(rng.choice([0.0, 0.0, -20.0])),
        noise=float(rng.uniform(0.015, 0.045)),
        bias=float(rng.uniform(0.08, 0.3)),
    )

    plan = series_plan(rng, config)
    plan_order = rng.permutation(len(plan))

    study_uid = uid(study_id)
    frame_uid = uid(study_id, "frame")
    series_rows, coordinates, n_images = [], [], 0
    for index, (description, levels, sides) in enumerate(plan):
        series_id = int(series_ids[plan_order[index]])
        series_rows.append((study_id, series_id, description))
        folder = staging / schema.IMAGES_DIR / str(study_id) / str(series_id)
        folder.mkdir(parents=True)
        meta = dict(study_uid=study_uid, frame_uid=frame_uid, series_uid=uid(study_id, series_id),
                    series_number=index + 1, description=description,
                    sequence=sequence_tags(description, np.random.default_rng([study_id, series_id])))
        if description == AXIAL_T2:
            points, n = render_axial(rng, anatomy, acquisition, folder, meta, levels, sides, config)
        else:
            points, n = render_sagittal(rng, anatomy, acquisition, folder, meta, config)
        n_images += n
        for condition, level, instance, x, y in points:
            if not blank[(condition, level)]:
                coordinates.append((study_id, series_id, instance, schema.CONDITION_NAMES[condition], level,
                                    round(x, 6), round(y, 6)))

    labels = {"study_id": study_id}
    for (condition, level), grade in severity.items():
        labels[schema.label_column(condition, level)] = None if blank[(condition, level)] else schema.SEVERITIES[grade]
    return dict(labels=labels, series=series_rows, coordinates=coordinates, images=n_images)


def _replace_dir(staging: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = staging_path(target)  # a leftover of a kill right here is removed like any staging folder
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _progress(iterable, total, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="phantom studies", unit="study", mininterval=1 if sys.stderr.isatty() else 10)
