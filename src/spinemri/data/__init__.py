"""The data layer: DICOM -> sample table -> preprocessing -> cache -> splits.

    readers.load_samples(dir)        one row per labelled point (RSNA folder or the thesis's flat CSV)
    dicom.read_image(path)           float32 (H, W) with LUTs applied, MONOCHROME2
    preprocess.preprocess(...)       uint8 (S, S, C): the single pixel -> model-input path
    cache.prepare(dir, config)       the on-disk cache of model inputs, keyed by a fingerprint
    splits.split_studies(samples)    study-level train/val/test
    source.prepare_data(config)      the experiment's data (or the built-in phantom) as a prepared cache
    studies.find_studies(dir)        studies with their series, for study-level prediction
    phantom.synthesize(out, config)  the built-in synthetic dataset
    limits                           how large an input may be, checked before decoding
    schema                           the competition's vocabulary
"""
