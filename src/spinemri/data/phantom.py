"""A synthetic lumbar-spine MRI phantom written in exactly the RSNA 2024 LSDC layout.

Each study is a small anatomical model (vertebral bodies T12-S1, discs, the spinal canal, the
neural foramina and the subarticular recesses) whose geometry depends on the study's labels:
spinal canal stenosis narrows the canal at its level, foraminal narrowing shrinks the foramen on
its side, subarticular stenosis narrows the recess on its side. The model is rendered into real
DICOM files (Sagittal T1, Sagittal T2/STIR, Axial T2) with per-study nuisance (field of view,
pixel spacing, image size, rotation, intensity scale, bias field, Rician noise), and every label's
coordinate points at the pixel where its anatomy is drawn. Same seed, same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist

import cv2
import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from spinemri.data import schema
from spinemri.data.schema import (AXIAL_T2, CONDITIONS, LEVELS, RSNA_SEVERITY_FREQUENCIES, SAGITTAL_T1,
                                  SAGITTAL_T2)
from spinemri.errors import ConfigError, OutputExists
from spinemri.processes import remove_stale_staging, staging_path, worker_pool

# Degeneration is commoner low in the spine; thresholds are solved so the marginals stay as above.
_LEVEL_SHIFT = np.array([-0.35, -0.2, 0.0, 0.25, 0.3])
_STUDY_SHARE = 0.35  # share of latent variance common to the whole study
_LEVEL_RHO = 0.6  # correlation between neighbouring levels of one condition

FORAMEN_X_MM = 21.0  # distance of the neural foramina from the midline
RECESS_A_MM, RECESS_B_MM = 9.5, 2.2  # subarticular recess centre (lateral, posterior) at a disc


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


def synthesize(out_dir: str | Path, config: PhantomConfig = PhantomConfig(), *, workers: int = 1,
               overwrite: bool = False, force: bool = False, progress: bool = False) -> PhantomSummary:
    """Write a phantom dataset to ``out_dir`` (train.csv, train_series_descriptions.csv,
    train_label_coordinates.csv, train_images/<study>/<series>/<instance>.dcm, and MARKER).

    The folder appears only when complete: it is built beside ``out_dir`` and renamed into place.
    ``overwrite`` replaces an earlier phantom; a folder without MARKER also needs ``force``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExists(f"{out_dir} is a file; choose a folder for --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise OutputExists(f"{out_dir} already exists and is not empty; choose another --out or pass --overwrite")
        if not (out_dir / MARKER).is_file() and not force:
            raise OutputExists(f"{out_dir} does not look like a spinemri phantom (it has no {MARKER}); "
                                  "--overwrite would delete everything in it. Choose another --out, or pass "
                                  "--overwrite --force to delete it anyway")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir.parent)
    staging = staging_path(out_dir)
    (staging / schema.IMAGES_DIR).mkdir(parents=True)

    root = np.random.SeedSequence(config.seed)
    id_rng = np.random.default_rng(root.spawn(1)[0])
    ids = _unique_ids(id_rng, config.studies * 7)
    study_ids = sorted(ids[: config.studies])
    series_pool = ids[config.studies:]
    jobs = [
        (staging, study_id, series_pool[6 * i: 6 * i + 6], seq, config)
        for i, (study_id, seq) in enumerate(zip(study_ids, root.spawn(config.studies + 1)[1:]))
    ]
    try:
        if workers > 1:
            with worker_pool(workers) as pool:
                results = list(_progress(pool.map(_write_study, jobs), len(jobs), progress))
        else:
            results = list(_progress(map(_write_study, jobs), len(jobs), progress))
        labels = pd.DataFrame([r["labels"] for r in results], columns=["study_id", *schema.LABEL_COLUMNS])
        series = pd.DataFrame([s for r in results for s in r["series"]], columns=list(schema.SERIES_COLUMNS))
        coords = pd.DataFrame([c for r in results for c in r["coordinates"]], columns=list(schema.COORDINATE_COLUMNS))
        coords = coords.sort_values(["study_id", "series_id", "instance_number", "condition", "level"])
        (staging / MARKER).write_text(json.dumps({"generator": "spinemri data synth", **asdict(config)}, indent=2))
        labels.to_csv(staging / schema.TRAIN_CSV, index=False)
        series.to_csv(staging / schema.SERIES_CSV, index=False)
        coords.to_csv(staging / schema.COORDINATES_CSV, index=False, float_format="%.6f")
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PhantomSummary(
        out_dir=str(out_dir),
        studies=len(labels),
        series=len(series),
        images=sum(r["images"] for r in results),
        labelled_points=len(coords),
        blank_labels=int(labels[list(schema.LABEL_COLUMNS)].isna().sum().sum()),
    )


def label_table(studies: int = 1975, blanks: int = 572, seed: int = 0) -> pd.DataFrame:
    """Labels alone, in train.csv's layout, for ``studies`` studies with ``blanks`` blank cells: by default
    the size of the real RSNA 2024 train.csv (1,975 studies, 572 blank cells). No images."""
    rng = np.random.default_rng(seed)
    grades = [sample_labels(rng) for _ in range(studies)]
    table = pd.DataFrame([[schema.SEVERITIES[g[(c, lv)]] for c in CONDITIONS for lv in LEVELS] for g in grades],
                         columns=list(schema.LABEL_COLUMNS), dtype=object)
    cells = rng.choice(table.size, size=min(blanks, table.size), replace=False)
    for cell in cells:
        table.iat[cell // table.shape[1], cell % table.shape[1]] = None
    table.insert(0, "study_id", _unique_ids(rng, studies))
    return table.sort_values("study_id", ignore_index=True)


def sample_labels(rng: np.random.Generator) -> dict[tuple[str, str], int]:
    """Severity (0/1/2) of each (condition, level) of one study, correlated across levels.

    A latent Gaussian per condition and level = a study-wide degeneration factor + an AR(1)
    process along the levels + a level shift, cut at thresholds that reproduce the real priors.
    """
    study_factor = rng.standard_normal()
    left_right = {}
    out = {}
    for condition in CONDITIONS:
        group = condition.replace("left_", "").replace("right_", "")
        noise = _ar1(rng, len(LEVELS))
        if group in left_right:  # left and right sides share part of their degeneration
            noise = 0.6 * left_right[group] + math.sqrt(1 - 0.36) * noise
        left_right.setdefault(group, noise)
        latent = math.sqrt(_STUDY_SHARE) * study_factor + math.sqrt(1 - _STUDY_SHARE) * noise + _LEVEL_SHIFT
        t_moderate, t_severe = _thresholds(RSNA_SEVERITY_FREQUENCIES[condition])
        for level, value in zip(LEVELS, latent):
            out[(condition, level)] = int(value > t_moderate) + int(value > t_severe)
    return out


# --- one study ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Anatomy:
    """A study's spine in its own frame: u = anterior-posterior (posterior +, 0 at the back of the
    vertebral bodies), v = inferior-superior (superior +, 0 at the L3/L4 disc), in millimetres."""

    pitch: float  # distance between disc centres
    disc_height: float
    body_depth: float
    canal_width: float  # antero-posterior width of the thecal sac away from the discs
    skin_u: float  # posterior skin surface
    centre: tuple[float, float, float]  # patient (x, y, z) of the frame's origin (LPS)
    tilt: float  # rotation of the spine in the sagittal plane, radians
    twist: float  # in-plane rotation of the axial anatomy, radians
    severity: dict  # (condition, level) -> 0/1/2 (blank cells are drawn as their sampled severity)
    shrink: dict  # (condition, level) -> how much of the structure is lost (0..1)

    def disc_v(self, k: int) -> float:
        return (2 - k) * self.pitch

    def to_patient_sagittal(self, u, v):
        """Frame (u, v) -> patient (y, z)."""
        c, s = math.cos(self.tilt), math.sin(self.tilt)
        return self.centre[1] + c * u - s * v, self.centre[2] + s * u + c * v

    def from_patient_sagittal(self, y, z):
        c, s = math.cos(self.tilt), math.sin(self.tilt)
        dy, dz = y - self.centre[1], z - self.centre[2]
        return c * dy + s * dz, -s * dy + c * dz


def _new_anatomy(rng: np.random.Generator, severity: dict) -> _Anatomy:
    shrink = {}
    ranges = {0: (0.0, 0.12), 1: (0.42, 0.55), 2: (0.70, 0.82)}
    for key, grade in severity.items():
        shrink[key] = float(rng.uniform(*ranges[grade]))
    return _Anatomy(
        pitch=float(rng.uniform(32, 37)),
        disc_height=float(rng.uniform(8, 11)),
        body_depth=float(rng.uniform(30, 36)),
        canal_width=float(rng.uniform(12.5, 16)),
        skin_u=float(rng.uniform(70, 90)),
        centre=(float(rng.uniform(-3, 3)), float(rng.uniform(-8, 8)), float(rng.uniform(-8, 8))),
        tilt=math.radians(float(rng.uniform(-6, 6))),
        twist=math.radians(float(rng.uniform(-5, 5))),
        severity=severity,
        shrink=shrink,
    )


_TISSUE = {  # relative signal of each tissue per sequence
    SAGITTAL_T1: dict(soft=0.32, fat=0.88, muscle=0.28, bone=0.62, cortex=0.12, disc=0.38, csf=0.10,
                      nerve=0.30, ligament=0.07),
    SAGITTAL_T2: dict(soft=0.30, fat=0.62, muscle=0.18, bone=0.42, cortex=0.08, disc=0.78, csf=0.96,
                      nerve=0.22, ligament=0.05),
}
_TISSUE[AXIAL_T2] = _TISSUE[SAGITTAL_T2]


def _write_study(job) -> dict:
    staging, study_id, series_ids, seed_seq, config = job
    rng = np.random.default_rng(seed_seq)
    severity = sample_labels(rng)
    blank = {key: rng.random() < config.p_blank for key in severity}
    anatomy = _new_anatomy(rng, severity)
    acquisition = dict(
        scale=float(rng.uniform(700, 2200)),
        bits=int(rng.choice([12, 16])),
        slope=float(rng.choice([1.0, 1.0, 0.5, 2.0])),
        intercept=float(rng.choice([0.0, 0.0, -20.0])),
        noise=float(rng.uniform(0.015, 0.045)),
        bias=float(rng.uniform(0.08, 0.3)),
    )

    plan = series_plan(rng, config)
    plan_order = rng.permutation(len(plan))

    study_uid = _uid(study_id)
    frame_uid = _uid(study_id, "frame")
    series_rows, coordinates, n_images = [], [], 0
    for index, (description, levels, sides) in enumerate(plan):
        series_id = int(series_ids[plan_order[index]])
        series_rows.append((study_id, series_id, description))
        folder = staging / schema.IMAGES_DIR / str(study_id) / str(series_id)
        folder.mkdir(parents=True)
        meta = dict(study_uid=study_uid, frame_uid=frame_uid, series_uid=_uid(study_id, series_id),
                    series_number=index + 1, description=description,
                    sequence=sequence_tags(description, np.random.default_rng([study_id, series_id])))
        if description == AXIAL_T2:
            points, n = _render_axial(rng, anatomy, acquisition, folder, meta, levels, sides, config)
        else:
            points, n = _render_sagittal(rng, anatomy, acquisition, folder, meta, config)
        n_images += n
        for condition, level, instance, x, y in points:
            if not blank[(condition, level)]:
                coordinates.append((study_id, series_id, instance, schema.CONDITION_NAMES[condition], level,
                                    round(x, 6), round(y, 6)))

    labels = {"study_id": study_id}
    for (condition, level), grade in severity.items():
        labels[schema.label_column(condition, level)] = None if blank[(condition, level)] else schema.SEVERITIES[grade]
    return dict(labels=labels, series=series_rows, coordinates=coordinates, images=n_images)


def series_plan(rng: np.random.Generator, config: PhantomConfig) -> list[tuple[str, list[int], tuple[str, ...]]]:
    """The series of one study: (series description, levels, sides) each, where an axial series'
    levels (indices into LEVELS) and sides are the subarticular labels it carries.

    Three series usually; sometimes a second axial (rarely a third or fourth), the axial series then
    sharing the labels: each a run of levels, or one the left side and the other the right. Rarely one
    of the first three series is missing; a missing axial series takes the last share of the labels.
    """
    axial, axial_split = 1, None
    if rng.random() < config.p_second_axial:
        axial, axial_split = 2, "levels" if rng.random() < 0.6 else "sides"
        # No draw at all when p_more_axial is 0: a profile without it writes the files it wrote before.
        while config.p_more_axial and axial < 4 and rng.random() < config.p_more_axial:
            axial, axial_split = axial + 1, "levels"
    every_level, both_sides = list(range(len(LEVELS))), ("left", "right")
    if axial_split == "levels":
        shares = [([int(k) for k in run], both_sides) for run in np.array_split(every_level, axial)]
    elif axial_split == "sides":
        shares = [(every_level, ("left",)), (every_level, ("right",))]
    else:
        shares = [(every_level, both_sides)]
    descriptions = [SAGITTAL_T1, SAGITTAL_T2] + [AXIAL_T2] * axial
    if rng.random() < config.p_missing_series:
        descriptions.pop(int(rng.integers(0, 3)))
    shares_left = iter(shares)
    return [(d, *next(shares_left)) if d == AXIAL_T2 else (d, every_level, both_sides) for d in descriptions]


def image_size(rng: np.random.Generator, config: PhantomConfig) -> int:
    """Rows (= columns) of one series' images."""
    return int(rng.choice(config.image_sizes, p=config.image_size_weights or None))


def sagittal_slice_count(rng: np.random.Generator, config: PhantomConfig, description: str) -> int:
    if config.slice_counts:
        return config.slice_counts[description].draw(rng)
    return int(np.clip(round(rng.normal(config.median_sagittal_slices, 3.5)), 9, 32))


# --- sagittal series ---------------------------------------------------------------------------

def _render_sagittal(rng, anatomy: _Anatomy, acquisition, folder: Path, meta, config) -> tuple[list, int]:
    description = meta["description"]
    tissue = _TISSUE[description]
    size = image_size(rng, config)
    fov = float(rng.uniform(210, 280))
    spacing = fov / size
    n = sagittal_slice_count(rng, config, description)
    gap = max(3.0, 50.0 / (n - 1)) * float(rng.uniform(1.0, 1.08))
    x_centre = anatomy.centre[0] + float(rng.uniform(-2, 2))
    slice_x = x_centre + (np.arange(n) - (n - 1) / 2) * gap
    # Image columns run posterior (+y), rows run inferior (-z); top-left pixel centre:
    y_left = anatomy.centre[1] + float(rng.uniform(-15, 5)) - fov / 2 + spacing / 2
    z_top = anatomy.centre[2] + float(rng.uniform(-10, 10)) + fov / 2 - spacing / 2
    cols = y_left + np.arange(size, dtype=np.float32) * spacing
    rows = z_top - np.arange(size, dtype=np.float32) * spacing
    Y, Z = np.meshgrid(cols, rows)
    U, V = anatomy.from_patient_sagittal(Y, Z)
    layers = _sagittal_layers(anatomy, U, V, tissue, description)
    bias = _bias_field(rng, size, acquisition["bias"])

    instances = _instance_numbers(rng, n)
    paths = []
    for i in range(n):
        dx = slice_x[i] - anatomy.centre[0]
        weights = dict(
            body=_ramp((24 - abs(dx)) / 3), canal=_ramp((10 - abs(dx)) / 2.5), posterior=_ramp((7 - abs(dx)) / 2.5),
            left=_ramp(1 - abs(dx - FORAMEN_X_MM) / 6), right=_ramp(1 - abs(dx + FORAMEN_X_MM) / 6),
        )
        image = layers["base"][0].copy()
        for name in ("body", "canal", "posterior", "left", "right"):
            if weights[name] > 0:
                value, alpha = layers[name]
                a = alpha * weights[name]
                image += a * (value - image)
        position = (float(slice_x[i]), float(y_left), float(z_top))
        paths.append(_write_image(folder, instances[i], image, bias, rng, acquisition, meta,
                                  position, (0, 1, 0, 0, 0, -1), spacing, gap))

    def pixel(u, v):
        y, z = anatomy.to_patient_sagittal(u, v)
        return (y - y_left) / spacing, (z_top - z) / spacing

    def nearest(x):
        return int(instances[int(np.argmin(np.abs(slice_x - x)))])

    points = []
    if description == SAGITTAL_T2:
        mid = nearest(anatomy.centre[0])
        for k, level in enumerate(LEVELS):
            c, r = pixel(0.8 + anatomy.canal_width / 2, anatomy.disc_v(k))
            points.append(("spinal_canal_stenosis", level, mid, c, r))
    else:
        for side, sign in (("left", 1), ("right", -1)):
            instance = nearest(anatomy.centre[0] + sign * FORAMEN_X_MM)
            for k, level in enumerate(LEVELS):
                c, r = pixel(5.0, anatomy.disc_v(k) + 3.5)
                points.append((f"{side}_neural_foraminal_narrowing", level, instance, c, r))
    return points, len(paths)


def _sagittal_layers(anatomy: _Anatomy, U, V, tissue, description) -> dict:
    W = anatomy.canal_width
    depth, H = anatomy.body_depth, anatomy.pitch - anatomy.disc_height
    t2 = description != SAGITTAL_T1
    zeros = np.zeros_like(U)

    base = np.full_like(U, tissue["soft"])
    _paint(base, _band(U, W + 9, anatomy.skin_u - 14), tissue["muscle"])
    _paint(base, _band(U, anatomy.skin_u - 14, anatomy.skin_u), tissue["fat"])
    _paint(base, _ramp((U - anatomy.skin_u) / 0.8), 0.0)

    body_v, body_a = zeros.copy(), zeros.copy()
    centres = [anatomy.disc_v(0) + anatomy.pitch * (j + 0.5) for j in (1, 0)]  # T12, L1
    centres += [anatomy.disc_v(k) - anatomy.pitch / 2 for k in range(5)]  # L2..S1
    for cv in centres:
        outer = _superellipse(U, V, -depth / 2, cv, depth / 2, H / 2)
        _layer(body_v, body_a, outer, tissue["cortex"])
        _layer(body_v, body_a, _superellipse(U, V, -depth / 2, cv, depth / 2 - 1.5, H / 2 - 1.5), tissue["bone"])
    for k, level in enumerate(LEVELS):
        worst = max(anatomy.severity[(c, level)] for c in CONDITIONS)
        disc = tissue["disc"] - (0.12 * worst if t2 else 0.0)  # degenerate discs dry out (dark on T2)
        vk = anatomy.disc_v(k)
        _layer(body_v, body_a, _ellipse(U, V, -depth / 2, vk, depth / 2 + 0.6, anatomy.disc_height / 2 + 0.8), disc)
        bulge = 0.6 * anatomy.shrink[("spinal_canal_stenosis", level)] * W
        if bulge > 0.3:
            _layer(body_v, body_a, _ellipse(U, V, 0.0, vk, bulge, anatomy.disc_height / 2 + 1.5), disc)
    _layer(body_v, body_a, _band(U, 0.0, 0.8) * _band(V, -150, 150), tissue["ligament"])

    # Thecal sac: CSF between the discs' posterior margin and the ligamentum flavum, narrowed
    # around each disc by that level's spinal canal stenosis.
    front = np.full_like(V, 0.8)
    back = np.full_like(V, 0.8 + W)
    for k, level in enumerate(LEVELS):
        loss = anatomy.shrink[("spinal_canal_stenosis", level)] * W
        bump = np.exp(-(((V - anatomy.disc_v(k)) / 5.5) ** 2))
        front += 0.6 * loss * bump
        back -= 0.4 * loss * bump
    canal_v, canal_a = zeros.copy(), zeros.copy()
    _layer(canal_v, canal_a, _band(U - back, 0.0, 2.5), tissue["ligament"])
    _layer(canal_v, canal_a, _ramp((U - front) / 0.7 + 0.5) * _ramp((back - U) / 0.7 + 0.5), tissue["csf"])

    post_v, post_a = zeros.copy(), zeros.copy()
    for cv in centres[:-1]:
        _layer(post_v, post_a, _ellipse(U, V, W + 17, cv - 3, 14, 7), tissue["cortex"])
        _layer(post_v, post_a, _ellipse(U, V, W + 17, cv - 3, 12.5, 5.5), tissue["bone"])

    layers = {"base": (base, None), "body": (body_v, body_a), "canal": (canal_v, canal_a),
              "posterior": (post_v, post_a)}
    for side in ("left", "right"):
        value, alpha = zeros.copy(), zeros.copy()
        _layer(value, alpha, _band(U, -1, 28) * _band(V, -140, 140), tissue["muscle"])
        for cv in centres[1:]:
            _layer(value, alpha, _ellipse(U, V, 4, cv + 2, 5.5, 7), tissue["cortex"])
            _layer(value, alpha, _ellipse(U, V, 4, cv + 2, 4.3, 5.8), tissue["bone"])
        for k, level in enumerate(LEVELS):
            vk = anatomy.disc_v(k)
            _layer(value, alpha, _ellipse(U, V, 19, vk + 2, 6, 9), tissue["bone"])
            keep = 1 - anatomy.shrink[(f"{side}_neural_foraminal_narrowing", level)]
            au, av = 4.6 * keep, 7.5 * keep
            _layer(value, alpha, _ellipse(U, V, 5.0, vk + 3.5, au, av), tissue["fat"])
            _layer(value, alpha, _ellipse(U, V, 5.0, vk + 3.5 + 0.45 * av, 1.5, 1.5), tissue["nerve"])
        layers[side] = (value, alpha)
    return layers


# --- axial series ------------------------------------------------------------------------------

def _render_axial(rng, anatomy: _Anatomy, acquisition, folder: Path, meta, levels, sides, config) -> tuple[list, int]:
    tissue = _TISSUE[AXIAL_T2]
    size = image_size(rng, config)
    fov = float(rng.uniform(160, 220))
    spacing = fov / size
    # Rows run posterior (+y), columns toward the patient's left (+x).
    x_left = anatomy.centre[0] + float(rng.uniform(-6, 6)) - fov / 2 + spacing / 2
    y_top = anatomy.centre[1] + float(rng.uniform(-25, -5)) - fov / 2 + spacing / 2
    cols = x_left + np.arange(size, dtype=np.float32) * spacing
    rows = y_top + np.arange(size, dtype=np.float32) * spacing
    X, Y = np.meshgrid(cols, rows)
    bias = _bias_field(rng, size, acquisition["bias"])
    gap = float(rng.uniform(3.5, 4.5))
    total = config.slice_counts[AXIAL_T2].draw(rng) if config.slice_counts else None
    if total is not None:  # a long series packs its slices closer: each level's stay within its segment
        gap = min(gap, 0.9 * anatomy.pitch / math.ceil(total / len(levels)))

    slices = []  # (z, level index, offset from the disc)
    for i, k in enumerate(levels):
        # The series' slices shared between its levels, or (without slice_counts) 3-5 through each disc.
        n_k = int(rng.integers(3, 6)) if total is None else total // len(levels) + int(i < total % len(levels))
        offsets = (np.arange(n_k) - (n_k - 1) / 2) * gap + float(rng.uniform(-0.8, 0.8))
        y_k, z_k = anatomy.to_patient_sagittal(0.0, anatomy.disc_v(k))
        slices += [(z_k + off, k, off, y_k) for off in offsets]
    slices.sort(key=lambda s: s[0])
    instances = _instance_numbers(rng, len(slices))
    c, s = math.cos(anatomy.twist), math.sin(anatomy.twist)

    renders = {}
    points = []
    for i, (z, k, offset, y_k) in enumerate(slices):
        if k not in renders:
            dx, dy = X - anatomy.centre[0], Y - y_k
            A, B = c * dx + s * dy, -s * dx + c * dy
            renders[k] = (_axial_section(anatomy, A, B, k, tissue, disc=True),
                          _axial_section(anatomy, A, B, k, tissue, disc=False))
        at_disc = _ramp((anatomy.disc_height / 2 - abs(offset)) / 1.5)
        image = at_disc * renders[k][0] + (1 - at_disc) * renders[k][1]
        position = (float(x_left), float(y_top), float(z))
        _write_image(folder, instances[i], image, bias, rng, acquisition, meta,
                     position, (1, 0, 0, 0, 1, 0), spacing, gap)
    for k in levels:
        nearest = min((abs(off), i) for i, (_, kk, off, _) in enumerate(slices) if kk == k)[1]
        y_k = slices[nearest][3]
        for side in sides:
            a = RECESS_A_MM if side == "left" else -RECESS_A_MM  # the patient's left is +x
            x = anatomy.centre[0] + c * a - s * RECESS_B_MM
            y = y_k + s * a + c * RECESS_B_MM
            points.append((f"{side}_subarticular_stenosis", LEVELS[k], int(instances[nearest]),
                           (x - x_left) / spacing, (y - y_top) / spacing))
    return points, len(slices)


def _axial_section(anatomy: _Anatomy, A, B, k: int, tissue, *, disc: bool) -> np.ndarray:
    """Cross-section at disc k (``disc``) or through the neighbouring bone; A lateral, B posterior."""
    level = LEVELS[k]
    loss = anatomy.shrink[("spinal_canal_stenosis", level)] if disc else 0.3 * anatomy.shrink[("spinal_canal_stenosis", level)]
    W = anatomy.canal_width * (1 - loss)
    depth = anatomy.body_depth
    image = np.zeros_like(A)
    _paint(image, _ellipse(A, B, 0, -10, 150, 110), tissue["fat"])
    _paint(image, _ellipse(A, B, 0, -10, 138, 98), tissue["soft"])
    lower = 1 + 0.12 * k  # psoas grows toward the sacrum
    for sign in (1, -1):
        _paint(image, _ellipse(A, B, sign * 33, -14, 12 * lower, 14 * lower), tissue["muscle"])
        _paint(image, _ellipse(A, B, sign * 25, 40, 18, 25), tissue["muscle"])
    if disc:
        worst = max(anatomy.severity[(c, level)] for c in CONDITIONS)
        _paint(image, _ellipse(A, B, 0, -depth / 2, 25, depth / 2 + 0.5), tissue["disc"] - 0.12 * worst)
    else:
        _paint(image, _ellipse(A, B, 0, -depth / 2, 24, depth / 2), tissue["cortex"])
        _paint(image, _ellipse(A, B, 0, -depth / 2, 22.5, depth / 2 - 1.5), tissue["bone"])
        for sign in (1, -1):
            _paint(image, _ellipse(A, B, sign * 14, 4, 4.5, 7), tissue["bone"])
    _paint(image, _ellipse(A, B, 0, 0.8 + W + 12, 4, 13), tissue["bone"])  # spinous process
    _paint(image, _ellipse(A, B, 0, 0.8 + W / 2 + 1.2, 12.5, W / 2 + 2.2), tissue["ligament"])
    _paint(image, _ellipse(A, B, 0, 0.8 + W / 2, 11, W / 2), tissue["csf"])
    for side, sign in (("left", 1), ("right", -1)):
        shrink = anatomy.shrink[(f"{side}_subarticular_stenosis", level)] if disc else 0.0
        facet_shift = 3.0 * shrink
        _paint(image, _ellipse(A, B, sign * (17.5 - facet_shift), 9, 6.5 + facet_shift, 7), tissue["bone"])
        keep = 1 - shrink
        _paint(image, _ellipse(A, B, sign * RECESS_A_MM, RECESS_B_MM, 3.2 * keep + 0.2, 2.8 * keep + 0.2), tissue["csf"])
        _paint(image, _ellipse(A, B, sign * RECESS_A_MM, RECESS_B_MM, 1.1 * keep, 1.1 * keep), tissue["nerve"])
    return image


# --- drawing helpers ---------------------------------------------------------------------------

def _ramp(t):
    """Linear ramp clipped to [0, 1] (soft, anti-aliased edges without an exp per pixel)."""
    return np.clip(t, 0.0, 1.0)


def _band(U, low, high, edge=0.7):
    return _ramp((U - low) / edge + 0.5) * _ramp((high - U) / edge + 0.5)


def _ellipse(U, V, cu, cv, au, av, edge=0.7):
    au, av = max(au, 1e-3), max(av, 1e-3)
    r = np.sqrt(((U - cu) / au) ** 2 + ((V - cv) / av) ** 2)
    return _ramp(0.5 - (r - 1) * min(au, av) / edge)


def _superellipse(U, V, cu, cv, au, av, edge=0.7):
    r = ((((U - cu) / au) ** 4) + (((V - cv) / av) ** 4)) ** 0.25
    return _ramp(0.5 - (r - 1) * min(au, av) / edge)


def _paint(image, mask, value):
    image += mask * (value - image)


def _layer(value, alpha, mask, tissue_value):
    value += mask * (tissue_value - value)
    np.maximum(alpha, mask, out=alpha)


def sequence_tags(description: str, rng: np.random.Generator) -> dict:
    """The acquisition tags a scanner writes for a series of this type (timings in ms): a T2 or STIR
    sagittal, a T1 sagittal, a T2 axial, with the spread of clinical protocols. Drawn from a generator
    of the series' own, so that the images do not change with them."""
    if description == SAGITTAL_T2 and rng.random() < 0.3:  # STIR: inversion recovery, short TI
        tags = dict(ScanningSequence=["SE", "IR"], RepetitionTime=rng.uniform(3500, 5500),
                    EchoTime=rng.uniform(35, 70), InversionTime=rng.uniform(140, 230))
    elif description == SAGITTAL_T1:
        tags = dict(ScanningSequence="SE", RepetitionTime=rng.uniform(400, 750), EchoTime=rng.uniform(8, 16))
    else:  # a T2 turbo spin echo, sagittal or axial
        tags = dict(ScanningSequence="SE", RepetitionTime=rng.uniform(2500, 5000), EchoTime=rng.uniform(85, 120))
    return {"ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"], "MRAcquisitionType": "2D",
            **{k: round(v, 1) if isinstance(v, float) else v for k, v in tags.items()}}


def _bias_field(rng, size, amplitude):
    coarse = rng.uniform(-1, 1, size=(4, 4)).astype(np.float32)
    smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return 1.0 + amplitude * smooth / max(1e-6, float(np.abs(smooth).max()))


def _instance_numbers(rng, n) -> np.ndarray:
    """InstanceNumbers in position order: usually 1..n, sometimes reversed, offset or with gaps."""
    numbers = np.arange(1, n + 1)
    if rng.random() < 0.15:
        numbers = numbers + int(rng.integers(1, 40))
    if rng.random() < 0.15:
        numbers = np.cumsum(rng.integers(1, 3, size=n)) + numbers[0] - 1
    if rng.random() < 0.5:
        numbers = numbers[::-1]
    return numbers


def _write_image(folder, instance, image, bias, rng, acquisition, meta, position, orientation, spacing, thickness):
    sigma = acquisition["noise"]
    signal = image * bias
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imag * imag) * acquisition["scale"]  # Rician noise
    top = 2 ** acquisition["bits"] - 1
    stored = np.clip(np.round((magnitude - acquisition["intercept"]) / acquisition["slope"]), 0, top).astype(np.uint16)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    sop_uid = _uid(meta["series_uid"], int(instance))
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = meta["study_uid"]
    ds.SeriesInstanceUID = meta["series_uid"]
    ds.FrameOfReferenceUID = meta["frame_uid"]
    ds.Modality = "MR"
    ds.PatientName = "Anonymous"
    ds.PatientID = ""
    ds.BodyPartExamined = "LSPINE"
    ds.SeriesDescription = meta["description"]
    for keyword, value in meta["sequence"].items():
        setattr(ds, keyword, value)
    ds.SeriesNumber = meta["series_number"]
    ds.InstanceNumber = int(instance)
    ds.ImagePositionPatient = [round(v, 4) for v in position]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [round(spacing, 6), round(spacing, 6)]
    ds.SliceThickness = round(thickness * 0.9, 3)
    ds.SpacingBetweenSlices = round(thickness, 3)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = acquisition["bits"]
    ds.HighBit = acquisition["bits"] - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = acquisition["slope"]
    ds.RescaleIntercept = acquisition["intercept"]
    ds.RescaleType = "US"
    centre = float(acquisition["scale"]) * 0.5
    ds.WindowCenter = round(centre, 1)
    ds.WindowWidth = round(2 * centre, 1)
    ds.PixelData = stored.tobytes()
    path = folder / f"{int(instance)}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _uid(*parts) -> str:
    return generate_uid(entropy_srcs=["spinemri-phantom", *map(str, parts)])


def _unique_ids(rng, n) -> list[int]:
    ids: list[int] = []
    seen = set()
    while len(ids) < n:
        for value in rng.integers(1_000_000, 4_294_967_295, size=n).tolist():
            if value not in seen and len(ids) < n:
                seen.add(value)
                ids.append(value)
    return ids


def _ar1(rng, n):
    out = np.empty(n)
    out[0] = rng.standard_normal()
    for i in range(1, n):
        out[i] = _LEVEL_RHO * out[i - 1] + math.sqrt(1 - _LEVEL_RHO**2) * rng.standard_normal()
    return out


_THRESHOLDS: dict = {}


def _thresholds(prior: tuple[float, float, float]) -> tuple[float, float]:
    """Latent cut points whose level-averaged exceedance matches P(>= Moderate) and P(Severe)."""
    if prior not in _THRESHOLDS:
        normal = NormalDist()

        def solve(target):
            lo, hi = -6.0, 6.0
            for _ in range(60):
                mid = (lo + hi) / 2
                share = float(np.mean([1 - normal.cdf(mid - shift) for shift in _LEVEL_SHIFT]))
                lo, hi = (mid, hi) if share > target else (lo, mid)
            return (lo + hi) / 2

        _THRESHOLDS[prior] = (solve(prior[1] + prior[2]), solve(prior[2]))
    return _THRESHOLDS[prior]


def _replace_dir(staging: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = staging_path(target)  # a leftover of a kill right here is removed like any staging folder
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _progress(iterable, total, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="phantom studies", unit="study")
