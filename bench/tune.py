"""Epochs trained by a 12-trial Optuna study with pruning vs without pruning, same seed.

Both studies run ``spinemri.api.tune.tune`` (what `spinemri tune` runs) on the quick experiment's
search space with the same TPE sampler seed, the tiny backbone at 64 px, up to 12 epochs per trial
with early stopping (patience 3), on a 40-study phantom, each in its own journal storage; the
best configuration's final retraining is not counted. Epochs per trial = the values the pruning
callback reported (one per epoch trained). The pruned study uses the default pruner, hyperband
(``--pruner median`` for the median pruner with ``--startup``/``--warmup``). Targets (issue 8):
>= 40 % fewer epochs with pruning, and an equal best val_loss within noise — here: the pruned
study's best no more than 5 % worse. Trials train with ``train.deterministic`` (TensorFlow's op
determinism), so that a configuration both studies try gives the same values in both.

    python bench/tune.py [--quick] [--trials 12] [--epochs 12] [--pruner hyperband|median] [--arch tiny]
"""

from __future__ import annotations

import argparse

import _common

TARGET_FEWER = 0.40
TOLERANCE = 0.05


def run_study(pruner: str, args, data_dir, storage: str) -> dict:
    import optuna

    from spinemri.api.tune import open_storage, tune
    from spinemri.config import load_experiment

    config = load_experiment("quick", {
        "arch": args.arch, "img_size": args.img_size, "epochs": args.epochs, "data_dir": str(data_dir),
        "trials": args.trials, "pruner": pruner, "storage": storage, "study_name": f"bench-{pruner}",
        "tuning.sampler_seed": args.seed, "tuning.n_startup_trials": args.startup,
        "tuning.n_warmup_steps": args.warmup,
        # The same configuration then trains to the same curve in both studies, so the best values
        # differ only by what the pruner stopped (CPU training is otherwise not reproducible).
        "train.deterministic": not args.nondeterministic,
    })
    result = tune(config)
    study = optuna.load_study(study_name=f"bench-{pruner}", storage=open_storage(storage))
    trials = study.get_trials(deepcopy=False)
    epochs = [len(t.intermediate_values) for t in trials]
    return {"pruner": pruner, "trials": len(trials), "epochs_total": sum(epochs), "epochs_per_trial": epochs,
            # val_loss after each epoch of each trial: where pruning stopped a trial, and what it would have done
            "curves": [[round(t.intermediate_values[k], 4) for k in sorted(t.intermediate_values)] for t in trials],
            "states": {s: sum(t.state.name.lower() == s for t in trials) for s in ("complete", "pruned", "fail")},
            "best_value": round(result.best_value, 5), "best_params": result.best_params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 trials of up to 3 epochs at 32 px on 8 studies")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=12, help="most epochs per trial")
    parser.add_argument("--arch", default="tiny")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="TPE sampler seed (both studies)")
    parser.add_argument("--startup", type=int, default=2, help="median pruner: trials before it may prune")
    parser.add_argument("--warmup", type=int, default=1, help="median pruner: epochs before a trial may be pruned")
    parser.add_argument("--nondeterministic", action="store_true",
                        help="train without TensorFlow's op determinism (the best values then carry training noise)")
    parser.add_argument("--pruner", choices=("hyperband", "median"), default="hyperband",
                        help="the pruned study's pruner (the other study uses none)")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs, args.img_size, args.studies, args.startup = 4, 3, 32, 8, 1

    data_dir = _common.phantom(args.studies)
    studies = {}
    with _common.private_store() as tmp, _common.stdout_to_stderr():
        for pruner in ("none", args.pruner):
            studies[pruner] = run_study(pruner, args, data_dir, str(tmp / f"optuna-{pruner}.log"))
            _common.log(f"pruner={pruner}: {studies[pruner]['epochs_total']} epochs, best {studies[pruner]['best_value']}")
    unpruned, pruned = studies["none"], studies[args.pruner]
    fewer = 1 - pruned["epochs_total"] / unpruned["epochs_total"]
    worse = (pruned["best_value"] - unpruned["best_value"]) / abs(unpruned["best_value"])  # val_loss: lower is better
    ok_epochs, ok_value = fewer >= TARGET_FEWER, worse <= TOLERANCE
    _common.emit("tune", {
        "arch": args.arch, "img_size": args.img_size, "max_epochs": args.epochs, "studies_in_phantom": args.studies,
        "sampler_seed": args.seed, "deterministic": not args.nondeterministic, "pruner": args.pruner, "n_startup_trials": args.startup, "n_warmup_steps": args.warmup,
        "monitor": "val_loss", "without_pruning": unpruned, "with_pruning": pruned,
        "ratios": {
            "fewer_epochs": {"value": round(fewer, 3), "target": f">= {TARGET_FEWER}", "result": _common.verdict(ok_epochs)},
            "best_value_worse_by": {"value": round(worse, 4), "target": f"<= {TOLERANCE}", "result": _common.verdict(ok_value)},
        },
        "result": _common.verdict(ok_epochs and ok_value)},
        f"tune: {args.trials} trials, {pruned['epochs_total']} epochs with {args.pruner} pruning vs {unpruned['epochs_total']} "
        f"without = {100 * fewer:.0f} % fewer (target >= {100 * TARGET_FEWER:.0f} %: {_common.verdict(ok_epochs)}); "
        f"best val_loss {pruned['best_value']:.4f} vs {unpruned['best_value']:.4f} ({100 * worse:+.1f} %, target <= "
        f"+{100 * TOLERANCE:.0f} %: {_common.verdict(ok_value)})")


if __name__ == "__main__":
    main()
