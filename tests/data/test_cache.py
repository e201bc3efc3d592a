"""The preprocessed cache: contents, reuse, invalidation, bad files, and a prepare killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinemri.data import schema
from spinemri.data.cache import PrepareError, prepare
from spinemri.data.dicom import read_image
from spinemri.data.preprocess import PreprocessConfig, preprocess
from spinemri.data.readers import load_samples

SMALL = PreprocessConfig(img_size=32, roi_mm=50.0)


def _finished(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if (p / "manifest.json").is_file()) if cache_dir.exists() else []


def test_cache_holds_one_uint8_tensor_per_sample(phantom_dir, cache_dir):
    dataset = prepare(phantom_dir, SMALL, cache_dir=cache_dir)
    samples = load_samples(phantom_dir)
    images = dataset.images()
    assert isinstance(images, np.memmap) and images.dtype == np.uint8
    assert images.shape == (len(samples), 32, 32, 1)
    cached = dataset.samples()
    assert len(cached) == len(samples) == dataset.manifest["samples"]
    assert cached["index"].is_unique
    assert all(images[i].std() > 0 for i in cached["index"])  # every row was written
    assert not dataset.reused and dataset.config == SMALL
    assert (dataset.path / "splits_seed0_80-10-10.csv").is_file()


@pytest.mark.parametrize("slices", [3, 5])
def test_cached_tensor_is_exactly_what_preprocess_gives(phantom_dir, cache_dir, slices):
    """A 2.5D stack in the cache: the site's slice in the middle and its neighbours in series order."""
    config = PreprocessConfig(img_size=48, roi_mm=40.0, slices=slices)
    dataset = prepare(phantom_dir, config, cache_dir=cache_dir)
    row = dataset.samples().iloc[7]
    path = phantom_dir / row["path"]
    folder = sorted(path.parent.glob("*.dcm"))
    from spinemri.data.dicom import series_order
    from spinemri.data.preprocess import neighbor_indices

    order = [p for _, p, _ in series_order(folder)]
    centre = order.index(str(path))
    stack = [read_image(order[i]) for i in neighbor_indices(centre, len(order), slices)]
    expected = preprocess([s.pixels for s in stack], stack[slices // 2].pixel_spacing, config, row["x"], row["y"])
    assert expected.shape == (48, 48, slices)
    np.testing.assert_array_equal(dataset.images()[row["index"]], expected)
    single = prepare(phantom_dir, PreprocessConfig(img_size=48, roi_mm=40.0, slices=1), cache_dir=cache_dir)
    np.testing.assert_array_equal(dataset.images()[row["index"]][..., slices // 2], single.images()[row["index"]][..., 0])


def test_same_command_reuses_and_changes_rebuild(phantom_copy, cache_dir):
    first = prepare(phantom_copy, SMALL, cache_dir=cache_dir)
    again = prepare(phantom_copy, SMALL, cache_dir=cache_dir)
    assert again.reused and again.path == first.path
    other_size = prepare(phantom_copy, PreprocessConfig(img_size=40, roi_mm=50.0), cache_dir=cache_dir)
    assert other_size.path != first.path and not other_size.reused

    # A changed labelled image (rewritten: new mtime) gives a new fingerprint.
    dicom = Path(load_samples(phantom_copy)["path"].iloc[0])
    dicom.write_bytes(dicom.read_bytes())
    os.utime(dicom, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert prepare(phantom_copy, SMALL, cache_dir=cache_dir).path != first.path

    # So does a changed label.
    train = pd.read_csv(phantom_copy / schema.TRAIN_CSV)
    column = schema.LABEL_COLUMNS[0]
    train.loc[0, column] = "Severe" if train.loc[0, column] != "Severe" else "Moderate"
    train.to_csv(phantom_copy / schema.TRAIN_CSV, index=False)
    relabelled = prepare(phantom_copy, SMALL, cache_dir=cache_dir)
    assert not relabelled.reused
    assert len(_finished(cache_dir)) == 4


def test_other_split_seed_reuses_the_tensors(phantom_dir, cache_dir):
    first = prepare(phantom_dir, SMALL, cache_dir=cache_dir)
    second = prepare(phantom_dir, SMALL, cache_dir=cache_dir, split_seed=5, split_fractions=(0.6, 0.2, 0.2))
    assert second.reused and second.path == first.path
    assert (first.path / "splits_seed5_60-20-20.csv").is_file()
    with_split = second.samples_with_split((0.6, 0.2, 0.2), 5)
    assert set(with_split["split"]) == {"train", "val", "test"}
    assert (with_split.groupby("study_id")["split"].nunique() == 1).all()


def test_bad_file_stops_by_default_and_leaves_nothing(phantom_copy, cache_dir):
    samples = load_samples(phantom_copy)
    bad = Path(samples["path"].iloc[3])
    bad.write_bytes(b"garbage" * 50)
    with pytest.raises(PrepareError, match=f"{bad.name} is not a DICOM file.*--on-bad-file=skip"):
        prepare(phantom_copy, SMALL, cache_dir=cache_dir)
    assert list(cache_dir.iterdir()) == []  # neither a finished nor a partial cache


def test_bad_file_skip_leaves_its_samples_out_and_lists_them(phantom_copy, cache_dir):
    samples = load_samples(phantom_copy)
    bad = Path(samples["path"].iloc[3])
    bad.write_bytes(b"garbage" * 50)
    affected = int((samples["path"] == str(bad)).sum())
    dataset = prepare(phantom_copy, SMALL, cache_dir=cache_dir, on_bad_file="skip", workers=2)
    assert dataset.manifest["samples"] == len(samples) - affected
    skipped = dataset.manifest["skipped"]
    assert {s["path"] for s in skipped} == {str(bad)}
    assert sum(len(s["rows"]) for s in skipped) == affected
    assert str(bad.relative_to(phantom_copy)) not in set(dataset.samples()["path"])


def test_workers_give_the_same_cache(phantom_dir, tmp_path):
    one = prepare(phantom_dir, SMALL, cache_dir=tmp_path / "one", workers=1)
    two = prepare(phantom_dir, SMALL, cache_dir=tmp_path / "two", workers=2)
    assert one.fingerprint == two.fingerprint
    np.testing.assert_array_equal(one.images(), two.images())


def test_empty_or_missing_dataset_is_refused(tmp_path, cache_dir):
    from spinemri.errors import DatasetError

    with pytest.raises(DatasetError, match="does not exist"):
        prepare(tmp_path / "nowhere", SMALL, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="on_bad_file"):
        prepare(tmp_path, SMALL, cache_dir=cache_dir, on_bad_file="ignore")


def test_killed_prepare_leaves_no_finished_cache_and_a_rerun_completes(phantom_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    slow = ["--img-size", "384", "--slices", "3", "--equalize", "clahe"]
    command = [sys.executable, "-m", "spinemri", "data", "prepare", str(phantom_dir), "--cache-dir", str(cache_dir), *slow]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(cache_dir.glob("*.partial-*")):
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.01)
    time.sleep(0.3)  # well inside the build, which takes seconds
    assert process.poll() is None, "prepare finished before it could be killed; the test needs a slower build"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert _finished(cache_dir) == []
    assert list(cache_dir.glob("*.partial-*")), "the killed run should have left its partial folder"

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    finished = _finished(cache_dir)
    assert len(finished) == 1
    assert not list(cache_dir.glob("*.partial-*"))  # the stale partial was cleaned up
    reference = prepare(phantom_dir, PreprocessConfig(img_size=384, slices=3, equalize="clahe"),
                        cache_dir=tmp_path / "reference")
    assert reference.fingerprint == finished[0].name
    np.testing.assert_array_equal(np.load(finished[0] / "images.npy", mmap_mode="r"), reference.images())


def children(pid: int) -> list[int]:
    """The processes ``pid`` started that are still running (zombies count as ended)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return [c for c in found if running(c)]


def running(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split()[1]


def kill_when_workers_run(command: list[str], workers: int) -> list[int]:
    """Start ``command``, SIGKILL it as soon as it has ``workers`` worker processes; returns their pids."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(children(process.pid)) < workers:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.005)
    found = children(process.pid)
    assert len(found) >= workers, "the command finished before its workers could be seen"
    process.send_signal(signal.SIGKILL)
    process.wait()
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_prepare_workers_die_with_a_killed_parent_and_its_partial_is_removed_later(phantom_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    command = [sys.executable, "-m", "spinemri", "data", "prepare", str(phantom_dir), "--cache-dir", str(cache_dir),
               "--img-size", "384", "--slices", "3", "--equalize", "clahe", "--workers", "2"]
    workers = kill_when_workers_run(command, 2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(running(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if running(pid)], "worker processes outlived their killed parent"
    assert list(cache_dir.glob("*.partial-*")), "the killed run should have left its staging folder"
    # Another preprocessing (another fingerprint) removes it too.
    prepare(phantom_dir, SMALL, cache_dir=cache_dir)
    assert not list(cache_dir.glob("*.partial-*"))


def test_prepare_blames_the_label_row_for_a_point_outside_the_image(phantom_copy, cache_dir):
    coords_csv = phantom_copy / schema.COORDINATES_CSV
    frame = pd.read_csv(coords_csv)
    frame.loc[3, ["x", "y"]] = [99999.0, -500.0]
    frame.to_csv(coords_csv, index=False)
    with pytest.raises(PrepareError) as info:
        prepare(phantom_copy, SMALL, cache_dir=cache_dir)
    message = str(info.value)
    assert message.startswith(f"{coords_csv} row 5: the labelled site (99999.0, -500.0) lies outside the "), message
    assert "fix the coordinate or drop the row" in message
    skipped = prepare(phantom_copy, SMALL, cache_dir=cache_dir, on_bad_file="skip")
    assert skipped.manifest["samples"] == len(frame) - 1
    assert skipped.manifest["skipped"][0]["label"] == f"{coords_csv} row 5"
