"""The library run layer: what a command does, as functions that the CLI, MLproject and tests call.

    settings      an experiment from its file, flags and --set (the flag a refused value came from); a run's own
    train         run_experiment(config): a classifier, a tuned classifier, a localizer or their cross-validations
    classifier    one classifier trained on one split, in one run
    cv            a classifier's K-fold cross-validation: nested fold runs, out-of-fold predictions
    localizer     one stage-1 localizer trained, in one run per series type
    localizer_cv  a localizer's cross-validation, its out-of-fold point errors
    ensemble      a cross-validation's fold models as one registered ensemble
    tune          an Optuna study of nested trial runs: pruning, resume, parallel workers
    evaluate      a logged model evaluated again on its run's split
    source        an experiment's data: its folder, or the phantom it generates
    compare       compare_runs(...): the thesis's table from an experiment file or an MLflow experiment name
    ablation      the study pipeline's ablation: each step's out-of-fold RSNA score, paired
    study         the study pipeline's evaluation and ablation, from a data folder and experiment names

Only this layer and the CLI read a whole experiment config; the layers below take the settings section
they use.
"""
