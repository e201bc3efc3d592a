"""Grad-CAM heatmaps for the three-head classifier: where in the image a head's class score came from.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a backbone feature map by the spatial mean
of the gradient of one class score with respect to it, sums the channels and keeps the positive
part. :func:`gradcam` computes the maps, :func:`gradcam_figure` overlays them on the inputs and
:func:`gradcam_grid` draws one figure per head for a set of labelled samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import keras
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

from spinemri.data.schema import HEAD_CLASSES, short_name
from spinemri.models.network import BACKBONE_LAYER, SITE_LOGITS_LAYER, is_per_site
from spinemri.figures import grid_margins

# Layers that only shrink or reshape a feature map on its way to the heads: the Grad-CAM layer is
# the last one before them (their outputs are coarser maps, or no longer maps at all).
_TOWARD_HEADS = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.GlobalAveragePooling2D,
                 keras.layers.GlobalMaxPooling2D, keras.layers.Flatten, keras.layers.Dropout,
                 keras.layers.SpatialDropout2D)


def last_conv_layer(model: keras.Model) -> str:
    """Name of the layer, inside the nested backbone, whose feature map Grad-CAM uses by default.

    It is the last spatial feature map on the way to the heads: walking back from the backbone's
    output, past layers that only pool, flatten or drop out, to the first layer with a rank-4 output
    (B, h, w, K). For six of the thesis backbones this is the backbone's output itself
    (inception_v3 ``mixed10``, xception ``block14_sepconv2_act``, resnet50 ``conv5_block3_out``,
    mobilenet_v2 ``out_relu``, densenet ``relu``, nasnet_large the ReLU after its last normal cell);
    for vgg16, whose backbone ends in ``block5_pool``, it is ``block5_conv3``, the layer of the
    original paper, at twice the resolution (the extras too end in their map: efficientnet_b0
    ``top_activation``, convnext_tiny its final LayerNormalization, densenet169/201 ``relu``).
    This is deliberately not "the last Conv2D layer": in DenseNet that is a 32-channel growth slice, in ResNet the convolution before the shortcut is
    added, in Inception and NASNet one branch of the concatenation that the heads actually see.
    """
    backbone = _backbone(model)
    producers = {}
    for layer in backbone.layers:
        try:
            producers[id(layer.output)] = layer
        except (AttributeError, ValueError):  # a layer called more than once has no single output
            continue
    layer = producers.get(id(backbone.output))
    while layer is not None and not isinstance(layer, keras.layers.InputLayer):
        if not isinstance(layer, _TOWARD_HEADS) and len(layer.output.shape) == 4:
            return layer.name
        if isinstance(layer.input, (list, tuple)):  # a merge of several maps: no single map to use
            break
        layer = producers.get(id(layer.input))
    raise ValueError(f"the backbone {backbone.name!r} of {model.name!r} has no rank-4 feature map (B, h, w, K) "
                     "feeding its output; pass gradcam(..., layer=NAME) with a layer of the backbone "
                     f"(e.g. one of: {', '.join(layer.name for layer in backbone.layers[-5:])})")


class GradCamModel:
    """The classifier re-assembled to also return a backbone feature map, for one head.

    Calling it on images float32 (B, S, S, C) in 0..255 returns ``(features, scores, probabilities)``:
    the feature map (B, h, w, K) of ``layer``, the head's class scores before the softmax (B, classes)
    and the head's probabilities (B, classes), equal to ``model.predict(images)[head]`` (a per-site
    severity output read at each image's site, ``sites`` (B,) indices into SITES). Keras cannot
    reach a layer inside the nested backbone from the outer graph, so the backbone is re-wrapped with
    two outputs and the outer layers are re-applied around it in their order, in inference mode.
    """

    def __init__(self, model: keras.Model, head: str, layer: str | None = None):
        if head not in model.output_names:
            raise ValueError(f"unknown head {head!r}; choose one of: {', '.join(model.output_names)}")
        backbone = _backbone(model)
        self.head = head
        self.layer = layer or last_conv_layer(model)
        try:
            features = backbone.get_layer(self.layer).output
        except ValueError:
            raise ValueError(f"the backbone {backbone.name!r} has no layer {self.layer!r}; omit layer= to use "
                             f"{last_conv_layer(model)!r}, the last feature map") from None
        if len(features.shape) != 4:
            raise ValueError(f"layer {self.layer!r} outputs shape {tuple(features.shape)}, not a feature map "
                             "(B, h, w, K); choose a convolutional layer")
        self._backbone = keras.Model(backbone.inputs, [features, backbone.output])
        outer = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        at = outer.index(backbone)
        self._before = outer[:at]
        per_site = head == "severity" and is_per_site(model)
        heads_only = {*model.output_names, SITE_LOGITS_LAYER, "severity_grid"}
        self._after = [layer for layer in outer[at + 1:] if layer.name not in heads_only]
        self._head = model.get_layer(SITE_LOGITS_LAYER if per_site else head)
        self.classes = len(HEAD_CLASSES[head])
        self.per_site = per_site

    def __call__(self, images, sites=None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        x = tf.convert_to_tensor(images, tf.float32)
        for layer in self._before:
            # build_model's only merge before the backbone repeats a gray channel as RGB.
            x = layer([x, x, x] if isinstance(layer, keras.layers.Concatenate) else x, training=False)
        features, x = self._backbone(x, training=False)
        for layer in self._after:
            x = layer(x, training=False)
        scores = keras.ops.matmul(x, self._head.kernel)
        if self._head.use_bias:
            scores = scores + self._head.bias
        if self.per_site:
            if sites is None:
                raise ValueError("a per-site severity output needs each image's site (sites=)")
            grid = keras.ops.reshape(scores, (-1, self._head.units // self.classes, self.classes))
            scores = keras.ops.take_along_axis(grid, keras.ops.reshape(np.maximum(np.asarray(sites), 0), (-1, 1, 1)),
                                               axis=1)[:, 0]
            return features, scores, keras.ops.softmax(scores, axis=-1)
        return features, scores, self._head.activation(scores)


def gradcam(model: keras.Model, images: np.ndarray, head: str, class_index: int | np.ndarray | None = None,
            layer: str | None = None, *, batch_size: int = 16, sites: np.ndarray | None = None) -> np.ndarray:
    """Grad-CAM maps float32 (N, S, S) in [0, 1] at the input size, one per image.

    ``images``: float32 (N, S, S, C) in 0..255, as the model takes them. ``class_index``: the class of
    ``head`` to explain, one for all images or one per image (N,); None explains each image's
    predicted class. ``layer``: a layer of the backbone, default :func:`last_conv_layer`. ``sites`` (N,):
    each image's site, for a per-site severity output (which is explained at that site).
    The gradient followed is that of the class's log-probability (its score against the other classes,
    see :func:`_evidence`), not of its raw pre-softmax score as in the paper: a softmax head can win a
    class by pushing the other scores down, and then the raw score's map is all zeros (a trained
    tiny model showed this on one seed in eight). Each map is upsampled bilinearly (cv2) and divided
    by its maximum; a map with no positive evidence stays all zeros. Runs eagerly: tracing a graph
    for NASNetLarge takes minutes, and Grad-CAM runs once per run on a few dozen images.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, S, S, C), got shape {images.shape}")
    cam_model = GradCamModel(model, head, layer)
    wanted = None
    if class_index is not None:
        wanted = np.broadcast_to(np.asarray(class_index), (len(images),)).astype(int)
        if wanted.min(initial=0) < 0 or wanted.max(initial=0) >= cam_model.classes:
            raise ValueError(f"class_index must be in 0..{cam_model.classes - 1} for head {head!r}, "
                             f"got {sorted(set(wanted.tolist()))}")
    height, width = images.shape[1:3]
    maps = np.zeros((len(images), height, width), np.float32)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        with tf.GradientTape() as tape:
            features, scores, probabilities = cam_model(
                batch, None if sites is None else np.asarray(sites)[start:start + batch_size])
            target = (wanted[start:start + batch_size] if wanted is not None
                      else keras.ops.convert_to_numpy(probabilities).argmax(axis=1))
            # Images do not interact in inference mode, so one gradient of the sum serves all of them.
            score = tf.reduce_sum(_evidence(scores, target))
        gradients = tape.gradient(score, features).numpy()
        channel_weights = gradients.mean(axis=(1, 2))  # (B, K)
        cams = np.maximum(np.einsum("bhwk,bk->bhw", features.numpy(), channel_weights), 0.0)
        for i, cam in enumerate(cams):
            maps[start + i] = _normalise(cv2.resize(cam.astype(np.float32), (width, height),
                                                    interpolation=cv2.INTER_LINEAR))
    return maps


def _evidence(scores: tf.Tensor, target: np.ndarray) -> tf.Tensor:
    """Per image, a score whose gradient points where the gradient of log p(target) points, without its underflow.

    d log p_c = sum_{j != c} p_j (dz_c - dz_j): class c's score against the other classes, each weighted
    by its probability. Written out like this the weights p_j / sum_{j != c} p_j come from a softmax
    over the other classes alone and keep their precision when p_c rounds to 1.0 in float32, where
    autodiff's (1 - p_c) is exactly 0 and the map would lose class c's own evidence.
    """
    chosen = tf.one_hot(target, scores.shape[-1], dtype=scores.dtype)
    others = tf.stop_gradient(tf.nn.softmax(tf.where(chosen > 0, tf.constant(-np.inf, scores.dtype), scores)))
    return tf.reduce_sum(chosen * scores, axis=1) - tf.reduce_sum(others * scores, axis=1)


def _normalise(cam: np.ndarray) -> np.ndarray:
    peak = float(cam.max())
    return np.clip(cam / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(cam)


def gradcam_figure(images: Sequence[np.ndarray | None], maps: Sequence[np.ndarray | None], titles: Sequence[str],
                   ncols: int = 6, *, row_labels: Sequence[str] | None = None, alpha: float = 0.4) -> plt.Figure:
    """A grid of inputs (grayscale, the centre channel, 0..255) with their heatmaps overlaid.

    ``images`` (S, S, C), ``maps`` (S, S) in [0, 1] and ``titles`` run row by row, ``ncols`` to a
    row; an image of None leaves its cell empty. ``row_labels`` are written left of each row.
    """
    rows = max(1, int(np.ceil(len(images) / ncols)))
    fig, axes = plt.subplots(rows, ncols, figsize=(2.3 * ncols, 2.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, heatmap, title in zip(axes.ravel(), images, maps, titles):
        if image is None:
            continue
        ax.imshow(image[..., image.shape[-1] // 2], cmap="gray", vmin=0, vmax=255)
        ax.imshow(heatmap, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=7)
    for ax, label in zip(axes[:, 0], row_labels or ()):
        ax.text(-0.06, 0.5, label, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=9)
    grid_margins(fig, left=0.05 if row_labels else 0.01)
    return fig


def gradcam_grid(model: keras.Model, images: np.ndarray, targets: dict[str, np.ndarray],
                 proba: dict[str, np.ndarray], *, head: str | Sequence[str] = "severity", per_class: int = 4,
                 seed: int = 0, sites: np.ndarray | None = None) -> dict[str, plt.Figure]:
    """One Grad-CAM figure per head: ``{head: figure}``.

    ``images`` float32 or uint8 (N, S, S, C) in 0..255, or anything that returns those rows for
    ``images[index_array]`` (it is read once, for the chosen rows only); ``targets[head]`` class
    indices (N,) with -1 for unknown; ``proba[head]`` the model's
    probabilities (N, classes); ``sites`` (N,) each sample's site, for a per-site severity output. Each row of a figure is one true class, with up to ``per_class``
    samples of it (chosen with ``seed``), explained for the class the model predicted. A head with no
    labelled sample gets no figure.
    """
    heads = [head] if isinstance(head, str) else list(head)
    rng = np.random.default_rng(seed)
    figures = {}
    for name in heads:
        classes = HEAD_CLASSES[name]
        truth = np.asarray(targets[name])
        per_row = [np.sort(rng.choice(np.flatnonzero(truth == k), size=min(per_class, int((truth == k).sum())),
                                      replace=False)) for k in range(len(classes))]
        chosen = np.concatenate(per_row).astype(int)
        if chosen.size == 0:
            continue
        picked = np.asarray(images[chosen], np.float32)  # the only read of images
        maps = gradcam(model, picked, name, np.asarray(proba[name])[chosen].argmax(axis=1),
                       sites=None if sites is None else np.asarray(sites)[chosen])
        at = {int(i): j for j, i in enumerate(chosen)}
        cells, heatmaps, titles = [], [], []
        for rows in per_row:
            for slot in range(per_class):
                i = int(rows[slot]) if slot < len(rows) else None
                cells.append(None if i is None else picked[at[i]])
                heatmaps.append(None if i is None else maps[at[i]])
                titles.append("" if i is None else _title(classes, truth[i], proba[name][i]))
        row_labels = [f"true {short_name(c)}" + ("" if len(rows) else " (none)") for c, rows in zip(classes, per_row)]
        figures[name] = gradcam_figure(cells, heatmaps, titles, ncols=per_class, row_labels=row_labels)
    return figures


def _title(classes: Sequence[str], truth: int, probabilities: np.ndarray) -> str:
    predicted = int(np.argmax(probabilities))
    title = f"true {short_name(classes[truth])} / pred {short_name(classes[predicted])} {probabilities[predicted]:.2f}"
    return title if len(title) <= 36 else title.replace(" / ", "\n")  # long condition names: two lines


def _backbone(model: keras.Model) -> keras.Model:
    try:
        backbone = model.get_layer(BACKBONE_LAYER)
    except ValueError:
        raise ValueError(f"model {model.name!r} has no nested backbone layer {BACKBONE_LAYER!r}; Grad-CAM works on "
                         "models from spinemri.models.network.build_model") from None
    if isinstance(backbone, keras.layers.TimeDistributed):
        raise ValueError(f"model {model.name!r} encodes each slice separately (model.slice_pooling attention or "
                         "lstm); Grad-CAM explains models that see the slices as channels (slice_pooling: channels)")
    return backbone
