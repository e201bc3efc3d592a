"""The phantom's anatomy: vertebral bodies T12-S1, discs, the spinal canal, the neural foramina and the
subarticular recesses, shaped by a study's grades, and the tissue maps of a sagittal or axial section.
"""

from __future__ import annotations

from dataclasses import dataclass
import math

import numpy as np

from spinemri.data.schema import AXIAL_T2, CONDITIONS, LEVELS, SAGITTAL_T1, SAGITTAL_T2

FORAMEN_X_MM = 21.0  # distance of the neural foramina from the midline


RECESS_A_MM, RECESS_B_MM = 9.5, 2.2  # subarticular recess centre (lateral, posterior) at a disc


@dataclass(frozen=True)
class Anatomy:
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


def new_anatomy(rng: np.random.Generator, severity: dict) -> Anatomy:
    shrink = {}
    ranges = {0: (0.0, 0.12), 1: (0.42, 0.55), 2: (0.70, 0.82)}
    for key, grade in severity.items():
        shrink[key] = float(rng.uniform(*ranges[grade]))
    return Anatomy(
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


TISSUE = {  # relative signal of each tissue per sequence
    SAGITTAL_T1: dict(soft=0.32, fat=0.88, muscle=0.28, bone=0.62, cortex=0.12, disc=0.38, csf=0.10,
                      nerve=0.30, ligament=0.07),
    SAGITTAL_T2: dict(soft=0.30, fat=0.62, muscle=0.18, bone=0.42, cortex=0.08, disc=0.78, csf=0.96,
                      nerve=0.22, ligament=0.05),
}


TISSUE[AXIAL_T2] = TISSUE[SAGITTAL_T2]


def sagittal_layers(anatomy: Anatomy, U, V, tissue, description) -> dict:
    W = anatomy.canal_width
    depth, H = anatomy.body_depth, anatomy.pitch - anatomy.disc_height
    t2 = description != SAGITTAL_T1
    zeros = np.zeros_like(U)

    base = np.full_like(U, tissue["soft"])
    _paint(base, _band(U, W + 9, anatomy.skin_u - 14), tissue["muscle"])
    _paint(base, _band(U, anatomy.skin_u - 14, anatomy.skin_u), tissue["fat"])
    _paint(base, ramp((U - anatomy.skin_u) / 0.8), 0.0)

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
    _layer(canal_v, canal_a, ramp((U - front) / 0.7 + 0.5) * ramp((back - U) / 0.7 + 0.5), tissue["csf"])

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


def axial_section(anatomy: Anatomy, A, B, k: int, tissue, *, disc: bool) -> np.ndarray:
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


def ramp(t):
    """Linear ramp clipped to [0, 1] (soft, anti-aliased edges without an exp per pixel)."""
    return np.clip(t, 0.0, 1.0)


def _band(U, low, high, edge=0.7):
    return ramp((U - low) / edge + 0.5) * ramp((high - U) / edge + 0.5)


def _ellipse(U, V, cu, cv, au, av, edge=0.7):
    au, av = max(au, 1e-3), max(av, 1e-3)
    r = np.sqrt(((U - cu) / au) ** 2 + ((V - cv) / av) ** 2)
    return ramp(0.5 - (r - 1) * min(au, av) / edge)


def _superellipse(U, V, cu, cv, au, av, edge=0.7):
    r = ((((U - cu) / au) ** 4) + (((V - cv) / av) ** 4)) ** 0.25
    return ramp(0.5 - (r - 1) * min(au, av) / edge)


def _paint(image, mask, value):
    image += mask * (value - image)


def _layer(value, alpha, mask, tissue_value):
    value += mask * (tissue_value - value)
    np.maximum(alpha, mask, out=alpha)
