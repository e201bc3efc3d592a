"""`spinemri predict`: a logged model applied to many image files on disk, written to one CSV.

Each file is decoded and preprocessed by the model's own :class:`~spinemri.tracking.pyfunc.SpineClassifier`
(the code path the served model uses), then predicted in batches. The CSV appears only when the
whole job has succeeded (written next to its target, then renamed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from spinemri.data.dicom import BITMAP_SUFFIXES, read_image, series_order
from spinemri.data.preprocess import stack_neighbours
from spinemri.errors import ImageReadError, PredictError
from spinemri.files import write_csv
from spinemri.tracking.pyfunc import SpineClassifier, probabilities_frame

SUFFIXES = (".dcm", *BITMAP_SUFFIXES)
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


def read_sites(path: str | Path, root: Path) -> dict[str, tuple[float, float]]:
    """``--sites`` CSV with columns path,x,y (path relative to --input's folder, or absolute)."""
    try:
        table = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PredictError(f"--sites {path} cannot be read as CSV ({exc})") from None
    missing = {"path", "x", "y"} - set(table.columns)
    if missing:
        raise PredictError(f"--sites {path} lacks column(s) {sorted(missing)}; expected path,x,y (pixels)")
    sites = {}
    for number, row in enumerate(table.itertuples(index=False), start=2):
        try:
            x, y = float(row.x), float(row.y)
        except (TypeError, ValueError):
            raise PredictError(f"--sites {path} line {number}: x and y must be numbers, got {row.x!r}, {row.y!r}") from None
        file = Path(row.path) if Path(row.path).is_absolute() else root / row.path
        sites[str(file.resolve())] = (x, y)
    return sites


def check_out(out: str | Path, overwrite: bool) -> Path:
    """The output CSV, if it may be written: its folder exists, and it does not (or ``overwrite``)."""
    out = Path(out)
    if not out.parent.is_dir():
        raise PredictError(f"--out {out}: folder {out.parent} does not exist; create it first")
    if out.is_dir():
        raise PredictError(f"--out {out} is a folder; give the CSV file to write")
    if out.exists() and not overwrite:
        raise PredictError(f"--out {out} already exists; choose another file or pass --overwrite (it is then "
                           "replaced only once every prediction has succeeded)")
    return out


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

    names: list[str] = []
    frames: list[pd.DataFrame] = []
    batch: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []

    def flush():
        if batch:
            frames.append(probabilities_frame(classifier.predict_images(np.stack(batch), batch_size=batch_size)))
            batch.clear()

    bar = _bar(progress, len(files))
    try:
        for file in files:
            try:
                x, y = site_of.get(str(file.resolve()), (None, None))
                batch.append(classifier.prepare_image(read_image(file, voi=classifier.preprocessing.dicom_window),
                                                      _neighbours(classifier, file, orders), x, y))
                names.append(str(file))
            except (ImageReadError, ValueError) as exc:
                reason = exc.reason if isinstance(exc, ImageReadError) else str(exc)
                if on_bad_file == "stop":
                    raise PredictError(f"{file}: {reason}; nothing was written (skip bad files with "
                                       "--on-bad-file=skip)") from None
                skipped.append((str(file), reason))
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
