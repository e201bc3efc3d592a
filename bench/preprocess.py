"""DICOM -> cache throughput of `spinemri data prepare` vs the thesis's naive loop and bare decoding.

Measured on the same phantom files in one run (each timing the median of --repeats, files already
in the page cache after a warm-up read):

* naive: one process, once per distinct file, ``pydicom.dcmread`` + pixel decode + scale to 8 bits +
  ``cv2.resize`` + ``cv2.equalizeHist`` (what the thesis did, without ROI or geometry);
* bare: one process, per file ``pydicom.dcmread`` + pixel decode, nothing else;
* prepare: ``spinemri.data.cache.prepare`` (what `spinemri data prepare --workers K` runs) into a
  fresh cache, with 1 and with K worker processes: every labelled sample's ROI, each slice decoded once.

All of them run with the same allocator setting: prepare() keeps 64 MB of glibc heap padding in
a process that builds a cache (it saves page faults on every slice), and the benchmark sets the same
for itself before timing, so that the baselines get it too. The baselines' times before that (glibc
defaults, as a plain script runs) are in the JSON as secondary numbers.

Throughput is DICOM files (slices) per second over the distinct files the samples use (each
labelled sample is one ROI; a slice carries ~3 of them). The JSON also gives the naive loop run once
per sample row, as the thesis's table drove it (secondary, not the target's baseline).
Targets (issue 8): prepare with 2 workers >= 1.8x the naive loop; one worker's cost per slice
<= 1.3x bare decoding.

    python bench/preprocess.py [--quick] [--studies 300] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import _common  # noqa: F401 - puts src/ on sys.path

import cv2
import numpy as np
import pydicom

from spinemri.data import readers
from spinemri.data.cache import fingerprint, keep_heap_padding, prepare
from spinemri.data.preprocess import PreprocessConfig

TARGET_SPEEDUP = 1.8
TARGET_PER_WORKER = 1.3


def naive_loop(files: list[str], size: int) -> None:
    for path in files:
        pixels = pydicom.dcmread(path).pixel_array.astype(np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        image = ((pixels - low) / max(high - low, 1.0) * 255).astype(np.uint8)
        cv2.equalizeHist(cv2.resize(image, (size, size)))


def bare_decode(files: list[str]) -> None:
    for path in files:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the work measured


def breakdown(samples, config: PreprocessConfig) -> dict:
    """Seconds in spinemri's DICOM reader and in preprocess() (every site), one process, no cache."""
    from spinemri.data.dicom import read_image
    from spinemri.data.preprocess import percentile_window, preprocess

    read_s = process_s = 0.0
    for path, sites in samples.groupby("path"):
        started = time.perf_counter()
        image = read_image(path)
        read_s += time.perf_counter() - started
        started = time.perf_counter()
        window = percentile_window(image.pixels, config.p_low, config.p_high, stored=image.stored)
        for x, y in zip(sites["x"], sites["y"]):
            preprocess([image.pixels], image.pixel_spacing, config, x, y, window=window)
        process_s += time.perf_counter() - started
    return {"read_image": read_s, "preprocess_all_sites": process_s}


def prepare_seconds(data_dir, config: PreprocessConfig, workers: int) -> float:
    with tempfile.TemporaryDirectory(prefix="spinemri-bench-cache-") as cache_dir:
        started = time.perf_counter()
        prepare(data_dir, config, cache_dir=cache_dir, workers=workers)
        return time.perf_counter() - started


def median_seconds(function, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), [round(t, 4) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 studies, 1 repeat: a smoke run")
    parser.add_argument("--studies", type=int, default=300,
                        help="phantom size; large enough that per-dataset costs (label tables, fingerprint, "
                             "worker start-up) do not dominate the per-slice cost")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=128)
    args = parser.parse_args()
    if args.quick:
        args.studies, args.repeats = 8, 1

    data_dir = _common.phantom(args.studies)
    samples = readers.load_samples(data_dir)
    files = sorted(set(samples["path"]))
    config = PreprocessConfig(img_size=args.img_size, mode="roi")
    bare_decode(files)  # warm the page cache: every variant reads files from memory
    _common.log(f"{len(samples)} samples on {len(files)} DICOM files; {args.repeats} repeat(s) per variant")

    # The baselines with glibc's default heap behaviour (as a plain script runs them), secondary:
    # their time depends on what the process allocated before. Then the heap padding that
    # prepare() sets for itself (cache.keep_heap_padding) is set for this whole process, so that
    # every variant below, baselines included, runs with the same allocator.
    default_naive_s, _ = median_seconds(lambda: naive_loop(files, args.img_size), args.repeats)
    default_bare_s, _ = median_seconds(lambda: bare_decode(files), args.repeats)
    keep_heap_padding()

    naive_s, naive_all = median_seconds(lambda: naive_loop(files, args.img_size), args.repeats)
    # The thesis's table has one row per labelled point and its loop read the file for each row.
    per_row_s, _ = median_seconds(lambda: naive_loop(list(samples["path"]), args.img_size), args.repeats)
    bare_s, bare_all = median_seconds(lambda: bare_decode(files), args.repeats)
    one = [prepare_seconds(data_dir, config, 1) for _ in range(args.repeats)]
    many = [prepare_seconds(data_dir, config, args.workers) for _ in range(args.repeats)]
    prepare1_s, prepareK_s = statistics.median(one), statistics.median(many)

    parts = breakdown(samples, config)
    started = time.perf_counter()  # per-dataset work, whatever its size: label tables and the fingerprint
    fingerprint(readers.load_samples(data_dir), config)
    per_dataset_s = time.perf_counter() - started
    n = len(files)
    speedup = naive_s / prepareK_s
    per_worker = prepare1_s / bare_s  # one worker's cost per slice over bare decoding's
    result = {
        "studies": args.studies, "samples": len(samples), "dicom_files": n, "img_size": args.img_size,
        "workers": args.workers, "repeats": args.repeats,
        "seconds": {"naive": round(naive_s, 4), "bare_decode": round(bare_s, 4), "prepare_1": round(prepare1_s, 4),
                    f"prepare_{args.workers}": round(prepareK_s, 4)},
        "seconds_all": {"naive": naive_all, "bare_decode": bare_all, "prepare_1": [round(t, 4) for t in one],
                        f"prepare_{args.workers}": [round(t, 4) for t in many]},
        "slices_per_s": {"naive": round(n / naive_s, 1), "bare_decode": round(n / bare_s, 1),
                         "prepare_1": round(n / prepare1_s, 1), f"prepare_{args.workers}": round(n / prepareK_s, 1)},
        "ms_per_slice": {"naive": round(1e3 * naive_s / n, 3), "bare_decode": round(1e3 * bare_s / n, 3),
                         "prepare_1": round(1e3 * prepare1_s / n, 3)},
        # Where one worker's time per slice goes: spinemri's reader (decode + header + modality LUT
        # + float32), the percentile window and preprocess() for the ~3 sites on each slice, the work
        # done once per prepare (label tables, fingerprint), and the rest (the loop, writing).
        "breakdown_ms_per_slice": {
            "read_image": round(1e3 * parts["read_image"] / n, 3),
            "preprocess_all_sites": round(1e3 * parts["preprocess_all_sites"] / n, 3),
            "per_dataset_work": round(1e3 * per_dataset_s / n, 3),
            "rest_of_prepare": round(1e3 * (prepare1_s - sum(parts.values()) - per_dataset_s) / n, 3)},
        "worker_scaling": round(prepare1_s / prepareK_s, 3),
        # Secondary: the baselines before the heap padding was set (glibc's defaults).
        "default_allocator_seconds": {"naive": round(default_naive_s, 4), "bare_decode": round(default_bare_s, 4)},
        "prepare_vs_naive_default_allocator": round(default_naive_s / prepareK_s, 3),
        "per_worker_vs_bare_decode_default_allocator": round(prepare1_s / default_bare_s, 3),
        # Secondary: the naive loop once per sample row (as the thesis's table drove it), not per file.
        "naive_per_sample_row_seconds": round(per_row_s, 4),
        "prepare_vs_naive_per_sample_row": round(per_row_s / prepareK_s, 3),
        "ratios": {
            "prepare_vs_naive": {"value": round(speedup, 3), "target": f">= {TARGET_SPEEDUP}",
                                 "result": _common.verdict(speedup >= TARGET_SPEEDUP)},
            "per_worker_vs_bare_decode": {"value": round(per_worker, 3), "target": f"<= {TARGET_PER_WORKER}",
                                          "result": _common.verdict(per_worker <= TARGET_PER_WORKER)},
        },
    }
    _common.emit("preprocess", result,
                 f"preprocess: prepare --workers {args.workers} is {speedup:.2f}x the naive loop (target >= "
                 f"{TARGET_SPEEDUP}: {_common.verdict(speedup >= TARGET_SPEEDUP)}); one worker costs {per_worker:.2f}x "
                 f"bare decoding per slice (target <= {TARGET_PER_WORKER}: "
                 f"{_common.verdict(per_worker <= TARGET_PER_WORKER)}); {n} slices, {n / prepareK_s:.0f} slices/s "
                 f"with {args.workers} workers, scaling x{prepare1_s / prepareK_s:.2f}")


if __name__ == "__main__":
    main()
