"""What a decoded DICOM (or PNG/JPEG) file is to spinemri: a slice, a series' ordered stack, and the
modality rescale that links stored integers to pixel values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SKIP_HINT = "skip it with --on-bad-file=skip"


@dataclass(frozen=True)
class DicomImage:
    """One decoded slice.

    ``pixels`` is float32 (H, W) in MONOCHROME2 orientation (higher = brighter), after the modality
    LUT (RescaleSlope/Intercept) and, if requested, the VOI LUT or window. ``stored`` is, where
    the reader kept them, the stored integers with the slope and intercept that gave ``pixels``
    (``pixels == rescale(*stored)``): a faster route to the same percentile window.
    """

    pixels: np.ndarray
    path: str
    instance_number: int | None
    position: tuple[float, float, float] | None  # ImagePositionPatient, mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (row cosines, column cosines)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm; (1, 1) if absent
    frame: int = 0
    stored: tuple[np.ndarray, float, float] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SeriesStack:
    """A series ordered along the slice normal. ``pixels`` is float32 (N, H, W): an array, or from
    :func:`read_series` the :class:`SeriesPixels` that decode each slice when it is read."""

    pixels: np.ndarray  # an array, or the lazy SeriesPixels of read_series (indexed the same way)
    instance_numbers: tuple[int, ...]
    positions: tuple[float, ...]  # position of each slice along the normal, mm (index order if absent)
    pixel_spacing: tuple[float, float]
    # Patient geometry, where every slice has it: each slice's ImagePositionPatient (mm) and the
    # unit normal of the first slice's plane. Places the slices of several series in one stack.
    origins: tuple[tuple[float, float, float], ...] | None = None
    normal: tuple[float, float, float] | None = None

    def index_of(self, instance_number: int) -> int:
        """Slice index (in position order) of an InstanceNumber; KeyError names the series' instances."""
        try:
            return self.instance_numbers.index(int(instance_number))
        except ValueError:
            raise KeyError(
                f"instance {instance_number} is not in this series "
                f"(instances: {sorted(self.instance_numbers)})"
            ) from None


def rescale(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """float32 modality values of stored integers: what ``apply_modality_lut`` computes (float64
    ``stored * slope + intercept``), as float32."""
    if slope == 1 and intercept == 0:  # integers of up to 24 bits are exact in float32
        return stored.astype(np.float32)
    values = stored.astype(np.float64)
    values *= slope
    values += intercept
    return values.astype(np.float32)
