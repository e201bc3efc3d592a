"""The three-head classifier: backbone -> global pooling -> dense -> dropout -> condition/level/severity.

The model takes pixel values 0..255 (float32, the cache's uint8 as floats) and does the backbone's
own input scaling inside, so the same tensor from :func:`spinemri.data.preprocess.preprocess`
feeds training and serving. Its channels are the slices of a 2.5D stack (``preprocess.slices``),
pooled one of three ways (``model.slice_pooling``):

- ``channels``: the backbone sees the slices as the channels of one image (3 slices fill ImageNet's
  RGB; any other count with ImageNet weights first passes a 1x1 convolution to 3 channels that
  starts as the slices' mean);
- ``attention``: one shared 2D backbone encodes each slice alone, and a learned softmax weight per
  slice averages their features;
- ``lstm``: the same per-slice encoder, then a bidirectional LSTM across the slices.

The severity output is one of two kinds (``model.severity_head``):

- ``single``: one distribution per image (B, 3), for a crop centred on the one site it grades;
- ``per_site``: one distribution per site (B, 25, 3), in :data:`~spinemri.data.schema.SITES` order, for an
  image that shows several sites (a whole sagittal slice carries five levels): a row's severity is read at
  the site it names (:func:`spinemri.models.severity.severity_at`), and the training loss is taken there (:class:`SiteCrossentropy`).

Either starts at the training split's weight-aware prior (``severity_prior``: (3,) or (25, 3)): a zero
kernel and the prior's log as the bias, so that before any training the model predicts exactly the prior,
and a model that learns nothing from the images stays at its floor instead of below it.
"""

from __future__ import annotations

import keras
import numpy as np

from spinemri.data.schema import HEAD_CLASSES, SITES
from spinemri.models.backbones import Backbone, build_backbone, get_backbone
from spinemri.models.catalog import FEATURE_POOLING, GRID, SEVERITY_HEADS, SLICE_POOLING

BACKBONE_LAYER = "backbone"
SITE_LOGITS_LAYER = "severity_sites"  # the per-site severity head's Dense layer (25 x 3 logits)
LSTM_UNITS = 128

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
_IMAGENET_STD = np.array([0.229, 0.224, 0.225])
_CAFFE_MEAN = np.array([103.939, 116.779, 123.68])


def build_model(arch: str, img_size: int, channels: int, *, weights: str = "none", dense_units: int = 256,
                dropout: float = 0.3, bn_momentum: float = 0.0, slice_pooling: str = "channels",
                severity_head: str = "single", severity_prior: np.ndarray | None = None,
                pooling: str = "average") -> keras.Model:
    """Input 'image' float32 (B, img_size, img_size, channels) in 0..255; outputs a dict of float32 softmaxes:
    condition (B, 6), level (B, 5) and severity (B, 3), or (B, 25, 3) with ``severity_head="per_site"``.

    ``severity_prior``: the prior the severity output starts at, (3,) or, per site, (25, 3); None: Keras's
    default initialisation. Built under Keras's global dtype policy: with ``mixed_float16`` the backbone
    computes in float16 and the three heads stay float32.

    ``bn_momentum`` > 0 replaces the backbone's BatchNormalization momentum (Keras applications use
    0.99, whose moving statistics need more steps than a quick run on a few hundred images has).
    """
    if pooling not in FEATURE_POOLING:
        raise ValueError(f"pooling must be one of {', '.join(FEATURE_POOLING)}, got {pooling!r}")
    if slice_pooling == "channels":
        inputs, x = backbone_features(arch, img_size, channels, weights=weights, bn_momentum=bn_momentum)
        if pooling == "grid":  # the averages of a GRID x GRID grid of the map (fewer cells on a smaller map)
            cell = tuple(max(1, -(-int(side) // GRID)) for side in x.shape[1:3])
            x = keras.layers.AveragePooling2D(cell, strides=cell, padding="same", name="grid_pool")(x)
            x = keras.layers.Flatten(name="pool")(x)
        else:
            x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    elif pooling == "grid":
        raise ValueError("pooling grid pools one feature map (slice_pooling channels); per-slice encoders pool "
                         "each slice's features globally")
    elif slice_pooling in SLICE_POOLING:
        inputs, x = _pooled_slices(arch, img_size, channels, slice_pooling, weights=weights, bn_momentum=bn_momentum)
    else:
        raise ValueError(f"slice_pooling must be one of {', '.join(SLICE_POOLING)}, got {slice_pooling!r}")
    x = keras.layers.Dense(dense_units, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    if severity_head not in SEVERITY_HEADS[1:]:
        raise ValueError(f"severity_head must be one of {', '.join(SEVERITY_HEADS[1:])}, got {severity_head!r}")
    # float32 heads: under mixed_float16 a float16 softmax underflows and the losses lose precision.
    outputs = {head: keras.layers.Dense(len(classes), activation="softmax", name=head, dtype="float32")(x)
               for head, classes in HEAD_CLASSES.items() if head != "severity"}
    grades = len(HEAD_CLASSES["severity"])
    if severity_head == "per_site":
        logits = keras.layers.Dense(len(SITES) * grades, name=SITE_LOGITS_LAYER, dtype="float32")
        grid = keras.layers.Reshape((len(SITES), grades), name="severity_grid", dtype="float32")(logits(x))
        outputs["severity"] = keras.layers.Softmax(axis=-1, name="severity", dtype="float32")(grid)
        head = logits
    else:
        head = keras.layers.Dense(grades, activation="softmax", name="severity", dtype="float32")
        outputs["severity"] = head(x)
    model = keras.Model(inputs, {h: outputs[h] for h in HEAD_CLASSES}, name=f"spinemri_{arch}")
    if severity_prior is not None:
        start_at_prior(head, severity_prior)
    return model


def start_at_prior(head: keras.layers.Dense, prior: np.ndarray) -> None:
    """A zero kernel and the log of ``prior`` (its rows normalised, floored at 1e-6) as the bias of ``head``:
    the layer then outputs the prior for every input, and learns away from it by gradient."""
    prior = np.asarray(prior, np.float64)
    expected = (head.units // prior.shape[-1],) * (prior.ndim - 1) + prior.shape[-1:]
    if prior.ndim not in (1, 2) or prior.size != head.units or prior.shape != expected:
        raise ValueError(f"a prior of shape {prior.shape} does not fit the {head.units} outputs of {head.name!r}")
    prior = np.maximum(prior / prior.sum(axis=-1, keepdims=True), 1e-6)
    kernel, _ = head.get_weights()
    head.set_weights([np.zeros_like(kernel), np.log(prior).reshape(-1).astype(kernel.dtype)])


def is_per_site(model: keras.Model) -> bool:
    """Whether ``model``'s severity output holds one distribution per site (B, 25, 3)."""
    return len(model.get_layer("severity").output.shape) == 3


class SiteCrossentropy(keras.losses.Loss):
    """Cross-entropy of a per-site severity output at the row's site: ``y_true`` (B, 25, 3) is one-hot at the
    row's site and grade and zero at every other site (all zero: no site, no loss). Label smoothing spreads
    over the three grades of that site only. The per-row loss equals CategoricalCrossentropy of a single head."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "site_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        y_true = keras.ops.cast(y_true, y_pred.dtype)
        if self.label_smoothing:
            at_site = keras.ops.sum(y_true, axis=-1, keepdims=True)
            grades = keras.ops.cast(keras.ops.shape(y_true)[-1], y_pred.dtype)
            y_true = y_true * (1.0 - self.label_smoothing) + at_site * self.label_smoothing / grades
        log_p = keras.ops.log(keras.ops.clip(y_pred, keras.config.epsilon(), 1.0))
        return -keras.ops.sum(y_true * log_p, axis=(1, 2))

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def site_accuracy(y_true, y_pred):
    """1 where the most probable grade at the row's site is its true grade, else 0 (per row; weight rows
    without a site 0)."""
    hit = keras.ops.cast(keras.ops.equal(keras.ops.argmax(y_pred, axis=-1), keras.ops.argmax(y_true, axis=-1)),
                         y_pred.dtype)
    return keras.ops.sum(hit * keras.ops.sum(keras.ops.cast(y_true, y_pred.dtype), axis=-1), axis=-1)


def backbone_features(arch: str, img_size: int, channels: int, *, weights: str = "none",
                      bn_momentum: float = 0.0) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """The input 'image' (0..255) and the registry backbone's feature map on it, with the backbone's
    own input scaling (and gray -> RGB for ImageNet weights). Shared by the classifier and the localizer."""
    backbone = get_backbone(arch)
    backbone.check_size(img_size)
    inputs = keras.Input((img_size, img_size, channels), name="image")
    x = inputs
    if channels == 1 and weights != "none" and arch != "tiny":  # ImageNet filters expect 3 channels
        x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
        channels = 3
    elif channels not in (1, 3) and weights != "none" and arch != "tiny":
        # More slices than RGB: a learned 1x1 mix to 3 channels, starting as the slices' mean.
        x = keras.layers.Conv2D(3, 1, use_bias=False, kernel_initializer=keras.initializers.Constant(1.0 / channels),
                                name="slices_to_rgb")(x)
        channels = 3
    for layer in _scaling_layers(backbone, channels):
        x = layer(x)
    features = build_backbone(backbone, (img_size, img_size, channels), weights)
    features.name = BACKBONE_LAYER
    if bn_momentum > 0:
        for layer in features.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    return inputs, features(x)


def _pooled_slices(arch: str, img_size: int, slices: int, pooling: str, *, weights: str, bn_momentum: float
                   ) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """The input and the slice-pooled features of a per-slice encoder (``attention`` or ``lstm``)."""
    slice_in, features = backbone_features(arch, img_size, 1, weights=weights, bn_momentum=bn_momentum)
    encoder = keras.Model(slice_in, keras.layers.GlobalAveragePooling2D(name="slice_pool")(features),
                          name="slice_encoder")
    inputs = keras.Input((img_size, img_size, slices), name="image")
    stack = keras.layers.Permute((3, 1, 2), name="slices_first")(inputs)
    stack = keras.layers.Reshape((slices, img_size, img_size, 1), name="slice_stack")(stack)
    per_slice = keras.layers.TimeDistributed(encoder, name=BACKBONE_LAYER)(stack)  # (B, slices, F)
    if pooling == "lstm":
        return inputs, keras.layers.Bidirectional(keras.layers.LSTM(LSTM_UNITS), name="slice_lstm")(per_slice)
    hidden = keras.layers.Dense(128, activation="tanh", name="slice_attention_hidden")(per_slice)
    scores = keras.layers.Dense(1, name="slice_attention_score")(hidden)
    attention = keras.layers.Softmax(axis=1, name="slice_attention", dtype="float32")(scores)  # (B, slices, 1)
    per_slice = keras.layers.Activation("linear", dtype="float32", name="slice_features")(per_slice)
    pooled = keras.layers.Dot(axes=1, name="slice_weighted_sum")([attention, per_slice])  # (B, 1, F)
    return inputs, keras.layers.Flatten(name="pool")(pooled)


def set_backbone_trainable(model: keras.Model, trainable: bool) -> None:
    model.get_layer(BACKBONE_LAYER).trainable = trainable


def _scaling_layers(backbone: Backbone, channels: int) -> list[keras.layers.Layer]:
    def per_channel(values):
        return list(values) if channels == 3 else [float(np.mean(values))] * channels

    if backbone.scaling == "tf":
        return [keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")]
    if backbone.scaling == "unit":
        return [keras.layers.Rescaling(1 / 255.0, name="scale")]
    if backbone.scaling == "torch":
        return [keras.layers.Rescaling(1 / 255.0, name="scale"),
                keras.layers.Normalization(mean=per_channel(_IMAGENET_MEAN), variance=per_channel(_IMAGENET_STD**2),
                                           name="normalize")]
    if backbone.scaling == "caffe":
        return [keras.layers.Normalization(mean=per_channel(_CAFFE_MEAN), variance=[1.0] * channels, name="normalize")]
    return []  # "raw": the application rescales inside (EfficientNet, ConvNeXt)
