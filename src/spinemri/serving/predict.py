"""`spinemri predict`: a logged model applied to many image files on disk, written to one CSV.

Each file is decoded and preprocessed by the model's own :class:`~spinemri.serving.classifier.SpineClassifier`
(the code path the served model uses), then predicted in batches. The CSV appears only when the
whole job has succeeded (written next to its target, then renamed).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from spinemri.data.dicom import read_image, series_order
from spinemri.data.schema import CONDITIONS, LEVELS, condition_key, level_name
from spinemri.data.preprocess import stack_neighbours
from spinemri.errors import ImageReadError, PredictError
from spinemri.atomic import check_target, write_csv
from spinemri.serving.classifier import SpineClassifier
from spinemri.serving.inputs import SUFFIXES, read_file

ON_BAD_FILE = ("stop", "skip")


@dataclass
class PredictSummary:
    out: Path
    predicted: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def find_inputs(path: str | Path) -> list[Path]:
    """A file, or every .dcm/.png/.jpg/.jpeg file under a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PredictError(f"--input {path} does not exist; give a DICOM/PNG/JPEG file or a folder of them")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise PredictError(f"--input {path} holds no {'/'.join(SUFFIXES)} files")
    return files


@dataclass(frozen=True)
class Site:
    """Where in one file a prediction is asked for: the point (pixels; None: the image centre) and the
    condition and level graded there (None: not named; a per-site model needs both)."""

    x: float | None = None
    y: float | None = None
    condition: str | None = None
    level: str | None = None


def read_sites(path: str | Path, root: Path) -> dict[str, list[Site]]:
    """``--sites`` CSV: ``path`` (relative to --input's folder, or absolute) with ``x,y`` (pixels) and/or
    ``condition,level`` (the site graded there); a file may have several rows, one per site."""
    try:
        table = pd.read_csv(path, dtype={"path": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PredictError(f"--sites {path} cannot be read as CSV ({exc})") from None
    columns = set(table.columns)
    if "path" not in columns or not ({"x", "y"} <= columns or {"condition", "level"} <= columns):
        raise PredictError(f"--sites {path} has columns {sorted(map(str, columns))}; expected path with x,y (the "
                           "point in pixels), condition,level (the site graded there), or both")
    sites: dict[str, list[Site]] = {}
    for number, row in enumerate(table.to_dict("records"), start=2):
        x = y = None
        if "x" in row and not (pd.isna(row["x"]) and pd.isna(row["y"])):
            try:
                x, y = float(row["x"]), float(row["y"])
            except (TypeError, ValueError):
                raise PredictError(f"--sites {path} line {number}: x and y must be numbers, got {row['x']!r}, "
                                   f"{row['y']!r}") from None
            if not (math.isfinite(x) and math.isfinite(y)):
                raise PredictError(f"--sites {path} line {number}: give both x and y (finite pixels) or neither")
        condition = level = None
        if "condition" in row and not (pd.isna(row["condition"]) and pd.isna(row["level"])):
            condition = condition_key(str(row["condition"])) if not pd.isna(row["condition"]) else None
            level = level_name(str(row["level"])) if not pd.isna(row["level"]) else None
            if condition is None or level is None:
                raise PredictError(f"--sites {path} line {number}: condition {row['condition']!r} and level "
                                   f"{row['level']!r} must name a site, e.g. left_neural_foraminal_narrowing and "
                                   f"L4/L5 (conditions: {', '.join(CONDITIONS)}; levels: {', '.join(LEVELS)})")
        file = Path(row["path"]) if Path(row["path"]).is_absolute() else root / row["path"]
        sites.setdefault(str(file.resolve()), []).append(Site(x, y, condition, level))
    return sites


def check_out(out: str | Path, overwrite: bool) -> Path:
    """The output CSV, if it may be written: its folder exists, and it does not (or ``overwrite``)."""
    return check_target(out, overwrite=overwrite, error=PredictError, label=f"--out {out}", what="the CSV file to write")


def predict_files(classifier: SpineClassifier, input_path: str | Path, out: str | Path, *,
                  on_bad_file: str = "stop", sites: str | Path | None = None, batch_size: int = 32,
                  progress: bool = False, overwrite: bool = False) -> PredictSummary:
    if on_bad_file not in ON_BAD_FILE:
        raise PredictError(f"--on-bad-file must be one of {', '.join(ON_BAD_FILE)}, got {on_bad_file!r}")
    out = check_out(out, overwrite)
    files = find_inputs(input_path)
    root = Path(input_path) if Path(input_path).is_dir() else Path(input_path).parent
    site_of = read_sites(sites, root) if sites else {}
    orders: dict[Path, list[str]] = {}

    if classifier.per_site:
        unsited = [f for f in files if not any(s.condition for s in site_of.get(str(f.resolve()), ()))]
        if unsited:
            raise PredictError(f"{unsited[0]} has no site to grade ({len(unsited)} file(s) in all): this model grades "
                               "the site each image is given for (it was trained on images that show several "
                               "sites); pass --sites with path,condition,level rows, e.g. "
                               "a.png,left_neural_foraminal_narrowing,L4/L5")
    names: list[str] = []
    asked: list[Site] = []
    frames: list[pd.DataFrame] = []
    batch: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []

    def flush():
        if batch:
            sites = asked[len(asked) - len(batch):]
            conditions = [s.condition or "" for s in sites]
            frames.append(classifier.answer(classifier.predict_images(
                np.stack(batch), batch_size=batch_size, conditions=conditions,
                levels=[s.level or "" for s in sites]), conditions))
            batch.clear()

    bar = _bar(progress, len(files))
    try:
        for file in files:
            for site in site_of.get(str(file.resolve()), [Site()]):
                try:
                    batch.append(classifier.prepare_image(read_file(file, classifier.preprocessing),
                                                          _neighbours(classifier, file, orders), site.x, site.y))
                    names.append(str(file))
                    asked.append(site)
                except (ImageReadError, ValueError) as exc:
                    reason = exc.reason if isinstance(exc, ImageReadError) else str(exc)
                    if on_bad_file == "stop":
                        raise PredictError(f"{file}: {reason}; nothing was written (skip bad files with "
                                           "--on-bad-file=skip)") from None
                    skipped.append((str(file), reason))
                    break
                if len(batch) == batch_size:
                    flush()
            if bar is not None:
                bar.update(1)
        flush()
    finally:
        if bar is not None:
            bar.close()
    if not names:
        raise PredictError(f"none of the {len(files)} file(s) under {input_path} could be read; nothing was written")
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "file", names)
    if any(s.condition for s in asked):
        table.insert(1, "site_condition", [s.condition or "" for s in asked])
        table.insert(2, "site_level", [s.level or "" for s in asked])
    write_csv(table, out)
    return PredictSummary(out=out, predicted=len(names), skipped=skipped)


def _neighbours(classifier: SpineClassifier, file: Path, orders: dict[Path, list[str]]):
    """The neighbouring slices of a DICOM in its series folder for a 2.5D model, in order (as in training)."""
    count = classifier.preprocessing.slices
    if count == 1 or file.suffix.lower() != ".dcm":
        return None
    folder = file.parent
    if folder not in orders:
        orders[folder] = [p for _, p, _ in series_order(sorted(folder.glob("*.dcm")))]
    order = orders[folder]
    if str(file) not in order:
        return None
    voi = classifier.preprocessing.dicom_window
    return [read_image(order[j], voi=voi) for j in stack_neighbours(order.index(str(file)), len(order), count)]


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="predict")
