"""The one place where pixels become a model input, for training (the cache) and serving alike.

``preprocess(slices, pixel_spacing, config, x, y)`` takes the site's slice (and, for a 2.5D stack of
``config.slices`` slices, as many neighbours either side) as decoded by :mod:`spinemri.data.dicom` and
returns uint8 (S, S, slices), one channel per slice:

    percentile window -> ROI crop in mm around (x, y), or the whole slice -> resize keeping the
    physical aspect ratio (zero padding outside the image) -> optional equalisation -> uint8
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from spinemri.data.dicom import rescale
from spinemri.errors import ConfigError, SiteOutsideImage

MODES = ("roi", "slice")
SLICE_COUNTS = tuple(range(1, 16, 2))
EQUALIZE = ("none", "hist", "clahe")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that decides what a model input looks like (part of the cache fingerprint)."""

    img_size: int = field(default=128, metadata={"help": "side of the model input in pixels (S x S)"})
    mode: str = field(default="roi", metadata={
        "help": "roi: a square of roi_mm around the labelled point; slice: the whole slice (the thesis)"})
    roi_mm: float = field(default=60.0, metadata={"help": "side of the ROI square in millimetres (via PixelSpacing)"})
    slices: int = field(default=1, metadata={
        "help": "slices centred on the site's slice, one input channel each: 1, 3, 5, ... (odd; a 2.5D stack)"})
    p_low: float = field(default=0.5, metadata={"help": "intensity percentile mapped to 0"})
    p_high: float = field(default=99.5, metadata={"help": "intensity percentile mapped to 255"})
    equalize: str = field(default="none", metadata={
        "help": "histogram equalisation after windowing: none, hist (the thesis) or clahe"})
    dicom_window: bool = field(default=False, metadata={
        "help": "apply the file's own VOI window before the percentile window"})

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.img_size, int) or not 8 <= self.img_size <= 1024:
            problems.append(f"img_size must be an integer from 8 to 1024, got {self.img_size!r}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.roi_mm > 0:
            problems.append(f"roi_mm must be > 0 millimetres, got {self.roi_mm!r}")
        if not isinstance(self.slices, int) or isinstance(self.slices, bool) or self.slices not in SLICE_COUNTS:
            problems.append(f"slices must be an odd number from 1 to {SLICE_COUNTS[-1]} (the site's slice and as "
                            f"many either side), got {self.slices!r}")
        if not 0 <= self.p_low < self.p_high <= 100:
            problems.append(f"need 0 <= p_low < p_high <= 100, got p_low={self.p_low}, p_high={self.p_high}")
        if self.equalize not in EQUALIZE:
            problems.append(f"equalize must be one of {', '.join(EQUALIZE)}, got {self.equalize!r}")
        if problems:
            raise ConfigError("invalid preprocessing: " + "; ".join(problems))

    @property
    def channels(self) -> int:
        """Channels of the model input: one per slice."""
        return self.slices

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PreprocessConfig":
        if "channels" in values and "slices" not in values:  # the name in models logged before 2.5D stacks
            values = {("slices" if k == "channels" else k): v for k, v in values.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown preprocessing keys {unknown}; valid keys: {sorted(known)}")
        return cls(**values)


def site_inside(x: float, y: float, width: int, height: int) -> bool:
    """Whether the pixel coordinate (x = column, y = row) lies on a width x height image."""
    return -0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5


def neighbor_indices(index: int, n_slices: int, count: int) -> list[int]:
    """Slice indices feeding each channel of a ``count``-slice stack centred on ``index``: [i], [i-1, i, i+1],
    [i-2, ..., i+2], ..., repeating the edge slice at the ends of the series."""
    if not 0 <= index < n_slices:
        raise IndexError(f"slice index {index} outside a series of {n_slices} slices")
    half = count // 2
    return [min(max(index + d, 0), n_slices - 1) for d in range(-half, half + 1)]


def stack_neighbours(index: int, n_slices: int, count: int) -> list[int]:
    """The stack of :func:`neighbor_indices` without the site's slice: the neighbours in order, lower
    indices first (what a request's ``neighbors_b64`` holds)."""
    stack = neighbor_indices(index, n_slices, count)
    return stack[:count // 2] + stack[count // 2 + 1:]


def with_centre(centre, neighbours: Sequence, count: int) -> list:
    """A ``count``-slice stack from the site's slice and its ``count - 1`` neighbours in order; without
    neighbours, the site's slice repeated (as training does at the ends of a series)."""
    if not neighbours:
        return [centre] * count
    if len(neighbours) != count - 1:
        raise ValueError(f"a {count}-slice stack needs {count - 1} neighbouring slices, got {len(neighbours)}")
    return [*neighbours[:count // 2], centre, *neighbours[count // 2:]]


def percentile_window(image: np.ndarray, p_low: float, p_high: float, *,
                      stored: tuple[np.ndarray, float, float] | None = None) -> tuple[float, float]:
    """Intensities at the two percentiles; a flat image gives a window of width 1.

    ``stored``: the integers, slope and intercept ``image`` was computed from
    (``DicomImage.stored``); the same window, found faster from the integers.
    """
    low, high = _fast_percentiles(image, p_low, p_high, stored=stored)
    if not high > low:
        high = low + 1.0
    return float(low), float(high)


_MAX_HISTOGRAM_BINS = 1 << 20
_OPENCV_HISTOGRAM_BINS = 1 << 13  # beyond this OpenCV's time grows with the bins, NumPy's does not
_OPENCV_EXACT_COUNTS = 1 << 24


def _fast_percentiles(image: np.ndarray, p_low: float, p_high: float, *,
                      stored: tuple[np.ndarray, float, float] | None = None) -> np.ndarray:
    """``np.percentile(image, [p_low, p_high])`` (linear method), bit for bit, 2-7x faster.

    NumPy partially sorts a copy to find the order statistics on either side of each percentile;
    here they come from histograms, and NumPy's interpolation between them is repeated exactly.
    With the stored integers of a DICOM image (``stored``, a non-negative slope): a histogram of
    those, each order statistic then rescaled — the rescale is monotonic, so the k-th smallest
    value is the rescaled k-th smallest integer, the same float32. MR pixels without them are
    mostly integers stored as floats: one histogram of the values. Other float32 images (a
    non-integer RescaleSlope): a histogram of the top 16 bits of each value's bit pattern, made to
    sort like the values, then a sort of the one or two buckets that hold the wanted ranks.
    Anything else goes to ``np.percentile`` itself.
    """
    flat = image.ravel()
    if flat.dtype.kind != "f" or flat.size == 0:
        return np.percentile(image, [p_low, p_high])
    virtual = (flat.size - 1) * (np.array([p_low, p_high], dtype=np.float64) / 100)
    below = np.floor(virtual)
    gamma = virtual - below
    below = below.astype(np.int64)
    above = np.minimum(below + 1, flat.size - 1)
    ranks = np.concatenate([below, above])
    stats = None
    if (stored is not None and stored[0].size == flat.size and stored[0].dtype.kind in "ui"
            and stored[1] >= 0 and flat.dtype == np.float32):
        integers, slope, intercept = stored
        found = _order_statistics_of_integers(integers.ravel(), ranks)
        if found is not None:
            stats = rescale(found, slope, intercept)
    if stats is None:
        stats = _integer_order_statistics(flat, ranks)
    if stats is None and flat.dtype == np.float32:
        stats = _float32_order_statistics(flat, ranks)
    if stats is None:
        return np.percentile(image, [p_low, p_high])
    a, b = stats[:2], stats[2:]
    diff = b - a  # NumPy's _lerp: from the nearer end, so that gamma 1 gives b exactly
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


def _integer_order_statistics(flat: np.ndarray, ranks: np.ndarray) -> np.ndarray | None:
    """The values of the given (0-based) ranks of an integer-valued float array; None if it is not one."""
    with np.errstate(invalid="ignore"):  # NaN, inf and out-of-range values cast to garbage, rejected below
        ints = flat.astype(np.int32)
    if not np.array_equal(ints.astype(flat.dtype), flat):
        return None
    found = _order_statistics_of_integers(ints, ranks)
    return None if found is None else found.astype(flat.dtype)


def _order_statistics_of_integers(ints: np.ndarray, ranks: np.ndarray) -> np.ndarray | None:
    """The values (int64) of the given ranks of a 1-D integer array, from its histogram; None if the
    range is too wide for one."""
    lowest, highest = int(ints.min()), int(ints.max())
    span = highest - lowest + 1
    if span > _MAX_HISTOGRAM_BINS:
        return None
    if span <= _OPENCV_HISTOGRAM_BINS and ints.size < _OPENCV_EXACT_COUNTS:
        # OpenCV's histogram of 16-bit values is 2-5x faster than np.bincount for MR's usual
        # ranges; its float32 counts are exact below 2**24 pixels.
        if ints.dtype == np.uint16:  # uint16 as it is: the histogram's range starts at the lowest value
            counts = cv2.calcHist([ints.reshape(1, -1)], [0], None, [span], [lowest, lowest + span])
        else:
            shifted = (ints - lowest if ints.dtype == np.int32 else ints.astype(np.int32) - lowest).astype(np.uint16)
            counts = cv2.calcHist([shifted.reshape(1, -1)], [0], None, [span], [0, span])
        cumulative = np.cumsum(counts.ravel().astype(np.int64))
    else:
        cumulative = np.cumsum(np.bincount(ints.astype(np.int64) - lowest))
    return np.searchsorted(cumulative, ranks, side="right") + lowest


_SIGN_BIT = np.uint32(0x80000000)


def _float32_order_statistics(flat: np.ndarray, ranks: np.ndarray) -> np.ndarray | None:
    """The values of the given (0-based) ranks of a float32 array by radix selection; None if it holds NaN."""
    # Flip the sign bit of positive values and every bit of negative ones: the unsigned keys then
    # sort as the floats do.
    keys = flat.view(np.uint32) ^ ((flat.view(np.int32) >> 31).view(np.uint32) | _SIGN_BIT)
    high = keys >> 16
    cumulative = np.cumsum(np.bincount(high, minlength=1 << 16))
    if cumulative[0x7E] or cumulative[-1] - cumulative[0xFF80]:  # NaN keys lie beyond the buckets of -inf, +inf
        return None
    buckets = np.searchsorted(cumulative, ranks, side="right")
    first_rank = np.where(buckets > 0, cumulative[buckets - 1], 0)
    out = np.empty(len(ranks), dtype=np.float32)
    for bucket in np.unique(buckets):
        members = np.sort(flat[high == bucket])
        chosen = buckets == bucket
        out[chosen] = members[ranks[chosen] - first_rank[chosen]]
    return out


def preprocess(
    slices: Sequence[np.ndarray],
    pixel_spacing: tuple[float, float],
    config: PreprocessConfig,
    x: float | None = None,
    y: float | None = None,
    *,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Model input from ``config.slices`` float 2-D slices of equal shape, the site's slice in the middle.

    ``x``, ``y`` are the site centre in pixels (column, row) of the centre slice; in ROI mode they
    default to the image centre. ``window`` is ``percentile_window(centre, config.p_low,
    config.p_high)`` when the caller already has it (the cache computes it once per slice for all
    the sites on it); it depends on the centre slice only. Returns uint8 (img_size, img_size, slices).
    """
    if len(slices) != config.slices:
        raise ValueError(f"expected {config.slices} slice(s) for slices={config.slices}, got {len(slices)}")
    centre = slices[len(slices) // 2]
    if centre.ndim != 2 or 0 in centre.shape:
        raise ValueError(f"expected a non-empty 2-D slice, got shape {centre.shape}")
    if any(s.shape != centre.shape for s in slices):
        raise ValueError(f"neighbouring slices differ in shape: {[s.shape for s in slices]}")
    height, width = centre.shape
    row_mm, col_mm = pixel_spacing
    if config.mode == "roi":
        x = (width - 1) / 2 if x is None else float(x)
        y = (height - 1) / 2 if y is None else float(y)
        if not site_inside(x, y, width, height):
            raise SiteOutsideImage(f"site ({x:.1f}, {y:.1f}) lies outside the {width}x{height} image")
        extent = (config.roi_mm / col_mm, config.roi_mm / row_mm)
    else:  # the whole slice, letterboxed so that a millimetre is as wide as it is high
        x, y = (width - 1) / 2, (height - 1) / 2
        side_mm = max(width * col_mm, height * row_mm)
        extent = (side_mm / col_mm, side_mm / row_mm)

    low, high = window if window is not None else percentile_window(centre, config.p_low, config.p_high)
    (x, y), region = _source_region(centre.shape, (x, y), extent, config.img_size)
    channels = []
    for image in slices:
        windowed = np.subtract(image[region], low, dtype=np.float32)  # in place below: one array per slice
        windowed /= high - low
        np.clip(windowed, 0.0, 1.0, out=windowed)
        resampled = _resample(windowed, (x, y), extent, config.img_size)
        # round(v * 255) to uint8, as np.round(resampled * 255.0).astype(np.uint8) gives it (the
        # same float32 product, rounded half to even) for values in [0, 1], in one pass
        u8 = cv2.convertScaleAbs(resampled, alpha=255.0)
        channels.append(_equalize(u8, config.equalize))
    return channels[0][..., np.newaxis] if len(channels) == 1 else np.stack(channels, axis=-1)


def _source_region(shape: tuple[int, int], centre: tuple[float, float], extent: tuple[float, float],
                   size: int) -> tuple[tuple[float, float], tuple[slice, slice]]:
    """The part of the image an ROI reads, so that only it is windowed: the output is the same as
    from the whole image (bilinear sampling reads pixels within one of the square, and outside
    the image the border is 0 either way). ``centre`` comes back relative to the part. Where
    ``_resample`` first area-averages the whole image (a large downscale), the whole image."""
    (cx, cy), (ex, ey) = centre, extent
    height, width = shape
    if int(min(ex, ey) / size) >= 2:
        return centre, (slice(None), slice(None))
    left = max(int(np.floor(cx - ex / 2)) - 2, 0)
    top = max(int(np.floor(cy - ey / 2)) - 2, 0)
    right = min(int(np.ceil(cx + ex / 2)) + 3, width)
    bottom = min(int(np.ceil(cy + ey / 2)) + 3, height)
    if left >= right or top >= bottom:  # wholly outside (preprocess rejects such sites): keep it simple
        return centre, (slice(None), slice(None))
    return (cx - left, cy - top), (slice(top, bottom), slice(left, right))


def _resample(image: np.ndarray, centre: tuple[float, float], extent: tuple[float, float], size: int) -> np.ndarray:
    """Square of ``extent`` (width, height) pixels around ``centre`` to size x size; zeros outside."""
    cx, cy = centre
    ex, ey = extent
    shrink = int(min(ex, ey) / size)
    if shrink >= 2:  # area-average first so that a large downscale does not alias
        h, w = image.shape
        new_w, new_h = max(1, round(w / shrink)), max(1, round(h / shrink))
        fx, fy = new_w / w, new_h / h
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        cx, cy = (cx + 0.5) * fx - 0.5, (cy + 0.5) * fy - 0.5
        ex, ey = ex * fx, ey * fy
    sx, sy = ex / size, ey / size
    # Output pixel j's centre sits at input coordinate cx - ex/2 + (j + 0.5) * sx.
    matrix = np.array([[sx, 0.0, cx - ex / 2 + 0.5 * sx], [0.0, sy, cy - ey / 2 + 0.5 * sy]])
    return cv2.warpAffine(
        image, matrix, (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0.0,
    )


def _equalize(image: np.ndarray, method: str) -> np.ndarray:
    if method == "hist":
        return cv2.equalizeHist(image)
    if method == "clahe":
        return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(image)
    return image
