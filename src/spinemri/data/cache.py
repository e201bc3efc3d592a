"""The preprocessed cache: model-ready uint8 tensors on disk, keyed by a fingerprint.

``prepare(data_dir, config)`` reads the sample table, decodes each series once, runs
:func:`spinemri.data.preprocess.preprocess` for every sample and writes

    <cache_dir>/<fingerprint>/
        images.npy        uint8 (N, S, S, C), memory-mappable (training never loads it whole)
        samples.csv       the sample table + ``index`` (row in images.npy)
        splits_seed<seed>_<train>-<val>-<test>.csv   study -> train/val/test
        manifest.json     preprocessing, counts, skipped files, timings

The fingerprint covers the preprocessing parameters, the label tables and the name, size and
modification time of every image file used, so the same command reuses the cache and any change
builds a new one. Everything is written into a temporary folder that is renamed into place only
when complete: a killed run never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spinemri.data import readers
from spinemri.data.dicom import read_image, series_order
from spinemri.data.preprocess import (PreprocessConfig, SiteOutsideImage, neighbor_indices, percentile_window,
                                      preprocess)
from spinemri.data.schema import DEFAULT_SPLIT, SPLITS
from spinemri.data.splits import split_studies
from spinemri.errors import ConfigError, DatasetError, ImageReadError, PrepareError
from spinemri.atomic import write_csv
from spinemri.processes import remove_stale_staging, staging_path, worker_pool

CACHE_VERSION = 3  # bump when a cache's contents change (2: ROI windowed on its crop; 3: slice geometry in slices.csv)
ON_BAD_FILE = ("stop", "skip")


@dataclass(frozen=True)
class CacheFolder:
    """A finished cache folder: images.npy and manifest.json (the classifier's and the localizer's)."""

    path: Path
    manifest: dict
    reused: bool = False

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.manifest["preprocess"])

    @property
    def content_digest(self) -> str:
        """sha256 of what the model reads (the images and the tables, not where or when they were made):
        the same data prepared the same way has the same digest on every machine. Folders built before it
        was recorded get it computed once and added to their manifest."""
        if "content_digest" not in self.manifest:
            self.manifest["content_digest"] = content_digest(self.path)
            staged = self.path / f".manifest.{os.getpid()}.json"
            try:
                staged.write_text(json.dumps(self.manifest, indent=2))
                staged.replace(self.path / "manifest.json")
            except OSError:  # a read-only cache still answers; it computes the digest each time
                pass
            finally:
                with contextlib.suppress(OSError):
                    staged.unlink(missing_ok=True)
        return self.manifest["content_digest"]

    def images(self) -> np.ndarray:
        """Read-only memory map, uint8 (N, S, S, C); index it with the table's ``index`` column."""
        return np.load(self.path / "images.npy", mmap_mode="r")


@dataclass(frozen=True)
class PreparedDataset(CacheFolder):
    """The classifier's cache: one ROI (or slice) per labelled sample, listed in samples.csv."""

    def samples(self) -> pd.DataFrame:
        frame = pd.read_csv(self.path / "samples.csv")
        frame["severity"] = frame["severity"].astype("Int64")
        return frame

    def splits(self, fractions: tuple[float, float, float] = DEFAULT_SPLIT, seed: int = 0) -> pd.DataFrame:
        """Study-level split table (computed once per seed and fractions, then read from disk)."""
        path = self.path / split_file_name(fractions, seed)
        if not path.is_file():
            table = split_studies(self.samples(), fractions, seed)
            write_csv(table, path)
        return pd.read_csv(path)

    def samples_with_split(self, fractions=DEFAULT_SPLIT, seed: int = 0) -> pd.DataFrame:
        return self.samples().merge(self.splits(fractions, seed)[["study_id", "split"]], on="study_id", how="left")

    def summary(self, fractions=DEFAULT_SPLIT, seed: int = 0) -> dict:
        """What `spinemri data prepare` reports: the folder, samples (kept and skipped) and the split."""
        per_split = self.samples_with_split(fractions, seed)["split"].value_counts()
        studies = self.splits(fractions, seed)["split"].value_counts()
        return {
            "cache": str(self.path),
            "reused": self.reused,
            "samples": self.manifest["samples"],
            "skipped": sum(len(s["rows"]) for s in self.manifest["skipped"]),
            "samples_per_split": {s: int(per_split.get(s, 0)) for s in SPLITS},
            "studies_per_split": {s: int(studies.get(s, 0)) for s in SPLITS},
            "shape": self.manifest["shape"],
        }


def default_cache_dir() -> Path:
    """$SPINEMRI_CACHE_DIR, else $XDG_CACHE_HOME/spinemri/prepared, else ~/.cache/spinemri/prepared."""
    if os.environ.get("SPINEMRI_CACHE_DIR"):
        return Path(os.environ["SPINEMRI_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "spinemri" / "prepared"


def split_file_name(fractions, seed: int) -> str:
    parts = "-".join(str(int(round(100 * f))) for f in fractions)
    return f"splits_seed{seed}_{parts}.csv"


def fingerprint(samples: pd.DataFrame, config: PreprocessConfig) -> str:
    """sha256 over the cache version, preprocessing, sample table and the stat of every image used."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": CACHE_VERSION, "preprocess": config.to_dict()}, sort_keys=True).encode())
    root = samples.attrs.get("root", "")
    table = samples.assign(path=relative_paths(samples["path"], root))
    digest.update(table.to_csv(index=False).encode())
    used = sorted(_files_used(samples, config))
    for path, rel in zip(used, relative_paths(used, root)):
        try:
            stat = os.stat(path)
        except FileNotFoundError:  # missing files are the build's to report (or skip)
            continue
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def content_digest(folder: Path) -> str:
    """sha256 over the name and bytes of every file of a cache folder except its manifest and split tables
    (which depend on the split settings, not on the data), read 8 MiB at a time."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith((".", "manifest")) or path.name.startswith("splits_"):
            continue
        digest.update(f"{path.name}\0".encode())
        with path.open("rb") as handle:
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:20]


def relative_paths(paths, root: str) -> list[str]:
    """``os.path.relpath(p, root)`` for each path (unchanged without a root), without its cost for
    the usual case of a clean path inside the root."""
    if not root:
        return list(paths)
    prefix = os.path.join(root, "")
    out = []
    for path in paths:
        rest = path[len(prefix):] if path.startswith(prefix) else ""
        out.append(rest if rest and rest == os.path.normpath(rest) and not rest.startswith("..")
                   else os.path.relpath(path, root))
    return out


def prepare(data_dir: str | Path, config: PreprocessConfig = PreprocessConfig(), *,
            cache_dir: str | Path | None = None, workers: int = 1, on_bad_file: str = "stop",
            split_fractions: tuple[float, float, float] = DEFAULT_SPLIT, split_seed: int = 0,
            progress: bool = False) -> PreparedDataset:
    """Build (or reuse) the cache for a dataset; see the module docstring for the layout."""
    if on_bad_file not in ON_BAD_FILE:
        raise ConfigError(f"on_bad_file must be one of {', '.join(ON_BAD_FILE)}, got {on_bad_file!r}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    samples = readers.load_samples(data_dir)
    if samples.empty:
        raise DatasetError([f"{data_dir} has no labelled samples"])
    if config.mode == "roi" and on_bad_file == "stop":
        _refuse_pointless(samples)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = fingerprint(samples, config)
    final = cache_dir / key
    if (final / "manifest.json").is_file():
        dataset = PreparedDataset(final, json.loads((final / "manifest.json").read_text()), reused=True)
        dataset.splits(split_fractions, split_seed)
        return dataset

    def build(staging: Path) -> dict:
        manifest = _build(samples, config, staging, workers=workers, on_bad_file=on_bad_file, progress=progress)
        manifest.update(fingerprint=key, data_dir=str(Path(data_dir).resolve()), cache_version=CACHE_VERSION,
                        workers=workers)
        PreparedDataset(staging, manifest).splits(split_fractions, split_seed)
        return manifest

    return PreparedDataset(final, publish(cache_dir, key, build))


def _refuse_pointless(samples: pd.DataFrame) -> None:
    """roi mode crops around each labelled point: rows without one are refused, each named with the fix."""
    pointless = samples[samples["x"].isna() | samples["y"].isna()]
    if pointless.empty:
        return
    labels_csv = samples.attrs.get("labels_csv", "the labels CSV")
    problems = [f"{labels_csv} row {row}: no x/y point; roi mode (preprocess.mode roi) crops a square around the "
                "labelled point, so give its pixel column and row in x and y, or train on whole slices with "
                "--mode slice (which grades the site each row names)" for row in pointless["label_row"].head(10)]
    if len(pointless) > 10:
        problems.append(f"... and {len(pointless) - 10} more rows without x/y ({len(pointless)} in all); "
                        "--on-bad-file=skip leaves them out")
    raise DatasetError(problems)


def publish(cache_dir: Path, name: str, build) -> dict:
    """Create the cache folder ``cache_dir/name`` so that it appears only when complete; returns its manifest.

    ``build(staging)`` fills a private staging folder and returns the manifest, written last (with
    the build's ``seconds``). The folder is then renamed into place; if another process finished
    the same cache first, theirs is kept. On any error or interrupt the staging folder is removed,
    and leftovers of killed runs are removed by the next call.
    """
    final = cache_dir / name
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(cache_dir)
    staging = staging_path(final)
    staging.mkdir()
    started = time.perf_counter()
    try:
        manifest = build(staging)
        manifest["content_digest"] = content_digest(staging)
        manifest["seconds"] = round(time.perf_counter() - started, 2)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        try:
            staging.rename(final)
        except OSError:  # another process finished the same cache first: use theirs
            if not (final / "manifest.json").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return json.loads((final / "manifest.json").read_text())


# --- building ----------------------------------------------------------------------------------

def _build(samples: pd.DataFrame, config: PreprocessConfig, staging: Path, *, workers: int,
           on_bad_file: str, progress: bool) -> dict:
    samples = samples.reset_index(drop=True)
    shape = (len(samples), config.img_size, config.img_size, config.channels)
    output = str(staging / "images.npy")
    np.lib.format.open_memmap(output, mode="w+", dtype=np.uint8, shape=shape).flush()  # the file, zero-filled
    # Plain lists per series (cheap to send to a worker process; no DataFrame per group). Workers
    # write their arrays straight into the memory-mapped output and send back row numbers only.
    paths = np.asarray(samples["path"].tolist(), dtype=object)  # converted once, not per series
    xs, ys = samples["x"].to_numpy(float), samples["y"].to_numpy(float)
    label_rows = samples["label_row"].to_numpy(np.int64) if "label_row" in samples else np.zeros(len(samples), int)
    labels_csv = samples.attrs.get("labels_csv", "the labels CSV")
    groups = [(config, output, rows.tolist(), paths[rows].tolist(), xs[rows].tolist(), ys[rows].tolist(),
               label_rows[rows].tolist(), labels_csv)
              for rows in samples.groupby(["study_id", "series_id"], sort=True).indices.values()]
    done = np.zeros(len(samples), dtype=bool)
    failures: list[dict] = []
    bar = _bar(progress, len(samples))
    try:
        if workers > 1:
            with worker_pool(workers) as pool:
                for result in pool.map(_prepare_group, groups, chunksize=4):
                    _collect(result, done, failures, on_bad_file, bar)
        else:
            for result in map(_prepare_group, groups):
                _collect(result, done, failures, on_bad_file, bar)
    finally:
        _close_output(output)
        if bar is not None:
            bar.close()
    kept = samples[done].assign(index=np.flatnonzero(done))
    kept = kept.assign(path=relative_paths(kept["path"], samples.attrs.get("root", "")))
    write_csv(kept, staging / "samples.csv")
    return {
        "preprocess": config.to_dict(),
        "shape": list(shape),
        "samples": int(done.sum()),
        "samples_total": len(samples),
        "skipped": failures,
        "dataset_root": samples.attrs.get("root", ""),
    }


_OUTPUTS: dict[str, np.ndarray] = {}  # this process's mappings of the images.npy being built
_HEAP_PAD = 64 << 20
_M_TOP_PAD = -2  # glibc's mallopt() parameter number
_HEAP_PADDED = False


def _output(path: str) -> np.ndarray:
    if path not in _OUTPUTS:
        keep_heap_padding()
        _OUTPUTS[path] = np.load(path, mmap_mode="r+")
    return _OUTPUTS[path]


def keep_heap_padding() -> None:
    """On glibc, keep 64 MB free at the top of the heap (M_TOP_PAD) in a process that builds a cache.

    Each slice allocates and frees a few arrays of 0.2-1 MB (file bytes, float32 pixels, float64
    rescale); by default glibc grows the heap for them and trims it again, and the fresh pages
    fault in one by one each time. Kept padding reuses them: 1.6x faster per slice on the
    300-study benchmark. The padding is address space until touched, and at most 64 MB of it.
    Elsewhere (macOS, musl) this does nothing.
    """
    global _HEAP_PADDED
    if _HEAP_PADDED or not sys.platform.startswith("linux"):
        return
    _HEAP_PADDED = True
    try:
        ctypes.CDLL(None).mallopt(_M_TOP_PAD, _HEAP_PAD)
    except (OSError, AttributeError):  # not glibc
        pass


def _close_output(path: str) -> None:
    images = _OUTPUTS.pop(path, None)
    if images is not None:
        images.flush()


def _prepare_group(job) -> tuple[list[int], list[dict]]:
    """Preprocess all samples of one series into their rows of the output: each needed slice is
    decoded, and windowed, once. Returns the rows written and the failures."""
    config, output, rows, paths, xs, ys, label_rows, labels_csv = job
    images = _output(output)
    indices, failures = [], []
    decoded: dict[str, object] = {}
    windows: dict[str, tuple[float, float]] = {}  # centre path -> percentile window (shared by its sites)

    def load(path):
        if path not in decoded:
            try:
                decoded[path] = read_image(path, voi=config.dicom_window)
            except ImageReadError as exc:
                decoded[path] = exc
        return decoded[path]

    order = None
    if config.slices > 1:
        folder = Path(paths[0]).parent
        try:
            order = [p for _, p, _ in series_order(sorted(folder.glob("*.dcm")))]
        except ImageReadError as exc:
            return [], [dict(path=exc.path, reason=exc.reason, rows=list(rows))]
    for row, path, x, y, label_row in zip(rows, paths, xs, ys, label_rows):
        inputs = [path]
        if order is not None:
            try:
                centre = order.index(path)
            except ValueError:
                centre = None
            inputs = [path] * config.slices if centre is None else \
                [order[i] for i in neighbor_indices(centre, len(order), config.slices)]
        loaded = [load(p) for p in inputs]
        bad = next((img for img in loaded if isinstance(img, ImageReadError)), None)
        if bad is not None:
            failures.append(dict(path=bad.path, reason=bad.reason, rows=[int(row)]))
            continue
        x, y = (None if np.isnan(x) else x), (None if np.isnan(y) else y)
        if config.mode == "roi" and (x is None or y is None):
            failures.append(dict(path=path, reason="has no x/y coordinate (roi mode needs one; use --mode slice)",
                                 rows=[int(row)]))
            continue
        try:
            slices = [img.pixels for img in loaded]
            middle = loaded[len(loaded) // 2]
            if middle.path not in windows and middle.pixels.ndim == 2 and middle.pixels.size:  # else preprocess says why
                windows[middle.path] = percentile_window(middle.pixels, config.p_low, config.p_high,
                                                         stored=middle.stored)
            images[row] = preprocess(slices, middle.pixel_spacing, config, x, y, window=windows.get(middle.path))
            indices.append(int(row))
        except SiteOutsideImage as exc:
            failures.append(dict(path=path, reason=str(exc), rows=[int(row)],
                                 label=f"{labels_csv} row {label_row}"))
        except ValueError as exc:
            failures.append(dict(path=path, reason=str(exc), rows=[int(row)]))
    return indices, failures


def _collect(result, done, failures, on_bad_file, bar) -> None:
    indices, group_failures = result
    done[indices] = True
    if group_failures and on_bad_file == "stop":
        first = group_failures[0]
        if "label" in first:  # the label is wrong, not the file
            raise PrepareError(f"{first['label']}: the labelled {first['reason']} ({first['path']}); fix the "
                               "coordinate or drop the row (--on-bad-file=skip leaves such samples out)")
        raise PrepareError(f"{first['path']} {first['reason']}; skip bad files with --on-bad-file=skip")
    failures.extend(group_failures)
    if bar is not None:
        bar.update(len(indices) + sum(len(f["rows"]) for f in group_failures))


def _files_used(samples: pd.DataFrame, config: PreprocessConfig) -> set[str]:
    files = set(samples["path"])
    if config.slices > 1:  # neighbours count too
        for folder in {str(Path(p).parent) for p in samples["path"]}:
            files.update(str(p) for p in Path(folder).glob("*.dcm"))
    return files




def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="preprocessing", unit="sample", mininterval=1 if sys.stderr.isatty() else 10)
