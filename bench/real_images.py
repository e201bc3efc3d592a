"""Real images: the default slice recipe against its floor, 5-fold cross-validated by study on real RSNA slices.

The data is a folder like ``rsna-foraminal-png-dev`` (a ``labels.csv`` of graded sites per image,
``study_id, condition_level, severity, file``, and the images it names): real scans with their official
grades, which no test may depend on and no commit may hold, so the folder is given on the command line.
The site table becomes a flat CSV without points (spinemri.data.site_table), and ``spinemri train
--experiment slices --folds K`` cross-validates the default slice recipe (experiments/slices.yaml) over
every study (no locked test split) in a private MLflow store: each fold's model against the per-site
prior of its own training folds, on the same held-out studies.

Printed: the out-of-fold severity-weighted log loss and ROC-AUC of the model and of the floor, their
paired difference on the weighted log loss with its 95 % CI over studies, the verdict, and the run time.
Targets: never worse than the floor (upper end of the CI <= +0.01) and, the aim, better (the CI below 0).

    python bench/real_images.py --data ../shared/data/rsna-foraminal-png-dev [--folds 5] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys
import time

from _common import emit, log, private_store, stdout_to_stderr, verdict

NEVER_WORSE = 0.01  # the largest upper end of the paired CI that still counts as "not worse than the floor"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with labels.csv (study_id, condition_level, severity, "
                                                      "file) and the images it names")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds by study (default 5)")
    parser.add_argument("--experiment", default="slices", help="the recipe (default: experiments/slices.yaml)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the recipe (repeatable), e.g. model.arch=tiny")
    args = parser.parse_args()
    data = Path(args.data).resolve()  # the private store below runs in a folder of its own
    table = data / "labels.csv"
    if not table.is_file():
        print(f"bench/real_images.py: {table} not found; --data must be a folder of real slices with a labels.csv "
              "of graded sites (study_id, condition_level, severity, file), e.g. "
              "../shared/data/rsna-foraminal-png-dev", file=sys.stderr)
        return 2
    if args.folds < 2:
        print(f"bench/real_images.py: --folds must be at least 2, got {args.folds}", file=sys.stderr)
        return 2

    from spinemri.config import load_experiment, parse_override
    from spinemri.errors import UserError

    try:
        overrides = dict(parse_override(item) for item in args.settings)
    except UserError as exc:
        print(f"bench/real_images.py: {exc}", file=sys.stderr)
        return 2
    with private_store() as tmp:
        from spinemri.api.classifier import train
        from spinemri.data.site_table import write_flat_csv

        try:
            flat = write_flat_csv(table, tmp / "flat.csv")
            config = load_experiment(args.experiment, {
                **overrides, "data.data_dir": str(tmp / "flat.csv"), "split.folds": args.folds,
                "split.fractions": [0.8, 0.2, 0.0], "mlflow.system_metrics_interval": 0})
        except UserError as exc:
            print(f"bench/real_images.py: {exc}", file=sys.stderr)
            return 2
        log(f"{len(flat)} graded sites on {flat['image_path'].nunique()} images of {flat['study_id'].nunique()} "
            f"studies; {args.folds}-fold CV of {config.name} ({config.model.arch}, {config.preprocess.img_size} px)")
        started = time.perf_counter()
        with stdout_to_stderr():
            result = train(config, log_model=False)
        seconds = time.perf_counter() - started
    m, decided = result.metrics, result.verdict
    if decided is None:
        print("bench/real_images.py: the cross-validation gave no verdict against the per-site prior (see above)",
              file=sys.stderr)
        return 1
    model = {"weighted_log_loss": m["cv_severity_weighted_log_loss"], "roc_auc": m["cv_severity_roc_auc"]}
    floor = {"weighted_log_loss": m["cv_floor_severity_weighted_log_loss"], "roc_auc": m["cv_floor_severity_roc_auc"]}
    difference = {"value": m["cv_vs_floor"], "ci_low": m["cv_vs_floor_ci_low"], "ci_high": m["cv_vs_floor_ci_high"],
                  "studies": decided.paired.studies}
    never_worse = difference["ci_high"] <= NEVER_WORSE
    better = decided.better
    record = {
        "data": str(data), "studies": int(flat["study_id"].nunique()), "images": int(flat["image_path"].nunique()),
        "graded_sites": len(flat), "folds": args.folds, "recipe": config.name, "arch": config.model.arch,
        "img_size": config.preprocess.img_size, "settings": overrides, "model": model, "floor": floor,
        "difference_weighted_log_loss": difference, "verdict": decided.outcome,
        "sentence": decided.sentence, "seconds": round(seconds, 1),
        "targets": {"never_worse": {"upper_ci_at_most": NEVER_WORSE, "result": verdict(never_worse)},
                    "better": {"result": verdict(better)}},
    }
    emit("real_images", record,
         f"real_images: OOF weighted log loss {model['weighted_log_loss']:.4f} vs floor {floor['weighted_log_loss']:.4f} "
         f"(difference {difference['value']:+.4f} [{difference['ci_low']:+.4f}, {difference['ci_high']:+.4f}] over "
         f"{difference['studies']} studies), ROC-AUC {model['roc_auc']:.3f} vs {floor['roc_auc']:.3f}; never worse: "
         f"{verdict(never_worse)}, better: {verdict(better)}; {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
