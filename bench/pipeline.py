"""Training images/s of `fit` streaming from the on-disk cache vs the same model fed in-memory tensors.

For each backbone (default mobilenet_v2 and densenet at 128 px, 1 channel, batch 16, weights=None):
one model, compiled as `spinemri train` compiles it, is fitted alternately on

* cache: ``spinemri.training.data.make_dataset`` — rows read from images.npy with pread in a
  parallel ``map`` + prefetch, shuffled, one-hot targets and sample weights built per batch
  (augmentation off: it is a model choice that costs the same whichever way the pixels arrive);
* memory: the same training rows loaded beforehand into float32 tensors
  (``tf.data.Dataset.from_tensor_slices`` + shuffle + batch + prefetch).

Each fit is ``--steps`` batches; the first batch of every fit (iterator start-up) is not timed.
Rounds alternate cache/memory so that load from other processes hits both alike; the ratio is
median cache images/s over median memory images/s. Target (issue 8): >= 0.9.

    python bench/pipeline.py [--quick] [--archs mobilenet_v2,densenet] [--img-size 128] [--steps 24] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common

TARGET = 0.9


class BatchClock:
    """Seconds from the start of batch 1 to the end of the last batch of one fit."""

    def __init__(self):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_train_batch_begin(inner, batch, logs=None):
                if batch == 1:
                    self.started = time.perf_counter()

            def on_train_end(inner, logs=None):
                self.seconds = time.perf_counter() - self.started

        self.callback = Callback()
        self.started = self.seconds = None


def memory_dataset(images_path, split, batch_size: int, seed: int):
    import tensorflow as tf

    from spinemri.data.schema import HEAD_CLASSES
    from spinemri.training.data import read_rows, sample_weights

    x = read_rows(str(images_path), split.rows).astype("float32")
    y = {h: tf.one_hot(split.targets[h], len(c)).numpy() for h, c in HEAD_CLASSES.items()}
    w = sample_weights(split.targets, True)
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def measure(arch: str, img_size: int, batch_size: int, steps: int, rounds: int, data_dir) -> dict:
    import keras

    from spinemri.api.source import prepare_data
    from spinemri.config import load_experiment
    from spinemri.models.network import build_model
    from spinemri.training.data import make_dataset, split_data
    from spinemri.training.classifier import compile_model

    config = load_experiment("quick", {"arch": arch, "img_size": img_size, "batch_size": batch_size,
                                       "data_dir": str(data_dir)})
    dataset, samples = prepare_data(config)
    train = split_data(samples, "train")
    images_path = dataset.path / "images.npy"
    feeds = {
        "cache": make_dataset(images_path, train, batch_size, shuffle=True, seed=0, augment=None).repeat(),
        "memory": memory_dataset(images_path, train, batch_size, seed=0).repeat(),
    }
    keras.utils.set_random_seed(0)
    model = build_model(arch, img_size, 1, dense_units=config.model.dense_units, dropout=config.model.dropout)
    compile_model(model, config.classifier, config.train.lr)
    clock = BatchClock()
    for feed in feeds.values():  # warm-up: tracing, thread pools, first reads
        model.fit(feed, epochs=1, steps_per_epoch=min(steps, 4), verbose=0)
    rates = {name: [] for name in feeds}
    for round_index in range(rounds):
        order = list(feeds) if round_index % 2 == 0 else list(reversed(feeds))
        for name in order:
            model.fit(feeds[name], epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[clock.callback])
            rates[name].append((steps - 1) * batch_size / clock.seconds)
            _common.log(f"{arch} {name}: {rates[name][-1]:.1f} images/s")
    cache_rate, memory_rate = statistics.median(rates["cache"]), statistics.median(rates["memory"])
    ratio = cache_rate / memory_rate
    return {"arch": arch, "img_size": img_size, "batch_size": batch_size, "steps_per_fit": steps, "rounds": rounds,
            "train_samples": len(train), "images_per_s": {"cache": round(cache_rate, 2), "memory": round(memory_rate, 2)},
            "images_per_s_all": {k: [round(v, 2) for v in vs] for k, vs in rates.items()},
            "ratio": round(ratio, 3), "target": f">= {TARGET}", "result": _common.verdict(ratio >= TARGET)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="mobilenet_v2 at 32 px, 6 steps, 1 round, 8 studies")
    parser.add_argument("--archs", default="mobilenet_v2,densenet")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=24, help="batches per timed fit")
    parser.add_argument("--rounds", type=int, default=3, help="cache/memory pairs per backbone")
    parser.add_argument("--studies", type=int, default=40)
    args = parser.parse_args()
    if args.quick:
        args.archs, args.img_size, args.steps, args.rounds, args.studies = "mobilenet_v2", 32, 6, 1, 8

    data_dir = _common.phantom(args.studies)
    results = []
    with _common.private_store(), _common.stdout_to_stderr():
        for arch in args.archs.split(","):
            results.append(measure(arch.strip(), args.img_size, args.batch_size, args.steps, args.rounds, data_dir))
    _common.emit("pipeline", {"studies": args.studies, "results": results,
                              "result": _common.verdict(all(r["result"] == "pass" for r in results))},
                 "pipeline: " + "; ".join(
                     f"{r['arch']}@{r['img_size']} cache {r['images_per_s']['cache']:.1f} vs memory "
                     f"{r['images_per_s']['memory']:.1f} images/s = {r['ratio']:.3f} (target >= {TARGET}: {r['result']})"
                     for r in results))


if __name__ == "__main__":
    main()
