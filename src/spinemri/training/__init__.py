"""Fitting models, given the settings sections they read: the fit loop every trainer shares, the classifier's
fit and logging, the localizers', the distribution strategies and training batches.

    fit          seeding, devices, the callback stack, the best weights (every trainer)
    classifier   a classifier fitted, predicted, calibrated and logged (ClassifierSettings)
    localizer    a localizer's batches, validation monitor, point errors, baseline and figures
    data         training batches of the cache: targets, sample weights, augmentation
    jitter       crops jittered the way a localizer errs
    cluster      mirrored and multi-worker training

The runs that call them (one split, K folds, an ensemble, a tuning study) are spinemri.api's."""
