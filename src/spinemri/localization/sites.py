"""What a localizer finds on each series type, and how label points map into a model's frame.

Each series type has *slice groups* (which slice to look at) and *points* (where on that slice):

    sagittal_t2  1 group  (the mid-sagittal slice)          5 points: spinal canal at L1/L2 .. L5/S1
    sagittal_t1  2 groups (left and right parasagittal)     10 points: left/right foramen per level
    axial_t2     5 groups (the slice through each disc)      2 points: left/right subarticular recess

A competition site (condition, level) is then (series type, group, point): the spinal canal at L4/L5
is point 3 on the sagittal T2 group 0 slice; the right subarticular recess at L4/L5 is point 1 on
the axial T2 slice chosen for group 3 (L4/L5).

The model sees each slice as :func:`spinemri.data.preprocess.preprocess` renders it in ``slice``
mode: the whole slice letterboxed into a square of ``side_mm`` millimetres. A pixel (x, y) of the
slice sits at unit coordinates (u, v) in [0, 1] of that square (see :func:`to_unit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spinemri.data.schema import LEVELS, SERIES_TYPES
from spinemri.errors import ConfigError


@dataclass(frozen=True)
class SeriesTask:
    name: str  # sagittal_t2 | sagittal_t1 | axial_t2
    description: str  # the series_description it applies to
    groups: tuple[str, ...]  # slice groups
    sites: tuple[tuple[str, str, int, int], ...]  # (condition, level, group, point)

    @property
    def points(self) -> int:
        return 1 + max(point for *_, point in self.sites)

    def point_names(self) -> list[str]:
        names = [""] * self.points
        for condition, level, group, point in self.sites:
            if not names[point]:
                names[point] = condition if len(self.groups) == len(LEVELS) else f"{condition} {level}"
        return names


def _sagittal_t1_sites():
    for side_index, side in enumerate(("left", "right")):
        for k, level in enumerate(LEVELS):
            yield f"{side}_neural_foraminal_narrowing", level, side_index, side_index * len(LEVELS) + k


SERIES_TASKS: dict[str, SeriesTask] = {
    "sagittal_t2": SeriesTask("sagittal_t2", SERIES_TYPES["sagittal_t2"], ("mid-sagittal",),
                              tuple(("spinal_canal_stenosis", level, 0, k) for k, level in enumerate(LEVELS))),
    "sagittal_t1": SeriesTask("sagittal_t1", SERIES_TYPES["sagittal_t1"], ("left foramina", "right foramina"),
                              tuple(_sagittal_t1_sites())),
    "axial_t2": SeriesTask("axial_t2", SERIES_TYPES["axial_t2"], LEVELS,
                           tuple((f"{side}_subarticular_stenosis", level, k, side_index)
                                 for k, level in enumerate(LEVELS) for side_index, side in enumerate(("left", "right")))),
}


def get_task(series: str) -> SeriesTask:
    try:
        return SERIES_TASKS[series]
    except KeyError:
        raise ConfigError(f"unknown series {series!r}; choose one of {', '.join(SERIES_TASKS)}") from None


def site_of(condition: str) -> SeriesTask:
    """The series type a condition is localized (and graded) on."""
    for task in SERIES_TASKS.values():
        if any(c == condition for c, *_ in task.sites):
            return task
    raise ValueError(f"unknown condition {condition!r}")


@dataclass(frozen=True)
class SliceFrame:
    """The square a slice is letterboxed into by ``preprocess(mode='slice')``."""

    width: int
    height: int
    row_mm: float
    col_mm: float

    @property
    def side_mm(self) -> float:
        return max(self.width * self.col_mm, self.height * self.row_mm)

    def to_unit(self, x, y):
        """Pixel (column, row) of the slice -> (u, v) in [0, 1] of the model's square."""
        ex, ey = self.side_mm / self.col_mm, self.side_mm / self.row_mm
        return (np.asarray(x, float) - (self.width - 1) / 2) / ex + 0.5, \
            (np.asarray(y, float) - (self.height - 1) / 2) / ey + 0.5

    def to_pixels(self, u, v):
        ex, ey = self.side_mm / self.col_mm, self.side_mm / self.row_mm
        return (np.asarray(u, float) - 0.5) * ex + (self.width - 1) / 2, \
            (np.asarray(v, float) - 0.5) * ey + (self.height - 1) / 2

    def distance_mm(self, x1, y1, x2, y2):
        return np.hypot((np.asarray(x1, float) - x2) * self.col_mm, (np.asarray(y1, float) - y2) * self.row_mm)
