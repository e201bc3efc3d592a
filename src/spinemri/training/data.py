"""From the preprocessed cache to tf.data: targets per head, masks, augmentation, streaming.

Images are read batch by batch from ``images.npy`` with ``pread`` (see :func:`read_rows`); nothing
holds the whole dataset in memory, and the resident set does not grow with it. Targets are class indices per head with -1 for unknown (a blank grade, a
flat-CSV slice without a level), which become all-zero one-hot rows with sample weight 0.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
import keras

from spinemri.config import AugmentConfig
from spinemri.data.schema import AXIAL_T2, CONDITIONS, HEAD_CLASSES, HEALTHY, LEVELS, SEVERITY_WEIGHTS, SITES, site_indices
# Left-right mirror: left_* <-> right_* conditions (spinal canal and healthy stay).
def _mirrored(condition: str) -> str:
    return condition.replace("left_", "@").replace("right_", "left_").replace("@", "right_")


_MIRROR = [HEAD_CLASSES["condition"].index(_mirrored(c)) for c in HEAD_CLASSES["condition"]]
_SITE_MIRROR = [SITES.index((_mirrored(c), level)) for c, level in SITES]


@dataclass(frozen=True)
class SplitData:
    """One split: rows of images.npy, targets per head (-1 = unknown), each row's site and the sample table."""

    name: str
    rows: np.ndarray
    targets: dict[str, np.ndarray]
    axial: np.ndarray  # image x axis is the patient's left-right (a flip swaps sides)
    samples: pd.DataFrame
    sites: np.ndarray | None = None  # int64 (n,): the row's (condition, level) in SITES, -1 where it names none

    def __post_init__(self) -> None:
        if self.sites is None:
            object.__setattr__(self, "sites", site_indices(self.samples["condition"], self.samples["level"]))

    def __len__(self) -> int:
        return len(self.rows)


def encode_targets(samples: pd.DataFrame) -> dict[str, np.ndarray]:
    """Class index per head; -1 where the label is unknown."""
    severity = samples["severity"].astype("Float64").fillna(-1).astype(int).to_numpy()
    condition = np.full(len(samples), -1)
    for i, (name, grade) in enumerate(zip(samples["condition"], severity)):
        if pd.isna(name) or grade == 0:  # a normal slice, or a site graded Normal/Mild
            condition[i] = HEAD_CLASSES["condition"].index(HEALTHY)
        elif grade > 0:
            condition[i] = CONDITIONS.index(name)
    level = np.array([LEVELS.index(v) if isinstance(v, str) and v in LEVELS else -1 for v in samples["level"]])
    return {"condition": condition, "level": level, "severity": severity}


def split_data(samples: pd.DataFrame, split: str) -> SplitData:
    part = samples[samples["split"] == split].reset_index(drop=True)
    return SplitData(
        name=split,
        rows=part["index"].to_numpy(np.int64),
        targets=encode_targets(part),
        axial=(part["series_description"] == AXIAL_T2).to_numpy(),
        samples=part,
    )


def sample_weights(targets: dict[str, np.ndarray], severity_weights: bool, sites: np.ndarray | None = None
                   ) -> dict[str, np.ndarray]:
    """0 where a head's label is unknown (with ``sites``, for a per-site severity output: also where the row
    names no site); severity rows weighted 1/2/4 when asked."""
    weights = {head: (t >= 0).astype(np.float32) for head, t in targets.items()}
    if sites is not None:
        weights["severity"] = weights["severity"] * (np.asarray(sites) >= 0).astype(np.float32)
    if severity_weights:
        weights["severity"] = weights["severity"] * SEVERITY_WEIGHTS.astype(np.float32)[np.clip(targets["severity"], 0, 2)]
    return weights


_OPEN: dict[str, tuple] = {}  # path -> (fd, st_dev, st_ino, shape, dtype, data offset)
_OPEN_LOCK = threading.Lock()


def _open_images(images_path: str) -> tuple[int, tuple[int, ...], np.dtype, int]:
    """A file descriptor on images.npy, its (N, S, S, C) shape, dtype and data offset (opened once per file)."""
    stat = os.stat(images_path)
    with _OPEN_LOCK:
        entry = _OPEN.get(images_path)
        if entry is not None and entry[1:3] == (stat.st_dev, stat.st_ino):
            return entry[0], *entry[3:]
        if entry is not None:  # the file was replaced: a new cache at the same path
            os.close(entry[0])
        with open(images_path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
        if fortran:
            raise ValueError(f"{images_path} is Fortran-ordered; rebuild the cache with `spinemri data prepare`")
        fd = os.open(images_path, os.O_RDONLY)
        _OPEN[images_path] = (fd, stat.st_dev, stat.st_ino, tuple(shape), np.dtype(dtype), offset)
        return fd, tuple(shape), np.dtype(dtype), offset


def read_rows(images_path: str, rows: np.ndarray) -> np.ndarray:
    """uint8 (len(rows), S, S, C) from the cache's images.npy, read in file order.

    Plain ``pread`` calls into a fresh array (one per run of consecutive rows), not a memory map:
    pages of a map stay in the process's resident set once touched, so an epoch over a memory map
    grows RSS with the dataset, while read pages live only in the kernel's page cache. Safe to call
    from tf.data's parallel threads.
    """
    fd, shape, dtype, offset = _open_images(images_path)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= shape[0]):
        raise IndexError(f"rows outside 0..{shape[0] - 1} of {images_path}")
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    chunk = np.empty((len(rows), *shape[1:]), dtype=dtype)
    row_bytes = chunk[0].nbytes if len(rows) else 0
    start = 0
    while start < len(ordered):
        stop = start + 1
        while stop < len(ordered) and ordered[stop] == ordered[stop - 1] + 1:
            stop += 1
        target = memoryview(chunk[start:stop].reshape(-1).view(np.uint8))
        position = offset + int(ordered[start]) * row_bytes
        while len(target):  # pread may return fewer bytes than asked
            done = os.preadv(fd, [target], position)
            if done == 0:
                raise OSError(f"{images_path} ends early (truncated cache?); rebuild it with `spinemri data prepare`")
            target, position = target[done:], position + done
        start = stop
    out = np.empty_like(chunk)
    out[order] = chunk
    return out


def make_dataset(images_path: str | Path, split: SplitData, batch_size: int, *, shuffle: bool, seed: int,
                 augment: AugmentConfig | None = None, severity_weights: bool = True,
                 min_batch: int = 1, jitter: tuple[np.ndarray, np.ndarray] | None = None,
                 replica_batches: tuple[int, int] | None = None, per_site: bool = False) -> tf.data.Dataset:
    """Batches of (image float32 0..255, {head: one-hot}, {head: sample weight}).

    ``per_site``: the severity target is (B, 25, 3), one-hot at the row's site and grade (zero elsewhere),
    for a per-site severity output; a row without a site has severity weight 0.

    ``jitter``: per sample, the σ in pixels of a random in-plane shift and the chance that its slice
    stack moves one slice (spinemri.training.jitter), applied before the augmentation.

    ``min_batch`` > 1 (the replica count R under MirroredStrategy) trims the last batch to a multiple
    of R: a batch of fewer than R images leaves a replica an empty batch, and one that does not divide
    by R gives the replicas batches of different sizes; Keras 3 can run neither (at most R - 1 samples
    per epoch are left out; with shuffling, different ones each epoch).

    ``replica_batches`` = (first, count) cuts every batch into its ``min_batch`` replica batches and
    keeps ``count`` of them from the ``first``-th on, each an element of its own: what one worker's
    replicas train on under MultiWorkerMirroredStrategy (every worker shuffles and batches alike from
    the same seed). Only those images are read.
    """
    images_path = str(images_path)
    shape = _open_images(images_path)[1][1:]
    weights = sample_weights(split.targets, severity_weights, split.sites if per_site else None)
    ds = tf.data.Dataset.from_tensor_slices({
        "row": split.rows, "axial": split.axial, "site": split.sites,
        **{f"y_{h}": t for h, t in split.targets.items()}, **{f"w_{h}": w for h, w in weights.items()},
        **({"jitter_sigma": jitter[0], "jitter_move": jitter[1]} if jitter is not None else {}),
    })
    if shuffle:
        ds = ds.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if min_batch > 1:
        def whole_replicas(batch):
            keep = tf.shape(batch["row"])[0] // min_batch * min_batch
            return {key: value[:keep] for key, value in batch.items()}

        ds = ds.map(whole_replicas).filter(lambda batch: tf.shape(batch["row"])[0] > 0)
    if replica_batches is not None:
        first, count = replica_batches

        def these_replicas(batch):  # every value is one number per sample
            return tf.data.Dataset.from_tensor_slices(
                {key: tf.reshape(value, [min_batch, -1])[first:first + count] for key, value in batch.items()})

        ds = ds.flat_map(these_replicas)
    augmenter = _augmenter(augment, seed) if augment is not None else None

    def load(batch):
        images = tf.numpy_function(lambda r: read_rows(images_path, r), [batch["row"]], tf.uint8)
        images = tf.reshape(images, (-1, *shape))
        x = tf.cast(images, tf.float32)
        condition, site = batch["y_condition"], batch["site"]
        if jitter is not None:
            x = jitter_sites(x, batch["jitter_sigma"], batch["jitter_move"], seed)
        if augmenter is not None:
            x = tf.clip_by_value(augmenter(x, training=True), 0.0, 255.0)
            if augment.flip:
                x, condition, site = _flip(x, condition, site, batch["axial"], seed)
        severity = tf.one_hot(batch["y_severity"], len(HEAD_CLASSES["severity"]))
        if per_site:
            severity = tf.one_hot(site, len(SITES))[:, :, None] * severity[:, None, :]
        y = {"condition": tf.one_hot(condition, len(HEAD_CLASSES["condition"])),
             "level": tf.one_hot(batch["y_level"], len(HEAD_CLASSES["level"])),
             "severity": severity}
        w = {h: batch[f"w_{h}"] for h in HEAD_CLASSES}
        return x, y, w

    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def jitter_sites(x, sigma, move, seed: int):
    """Each image shifted in plane by normal offsets of σ ``sigma`` pixels per axis (zeros where the shift
    uncovers the border), and its slice stack moved one slice up or down with probability ``move`` (the
    edge slice repeated). ``x`` float32 (B, S, S, C), ``sigma`` and ``move`` (B,)."""
    n = tf.shape(x)[0]
    shift = tf.random.normal([n, 2], seed=seed + 11) * tf.cast(sigma, tf.float32)[:, None]
    ones, zeros = tf.ones([n]), tf.zeros([n])
    # output pixel (u, v) reads input (u + dx, v + dy): the site moves by (-dx, -dy)
    transform = tf.stack([ones, zeros, shift[:, 0], zeros, ones, shift[:, 1], zeros, zeros], axis=1)
    x = tf.raw_ops.ImageProjectiveTransformV3(images=x, transforms=transform, output_shape=tf.shape(x)[1:3],
                                              fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    slices = x.shape[-1]
    if slices and slices > 1:
        moved = tf.random.uniform([n], seed=seed + 12) < tf.cast(move, tf.float32)
        step = tf.where(tf.random.uniform([n], seed=seed + 13) < 0.5, -1, 1)
        offset = tf.where(moved, step, tf.zeros_like(step))
        index = tf.clip_by_value(tf.range(slices)[None, :] + offset[:, None], 0, slices - 1)
        x = tf.gather(x, index, axis=3, batch_dims=1)
    return x


def _augmenter(augment: AugmentConfig, seed: int) -> keras.Sequential:
    k = augment.strength
    rotation, shift, zoom = augment.rotation_deg * k, augment.shift * k, augment.zoom * k
    brightness, contrast = augment.brightness * k, augment.contrast * k
    layers = []
    if rotation > 0:
        layers.append(keras.layers.RandomRotation(rotation / 360.0, fill_mode="constant", seed=seed))
    if shift > 0:
        layers.append(keras.layers.RandomTranslation(shift, shift, fill_mode="constant", seed=seed + 1))
    if zoom > 0:
        layers.append(keras.layers.RandomZoom(zoom, fill_mode="constant", seed=seed + 2))
    if brightness > 0:
        layers.append(keras.layers.RandomBrightness(min(brightness, 1.0), value_range=(0, 255), seed=seed + 3))
    if contrast > 0:
        layers.append(keras.layers.RandomContrast(min(contrast, 1.0), value_range=(0, 255), seed=seed + 4))
    return keras.Sequential(layers or [keras.layers.Identity()], name="augment")


def _flip(x, condition, site, axial, seed):
    """Mirror left-right at random; on axial images that also swaps the side of the label (its condition
    and its site).

    On sagittal images the horizontal axis is anterior-posterior, so a flip changes no side.
    """
    flip = tf.random.uniform([tf.shape(x)[0]], seed=seed + 7) < 0.5
    x = tf.where(flip[:, None, None, None], tf.reverse(x, axis=[2]), x)
    swap = tf.logical_and(flip, axial)
    mirrored = tf.gather(tf.constant(_MIRROR, tf.int64), tf.maximum(condition, 0))
    condition = tf.where(tf.logical_and(swap, condition >= 0), mirrored, condition)
    mirrored_site = tf.gather(tf.constant(_SITE_MIRROR, tf.int64), tf.maximum(site, 0))
    site = tf.where(tf.logical_and(swap, site >= 0), mirrored_site, site)
    return x, condition, site
