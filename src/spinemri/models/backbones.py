"""The backbone registry: every architecture a user can name, with its sizes and preprocessing.

``BACKBONES["densenet"]`` knows how to build the feature extractor (``include_top=False``), its
native input size (what ImageNet weights were trained at), the smallest input it accepts, and
how pixels 0..255 must be scaled for it. Unknown names and too-small inputs fail with the valid
choices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras

from spinemri.config import THESIS_ARCHS
from spinemri.errors import UserError


class UnknownArchitecture(ValueError):
    pass


class WeightsUnavailable(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[..., keras.Model]  # (input_shape, weights) -> model without top
    native_size: int
    min_size: int
    scaling: str  # "tf": [-1, 1]; "torch": ImageNet mean/std; "caffe": mean subtraction; "raw": 0..255 (model scales); "unit": [0, 1]
    weights_file: str | None = None  # file name Keras caches ImageNet weights under

    def check_size(self, img_size: int) -> None:
        if img_size < self.min_size:
            raise ValueError(f"img_size {img_size} is below the minimum of {self.min_size} px for {self.name}; "
                             f"use img_size >= {self.min_size} (native: {self.native_size})")


def _app(factory, **extra):
    def build(input_shape, weights):
        return factory(include_top=False, weights=weights, input_shape=input_shape, **extra)
    return build


def _tiny(input_shape, weights):
    """A small CNN for tests and quick checks (no ImageNet weights)."""
    if weights == "imagenet":
        raise WeightsUnavailable("the tiny backbone has no ImageNet weights; use weights=none")
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)  # settles within the few steps of a quick run
        x = keras.layers.Activation("relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(96, 3, padding="same", activation="relu")(x)
    model = keras.Model(inputs, x, name="tiny")
    if weights not in (None, "none"):
        model.load_weights(weights)
    return model


A = keras.applications
BACKBONES: dict[str, Backbone] = {
    "inception_v3": Backbone("inception_v3", _app(A.InceptionV3), 299, 75, "tf",
                             "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "xception": Backbone("xception", _app(A.Xception), 299, 71, "tf",
                         "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "vgg16": Backbone("vgg16", _app(A.VGG16), 224, 32, "caffe",
                      "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "nasnet_large": Backbone("nasnet_large", _app(A.NASNetLarge), 331, 32, "tf", "nasnet_large_no_top.h5"),
    "resnet50": Backbone("resnet50", _app(A.ResNet50), 224, 32, "caffe",
                         "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "mobilenet_v2": Backbone("mobilenet_v2", _app(A.MobileNetV2), 224, 32, "tf",
                             "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
    "densenet": Backbone("densenet", _app(A.DenseNet121), 224, 32, "torch",
                         "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "densenet169": Backbone("densenet169", _app(A.DenseNet169), 224, 32, "torch",
                            "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "densenet201": Backbone("densenet201", _app(A.DenseNet201), 224, 32, "torch",
                            "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "efficientnet_b0": Backbone("efficientnet_b0", _app(A.EfficientNetB0), 224, 32, "raw", "efficientnetb0_notop.h5"),
    "convnext_tiny": Backbone("convnext_tiny", _app(A.ConvNeXtTiny), 224, 32, "raw", "convnext_tiny_notop.h5"),
    "tiny": Backbone("tiny", _tiny, 96, 16, "unit"),
}
THESIS_BACKBONES = THESIS_ARCHS  # the thesis's seven, defined with the config that defaults to them


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UnknownArchitecture(f"unknown arch {name!r}; choose one of: {', '.join(BACKBONES)}") from None


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def build_backbone(backbone: Backbone, input_shape: tuple[int, int, int], weights: str) -> keras.Model:
    """The feature extractor; ``weights`` is 'none', 'imagenet' or a weights file path.

    ImageNet weights come from the Keras cache or are downloaded once; when that is impossible
    the error says how to pre-fill the cache, instead of silently training from random weights.
    """
    if weights == "none":
        return backbone.build(input_shape, None)
    if weights != "imagenet":
        if not Path(weights).is_file():
            raise WeightsUnavailable(f"weights file {weights} does not exist; pass weights=imagenet, none or a file")
        return backbone.build(input_shape, str(weights))
    try:
        return backbone.build(input_shape, "imagenet")
    except WeightsUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - urllib/HTTP/OS errors when the download fails
        target = keras_cache_dir() / (backbone.weights_file or "<weights file>")
        raise WeightsUnavailable(
            f"ImageNet weights for {backbone.name} are not in the Keras cache and could not be downloaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). Pre-fill the cache by copying "
            f"{backbone.weights_file} from a machine with internet to {target} (set KERAS_HOME to use another "
            "folder), or pass weights=none (random initialisation) or weights=/path/to/weights.h5"
        ) from None
