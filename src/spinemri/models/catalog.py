"""The backbone catalog: every architecture a user can name, with its sizes and input scaling.

Plain facts, without Keras, so that configuration and validation never load TensorFlow:
``CATALOG["densenet"]`` knows its native input size (what ImageNet weights were trained at), the
smallest input it accepts, how pixels 0..255 must be scaled for it, and the file Keras caches its
ImageNet weights under. :mod:`spinemri.models.backbones` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from spinemri.errors import ConfigError, UnknownArchitecture


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    native_size: int
    min_size: int
    scaling: str  # "tf": [-1, 1]; "torch": ImageNet mean/std; "caffe": mean subtraction; "raw": 0..255 (model scales); "unit": [0, 1]
    weights_file: str | None = None  # file name Keras caches the ImageNet weights under

    def check_size(self, img_size: int) -> None:
        if img_size < self.min_size:
            raise ConfigError(f"img_size {img_size} is below the minimum of {self.min_size} px for {self.name}; "
                              f"use img_size >= {self.min_size} (native: {self.native_size})")


CATALOG: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    BackboneSpec("inception_v3", 299, 75, "tf", "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneSpec("xception", 299, 71, "tf", "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneSpec("vgg16", 224, 32, "caffe", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneSpec("nasnet_large", 331, 32, "tf", "nasnet_large_no_top.h5"),
    BackboneSpec("resnet50", 224, 32, "caffe", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneSpec("mobilenet_v2", 224, 32, "tf", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
    BackboneSpec("densenet", 224, 32, "torch", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneSpec("densenet169", 224, 32, "torch", "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneSpec("densenet201", 224, 32, "torch", "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    BackboneSpec("efficientnet_b0", 224, 32, "raw", "efficientnetb0_notop.h5"),
    BackboneSpec("convnext_tiny", 224, 32, "raw", "convnext_tiny_notop.h5"),
    BackboneSpec("tiny", 96, 16, "unit"),  # a small CNN for tests and quick checks (no ImageNet weights)
)}
# How the slices of a 2.5D stack meet in the network (spinemri.models.network builds each).
SLICE_POOLING = ("channels", "attention", "lstm")
# How a backbone's feature map becomes the heads' input: its global average, or the averages of a 4 x 4 grid of
# it side by side (what is where survives: on a whole slice each level has its own place).
FEATURE_POOLING = ("average", "grid")
GRID = 4
# The severity output: one distribution per image (single), or one per site of the 25 (per_site), read at the
# site a row names; auto picks per_site for whole slices (preprocess.mode slice) and single for ROI crops.
SEVERITY_HEADS = ("auto", "single", "per_site")


def severity_head(choice: str, mode: str) -> str:
    """The severity output a model gets: ``single`` or ``per_site`` (``auto``: per_site iff ``mode`` is slice)."""
    if choice == "auto":
        return "per_site" if mode == "slice" else "single"
    return choice
# The thesis's seven backbones (its Table 3.1): the default set of `spinemri compare --train`.
THESIS_ARCHS = ("inception_v3", "xception", "vgg16", "nasnet_large", "resnet50", "mobilenet_v2", "densenet")


def get_spec(name: str) -> BackboneSpec:
    try:
        return CATALOG[name]
    except KeyError:
        raise UnknownArchitecture(f"unknown arch {name!r}; choose one of: {', '.join(CATALOG)}") from None
