"""The cost curve: every step of the pipeline on rsna-profile phantoms of growing size, fitted against
the number of DICOM files and extrapolated to the full RSNA 2024 training set (147,218 files).

For each size (default 20, 60 and 180 studies of `spinemri data synth --profile rsna`: the real
series lengths, image sizes of 256-1024 px, extra and missing series), each step runs as its own
process, one after the other, calling the library function behind its command. Each is measured
around that call (without the interpreter's start and imports) in wall seconds and in CPU seconds
(user + system, of the process and of its worker processes), and by its peak RSS (``ru_maxrss``
from ``wait4``: the largest of the step's processes, worker pools included):

* synth: `spinemri data synth --profile rsna`, with --workers processes;
* prepare: `spinemri data prepare --workers W`: the classifier's ROI cache (quick experiment at
  --img-size px);
* localizer_caches: the three localizers' slice caches (every slice of every series, 64 px), as
  `spinemri train --experiment localize` builds them, with W worker processes;
* train: one epoch of `spinemri train` (the tiny backbone at --img-size px, batch 32): the second
  of two epochs, validation included (the first also traces the model);
* predict: `spinemri predict-study` on every study of the phantom (finding the studies, reading and
  localizing every series, grading the 25 sites), with three localizers trained once (one epoch, on
  the smallest phantom) and the classifier trained on the smallest phantom; loading the four models
  is timed apart.

Each step's CPU seconds, wall seconds and the cache bytes are fitted as ``cost = c · files^k``
(least squares in log-log) and extrapolated to 147,218 files. Targets: every CPU-time exponent
k <= 1.05 (no step costs more than linearly in the data; CPU time, because wall time on a shared
machine follows its load); every step's peak RSS grows < 10 % from the smallest size to the
largest (memory does not grow with the data). The plot goes to docs/images/scale.png.

    python bench/scale.py [--quick] [--sizes 20,60,180] [--steps all] [--workers 2] [--img-size 48]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import shutil
import sys
import tempfile

import _common

FULL_STUDIES, FULL_FILES = 1975, 147_218  # the RSNA 2024 LSDC training set (docs/data.md)
TARGET_EXPONENT = 1.05
TARGET_RSS_RATIO = 1.10
STEPS = ("synth", "prepare", "localizer_caches", "train", "predict")
SPLIT = [0.5, 0.25, 0.25]  # a validation and a test study even in the quick run's 3-study phantom
LOCALIZER_IMG_SIZE = 64

# Each step is one `python -c` process: CLOCK, then the step's code, which prints one JSON line last
# with the wall and CPU seconds of its work.
CLOCK = """
import json, resource, sys, time
def cpu():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
def clock():
    return time.perf_counter(), cpu()
def since(started, **extra):
    return {"seconds": time.perf_counter() - started[0], "cpu_s": cpu() - started[1], **extra}
"""
SYNTH = CLOCK + """
from dataclasses import asdict
from spinemri.phantom import profile, synthesize
out, studies, workers, changes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
started = clock()
summary = synthesize(out, profile("rsna", studies=studies, seed=0, **changes), workers=workers, overwrite=True)
print(json.dumps(since(started, **asdict(summary))))
"""
PREPARE = CLOCK + """
from spinemri.config import load_experiment
from spinemri.data.cache import prepare
data_dir, workers, img_size, split = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
config = load_experiment("quick", {"img_size": img_size, "data.workers": workers, "split.fractions": split})
started = clock()
dataset = prepare(data_dir, config.preprocess, workers=workers, split_fractions=split, split_seed=config.split.seed)
print(json.dumps(since(started, samples=dataset.manifest["samples"])))
"""
LOCALIZER_CACHES = CLOCK + """
from spinemri.config import load_experiment
from spinemri.data.schema import SERIES_TYPES
from spinemri.localization.dataset import prepare_localizer
data_dir, workers, img_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
preprocessing = load_experiment("localize", {"localize.img_size": img_size}).localizer_preprocessing
started = clock()
slices = {s: prepare_localizer(data_dir, s, preprocessing, workers=workers)[0].manifest["slices"] for s in SERIES_TYPES}
print(json.dumps(since(started, slices=slices)))
"""
TRAIN = CLOCK + """
import keras
from spinemri.config import load_experiment
from spinemri.api.classifier import train
data_dir, workers, img_size, split = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
epochs = []
class EpochClock(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.started = clock()
    def on_epoch_end(self, epoch, logs=None):
        epochs.append(since(self.started))
config = load_experiment("quick", {"arch": "tiny", "data_dir": data_dir, "img_size": img_size, "epochs": 2,
                                   "batch_size": 32, "data.workers": workers, "split.fractions": split,
                                   "mlflow.experiment": "bench-scale"})
result = train(config, callbacks=[EpochClock()])
print(json.dumps({**epochs[-1], "first_epoch_s": epochs[0]["seconds"], "model_uri": result.model_uri}))
"""
LOCALIZER_MODELS = """
import json, sys
from spinemri.config import load_experiment
from spinemri.data.schema import SERIES_TYPES
from spinemri.api.localizer import train_localizer
data_dir, workers, img_size, split = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
uris = {}
for series in SERIES_TYPES:
    config = load_experiment("localize", {"data_dir": data_dir, "series": series, "train.epochs": 1,
                                          "localize.img_size": img_size, "data.workers": workers,
                                          "split.fractions": split, "mlflow.experiment": "bench-scale"})
    uris[series] = train_localizer(config).model_uri
print(json.dumps(uris))
"""
# What spinemri.study.submission.predict_submission does for every study (split "all"), with the
# model loading timed apart from the predictions.
PREDICT = CLOCK + """
from spinemri.data.studies import find_studies
from spinemri.serving.study_predictor import StudyPredictor, classifier_prior, predict_studies, resolve_localizers
from spinemri.serving.classifier import load_classifier
data_dir, out, classifier_uri, localizer_uris = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
started = clock()
classifier = load_classifier(classifier_uri)
prior, source = classifier_prior(classifier)
predictor = StudyPredictor(resolve_localizers(localizer_uris), classifier, prior)
loading = since(started)
started = clock()
summary = predict_studies(predictor, find_studies(data_dir), out, prior_source=source)
print(json.dumps(since(started, studies=summary.studies, loading_s=loading["seconds"])))
"""


def run_step(name: str, command: list[str], env: dict) -> tuple[dict, str]:
    """({wall_s, peak_rss_mb}, stdout) of one step's process; its stdout is copied to stderr."""
    with tempfile.TemporaryFile("w+") as out:
        peak, wall, status = _common.peak_rss(command, env, stdout=out)
        out.seek(0)
        text = out.read()
    sys.stderr.write(text)
    if status != 0:
        raise SystemExit(f"step {name} failed with exit status {status} (its output is on stderr)")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(peak / 2**20, 1)}, text


def last_json(text: str) -> dict:
    """The JSON object a step printed last (one line, or indented over several)."""
    lines = text.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("{"))
    return json.loads("\n".join(lines[start:]))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def largest_series(data_dir: Path) -> dict:
    """The series with the most bytes on disk (what one worker or one prediction decodes at once)."""
    biggest = max((folder for study in (data_dir / "train_images").iterdir() for folder in study.iterdir()),
                  key=folder_bytes)
    return {"mb": round(folder_bytes(biggest) / 2**20, 1), "slices": len(list(biggest.glob("*.dcm")))}


def measure_size(studies: int, args, steps: set[str], tmp: Path, models: dict) -> dict:
    """Every selected step on a fresh phantom of ``studies`` studies; the phantom and its caches are
    deleted afterwards (the default run writes 11 GB of DICOM in all, 8 GB at once)."""
    data_dir = _common.work_dir() / f"scale-rsna-{studies}"
    cache_dir = tmp / f"cache-{studies}"
    env = {**os.environ, "SPINEMRI_CACHE_DIR": str(cache_dir),
           "PYTHONPATH": os.pathsep.join([str(_common.ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    workers, split = str(args.workers), json.dumps(SPLIT)

    def step(name: str, code: str, *arguments) -> dict:
        measured, text = run_step(name, [sys.executable, "-c", code, *map(str, arguments)], env)
        result = last_json(text)
        return {**measured, **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}}

    row: dict = {"studies": studies}
    try:
        _common.log(f"{studies} studies: synth")
        synth = step("synth", SYNTH, data_dir, studies, workers, json.dumps(args.phantom_changes))
        row.update(files=synth["images"], series=synth["series"], phantom_bytes=folder_bytes(data_dir),
                   largest_series=largest_series(data_dir))
        row["synth"] = {k: synth[k] for k in ("wall_s", "peak_rss_mb", "seconds", "cpu_s")}
        if "prepare" in steps:
            _common.log(f"{studies} studies: data prepare ({row['files']} files)")
            row["prepare"] = step("prepare", PREPARE, data_dir, workers, args.img_size, split)
        if "localizer_caches" in steps:
            _common.log(f"{studies} studies: the three localizer caches")
            row["localizer_caches"] = step("localizer_caches", LOCALIZER_CACHES, data_dir, workers, LOCALIZER_IMG_SIZE)
        if cache_dir.is_dir():
            row["cache_bytes"] = folder_bytes(cache_dir)
        if "train" in steps:
            _common.log(f"{studies} studies: two epochs of the tiny classifier at {args.img_size} px")
            row["train"] = step("train", TRAIN, data_dir, workers, args.img_size, split)
            models.setdefault("classifier", row["train"].pop("model_uri"))
        if "predict" in steps:
            if "localizers" not in models:
                _common.log(f"{studies} studies: training the three localizers for predict-study (not measured)")
                _, text = run_step("localizer models", [sys.executable, "-c", LOCALIZER_MODELS, str(data_dir), workers,
                                                        str(LOCALIZER_IMG_SIZE), split], env)
                models["localizers"] = list(last_json(text).values())
            _common.log(f"{studies} studies: predict-study")
            row["predict"] = step("predict", PREDICT, data_dir, tmp / f"submission-{studies}.csv", models["classifier"],
                                  *models["localizers"])
            row["predict"]["studies_per_s"] = round(row["predict"]["studies"] / row["predict"]["seconds"], 3)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(cache_dir, ignore_errors=True)
    return row


def power_fit(files: list[int], values: list[float]) -> tuple[float, float]:
    """(k, c) of ``value = c · files^k``, least squares on log(value) against log(files)."""
    import numpy as np

    k, log_c = np.polyfit(np.log(files), np.log(values), 1)
    return float(k), float(np.exp(log_c))


def fits(rows: list[dict], steps: list[str]) -> dict:
    """Per step: the CPU-time and wall-time exponents, their extrapolation to the full dataset, and the
    peak-RSS ratio largest/smallest size; the same fit for the cache bytes."""
    files = [r["files"] for r in rows]
    out = {}
    for name in steps:
        k, c = power_fit(files, [r[name]["cpu_s"] for r in rows])
        k_wall, c_wall = power_fit(files, [r[name]["seconds"] for r in rows])
        rss = [r[name]["peak_rss_mb"] for r in rows]
        ratio = rss[-1] / rss[0]
        out[name] = {"cpu_exponent": round(k, 3), "full_dataset_cpu_s": round(c * FULL_FILES**k, 1),
                     "exponent_result": _common.verdict(k <= TARGET_EXPONENT),
                     "wall_exponent": round(k_wall, 3), "full_dataset_wall_s": round(c_wall * FULL_FILES**k_wall, 1),
                     "rss_ratio": round(ratio, 3), "rss_result": _common.verdict(ratio < TARGET_RSS_RATIO)}
    if all("cache_bytes" in r for r in rows):
        k, c = power_fit(files, [r["cache_bytes"] for r in rows])
        out["cache_bytes"] = {"exponent": round(k, 3), "full_dataset_gb": round(c * FULL_FILES**k / 1e9, 2)}
    return out


def plot(rows: list[dict], steps: list[str], path: Path) -> None:
    """Left: each step's CPU seconds against files (log-log) and the fitted line out to the full
    dataset; right: each step's peak RSS against files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = np.array([r["files"] for r in rows], float)
    line = np.geomspace(files[0], FULL_FILES, 50)
    figure, (times, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in steps:
        seconds = np.array([r[name]["cpu_s"] for r in rows])
        k, c = power_fit(files, seconds)
        drawn = times.loglog(files, seconds, "o-", label=f"{name} (k = {k:.2f})")[0]
        times.loglog(line, c * line**k, "--", color=drawn.get_color(), linewidth=1)
        memory.semilogx(files, [r[name]["peak_rss_mb"] for r in rows], "o-", color=drawn.get_color(), label=name)
    times.axvline(FULL_FILES, color="grey", linewidth=0.8)
    times.text(FULL_FILES, times.get_ylim()[0], " full dataset", rotation=90, va="bottom", ha="right", fontsize=8)
    times.set(xlabel="DICOM files", ylabel="CPU seconds", title="CPU time per step (dashed: fit, extrapolated)")
    memory.set(xlabel="DICOM files", ylabel="peak RSS (MB)", title="peak RSS per step (largest process)")
    memory.set_ylim(bottom=0)
    times.legend(fontsize=8)
    memory.legend(fontsize=8)
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.22)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 and 6 studies of 96-px images, synth and the caches only (add --steps all for the rest)")
    parser.add_argument("--sizes", default="20,60,180", help="phantom sizes in studies, at least two")
    parser.add_argument("--steps", default=None, help=f"comma-separated subset of {','.join(STEPS)}, or all "
                                                      "[default: all; with --quick synth,prepare,localizer_caches]")
    parser.add_argument("--workers", type=int, default=2, help="processes of synth and of both prepares")
    parser.add_argument("--img-size", type=int, default=48, help="the classifier's input size")
    parser.add_argument("--plot", default=None, help="[default: docs/images/scale.png; with --quick, in the bench dir]")
    args = parser.parse_args()
    args.phantom_changes = {}
    if args.quick:
        args.sizes = "3,6"
        args.steps = args.steps or "synth,prepare,localizer_caches"
        args.phantom_changes = {"image_sizes": [96], "image_size_weights": []}
    args.plot = Path(args.plot or (_common.work_dir() / "scale-quick.png" if args.quick
                                   else _common.ROOT / "docs" / "images" / "scale.png"))
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",")})
    except ValueError:
        sizes = []
    if len(sizes) < 2 or sizes[0] < 2:
        raise SystemExit(f"--sizes must be at least two numbers of studies (>= 2), comma-separated, e.g. 20,60,180; "
                         f"got {args.sizes!r}")
    chosen = list(STEPS) if args.steps in (None, "all") else [s.strip() for s in args.steps.split(",")]
    if set(chosen) - set(STEPS) or "synth" not in chosen:
        raise SystemExit(f"--steps must be 'all' or steps of {','.join(STEPS)} that include synth (the others "
                         f"measure its phantom); got {args.steps!r}")
    if "predict" in chosen and "train" not in chosen:
        raise SystemExit("--steps predict needs train: predict-study grades with the classifier trained on the "
                         "smallest phantom; add train to --steps")
    steps = [s for s in STEPS if s in chosen]

    rows, models = [], {}
    with _common.private_store() as tmp:
        for studies in sizes:
            rows.append(measure_size(studies, args, set(steps), tmp, models))
            _common.log(f"{studies} studies: {json.dumps(rows[-1])}")
    fitted = fits(rows, steps)
    plot(rows, steps, args.plot)
    prepares = [s for s in ("prepare", "localizer_caches") if s in fitted]
    prepare_wall_s = sum(fitted[s]["full_dataset_wall_s"] for s in prepares)
    prepare_cpu_s = sum(fitted[s]["full_dataset_cpu_s"] for s in prepares)
    ok_exponents = all(fitted[s]["exponent_result"] == "pass" for s in steps)
    ok_rss = all(fitted[s]["rss_result"] == "pass" for s in steps)
    result = {
        "sizes": sizes, "steps": steps, "workers": args.workers, "img_size": args.img_size,
        "localizer_img_size": LOCALIZER_IMG_SIZE, "phantom_changes": args.phantom_changes, "rows": rows,
        "fits": fitted,
        # The full dataset's prepare (classifier and localizer caches) on --workers processes: by the wall-time
        # fits of this run, and by the CPU-time fits spread over the workers (what idle cores would reach at best).
        "full_dataset": {"studies": FULL_STUDIES, "files": FULL_FILES, "prepare_wall_s": round(prepare_wall_s, 1),
                         "prepare_cpu_s": round(prepare_cpu_s, 1),
                         "prepare_cpu_s_per_worker": round(prepare_cpu_s / args.workers, 1)},
        "targets": {"cpu_exponent": f"<= {TARGET_EXPONENT}", "rss_ratio": f"< {TARGET_RSS_RATIO}"},
        "result": _common.verdict(ok_exponents and ok_rss), "plot": str(args.plot),
    }
    exponents = ", ".join(f"{s} {fitted[s]['cpu_exponent']:.2f}" for s in steps)
    ratios = ", ".join(f"{s} {fitted[s]['rss_ratio']:.2f}" for s in steps)
    _common.emit("scale", result,
                 f"scale: {rows[0]['files']} to {rows[-1]['files']} files; CPU-time exponents {exponents} (target <= "
                 f"{TARGET_EXPONENT}: {_common.verdict(ok_exponents)}); peak RSS largest/smallest {ratios} (target < "
                 f"{TARGET_RSS_RATIO}: {_common.verdict(ok_rss)}); full dataset ({FULL_FILES:,} files): prepare "
                 f"--workers {args.workers} {prepare_wall_s / 60:.0f} min by this run's wall time, "
                 f"{prepare_cpu_s / 60:.0f} CPU-min ({prepare_cpu_s / args.workers / 60:.0f} min on {args.workers} idle cores)")

if __name__ == "__main__":
    main()
