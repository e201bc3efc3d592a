"""The severity output: per site (25 x 3, read at the row's site) or single, both starting at the training prior."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest

from spinemri.data.schema import SITES, site_index
from spinemri.metrics.prior import prior_from_samples, prior_grid
from spinemri.models.network import SiteCrossentropy, build_model, is_per_site, site_accuracy, start_at_prior
from spinemri.models.severity import severity_at


def _samples(rng: np.random.Generator, n: int = 300) -> pd.DataFrame:
    sites = [SITES[i] for i in rng.integers(0, len(SITES), n)]
    return pd.DataFrame({"condition": [c for c, _ in sites], "level": [lv for _, lv in sites],
                         "severity": pd.array(rng.choice(3, n, p=[0.7, 0.2, 0.1]), dtype="Int64")})


@pytest.mark.parametrize("head", ["per_site", "single"])
def test_the_prior_initialised_head_equals_the_prior_before_training(head):
    rng = np.random.default_rng(0)
    grid = prior_grid(prior_from_samples(_samples(rng)))
    prior = grid if head == "per_site" else grid.mean(axis=0) / grid.mean(axis=0).sum()
    model = build_model("tiny", 32, 1, dense_units=8, severity_head=head, severity_prior=prior)
    images = rng.uniform(0, 255, (6, 32, 32, 1)).astype(np.float32)
    severity = model.predict(images, verbose=0)["severity"]
    assert severity.shape == ((6, 25, 3) if head == "per_site" else (6, 3))
    assert np.abs(severity - prior[None]).max() < 1e-6
    assert is_per_site(model) == (head == "per_site")
    # the other heads are untouched by the prior: they still depend on the image
    assert model.predict(images, verbose=0)["condition"].std(axis=0).max() > 0


def test_a_prior_of_the_wrong_shape_is_refused():
    model = build_model("tiny", 32, 1, dense_units=8, severity_head="per_site")
    with pytest.raises(ValueError, match="does not fit the 75 outputs"):
        start_at_prior(model.get_layer("severity_sites"), np.full(3, 1 / 3))
    with pytest.raises(ValueError, match="severity_head must be one of"):
        build_model("tiny", 32, 1, severity_head="auto")


def test_the_site_loss_is_the_cross_entropy_at_the_rows_site():
    rng = np.random.default_rng(1)
    grid = rng.dirichlet([1, 1, 1], size=(4, 25)).astype(np.float32)
    sites, grades = np.array([0, 7, 24, -1]), np.array([1, 2, 0, 1])
    y = np.zeros((4, 25, 3), np.float32)
    for i, (site, grade) in enumerate(zip(sites, grades)):
        if site >= 0:
            y[i, site, grade] = 1.0
    per_row = SiteCrossentropy(reduction=None)(y, grid).numpy()
    expected = [-np.log(grid[i, s, g]) if s >= 0 else 0.0 for i, (s, g) in enumerate(zip(sites, grades))]
    assert per_row == pytest.approx(expected, rel=1e-5)
    smoothed = SiteCrossentropy(label_smoothing=0.3, reduction=None)(y, grid).numpy()
    at = grid[0, 0]
    assert smoothed[0] == pytest.approx(-(0.8 * np.log(at[1]) + 0.1 * np.log(at[0]) + 0.1 * np.log(at[2])), rel=1e-5)
    assert smoothed[3] == 0.0
    hits = site_accuracy(keras.ops.convert_to_tensor(y), keras.ops.convert_to_tensor(grid)).numpy()
    assert hits.tolist() == [float(grid[i, s].argmax() == g) if s >= 0 else 0.0
                             for i, (s, g) in enumerate(zip(sites, grades))]


def test_severity_is_read_at_the_site_a_row_names():
    grid = np.arange(2 * 25 * 3, dtype=np.float64).reshape(2, 25, 3)
    site = site_index("left_neural_foraminal_narrowing", "L4/L5")
    assert site == 8
    read = severity_at(grid, np.array([site, -1]))
    assert read[0].tolist() == grid[0, 8].tolist()
    assert read[1] == pytest.approx(grid[1].mean(axis=0))
    single = np.ones((2, 3)) / 3
    assert severity_at(single, np.array([-1, 3])) is single
    with pytest.raises(ValueError, match="3 sites for 2 rows"):
        severity_at(grid, np.array([0, 1, 2]))


def test_grad_cam_explains_a_per_site_output_at_each_images_site():
    from spinemri.models.gradcam import GradCamModel, gradcam

    rng = np.random.default_rng(2)
    model = build_model("tiny", 32, 1, dense_units=8, severity_head="per_site",
                        severity_prior=rng.dirichlet([1, 1, 1], size=25))
    model.get_layer("severity_sites").set_weights([rng.normal(0, 0.5, (8, 75)).astype(np.float32),
                                                   np.zeros(75, np.float32)])
    images = rng.uniform(0, 255, (3, 32, 32, 1)).astype(np.float32)
    sites = np.array([0, 12, 24])
    _, _, probabilities = GradCamModel(model, "severity")(images, sites)
    expected = severity_at(model.predict(images, verbose=0)["severity"], sites)
    assert np.asarray(probabilities) == pytest.approx(expected, abs=1e-5)
    maps = gradcam(model, images, "severity", sites=sites)
    assert maps.shape == (3, 32, 32) and np.isfinite(maps).all()
    with pytest.raises(ValueError, match="needs each image's site"):
        gradcam(model, images, "severity")
    assert gradcam(model, images, "level").shape == (3, 32, 32)  # the other heads need no site
