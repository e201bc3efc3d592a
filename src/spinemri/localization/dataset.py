"""The localizer's cache: every slice of every series of one type, preprocessed whole (``slice`` mode).

``prepare_localizer(data_dir, "sagittal_t2", config)`` writes

    <cache_dir>/localize-<series>-<fingerprint>/
        images.npy      uint8 (N, S, S, C), one row per slice, memory-mapped by training
        slices.csv      study_id, series_id, instance_number, position (0.. along the slice normal),
                        n_slices, width, height, row_mm, col_mm, path, origin_x/y/z (the slice's
                        ImagePositionPatient), normal_x/y/z (its series' plane normal), index (row
                        in images.npy)
        manifest.json   preprocessing, counts, skipped series

with the same guarantees as :mod:`spinemri.data.cache`: the fingerprint covers the preprocessing
and the name, size and time of every file, and the folder appears only when complete. Targets
(which slice, which point) are computed from the label table at training time by
:func:`slice_targets`, so changing how they are built needs no new cache.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spinemri.data.tables import read_csv
from spinemri.data import cache, readers, schema
from spinemri.data.dicom import SeriesStack, read_series
from spinemri.data.preprocess import PreprocessConfig, neighbor_indices, preprocess
from spinemri.data.splits import split_studies
from spinemri.localization.sites import SeriesTask, SliceFrame, get_task
from spinemri.errors import ConfigError, DatasetError, ImageReadError, PrepareError
from spinemri.atomic import write_csv
from spinemri.processes import worker_pool

SLICE_COLUMNS = ("study_id", "series_id", "instance_number", "position", "n_slices", "width", "height",
                 "row_mm", "col_mm", "path", "origin_x", "origin_y", "origin_z", "normal_x", "normal_y", "normal_z")
_ORIGIN, _NORMAL = ["origin_x", "origin_y", "origin_z"], ["normal_x", "normal_y", "normal_z"]


@dataclass(frozen=True)
class LocalizerDataset(cache.CacheFolder):
    """The localizer's cache: every slice of one series type, listed in slices.csv."""

    @property
    def task(self) -> SeriesTask:
        return get_task(self.manifest["series"])

    def slices(self) -> pd.DataFrame:
        """slices.csv plus ``stack_position``: each slice's place in its study's stack (see stack_positions)."""
        table = pd.read_csv(self.path / "slices.csv")
        table["stack_position"] = np.zeros(len(table), np.float32)
        for rows in table.groupby("study_id").indices.values():
            study = table.iloc[rows]
            series = []
            for _, one in study.groupby("series_id", sort=True):
                one = one.sort_values("position")
                geometry = one[_ORIGIN + _NORMAL].to_numpy(float)
                known = not np.isnan(geometry).any()
                series.append((one.index, len(one), geometry[:, :3] if known else None, geometry[0, 3:] if known else None))
            for (index, *_), where in zip(series, stack_positions([g for _, *g in series])):
                table.loc[index, "stack_position"] = where[:, 0]
        return table


def series_table(root: Path) -> pd.DataFrame:
    """train_series_descriptions.csv (or test_...) of an RSNA-layout folder."""
    for name in (schema.SERIES_CSV, "test_series_descriptions.csv"):
        if (root / name).is_file():
            return read_csv(root / name, required=list(schema.SERIES_COLUMNS))
    raise DatasetError([f"{root} has no {schema.SERIES_CSV} (or test_series_descriptions.csv); the localizer "
                                "needs each series' description to know which series to read"])


def prepare_localizer(data_dir: str | Path, series: str, config: PreprocessConfig, *,
                      cache_dir: str | Path | None = None, workers: int = 1,
                      on_bad_file: str = "stop") -> tuple[LocalizerDataset, pd.DataFrame]:
    """Build (or reuse) the slice cache of one series type; returns it and the labelled sample table."""
    task = get_task(series)
    if config.mode != "slice":
        raise ConfigError(f"the localizer sees whole slices: preprocess.mode must be 'slice', got {config.mode!r}")
    root = Path(data_dir)
    if readers.detect_layout(root) != "rsna":
        raise DatasetError([f"{root} is a flat CSV; the localizer needs whole series, i.e. an RSNA-layout "
                                    "folder (train.csv, train_series_descriptions.csv, train_label_coordinates.csv, "
                                    "train_images/)"])
    samples = readers.load_rsna(root)
    files = _series_files(root, samples, task)
    if files.empty:
        raise DatasetError([f"{root} has no labelled {task.description} series; the {series} localizer "
                                    f"learns from {schema.COORDINATES_CSV} points on them"])
    cache_dir = Path(cache_dir) if cache_dir else cache.default_cache_dir()
    key = cache.fingerprint(files, config)
    final = cache_dir / f"localize-{series}-{key}"
    if (final / "manifest.json").is_file():
        return LocalizerDataset(final, json.loads((final / "manifest.json").read_text()), reused=True), samples

    def build(staging: Path) -> dict:
        manifest = _build(files, config, staging, workers=workers, on_bad_file=on_bad_file)
        manifest.update(series=series, fingerprint=key, data_dir=str(root.resolve()), workers=workers)
        return manifest

    return LocalizerDataset(final, cache.publish(cache_dir, final.name, build)), samples


def study_splits(samples: pd.DataFrame, fractions, seed: int) -> pd.DataFrame:
    """The same study-level split as the classifier's cache (same function, same label table)."""
    return split_studies(samples, fractions, seed)


def slice_targets(slices: pd.DataFrame, samples: pd.DataFrame, task: SeriesTask, sigma: float = 1.0,
                  point_slices: int = 1) -> dict[str, np.ndarray]:
    """Per slice: which group's slice it is (soft, Gaussian in slices) and where each point lies.

    slice_target (N, G): exp(-d^2 / 2 sigma^2), d = slices from the labelled slice of the group in
    this series (0 when the group is labelled in another series of the study). slice_mask (N, G):
    1 where the study has that group labelled at all. points (N, P, 2): unit coordinates;
    point_mask (N, P): 1 on slices within ``point_slices`` of the point's labelled slice.
    """
    n, groups, points = len(slices), len(task.groups), task.points
    out = dict(slice_target=np.zeros((n, groups), np.float32), slice_mask=np.zeros((n, groups), np.float32),
               points=np.zeros((n, points, 2), np.float32), point_mask=np.zeros((n, points), np.float32))
    site = {(c, lv): (g, p) for c, lv, g, p in task.sites}
    labelled = samples[samples["series_description"] == task.description]
    labelled = labelled[[(c, lv) in site for c, lv in zip(labelled["condition"], labelled["level"])]]
    position = {(s, se, i): (pos, n_s) for s, se, i, pos, n_s in
                slices[["study_id", "series_id", "instance_number", "position", "n_slices"]].itertuples(index=False)}
    rows_of = {key: np.asarray(index) for key, index in slices.groupby(["study_id", "series_id"]).indices.items()}
    studies_series: dict[int, list] = {}
    for (study, series_id) in rows_of:
        studies_series.setdefault(study, []).append(series_id)

    for study, group_frame in labelled.groupby("study_id"):
        for g in range(groups):
            in_group = group_frame[[site[(c, lv)][0] == g for c, lv in zip(group_frame["condition"], group_frame["level"])]]
            if in_group.empty:
                continue
            for series_id in studies_series.get(study, []):
                rows = rows_of[(study, series_id)]
                out["slice_mask"][rows, g] = 1.0
                here = in_group[in_group["series_id"] == series_id]
                if here.empty:
                    continue
                instance = int(here["instance_number"].mode().iloc[0])
                if (study, series_id, instance) not in position:
                    continue
                centre = position[(study, series_id, instance)][0]
                d = slices["position"].to_numpy()[rows] - centre
                out["slice_target"][rows, g] = np.exp(-(d ** 2) / (2 * sigma ** 2))
        for point_row in group_frame.itertuples(index=False):
            g, p = site[(point_row.condition, point_row.level)]
            key = (study, point_row.series_id, int(point_row.instance_number))
            if key not in position or (study, point_row.series_id) not in rows_of:
                continue
            rows = rows_of[(study, point_row.series_id)]
            centre = position[key][0]
            near = rows[np.abs(slices["position"].to_numpy()[rows] - centre) <= point_slices]
            frame_row = slices.iloc[rows[0]]
            frame = SliceFrame(int(frame_row["width"]), int(frame_row["height"]), float(frame_row["row_mm"]),
                               float(frame_row["col_mm"]))
            u, v = frame.to_unit(point_row.x, point_row.y)
            out["points"][near, p] = (u, v)
            out["point_mask"][near, p] = 1.0
    return out


# --- building ----------------------------------------------------------------------------------

def _series_files(root: Path, samples: pd.DataFrame, task: SeriesTask) -> pd.DataFrame:
    """Every .dcm of every series of the task's type in studies with a labelled point of that type."""
    series = series_table(root)
    series = series[series["series_description"] == task.description]
    conditions = {c for c, *_ in task.sites}
    studies = set(samples.loc[samples["condition"].isin(conditions) &
                              (samples["series_description"] == task.description), "study_id"])
    rows = []
    for study, series_id in series[series["study_id"].isin(studies)][["study_id", "series_id"]].itertuples(index=False):
        folder = root / schema.IMAGES_DIR / str(study) / str(series_id)
        for path in sorted(folder.glob("*.dcm")):
            rows.append((int(study), int(series_id), str(path)))
    files = pd.DataFrame(rows, columns=["study_id", "series_id", "path"]).assign(task=task.name)
    files.attrs["root"] = str(root)
    return files


def _build(files: pd.DataFrame, config: PreprocessConfig, staging: Path, *, workers: int, on_bad_file: str) -> dict:
    root = files.attrs["root"]
    groups = [(config, key, list(group["path"])) for key, group in files.groupby(["study_id", "series_id"], sort=True)]
    offsets = np.cumsum([0] + [len(paths) for *_, paths in groups])
    shape = (int(offsets[-1]), config.img_size, config.img_size, config.channels)
    tables, skipped = [], []
    # Written in order with plain writes, not through a memory map: the written pages go to the page
    # cache, not to this process's memory, so building a cache costs the same memory at any size.
    with contextlib.ExitStack() as stack, open(staging / "images.npy", "wb") as out:
        np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                   "fortran_order": False, "shape": shape})
        jobs = map(_prepare_series, groups) if workers == 1 else \
            stack.enter_context(worker_pool(workers)).map(_prepare_series, groups, chunksize=2)
        for offset, end, (rows, arrays, failure) in zip(offsets[:-1], offsets[1:], jobs):
            if failure is not None:
                if on_bad_file == "stop":
                    raise PrepareError(f"{failure}; skip bad series with --on-bad-file=skip")
                skipped.append(failure)
                rows, arrays = [], np.zeros((0, *shape[1:]), np.uint8)
            out.write(np.ascontiguousarray(arrays, np.uint8).tobytes())
            out.write(bytes((end - offset - len(arrays)) * int(np.prod(shape[1:]))))  # the rows of no slice: zeros
            if rows:
                tables.append(pd.DataFrame(rows, columns=list(SLICE_COLUMNS)).assign(
                    index=np.arange(offset, offset + len(rows))))
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=[*SLICE_COLUMNS, "index"])
    table["path"] = [os.path.relpath(p, root) for p in table["path"]]
    write_csv(table, staging / "slices.csv")
    return {"preprocess": config.to_dict(), "shape": list(shape), "slices": int(len(table)),
            "series": int(table.groupby(["study_id", "series_id"]).ngroups) if len(table) else 0,
            "skipped": skipped, "dataset_root": root}


def _prepare_series(job):
    """All slices of one series, in position order, preprocessed whole (no site)."""
    config, (study, series_id), paths = job
    cache.keep_heap_padding()
    try:  # the headers and first slice here, every other slice in series_inputs
        stack = read_series(paths, voi=config.dicom_window)
        inputs = series_inputs(stack, config)
    except ImageReadError as exc:
        return [], None, f"series {study}/{series_id}: {exc.path} {exc.reason}"
    n = len(stack.instance_numbers)
    height, width = stack.pixels.shape[1:]
    row_mm, col_mm = stack.pixel_spacing
    rows = []
    by_instance = {}
    for path in paths:
        by_instance.setdefault(Path(path).stem, path)
    normal = stack.normal or (np.nan,) * 3
    for i, instance in enumerate(stack.instance_numbers):
        origin = stack.origins[i] if stack.origins else (np.nan,) * 3
        rows.append((study, series_id, instance, i, n, width, height, row_mm, col_mm,
                     by_instance.get(str(instance), paths[0]), *origin, *normal))
    return rows, inputs, None


def stack_positions(series) -> list[np.ndarray]:
    """The localizer's position input for every slice of a study's series of one type: (n_k, 1) per series.

    ``series`` holds, per series in series-id order, ``(n_slices, origins, normal)``: the slices'
    ImagePositionPatient in position order (n, 3) and the plane's normal, or None where unknown.
    A slice's position is its rank in one stack of all the series, ordered along the first
    series' normal, scaled to 0..1. For one series that is its place in the series. For two axial
    series that split the levels between them, it stays the place in the lumbar spine, which a
    per-series position would not (L4/L5 would sit at the top of a series holding L4/L5 and L5/S1).
    Without geometry each series keeps its own 0..1.
    """
    series = list(series)
    own = [(np.arange(n, dtype=np.float32) / max(n - 1, 1))[:, None] for n, *_ in series]
    if len(series) < 2 or any(origins is None or normal is None for _, origins, normal in series):
        return own
    reference = np.asarray(series[0][2], float)
    along = np.concatenate([np.asarray(origins, float) @ reference for _, origins, _ in series])
    rank = np.empty(len(along), np.float32)
    rank[np.argsort(along, kind="stable")] = np.arange(len(along), dtype=np.float32)
    rank /= max(len(along) - 1, 1)
    bounds = np.cumsum([0] + [n for n, *_ in series])
    return [rank[a:b, None] for a, b in zip(bounds[:-1], bounds[1:])]


def series_inputs(stack: SeriesStack, config: PreprocessConfig) -> np.ndarray:
    """Every slice of a series as the localizer sees it (the cache and inference alike):
    uint8 (n, S, S, C), the whole slice in ``slice`` mode, neighbours as channels when C = 3."""
    n = len(stack.instance_numbers)
    return np.stack([preprocess([stack.pixels[j] for j in neighbor_indices(i, n, config.channels)],
                                stack.pixel_spacing, config) for i in range(n)])
