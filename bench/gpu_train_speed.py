"""Training images/s of one GPU against the input pipeline's capacity on the same machine's cores.

For each backbone and img_size of ``feed.GPU_IMAGES_PER_S`` (DenseNet121 and MobileNetV2 at 128 and
224 px): the classifier `spinemri train` builds (weights=None, feed.GPU_SLICES slices as channels),
under Keras's ``mixed_float16`` policy, compiled as training compiles it, fitted on one synthetic
batch of feed.BATCH_SIZE images held in host memory and repeated (copied to the GPU each step, as
streamed batches are). --warmup steps (XLA compilation included) are not timed, --steps are.

Then ``feed.measure_feed`` measures the training input pipeline on all of this machine's cores at
the same sizes and slices, in processes that see no GPU. Ratio = pipeline images/s ÷ GPU images/s
per backbone and size; target >= feed.TARGET. The GPU figures belong in feed.GPU_IMAGES_PER_S.

Exits with status 2 and says so when TensorFlow sees no GPU. ``--cpu-smoke`` runs every step on
the CPU at tiny sizes and a few steps, to check the script, not to measure anything.

    python bench/gpu_train_speed.py [--archs densenet,mobilenet_v2] [--steps 40] [--warmup 5] [--studies 20]
    python bench/gpu_train_speed.py --cpu-smoke [--archs mobilenet_v2]
"""

from __future__ import annotations

import argparse
import sys
import time

import _common
import feed


def train_rate(arch: str, img_size: int, slices: int, batch_size: int, warmup: int, steps: int) -> float:
    """Training images/s of one model on a repeated in-memory batch, timed after ``warmup`` steps."""
    import keras
    import numpy as np
    import tensorflow as tf

    from spinemri.config import load_experiment
    from spinemri.data.schema import HEAD_CLASSES
    from spinemri.models.network import build_model
    from spinemri.training.classifier import compile_model

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("mixed_float16")
    config = load_experiment("quick", {"arch": arch, "img_size": img_size, "batch_size": batch_size})
    model = build_model(arch, img_size, slices, weights="none", dense_units=config.model.dense_units,
                        dropout=config.model.dropout, bn_momentum=config.model.bn_momentum)
    compile_model(model, config.classifier, config.train.lr)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch_size, img_size, img_size, slices)).astype(np.float32)
    y = {h: np.eye(len(c), dtype=np.float32)[rng.integers(0, len(c), batch_size)] for h, c in HEAD_CLASSES.items()}
    w = {h: np.ones(batch_size, np.float32) for h in HEAD_CLASSES}
    batches = tf.data.Dataset.from_tensors((x, y, w)).repeat()
    clock = {}

    class Clock(keras.callbacks.Callback):
        # Reading the step counter waits for the steps queued before it: the clock sees finished work.
        def on_train_batch_begin(self, batch, logs=None):
            if batch == warmup:
                int(self.model.optimizer.iterations.numpy())
                clock["started"] = time.perf_counter()

        def on_train_end(self, logs=None):
            int(self.model.optimizer.iterations.numpy())
            clock["seconds"] = time.perf_counter() - clock["started"]

    model.fit(batches, epochs=1, steps_per_epoch=warmup + steps, verbose=0, callbacks=[Clock()])
    keras.mixed_precision.set_global_policy("float32")
    return steps * batch_size / clock["seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="on the CPU, 32 px, batch 4, 2+2 steps, 8 studies (minutes: the CPU builds densenet's "
                             "training graph slowly)")
    parser.add_argument("--archs", default=",".join(feed.GPU_IMAGES_PER_S), help="backbones of the table to train")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation included)")
    parser.add_argument("--studies", type=int, default=20, help="phantom studies for the pipeline's caches")
    parser.add_argument("--seconds", type=float, default=3.0, help="one timed window of the pipeline")
    args = parser.parse_args()
    unknown = set(args.archs.split(",")) - set(feed.GPU_IMAGES_PER_S)
    if unknown:
        parser.error(f"--archs: {', '.join(sorted(unknown))} not in feed.GPU_IMAGES_PER_S — choose from "
                     f"{', '.join(feed.GPU_IMAGES_PER_S)}")
    grid = {arch: sorted(feed.GPU_IMAGES_PER_S[arch]) for arch in args.archs.split(",")}
    batch_size, slices, seconds, rounds = feed.BATCH_SIZE, feed.GPU_SLICES, args.seconds, 3
    if args.cpu_smoke:
        grid = {arch: [32] for arch in grid}
        batch_size, args.steps, args.warmup, args.studies, seconds, rounds = 4, 2, 2, 8, 0.5, 1

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.cpu_smoke:
        print("gpu_train_speed: TensorFlow sees no GPU, so there is no GPU training speed to measure here; "
              "run it on a machine with a GPU (and a CUDA build of TensorFlow), or pass --cpu-smoke to check "
              "the script on the CPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    sizes = sorted({size for arch_sizes in grid.values() for size in arch_sizes})
    all_cores = len(feed.usable_cpus())
    pipeline = feed.measure_feed(_common.phantom(args.studies), [(size, slices) for size in sizes], [all_cores],
                                 batch_size=batch_size, seconds=seconds, rounds=rounds)
    results = []
    with _common.stdout_to_stderr():
        for arch, arch_sizes in grid.items():
            for size in arch_sizes:
                gpu_rate = train_rate(arch, size, slices, batch_size, args.warmup, args.steps)
                feed_rate = pipeline[size, slices][all_cores]["images_per_s"]
                ratio = feed_rate / gpu_rate
                _common.log(f"{arch} @{size}: trains {gpu_rate:.0f} images/s; the pipeline delivers {feed_rate:.0f}")
                results.append({"arch": arch, "img_size": size, "slices": slices, "gpu_images_per_s": round(gpu_rate, 1),
                                "pipeline_images_per_s": feed_rate, "ratio": round(ratio, 2),
                                "result": _common.verdict(ratio >= feed.TARGET)})
    seconds_total = time.perf_counter() - started
    _common.emit("gpu_train_speed", {
        "device": [gpu.name for gpu in gpus] or "CPU (smoke run, not a measurement)", "cores": all_cores,
        "batch_size": batch_size, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "precision": "mixed_float16", "results": results, "target": f">= {feed.TARGET}",
        "result": _common.verdict(all(r["result"] == "pass" for r in results)), "seconds": round(seconds_total, 1)},
        "gpu_train_speed: " + "; ".join(
            f"{r['arch']}@{r['img_size']} GPU {r['gpu_images_per_s']:.0f} images/s vs pipeline on {all_cores} cores "
            f"{r['pipeline_images_per_s']:.0f} = {r['ratio']:.2f} (target >= {feed.TARGET}: {r['result']})"
            for r in results) + f"; {seconds_total:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
