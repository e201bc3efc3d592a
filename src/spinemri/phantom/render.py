"""The phantom's acquisitions: which series a study has, their sizes and slice counts, and each slice
rendered from the anatomy with per-study nuisance (field of view, spacing, rotation, intensity, bias
field, Rician noise) and written as a DICOM file.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from spinemri.data.schema import AXIAL_T2, LEVELS, SAGITTAL_T1, SAGITTAL_T2
from spinemri.phantom.anatomy import FORAMEN_X_MM, RECESS_A_MM, RECESS_B_MM, TISSUE, Anatomy, axial_section, ramp, sagittal_layers
from spinemri.phantom.settings import PhantomConfig


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


def render_sagittal(rng, anatomy: Anatomy, acquisition, folder: Path, meta, config) -> tuple[list, int]:
    description = meta["description"]
    tissue = TISSUE[description]
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
    layers = sagittal_layers(anatomy, U, V, tissue, description)
    bias = _bias_field(rng, size, acquisition["bias"])

    instances = _instance_numbers(rng, n)
    paths = []
    for i in range(n):
        dx = slice_x[i] - anatomy.centre[0]
        weights = dict(
            body=ramp((24 - abs(dx)) / 3), canal=ramp((10 - abs(dx)) / 2.5), posterior=ramp((7 - abs(dx)) / 2.5),
            left=ramp(1 - abs(dx - FORAMEN_X_MM) / 6), right=ramp(1 - abs(dx + FORAMEN_X_MM) / 6),
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


def render_axial(rng, anatomy: Anatomy, acquisition, folder: Path, meta, levels, sides, config) -> tuple[list, int]:
    tissue = TISSUE[AXIAL_T2]
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
            renders[k] = (axial_section(anatomy, A, B, k, tissue, disc=True),
                          axial_section(anatomy, A, B, k, tissue, disc=False))
        at_disc = ramp((anatomy.disc_height / 2 - abs(offset)) / 1.5)
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
    sop_uid = uid(meta["series_uid"], int(instance))
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


def uid(*parts) -> str:
    return generate_uid(entropy_srcs=["spinemri-phantom", *map(str, parts)])
