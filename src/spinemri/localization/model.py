"""The localizer network: any registry backbone, a soft-argmax point head and a slice head.

    image (S, S, C) 0..255 -> backbone's scaling -> backbone feature map (h, w, F)
        points: 3x3 conv -> 1x1 conv to one heatmap per point -> spatial softmax -> expected (u, v)
        slice:  global pooling + the slice's relative position in its series (0 = first, 1 = last)
                -> dense -> dropout -> one sigmoid per slice group

The point head is integral (soft-argmax) regression: a heatmap per point whose expectation is the
coordinate, trained directly on the coordinate error. It keeps the convolutional map's spatial
layout (unlike pooling then regressing), gives sub-cell precision from a coarse map, and needs no
decoder, so it works on every backbone of the registry unchanged. The slice head also sees where
the slice lies in its series: one slice alone rarely tells a left from a right parasagittal slice,
or L3/L4 from L4/L5 on an axial stack; its place in the stack does.
"""

from __future__ import annotations

import keras
from keras import ops

from spinemri.localization.sites import SeriesTask
from spinemri.models.network import backbone_features


@keras.saving.register_keras_serializable(package="spinemri")
class SoftArgmax(keras.layers.Layer):
    """(B, h, w, P) logits -> (B, P, 2) expected (u, v) in [0, 1] under a softmax over the h x w cells."""

    def call(self, logits):
        shape = ops.shape(logits)
        h, w, p = shape[1], shape[2], shape[3]
        flat = ops.reshape(ops.transpose(logits, (0, 3, 1, 2)), (-1, p, h * w))
        weights = ops.softmax(flat, axis=-1)
        rows = (ops.cast(ops.arange(h), "float32") + 0.5) / ops.cast(h, "float32")
        cols = (ops.cast(ops.arange(w), "float32") + 0.5) / ops.cast(w, "float32")
        grid_u = ops.reshape(ops.tile(cols[None, :], (h, 1)), (-1,))
        grid_v = ops.reshape(ops.tile(rows[:, None], (1, w)), (-1,))
        u = ops.sum(weights * grid_u, axis=-1)
        v = ops.sum(weights * grid_v, axis=-1)
        return ops.stack([u, v], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[3], 2)


@keras.saving.register_keras_serializable(package="spinemri")
class PositionEncoding(keras.layers.Layer):
    """A relative position in [0, 1] -> ``bins`` Gaussian bumps, so that a linear layer can score
    "near 0.3" as easily as "high"."""

    def __init__(self, bins: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.bins = bins

    def call(self, position):
        centres = ops.cast(ops.linspace(0.0, 1.0, self.bins), "float32")
        width = 1.0 / (self.bins - 1)
        return ops.exp(-0.5 * ops.square((position - centres[None, :]) / width))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.bins)

    def get_config(self):
        return {**super().get_config(), "bins": self.bins}


def build_localizer(arch: str, img_size: int, channels: int, task: SeriesTask, *, weights: str = "none",
                    dense_units: int = 128, dropout: float = 0.2) -> keras.Model:
    """Inputs {"image", "position"}; outputs {"points": (B, P, 2) unit coordinates, "slice": (B, G)}."""
    inputs, fmap = backbone_features(arch, img_size, channels, weights=weights)
    position = keras.Input((1,), name="position")
    heat = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="point_features")(fmap)
    heat = keras.layers.Conv2D(task.points, 1, name="point_logits")(heat)
    points = SoftArgmax(name="points", dtype="float32")(heat)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(fmap)
    pooled = keras.layers.Concatenate(name="with_position")([pooled, PositionEncoding(name="position_code")(position)])
    pooled = keras.layers.Dense(dense_units, activation="relu", name="dense")(pooled)
    pooled = keras.layers.Dropout(dropout, name="dropout")(pooled)
    slice_scores = keras.layers.Dense(len(task.groups), activation="sigmoid", name="slice", dtype="float32")(pooled)
    return keras.Model({"image": inputs, "position": position}, {"points": points, "slice": slice_scores}, name=f"localizer_{task.name}_{arch}")


def point_loss(y_true, y_pred):
    """Mean absolute coordinate error (unit square) over the points labelled on each slice.

    ``y_true`` (B, P, 3) holds u, v and a mask; slices without labelled points contribute 0.
    """
    mask = y_true[..., 2]
    error = ops.sum(ops.abs(y_true[..., :2] - y_pred), axis=-1)
    return ops.sum(mask * error, axis=-1) / ops.maximum(ops.sum(mask, axis=-1), 1.0)


def slice_loss(y_true, y_pred):
    """Binary cross-entropy against soft slice targets; ``y_true`` (B, G, 2) holds target and mask."""
    target, mask = y_true[..., 0], y_true[..., 1]
    p = ops.clip(y_pred, 1e-6, 1 - 1e-6)
    bce = -(target * ops.log(p) + (1 - target) * ops.log(1 - p))
    return ops.sum(mask * bce, axis=-1) / ops.maximum(ops.sum(mask, axis=-1), 1.0)
