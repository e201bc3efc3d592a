"""Images/s the training input pipeline delivers on one CPU core and on all of them, against what a GPU consumes.

For each img_size × slices of the grid (default 96, 128 and 224 px; 1 and 5 slices), the phantom
(default 30 studies) is prepared into a cache by ``spinemri.data.cache.prepare``, and its training
split is streamed through ``spinemri.training.data.make_dataset`` exactly as `spinemri train` builds
it: pread from images.npy, shuffle, the default augmentation (``AugmentConfig()``: rotation, shift,
zoom, brightness, contrast), one-hot targets and sample weights, batch --batch-size, prefetch. The
consumer iterates the dataset and touches nothing, so the figure is what the pipeline can deliver,
not what a model takes.

Each measurement runs in a fresh process (nothing leaks between them) pinned with
``sched_setaffinity`` to 1 CPU, or to all the CPUs this process may use, with TensorFlow's intra-
and inter-op pools and tf.data's private pool set to the same count, and no GPU visible (the
pipeline is CPU work). After a warm-up (iterator start-up, tracing, AUTOTUNE settling), --rounds
windows of --seconds each are timed; images/s is their median.

Reported: images/s (wall clock) on 1 core and on all cores; images/s per core, which is images per
CPU-second of the 1-core process (on a shared machine a pinned process gets less than its core, and
this counts only the time it had it; on an idle machine the two agree); the capacity of a 16-core
machine as an extrapolation, per core × 16, which assumes that cores add linearly (``scaling``,
images per CPU-second on all cores ÷ on 1, says how far that held here). The GPU side is the table
GPU_IMAGES_PER_S, filled from bench/gpu_train_speed.py on a GPU machine; where it holds None the
GPU consumption and the ratio (16-core capacity ÷ GPU images/s) are reported as unmeasured. Target: ratio >= 1.2.

    python bench/feed.py [--quick] [--sizes 96,128,224] [--slices 1,5] [--studies 30] [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

TARGET = 1.2
EXTRAPOLATED_CORES = 16
BATCH_SIZE = 64  # the batch both sides are measured at
GPU = "NVIDIA H200"
GPU_SLICES = 5  # the GPU side's input channels (only the first convolution sees them)
# Training images/s of one GPU (mixed_float16, weights=None, batch BATCH_SIZE, GPU_SLICES channels)
# per backbone and img_size, as `python bench/gpu_train_speed.py` measures them on a GPU machine.
# None: not measured yet. The only place the GPU side is written down.
GPU_IMAGES_PER_S: dict[str, dict[int, float | None]] = {
    "densenet": {128: None, 224: None},
    "mobilenet_v2": {128: None, 224: None},
}
GPU_COMMAND = "python bench/gpu_train_speed.py"


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def prepare_caches(data_dir: Path, grid: list[tuple[int, int]], cache_dir: Path) -> dict[tuple[int, int], Path]:
    """One prepared cache folder per (img_size, slices)."""
    from spinemri.data.cache import prepare
    from spinemri.data.preprocess import PreprocessConfig

    folders = {}
    for img_size, slices in grid:
        dataset = prepare(data_dir, PreprocessConfig(img_size=img_size, slices=slices), cache_dir=cache_dir,
                          workers=min(4, len(usable_cpus())))
        _common.log(f"cache {img_size} px × {slices} slices: {dataset.manifest['samples']} samples")
        folders[img_size, slices] = dataset.path
    return folders


def feed_rate(cache_folder: Path, cpus: list[int], *, batch_size: int, seconds: float, rounds: int) -> dict:
    """Images/s of the training pipeline on ``cpus``, measured in a fresh process (see ``_measure``)."""
    job = {"cache": str(cache_folder), "cpus": cpus, "batch_size": batch_size, "seconds": seconds, "rounds": rounds}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}  # CPU work; a GPU is the trainer's, not the feed's
    done = subprocess.run([sys.executable, __file__, "--measure", json.dumps(job)], stdout=subprocess.PIPE,
                          stderr=sys.stderr, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(job: dict) -> dict:
    """Runs in the measuring process: pin to the CPUs, then time the pipeline into a no-op consumer."""
    cpus = job["cpus"]
    os.sched_setaffinity(0, cpus)  # before TensorFlow sizes its thread pools from it
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(len(cpus))
    tf.config.threading.set_inter_op_parallelism_threads(len(cpus))
    from spinemri.config import AugmentConfig
    from spinemri.data.cache import PreparedDataset
    from spinemri.training.data import make_dataset, split_data

    folder = Path(job["cache"])
    dataset = PreparedDataset(folder, json.loads((folder / "manifest.json").read_text()))
    train = split_data(dataset.samples_with_split(), "train")
    options = tf.data.Options()
    options.threading.private_threadpool_size = len(cpus)
    pipeline = make_dataset(folder / "images.npy", train, job["batch_size"], shuffle=True, seed=0,
                            augment=AugmentConfig()).repeat().with_options(options)
    batches = iter(pipeline)
    started, warm_batches = time.perf_counter(), 0
    while warm_batches < 3 or time.perf_counter() - started < 1.0:
        next(batches)
        warm_batches += 1
    rates, cpu_rates, busy = [], [], []
    for _ in range(job["rounds"]):
        images, started, cpu_started = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < job["seconds"]:
            x, _, _ = next(batches)
            images += int(x.shape[0])  # the shape only: the consumer reads no pixel
        elapsed, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        rates.append(images / elapsed)
        cpu_rates.append(images / cpu_seconds)
        busy.append(cpu_seconds / (elapsed * len(cpus)))
    return {"cores": len(cpus), "cpus": sorted(os.sched_getaffinity(0)), "train_samples": len(train),
            "images_per_s": round(statistics.median(rates), 1), "rounds": [round(r, 1) for r in rates],
            "images_per_cpu_s": round(statistics.median(cpu_rates), 1), "cpu_busy": round(statistics.median(busy), 2)}


def measure_feed(data_dir: Path, grid: list[tuple[int, int]], core_counts: list[int], *,
                 batch_size: int = BATCH_SIZE, seconds: float = 3.0, rounds: int = 3) -> dict[tuple[int, int], dict]:
    """{(img_size, slices): {cores: the measuring process's result}} for this machine's first ``cores`` CPUs;
    the caches live in a temporary folder that is removed afterwards."""
    cpus = usable_cpus()
    results = {}
    with tempfile.TemporaryDirectory(prefix="spinemri-bench-feed-") as cache_dir:
        folders = prepare_caches(data_dir, grid, Path(cache_dir))
        for key, folder in folders.items():
            results[key] = {}
            for cores in core_counts:
                measured = feed_rate(folder, cpus[:cores], batch_size=batch_size, seconds=seconds, rounds=rounds)
                _common.log(f"{key[0]} px × {key[1]} slices on {cores} core(s): {measured['images_per_s']} images/s "
                            f"(rounds {measured['rounds']}), {measured['images_per_cpu_s']} per CPU-second "
                            f"(CPU busy {measured['cpu_busy']})")
                results[key][cores] = measured
    return results


def gpu_ratios(img_size: int, capacity: float) -> tuple[dict, dict]:
    """GPU images/s per backbone at this size (None: unmeasured) and capacity ÷ each (None where unmeasured)."""
    consumed = {arch: sizes.get(img_size) for arch, sizes in GPU_IMAGES_PER_S.items()}
    return consumed, {arch: None if gpu is None else round(capacity / gpu, 2) for arch, gpu in consumed.items()}


def summarize(img_size: int, slices: int, by_cores: dict[int, dict], all_cores: int) -> dict:
    """One grid point's figures; per core is images per CPU-second of the 1-core process (see the docstring)."""
    one, every = by_cores[1], by_cores[all_cores]
    per_core = one["images_per_cpu_s"]
    extrapolated = per_core * EXTRAPOLATED_CORES
    consumed, ratios = gpu_ratios(img_size, extrapolated)
    measured = [r for r in ratios.values() if r is not None]
    return {
        "img_size": img_size, "slices": slices, "train_samples": one["train_samples"],
        "images_per_s": {"1_core": one["images_per_s"], "all_cores": every["images_per_s"]},
        "images_per_cpu_s": {"1_core": per_core, "all_cores": every["images_per_cpu_s"]},
        "cpu_busy": {"1_core": one["cpu_busy"], "all_cores": every["cpu_busy"]},
        "cpus": {"1_core": one["cpus"], "all_cores": every["cpus"]},
        "rounds": {"1_core": one["rounds"], "all_cores": every["rounds"]},
        "per_core": per_core,
        "scaling": round(every["images_per_cpu_s"] / per_core, 2),
        f"extrapolated_{EXTRAPOLATED_CORES}_cores": round(extrapolated),
        "gpu_images_per_s": consumed, "ratio": ratios,
        "result": "unmeasured" if len(measured) < len(ratios) else _common.verdict(min(measured) >= TARGET),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 px × 1 slice, 8 studies, one 0.5 s window")
    parser.add_argument("--sizes", default="96,128,224")
    parser.add_argument("--slices", default="1,5")
    parser.add_argument("--studies", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one timed window")
    parser.add_argument("--rounds", type=int, default=3, help="timed windows per measurement (median)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # a measuring process's job (JSON)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(json.loads(args.measure))), flush=True)
        return
    if args.quick:
        args.sizes, args.slices, args.studies, args.batch_size, args.seconds, args.rounds = "64", "1", 8, 16, 0.5, 1

    grid = [(int(size), int(slices)) for size in args.sizes.split(",") for slices in args.slices.split(",")]
    all_cores = len(usable_cpus())
    core_counts = sorted({1, all_cores})
    measured = measure_feed(_common.phantom(args.studies), grid, core_counts, batch_size=args.batch_size,
                            seconds=args.seconds, rounds=args.rounds)
    results = [summarize(size, slices, measured[size, slices], all_cores) for size, slices in grid]
    verdicts = {r["result"] for r in results}
    result = "unmeasured" if "unmeasured" in verdicts else _common.verdict(verdicts == {"pass"})
    gpu_measured = any(v is not None for sizes in GPU_IMAGES_PER_S.values() for v in sizes.values())
    _common.emit("feed", {
        "studies": args.studies, "batch_size": args.batch_size, "augment": "AugmentConfig() defaults",
        "seconds_per_round": args.seconds, "cores": all_cores, "results": results,
        "gpu": {"device": GPU, "slices": GPU_SLICES, "images_per_s": GPU_IMAGES_PER_S if gpu_measured else None,
                "measure_with": GPU_COMMAND},
        "target": f">= {TARGET} ({EXTRAPOLATED_CORES}-core capacity ÷ GPU images/s)", "result": result},
        "feed: " + "; ".join(
            f"{r['img_size']} px × {r['slices']}: 1 core {r['images_per_s']['1_core']:.0f} images/s, {all_cores} cores "
            f"{r['images_per_s']['all_cores']:.0f}, per core {r['per_core']:.0f} (extrapolated to {EXTRAPOLATED_CORES} cores "
            f"{r[f'extrapolated_{EXTRAPOLATED_CORES}_cores']:.0f})" for r in results)
        + (f"; GPU consumption unmeasured (measure it with {GPU_COMMAND} on a GPU machine), so the ratio is too "
           f"(target >= {TARGET})" if result == "unmeasured" else
           f"; lowest ratio to the {GPU} {min(min(v for v in r['ratio'].values() if v is not None) for r in results)} "
           f"(target >= {TARGET}: {result})"))


if __name__ == "__main__":
    main()
