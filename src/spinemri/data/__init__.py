"""The data layer: DICOM -> sample table -> preprocessing -> cache -> splits.

    readers.load_samples(dir)        one row per labelled point (RSNA folder or the thesis's flat CSV)
    dicom.read_image(path)           float32 (H, W) with LUTs applied, MONOCHROME2
    preprocess.preprocess(...)       uint8 (S, S, C): the single pixel -> model-input path
    cache.prepare(dir, config)       the on-disk cache of model inputs, keyed by a fingerprint
    splits.split_studies(samples)    study-level train/val/test
    phantom.synthesize(out, config)  the built-in synthetic dataset
"""

from spinemri.data.cache import PreparedDataset, prepare
from spinemri.data.dicom import DicomReadError, ImageReadError, read_dicom, read_image, read_series
from spinemri.data.phantom import PhantomConfig, synthesize
from spinemri.data.preprocess import PreprocessConfig, preprocess
from spinemri.data.readers import DatasetError, check_dataset, load_samples
from spinemri.data.splits import split_studies

__all__ = [
    "DatasetError", "DicomReadError", "ImageReadError", "PhantomConfig", "PreparedDataset",
    "PreprocessConfig", "check_dataset", "load_samples", "prepare", "preprocess", "read_dicom",
    "read_image", "read_series", "split_studies", "synthesize",
]
