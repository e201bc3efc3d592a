"""Where a run's data comes from: the experiment's data_dir, or the built-in phantom, as a prepared cache.

``prepare_data(config)`` is what training, evaluation and tuning call: it resolves the data folder
(generating the phantom on first use when ``data.data_dir`` is empty), builds or reuses the
preprocessed cache with the experiment's preprocessing, and returns it with its study-level split.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spinemri.config import ExperimentConfig
from spinemri.data import cache
from spinemri.errors import DatasetError
from spinemri.phantom import PhantomConfig, synthesize


def phantom_dir(config: ExperimentConfig) -> Path:
    """Where the built-in phantom for this config lives (generated once, then reused)."""
    return cache.default_cache_dir().parent / "phantom" / f"studies{config.data.phantom_studies}-seed{config.data.phantom_seed}"


def resolve_data_dir(config: ExperimentConfig) -> Path:
    """config.data.data_dir, or the built-in phantom (written on first use) when it is empty."""
    data_dir = config.data.data_dir
    if not data_dir:
        data_dir = phantom_dir(config)
        if not (data_dir / "train.csv").is_file():
            synthesize(data_dir, PhantomConfig(studies=config.data.phantom_studies, seed=config.data.phantom_seed),
                       workers=config.data.workers)
    elif not Path(data_dir).exists():
        raise DatasetError([f"data_dir {data_dir} does not exist; give an RSNA-layout folder or a flat CSV, "
                            "or leave data_dir empty for the built-in phantom"])
    return Path(data_dir)


def prepare_data(config: ExperimentConfig) -> tuple[cache.PreparedDataset, pd.DataFrame]:
    """The cache for this config (the phantom when data_dir is empty) and its samples with splits."""
    data_dir = resolve_data_dir(config)
    dataset = cache.prepare(data_dir, config.preprocess, workers=config.data.workers,
                            split_fractions=config.split.fractions, split_seed=config.split.seed)
    return dataset, dataset.samples_with_split(config.split.fractions, config.split.seed)
