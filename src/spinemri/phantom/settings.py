"""What varies between phantom datasets: the generator's settings, its named profiles and the summary of a run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import math
from statistics import NormalDist

import numpy as np

from spinemri.data import schema
from spinemri.data.schema import AXIAL_T2, LEVELS, SAGITTAL_T1, SAGITTAL_T2
from spinemri.errors import ConfigError


@dataclass(frozen=True)
class SliceCount:
    """How many slices a series has: ``round(median * exp(sigma * z))`` for a standard normal z,
    clipped to [low, high] (a lognormal: skewed toward long series, as the real ones are)."""

    median: float
    sigma: float
    low: int
    high: int

    @classmethod
    def fitted(cls, quartiles: tuple[float, float, float], low: int, high: int) -> "SliceCount":
        """The lognormal closest (least squares in log space) to the given first quartile, median and
        third quartile."""
        z = NormalDist().inv_cdf(0.75)
        logs = [math.log(q) for q in quartiles]
        return cls(median=math.exp(sum(logs) / 3), sigma=(logs[2] - logs[0]) / (2 * z), low=low, high=high)

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.median <= self.high:
            raise ConfigError(f"SliceCount needs 1 <= low <= median <= high, got low={self.low}, "
                              f"median={self.median}, high={self.high}")
        if self.sigma < 0:
            raise ConfigError(f"SliceCount sigma must be >= 0, got {self.sigma}")

    def draw(self, rng: np.random.Generator) -> int:
        return int(np.clip(round(self.median * math.exp(self.sigma * rng.standard_normal())), self.low, self.high))


@dataclass(frozen=True)
class PhantomConfig:
    """What varies between phantom datasets. The defaults are the quick phantom ("fast" in PROFILES):
    the real data's labels and quirks on short series and mid-size images; "rsna" adds the real series
    lengths, image sizes and series shares."""

    studies: int = 40
    seed: int = 0
    p_blank: float = 0.01  # share of label cells left blank (with no coordinate)
    p_second_axial: float = 0.15  # studies with a second Axial T2 series
    p_more_axial: float = 0.0  # of those, the share with a third (and of those, with a fourth)
    p_missing_series: float = 0.03  # studies missing one of their series
    image_sizes: tuple[int, ...] = (256, 320, 384, 448, 512)
    image_size_weights: tuple[float, ...] = ()  # how often each image size occurs; empty: equally often
    median_sagittal_slices: int = 17
    # Slices per series by series description; empty: sagittal series around median_sagittal_slices
    # (9-32) and 3-5 axial slices through each disc.
    slice_counts: dict[str, SliceCount] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.studies < 1:
            raise ConfigError(f"studies must be >= 1, got {self.studies}")
        for name in ("p_blank", "p_second_axial", "p_more_axial", "p_missing_series"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"{name} must be within [0, 1], got {value}")
        if not self.image_sizes or min(self.image_sizes) < 32:
            raise ConfigError(f"image_sizes must be >= 32 pixels, got {self.image_sizes}")
        weights = self.image_size_weights
        if weights and (len(weights) != len(self.image_sizes) or min(weights) < 0 or abs(sum(weights) - 1) > 1e-6):
            raise ConfigError(f"image_size_weights must give one non-negative share per image size "
                              f"({len(self.image_sizes)}) summing to 1, got {weights}; leave it empty for equal shares")
        if self.median_sagittal_slices < 5:
            raise ConfigError(f"median_sagittal_slices must be >= 5, got {self.median_sagittal_slices}")
        if self.slice_counts and set(self.slice_counts) != set(schema.SERIES_DESCRIPTIONS):
            raise ConfigError(f"slice_counts must have one SliceCount for each of {', '.join(schema.SERIES_DESCRIPTIONS)}, "
                              f"got {', '.join(self.slice_counts) or 'none'}; leave it empty for the fast phantom's counts")
        if self.slice_counts and self.slice_counts[AXIAL_T2].low < len(LEVELS):
            raise ConfigError(f"slice_counts[{AXIAL_T2!r}].low must be >= {len(LEVELS)} (a slice through each disc), "
                              f"got {self.slice_counts[AXIAL_T2].low}")


# The real RSNA 2024 training data (FACTS): Axial T2 series have 5-192 slices (quartiles 24/29/44, mean 34),
# Sagittal T1 10-38 and Sagittal T2/STIR 8-29 (both mean 17); 17 % of studies have two or more Axial T2
# series, a few three or four; 0.15 % lack a series type. Image sizes span the clinical range, mostly
# 384-640 px, some 1024; the shares of each size below are an estimate within that range.
_RSNA_IMAGE_SIZES = {256: 0.04, 320: 0.06, 384: 0.2, 448: 0.12, 512: 0.3, 576: 0.05, 640: 0.15, 768: 0.03, 1024: 0.05}


PROFILES: dict[str, PhantomConfig] = {
    "fast": PhantomConfig(),
    "rsna": PhantomConfig(
        p_second_axial=0.17,
        p_more_axial=0.1,
        p_missing_series=0.0015,
        image_sizes=tuple(_RSNA_IMAGE_SIZES),
        image_size_weights=tuple(_RSNA_IMAGE_SIZES.values()),
        slice_counts={SAGITTAL_T1: SliceCount(median=17, sigma=0.2, low=10, high=38),
                      SAGITTAL_T2: SliceCount(median=17, sigma=0.2, low=8, high=29),
                      AXIAL_T2: SliceCount.fitted(quartiles=(24, 29, 44), low=5, high=192)},
    ),
}


def profile(name: str, **changes) -> PhantomConfig:
    """The named profile of PROFILES with ``changes`` (studies, seed, or any other PhantomConfig field)."""
    if name not in PROFILES:
        raise ConfigError(f"unknown phantom profile {name!r} (--profile): choose one of {', '.join(PROFILES)}")
    return dataclasses.replace(PROFILES[name], **changes)


@dataclass(frozen=True)
class PhantomSummary:
    out_dir: str
    studies: int
    series: int
    images: int
    labelled_points: int
    blank_labels: int


MARKER = "spinemri-phantom.json"  # written into every phantom: the generator's settings
