"""Stage 1 without training: site definitions, the slice frame, targets from labels, site choice."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spinemri.data import readers
from spinemri.data.dicom import read_series
from spinemri.data.preprocess import PreprocessConfig, preprocess
from spinemri.data.schema import CONDITIONS, LEVELS
from spinemri.localization.dataset import prepare_localizer, slice_targets, stack_positions
from spinemri.localization.locate import SeriesSlices, choose_sites, point_errors, summarize_errors
from spinemri.localization.sites import SERIES_TASKS, SliceFrame, get_task, site_of


def test_the_three_series_types_cover_each_competition_site_once():
    sites = [(c, lv) for task in SERIES_TASKS.values() for c, lv, *_ in task.sites]
    assert sorted(sites) == sorted((c, lv) for c in CONDITIONS for lv in LEVELS)
    assert [get_task(n).points for n in ("sagittal_t2", "sagittal_t1", "axial_t2")] == [5, 10, 2]
    assert site_of("left_subarticular_stenosis").name == "axial_t2"
    with pytest.raises(ValueError, match="choose one of sagittal_t2"):
        get_task("coronal")


@pytest.mark.parametrize("shape,spacing", [((120, 80), (0.5, 0.5)), ((64, 100), (0.8, 0.6))])
def test_slice_frame_maps_a_pixel_to_where_preprocess_draws_it(shape, spacing):
    """A bright dot at (x, y) lands at (u, v) * size in the slice-mode input."""
    frame = SliceFrame(shape[1], shape[0], *spacing)
    x, y = 0.7 * shape[1], 0.3 * shape[0]
    image = np.zeros(shape, np.float32)
    image[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2] = 1000.0
    config = PreprocessConfig(img_size=96, mode="slice", p_low=0, p_high=100)
    out = preprocess([image], spacing, config)[..., 0].astype(float)
    row, col = np.unravel_index(np.argmax(out), out.shape)
    u, v = frame.to_unit(int(x), int(y))
    assert abs(col + 0.5 - u * 96) <= 1.5 and abs(row + 0.5 - v * 96) <= 1.5
    back = frame.to_pixels(u, v)
    assert np.allclose(back, (int(x), int(y)))
    assert frame.distance_mm(0, 0, 3, 4) == pytest.approx(np.hypot(3 * spacing[1], 4 * spacing[0]))


def test_targets_point_at_the_labelled_slice_and_coordinates(phantom_dir, cache_dir):
    config = PreprocessConfig(img_size=48, mode="slice")
    for series in ("sagittal_t1", "axial_t2"):
        task = get_task(series)
        dataset, samples = prepare_localizer(phantom_dir, series, config, cache_dir=cache_dir)
        slices = dataset.slices()
        assert dataset.images().shape == (len(slices), 48, 48, 1)
        targets = slice_targets(slices, samples, task)
        truth = samples[samples["series_description"] == task.description]
        site = {(c, lv): (g, p) for c, lv, g, p in task.sites}
        for point in truth.itertuples(index=False):
            g, p = site[(point.condition, point.level)]
            row = np.flatnonzero((slices["study_id"] == point.study_id) & (slices["series_id"] == point.series_id)
                                 & (slices["instance_number"] == point.instance_number))[0]
            assert targets["slice_target"][row, g] == pytest.approx(1.0)
            assert targets["point_mask"][row, p] == 1.0
            frame = SliceFrame(*slices.loc[row, ["width", "height"]].astype(int), *slices.loc[row, ["row_mm", "col_mm"]])
            assert np.allclose(frame.to_pixels(*targets["points"][row, p]), (point.x, point.y), atol=1e-3)
        # Points are learnt only within one slice of their labelled slice.
        far = (targets["slice_target"].max(axis=1) < 0.1) & (targets["point_mask"].sum(axis=1) > 0)
        assert not far.any()
    assert prepare_localizer(phantom_dir, "axial_t2", config, cache_dir=cache_dir)[0].reused


def test_the_cache_rows_are_the_slices_in_position_order(phantom_dir, cache_dir):
    config = PreprocessConfig(img_size=32, mode="slice")
    dataset, _ = prepare_localizer(phantom_dir, "sagittal_t2", config, cache_dir=cache_dir)
    slices = dataset.slices()
    first = slices.groupby(["study_id", "series_id"]).head(100).iloc[0]
    series = slices[(slices["study_id"] == first["study_id"]) & (slices["series_id"] == first["series_id"])]
    stack = read_series(phantom_dir / "train_images" / str(first["study_id"]) / str(first["series_id"]))
    assert list(series["instance_number"]) == list(stack.instance_numbers)
    expected = preprocess([stack.pixels[3]], stack.pixel_spacing, config)
    assert np.array_equal(dataset.images()[series["index"].iloc[3]], expected)


def test_stack_positions_place_a_study_s_series_in_one_stack():
    up, down = (0.0, 0.0, 1.0), (0.0, 0.0, -1.0)
    upper = [(0.0, 0.0, 40.0 + 4 * i) for i in range(4)]  # L1/L2..L3/L4, in its own position order
    lower = [(0.0, 0.0, 4.0 * i) for i in range(5)]
    assert np.allclose(stack_positions([(5, lower, up)])[0][:, 0], [0, 0.25, 0.5, 0.75, 1])  # one series: its own place
    # Split by level: the lower series fills the bottom of the stack, the upper one the top.
    a, b = stack_positions([(4, upper, up), (5, lower, up)])
    assert np.allclose(a[:, 0], [5 / 8, 6 / 8, 7 / 8, 1]) and np.allclose(b[:, 0], [0, 1 / 8, 2 / 8, 3 / 8, 4 / 8])
    # A series whose normal points the other way: its slices come in the opposite order, same places.
    a, b = stack_positions([(4, upper, up), (5, lower[::-1], down)])
    assert np.allclose(b[:, 0], [4 / 8, 3 / 8, 2 / 8, 1 / 8, 0])
    # Split by side (the same levels twice): interleaved, still bottom to top.
    a, b = stack_positions([(5, lower, up), (5, lower, up)])
    assert np.allclose(np.sort(np.concatenate([a, b])[:, 0]), np.arange(10) / 9) and (np.abs(a - b) <= 1 / 9 + 1e-6).all()
    # Without geometry each series keeps its own 0..1.
    a, b = stack_positions([(4, None, None), (5, lower, up)])
    assert np.allclose(a[:, 0], np.arange(4) / 3) and np.allclose(b[:, 0], np.arange(5) / 4)


def test_the_cache_and_inference_give_a_slice_the_same_stack_position(phantom_dir, cache_dir):
    """Training reads a slice's stack position from the cache, a served study computes it from the
    decoded series: on a study with two axial series, locate() must find the sites that the model
    gives on the cached images with the cached positions (a real, untrained model)."""
    from spinemri.serving.localizer import SpineLocalizer
    from spinemri.localization.model import build_localizer

    config = PreprocessConfig(img_size=32, mode="slice")
    dataset, _ = prepare_localizer(phantom_dir, "axial_t2", config, cache_dir=cache_dir)
    slices = dataset.slices()
    per_study = slices.groupby("study_id")["series_id"].nunique()
    study = int(per_study[per_study == 2].index[0])  # the quirky phantom has studies with two axial series
    mine = slices[slices["study_id"] == study].sort_values(["series_id", "position"])
    assert sorted(mine["stack_position"]) == pytest.approx(np.arange(len(mine)) / (len(mine) - 1))

    task = get_task("axial_t2")
    localizer = SpineLocalizer()
    localizer.model = build_localizer("tiny", 32, 1, task, dense_units=16)
    localizer.meta = {"series": "axial_t2", "preprocess": config.to_dict()}
    series, points, scores = [], [], []
    for series_id, rows in mine.groupby("series_id", sort=True):
        images = np.asarray(dataset.images()[rows["index"].to_numpy()], np.float32)
        p, sc = localizer.outputs(images, rows["stack_position"].to_numpy(np.float32)[:, None])
        series.append(SeriesSlices(int(series_id), tuple(rows["instance_number"]),
                                   SliceFrame(*rows[["width", "height"]].iloc[0].astype(int),
                                              *rows[["row_mm", "col_mm"]].iloc[0])))
        points.append(p)
        scores.append(sc)
    expected = choose_sites(task, series, points, scores)
    stacks = [(int(s), read_series(phantom_dir / "train_images" / str(study) / str(s)))
              for s in sorted(mine["series_id"].unique(), reverse=True)]  # any order: locate sorts by series id
    got = localizer.locate(stacks)
    assert [(s.series_id, s.instance_number) for s in got] == [(s.series_id, s.instance_number) for s in expected]
    assert [s.slice_score for s in got] == pytest.approx([s.slice_score for s in expected], abs=1e-5)
    # The positions matter: each series' own 0..1 gives other scores.
    alone = [localizer.outputs(np.asarray(dataset.images()[rows["index"].to_numpy()], np.float32))[1]
             for _, rows in mine.groupby("series_id", sort=True)]
    assert not all(np.allclose(a, b, atol=1e-5) for a, b in zip(alone, scores))


def test_localizer_cache_refuses_roi_mode_and_flat_csv(phantom_dir, cache_dir, tmp_path):
    with pytest.raises(ValueError, match="mode must be 'slice'"):
        prepare_localizer(phantom_dir, "sagittal_t2", PreprocessConfig(mode="roi"), cache_dir=cache_dir)
    flat = tmp_path / "flat.csv"
    flat.write_text("study_id,series_id,instance_number,image_path,scan_type,condition,level,x,y,label,label_name\n")
    with pytest.raises(readers.DatasetError, match="needs whole series"):
        prepare_localizer(flat, "sagittal_t2", PreprocessConfig(mode="slice"), cache_dir=cache_dir)


def test_choose_sites_searches_every_series_of_the_type():
    task = get_task("axial_t2")
    frame = SliceFrame(100, 100, 1.0, 1.0)
    a = SeriesSlices(11, (1, 2, 3), frame)
    b = SeriesSlices(22, (7, 8), frame)
    scores_a = np.full((3, 5), 0.1)
    scores_b = np.full((2, 5), 0.1)
    scores_a[2, 0] = 0.9  # L1/L2 on series 11, slice 2
    scores_b[1, 4] = 0.8  # L5/S1 on series 22, slice 1
    points_a = np.full((3, 2, 2), 0.25)
    points_b = np.full((2, 2, 2), 0.75)
    sites = {(s.condition, s.level): s for s in choose_sites(task, [a, b], [points_a, points_b], [scores_a, scores_b])}
    assert len(sites) == 10
    assert (sites[("left_subarticular_stenosis", "L1/L2")].series_id, sites[("left_subarticular_stenosis", "L1/L2")].instance_number) == (11, 3)
    right = sites[("right_subarticular_stenosis", "L5/S1")]
    assert (right.series_id, right.instance_number, right.slice_index) == (22, 8, 1)
    assert (right.x, right.y) == pytest.approx(frame.to_pixels(0.75, 0.75))

    truth = pd.DataFrame([dict(study_id=1, series_id=22, instance_number=8, condition="right_subarticular_stenosis",
                               level="L5/S1", x=right.x + 3, y=right.y + 4),
                          dict(study_id=1, series_id=11, instance_number=1, condition="left_subarticular_stenosis",
                               level="L5/S1", x=10.0, y=10.0)])
    errors = point_errors(list(sites.values()), truth, {(1, 22): frame, (1, 11): frame},
                          {(1, 22, 7): 0, (1, 22, 8): 1, (1, 11, 1): 0})
    assert errors["error_mm"].iloc[0] == pytest.approx(5.0)
    assert errors["slice_ok"].tolist() == [True, False]  # the second was found on the other series
    summary = summarize_errors(errors)
    assert summary["within_5mm"] == 0.5 and summary["slice_accuracy"] == 0.5


def test_soft_argmax_returns_the_peak_cell_centre():
    from spinemri.localization.model import SoftArgmax

    logits = np.full((1, 4, 8, 2), -50.0, np.float32)
    logits[0, 1, 6, 0] = 50.0  # point 0 at row 1, column 6
    logits[0, 3, 0, 1] = 50.0  # point 1 at row 3, column 0
    out = np.asarray(SoftArgmax()(logits))
    assert out.shape == (1, 2, 2)
    assert out[0, 0] == pytest.approx([6.5 / 8, 1.5 / 4], abs=1e-4)
    assert out[0, 1] == pytest.approx([0.5 / 8, 3.5 / 4], abs=1e-4)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "densenet"])
def test_the_localizer_builds_on_registry_backbones_and_survives_saving(arch, tmp_path):
    import keras

    from spinemri.localization.model import build_localizer, point_loss, slice_loss

    task = get_task("sagittal_t1")
    model = build_localizer(arch, 64, 1, task, dense_units=8)
    batch = {"image": np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 1)).astype(np.float32),
             "position": np.array([[0.0], [1.0]], np.float32)}
    out = model.predict(batch, verbose=0)
    assert out["points"].shape == (2, 10, 2) and out["slice"].shape == (2, 2)
    assert ((out["points"] >= 0) & (out["points"] <= 1)).all()
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras", compile=False)
    assert np.allclose(again.predict(batch, verbose=0)["points"], out["points"], atol=1e-5)
    # Losses use only the labelled entries: an unlabelled point or group changes nothing.
    y_points = np.zeros((2, 10, 3), np.float32)
    y_points[0, 3] = (0.5, 0.5, 1.0)
    moved = y_points.copy()
    moved[1, 4, :2] = (0.9, 0.1)  # mask 0
    assert float(np.sum(point_loss(y_points, out["points"]))) == pytest.approx(float(np.sum(point_loss(moved, out["points"]))))
    y_slice = np.zeros((2, 2, 2), np.float32)
    y_slice[:, 0, 1] = 1.0  # group 0 labelled, group 1 not
    other = y_slice.copy()
    other[:, 1, 0] = 1.0
    assert np.allclose(slice_loss(y_slice, out["slice"]), slice_loss(other, out["slice"]))
