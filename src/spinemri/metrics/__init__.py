"""Metrics, pure: labels and probabilities in, numbers out (no MLflow, no files, no Keras).

    scores       every per-head metric, one function each, over many resamples at once: the registry
    heads        a split's report: each head's metrics with study-level bootstrap CIs, baselines, calibration
    competition  the RSNA 2024 LSDC score
    prior        the per-site prior, the floor; floor: every model against it, with its verdict
    paired       two models on the same studies; goals: which way is better, from a metric's name
    report       a report as MLflow metric names, tables, Markdown; plots: its figures
"""
