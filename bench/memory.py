"""Peak resident memory of a training run on N and on 10·N phantom studies (same everything else).

Each run is a fresh `python -m spinemri train` process (default: mobilenet_v2, 128 px, 3 channels,
1 epoch, batch 32, evaluation and model logging included); its peak RSS is ``ru_maxrss`` from
``os.wait4``, the kernel's own figure for that process (forked from a small launcher, since the
mark survives fork and exec). The preprocessed caches are built first, in
this process, so the peaks are those of training (streaming, evaluation, logging) alone. Ratio =
peak(10·N) / peak(N). Target (issue 8): < 1.10 — memory does not grow with the dataset.

    python bench/memory.py [--quick] [--studies 30] [--arch mobilenet_v2] [--img-size 128] [--channels 3]
"""

from __future__ import annotations

import argparse
import os
import sys

import _common

TARGET = 1.10


def peak_rss_of_training(data_dir, args) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of one `spinemri train` process."""
    command = [sys.executable, "-m", "spinemri", "train", "--experiment", "quick", "--arch", args.arch,
               "--data-dir", str(data_dir), "--img-size", str(args.img_size), "--epochs", "1",
               "--batch-size", str(args.batch_size), "--set", f"preprocess.slices={args.channels}",
               "--set", "mlflow.experiment=bench-memory"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_common.ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    peak, seconds, status = _common.peak_rss(command, env)
    if status != 0:
        raise SystemExit(f"training on {data_dir} failed with exit status {status} (see stderr)")
    return peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny backbone at 48 px, 3 vs 30 studies")
    parser.add_argument("--studies", type=int, default=30, help="N (the large run uses 10·N)")
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if args.quick:
        args.studies, args.arch, args.img_size = 3, "tiny", 48

    from spinemri.data.cache import prepare
    from spinemri.data.preprocess import PreprocessConfig

    runs = {}
    with _common.private_store():
        for label, studies in (("N", args.studies), ("10N", 10 * args.studies)):
            data_dir = _common.phantom(studies)
            dataset = prepare(data_dir, PreprocessConfig(img_size=args.img_size, slices=args.channels),
                              workers=min(2, os.cpu_count() or 1))
            _common.log(f"training on {studies} studies ({dataset.manifest['samples']} samples)")
            peak, seconds = peak_rss_of_training(data_dir, args)
            runs[label] = {"studies": studies, "samples": dataset.manifest["samples"],
                           "cache_mb": round((dataset.path / "images.npy").stat().st_size / 2**20, 1),
                           "peak_rss_mb": round(peak / 2**20, 1), "seconds": round(seconds, 1)}
    ratio = runs["10N"]["peak_rss_mb"] / runs["N"]["peak_rss_mb"]
    grew = runs["10N"]["peak_rss_mb"] - runs["N"]["peak_rss_mb"]
    extra_cache = runs["10N"]["cache_mb"] - runs["N"]["cache_mb"]
    _common.emit("memory", {
        "arch": args.arch, "img_size": args.img_size, "channels": args.channels, "batch_size": args.batch_size,
        "epochs": 1, "runs": runs, "peak_rss_growth_mb": round(grew, 1), "cache_growth_mb": round(extra_cache, 1),
        "ratio": round(ratio, 3), "target": f"< {TARGET}", "result": _common.verdict(ratio < TARGET)},
        f"memory: peak RSS {runs['N']['peak_rss_mb']:.0f} MB on {runs['N']['samples']} samples vs "
        f"{runs['10N']['peak_rss_mb']:.0f} MB on {runs['10N']['samples']} = {ratio:.3f} (target < {TARGET}: "
        f"{_common.verdict(ratio < TARGET)}); the cache grew by {extra_cache:.0f} MB, the peak by {grew:.0f} MB")


if __name__ == "__main__":
    main()
