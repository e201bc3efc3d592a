"""Fitting models: the classifier (one split, K folds, an ensemble of folds) and the stage-1 localizers, each in
MLflow runs, from the data source of an experiment's data settings."""
