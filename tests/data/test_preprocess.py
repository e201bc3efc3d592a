"""Preprocessing: windowing, ROI crop in millimetres, aspect ratio, channels, equalisation, validation."""

from __future__ import annotations

import numpy as np
import pytest

from spinemri.data.preprocess import (PreprocessConfig, _fast_percentiles, neighbor_indices, percentile_window, preprocess,
                                      stack_neighbours, with_centre)


def _dot_image(shape=(200, 300), dot=(120.0, 80.0), radius=3):
    """Dark image with one bright disk at dot=(x, y)."""
    rows, cols = np.indices(shape)
    image = np.zeros(shape, np.float32)
    image[(cols - dot[0]) ** 2 + (rows - dot[1]) ** 2 <= radius**2] = 1000.0
    image += np.linspace(0, 5, shape[1], dtype=np.float32)  # not flat, so the window is defined
    return image


def _centroid(channel: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(channel.shape)
    weights = channel.astype(np.float64)
    weights[weights < 128] = 0
    return float((cols * weights).sum() / weights.sum()), float((rows * weights).sum() / weights.sum())


def test_roi_is_centred_on_the_site_and_sized_in_millimetres():
    config = PreprocessConfig(img_size=64, mode="roi", roi_mm=32.0, p_low=0.0, p_high=100.0)
    out = preprocess([_dot_image()], (0.5, 0.5), config, x=120, y=80)
    assert out.shape == (64, 64, 1) and out.dtype == np.uint8
    cx, cy = _centroid(out[..., 0])
    assert cx == pytest.approx(31.5, abs=0.6) and cy == pytest.approx(31.5, abs=0.6)
    # 32 mm at 0.5 mm/px = 64 px -> 1:1; a 3 px radius disk keeps its ~28 px area.
    assert 20 <= (out[..., 0] > 128).sum() <= 40
    # At 1 mm/px the same ROI covers 32 px, shown twice as large.
    bigger = preprocess([_dot_image()], (1.0, 1.0), config, x=120, y=80)
    assert (bigger[..., 0] > 128).sum() > 3 * (out[..., 0] > 128).sum()


def test_off_centre_site_moves_the_structure_and_borders_pad_with_zero():
    config = PreprocessConfig(img_size=64, roi_mm=64.0, p_low=0.0, p_high=100.0)
    out = preprocess([_dot_image()], (1.0, 1.0), config, x=130, y=80)  # dot 10 px left of centre
    cx, _ = _centroid(out[..., 0])
    assert cx == pytest.approx(21.5, abs=0.7)
    corner = preprocess([_dot_image()], (1.0, 1.0), config, x=0, y=0)
    assert corner[:20, :20].max() == 0  # outside the image


def test_anisotropic_pixels_keep_the_physical_aspect():
    # A disk 10 mm across, sampled at 0.5 mm rows x 1 mm columns, looks like an ellipse in pixels.
    rows, cols = np.indices((200, 100))
    image = (((cols - 50) * 1.0) ** 2 + ((rows - 100) * 0.5) ** 2 <= 25).astype(np.float32) * 100
    out = preprocess([image], (0.5, 1.0), PreprocessConfig(img_size=64, roi_mm=40.0, p_low=0, p_high=100), 50, 100)
    mask = out[..., 0] > 128
    height = np.ptp(np.nonzero(mask)[0]) + 1
    width = np.ptp(np.nonzero(mask)[1]) + 1
    assert abs(height - width) <= 2


def test_slice_mode_letterboxes_the_whole_slice():
    image = np.full((100, 200), 50.0, np.float32)
    image[0, 0] = 0
    out = preprocess([image], (1.0, 1.0), PreprocessConfig(img_size=64, mode="slice", p_low=0, p_high=100))
    assert out.shape == (64, 64, 1)
    assert out[:14, :, 0].max() == 0 and out[-14:, :, 0].max() == 0  # padding above and below
    assert out[32, 5:59, 0].min() == 255


def test_percentile_window_is_robust_to_outliers():
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (128, 128)).astype(np.float32)
    image[0, 0] = 1e6
    low, high = percentile_window(image, 0.5, 99.5)
    assert 60 < low < 90 and 110 < high < 140
    out = preprocess([image], (1.0, 1.0), PreprocessConfig(img_size=32, mode="slice"))
    assert 100 < out.mean() < 155  # not crushed to black by the outlier


def test_three_channels_follow_the_neighbours():
    slices = [np.full((64, 64), v, np.float32) for v in (10.0, 20.0, 30.0)]
    for s in slices:
        s[0, 0] = 0.0
        s[-1, -1] = 40.0
    out = preprocess(slices, (1.0, 1.0), PreprocessConfig(img_size=32, slices=3, roi_mm=20, p_low=0, p_high=100))
    means = out[8:24, 8:24].reshape(-1, 3).mean(axis=0)
    assert means[0] < means[1] < means[2]
    assert neighbor_indices(0, 5, 3) == [0, 0, 1]
    assert neighbor_indices(4, 5, 3) == [3, 4, 4]
    assert neighbor_indices(2, 5, 1) == [2]
    assert neighbor_indices(1, 6, 5) == [0, 0, 1, 2, 3]
    assert stack_neighbours(1, 6, 5) == [0, 0, 2, 3]  # the stack without the site's slice
    assert with_centre("c", ["a", "b", "d", "e"], 5) == ["a", "b", "c", "d", "e"]
    assert with_centre("c", [], 5) == ["c"] * 5
    with pytest.raises(ValueError, match="a 5-slice stack needs 4 neighbouring slices, got 2"):
        with_centre("c", ["b", "d"], 5)


def test_models_logged_before_2_5d_stacks_still_load_their_preprocessing():
    legacy = {**PreprocessConfig(img_size=32).to_dict(), "channels": 3}
    del legacy["slices"]
    config = PreprocessConfig.from_dict(legacy)
    assert config.slices == config.channels == 3


@pytest.mark.parametrize("method", ["hist", "clahe"])
def test_equalisation_spreads_a_narrow_histogram(method):
    rng = np.random.default_rng(1)
    image = rng.normal(100, 2, (96, 96)).astype(np.float32)
    image[0, 0], image[-1, -1] = 0, 400  # window wider than the content
    plain = preprocess([image], (1, 1), PreprocessConfig(img_size=64, mode="slice", p_low=0, p_high=100))
    equalised = preprocess([image], (1, 1), PreprocessConfig(img_size=64, mode="slice", p_low=0, p_high=100,
                                                             equalize=method))
    assert equalised.std() > 2 * plain.std()


@pytest.mark.parametrize("kwargs, message", [
    (dict(img_size=0), "img_size"),
    (dict(mode="cube"), "mode must be one of roi, slice"),
    (dict(roi_mm=-5), "roi_mm"),
    (dict(slices=2), "slices must be an odd number from 1 to 15"),
    (dict(slices=17), "slices must be an odd number from 1 to 15"),
    (dict(p_low=50, p_high=10), "p_low < p_high"),
    (dict(equalize="yes"), "equalize"),
])
def test_bad_configuration_names_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**kwargs)


def test_bad_inputs_are_refused():
    config = PreprocessConfig(img_size=32)
    with pytest.raises(ValueError, match="outside the 64x64 image"):
        preprocess([np.ones((64, 64), np.float32)], (1, 1), config, x=100, y=10)
    with pytest.raises(ValueError, match="expected 1 slice"):
        preprocess([np.ones((64, 64))] * 3, (1, 1), config)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        preprocess([np.ones((0, 64))], (1, 1), config)
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessConfig.from_dict({"img_size": 32, "colour": True})
    assert PreprocessConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_percentile_window_equals_numpy_percentile_on_integer_and_other_images(dtype):
    # The histogram paths must give np.percentile's values bit for bit, so that cached tensors and
    # served inputs do not depend on which path computed the window.
    rng = np.random.default_rng(3)
    specials = np.array([-0.0, 0.0, 1.5, -np.inf, np.inf, 3e38, -3e38, -1e-40, 1e-45, 7.0])
    for trial in range(600):
        shape = tuple(rng.integers(1, 120, 2))
        image = rng.integers(-2000, rng.choice([2, 40, 4096, 60000]), shape).astype(dtype)
        if trial % 5 == 0:
            image = image * 0.37  # non-integer (a RescaleSlope): the float32 radix path
        elif trial % 5 == 1 and trial % 3 == 0:
            image = rng.normal(0, rng.choice([1e-3, 1, 1e4]), shape).astype(dtype)
        elif trial % 5 == 1:
            image = rng.choice(specials, shape).astype(dtype)  # signed zeros, infinities, subnormals, ties
        if trial % 7 == 0:
            image[0, 0] = np.nan
        p_low, p_high = sorted(rng.uniform(0, 100, 2)) if trial % 2 else (0.5, 99.5)
        with np.errstate(invalid="ignore"):
            expected = np.percentile(image, [p_low, p_high])
            got = _fast_percentiles(image, p_low, p_high)
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == expected.dtype


def test_the_window_from_stored_integers_equals_numpy_percentile_of_the_rescaled_image():
    # What the cache does for a DICOM slice: order statistics of the stored integers, rescaled.
    # The result must be np.percentile of the float32 image bit for bit (serving computes that).
    from spinemri.data.dicom import rescale

    rng = np.random.default_rng(11)
    for trial in range(400):
        dtype = rng.choice([np.uint16, np.int16, np.uint8])
        info = np.iinfo(dtype)
        top = int(rng.choice([1, 50, 1500, 4095, 9000, info.max]))
        low = 0 if dtype != np.int16 else -int(rng.choice([0, 7, 1024]))
        stored = rng.integers(max(low, info.min), min(top, info.max) + 1, tuple(rng.integers(1, 150, 2))).astype(dtype)
        slope, intercept = [(1.0, 0.0), (2.5, -1024.25), (0.3791, 0.0), (1.0, -1024.0), (0.0, 5.0),
                            (7.77e-3, 12.5)][trial % 6]
        image = rescale(stored, slope, intercept)
        p_low, p_high = sorted(rng.uniform(0, 100, 2)) if trial % 2 else (0.5, 99.5)
        expected = np.percentile(image, [p_low, p_high])
        got = _fast_percentiles(image, p_low, p_high, stored=(stored, slope, intercept))
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == expected.dtype
        assert percentile_window(image, p_low, p_high, stored=(stored, slope, intercept)) == \
            percentile_window(image, p_low, p_high)


def test_a_decoded_slice_carries_the_integers_its_pixels_came_from(phantom_dir):
    from spinemri.data.dicom import read_image, rescale

    rescaled = 0
    for path in sorted(phantom_dir.rglob("*.dcm"))[::7]:
        image = read_image(path)
        integers, slope, intercept = image.stored
        np.testing.assert_array_equal(rescale(integers, slope, intercept), image.pixels)
        rescaled += slope != 1
    assert rescaled, "the phantom should have slices with a RescaleSlope"


def test_the_uint8_conversion_rounds_half_to_even_as_numpy_does():
    # preprocess() converts with cv2.convertScaleAbs; the reference is np.round(v * 255) on the same
    # resampled float32 values, for sites anywhere, grey levels with exact halves, and 3 channels.
    from spinemri.data.preprocess import _resample, _source_region

    rng = np.random.default_rng(8)
    levels = rng.integers(0, 511, (90, 120)).astype(np.float32)  # (k + 0.5) / 255 steps after windowing
    for image in (rng.normal(500, 150, (90, 120)).astype(np.float32), levels):
        for channels in (1, 3):
            config = PreprocessConfig(img_size=40, roi_mm=25, slices=channels)
            low, high = percentile_window(image, config.p_low, config.p_high)
            stack = [image * 0.9, image, image * 1.1][:channels] if channels == 3 else [image]
            for x, y in [(60, 45), (0, 0), (119, 89), (33.3, 70.6)]:
                got = preprocess(stack, (0.5, 0.5), config, x, y, window=(low, high))
                extent = (25 / 0.5, 25 / 0.5)
                (cx, cy), region = _source_region(image.shape, (x, y), extent, 40)
                for c, slice_ in enumerate(stack):
                    windowed = np.subtract(slice_[region], low, dtype=np.float32)
                    windowed /= high - low
                    np.clip(windowed, 0.0, 1.0, out=windowed)
                    expected = np.round(_resample(windowed, (cx, cy), extent, 40) * 255.0).astype(np.uint8)
                    np.testing.assert_array_equal(got[..., c], expected)
                assert got.shape == (40, 40, channels) and got.dtype == np.uint8


def test_an_roi_is_windowed_on_its_own_crop_with_the_whole_slice_result():
    """preprocess windows only the pixels an ROI reads; the result is that of windowing the whole
    slice first (to within one grey level where the resampler rounds coordinates differently),
    for sites in the middle, at the edges and in the corners."""
    from spinemri.data.preprocess import _resample

    rng = np.random.default_rng(5)
    image = rng.normal(500, 120, (150, 200)).astype(np.float32)
    config = PreprocessConfig(img_size=48, roi_mm=30)
    window = percentile_window(image, config.p_low, config.p_high)
    for x, y in [(100, 75), (0, 0), (199, 149), (3, 140), (190, 8), (57.3, 91.8)]:
        got = preprocess([image], (0.5, 0.7), config, x, y, window=window)[..., 0]
        whole = np.clip((image - window[0]) / (window[1] - window[0]), 0, 1).astype(np.float32)
        expected = np.round(_resample(whole, (x, y), (30 / 0.7, 30 / 0.5), 48) * 255).astype(np.uint8)
        diff = np.abs(got.astype(int) - expected.astype(int))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.01 * diff.size, (x, y)
        assert (got[expected == 0] <= 1).all()  # zero padding outside the image stays zero
