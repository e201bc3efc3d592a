"""The library run layer: what a command does, as functions that the CLI, MLproject and tests call.

    settings   an experiment from its file, flags and --set, with the flag a refused value came from
    train      run_experiment(config): a classifier, a tuned classifier, a localizer or their cross-validations
    compare    compare_runs(...): the thesis's table from an experiment file or an MLflow experiment name
    study      the study pipeline's evaluation and ablation, from a data folder and experiment names

Only this layer and the CLI read a whole experiment config; the layers below take the settings section
they use.
"""
