"""The Keras builders of the backbone catalog (spinemri.models.catalog): a feature extractor
(``include_top=False``) per architecture, with ImageNet weights fetched, cached or refused with
instructions. Unknown names and too-small inputs fail with the valid choices.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import keras

from spinemri.errors import WeightsUnavailable
from spinemri.models.catalog import CATALOG, BackboneSpec, get_spec


@dataclass(frozen=True)
class Backbone(BackboneSpec):
    build: Callable[..., keras.Model] | None = None  # (input_shape, weights) -> model without top


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
_BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "inception_v3": _app(A.InceptionV3), "xception": _app(A.Xception), "vgg16": _app(A.VGG16),
    "nasnet_large": _app(A.NASNetLarge), "resnet50": _app(A.ResNet50), "mobilenet_v2": _app(A.MobileNetV2),
    "densenet": _app(A.DenseNet121), "densenet169": _app(A.DenseNet169), "densenet201": _app(A.DenseNet201),
    "efficientnet_b0": _app(A.EfficientNetB0), "convnext_tiny": _app(A.ConvNeXtTiny), "tiny": _tiny,
}
BACKBONES: dict[str, Backbone] = {name: Backbone(**asdict(spec), build=_BUILDERS[name]) for name, spec in CATALOG.items()}


def get_backbone(name: str) -> Backbone:
    return BACKBONES[get_spec(name).name]


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
