"""Dataset lineage: which data a run saw, as MLflow dataset inputs (the runs table's Dataset column).

Every training run logs one input per split it reads (``training``, ``validation``, ``test``; a
cross-validation's parent logs the cross-validated studies and the locked test studies). Each input is
named after the data (``phantom-40-studies-seed0`` or the data folder's name) and the split, its source is
the data folder, its profile counts the studies and samples of the split, and its digest is the
prepared cache's content digest (spinemri.data.cache.CacheFolder.content_digest): the same data,
prepared the same way, has the same digest on every machine.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source_registry import resolve_dataset_source

from spinemri.config import DataConfig, SplitConfig

# The split a run reads -> the context MLflow shows beside the dataset.
CONTEXTS = {"train": "training", "val": "validation", "test": "test", "cv": "cross-validation"}


class SplitDataset(Dataset):
    """One split of a prepared dataset: name, source folder, digest and a profile of counts."""

    def __init__(self, name: str, source_dir: str, digest: str, profile: dict[str, Any]):
        with warnings.catch_warnings():  # MLflow finds two equivalent local source types and says so
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(source_dir))
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    def _compute_digest(self) -> str:  # the digest is always given
        raise NotImplementedError

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    @property
    def schema(self):
        return None

    def to_dict(self) -> dict[str, str]:
        import json

        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def data_name(data: DataConfig) -> str:
    """What the data is: the phantom with its studies and seed, or the data folder's name."""
    if not data.data_dir:
        return f"phantom-{data.phantom_studies}-studies-seed{data.phantom_seed}"
    return Path(data.data_dir).resolve().name or str(data.data_dir)


DATA_KIND_TAG = "data_kind"  # phantom (a folder spinemri's generator wrote) or real


def data_kind(source_dir: str) -> str:
    """``phantom`` for a folder the phantom generator wrote (it carries the generator's marker file), else ``real``."""
    from spinemri.phantom.settings import MARKER

    return "phantom" if (Path(source_dir) / MARKER).is_file() else "real"


def log_splits(data: DataConfig, split_settings: SplitConfig, source_dir: str, digest: str,
               parts: dict[str, pd.DataFrame], *, unit: str = "samples") -> list[SplitDataset]:
    """Log one dataset input per split of ``parts`` (split -> its rows, each with a ``study_id``) into the
    active run; ``unit`` names what a row is (samples, slices). Returns the datasets."""
    base = data_name(data)
    mlflow.set_tag(DATA_KIND_TAG, data_kind(source_dir))
    datasets = []
    for split, rows in parts.items():
        profile = {"split": split, "studies": int(rows["study_id"].nunique()), unit: int(len(rows)),
                   "split_fractions": list(split_settings.fractions), "split_seed": split_settings.seed}
        dataset = SplitDataset(f"{base}-{split}", source_dir, digest, profile)
        mlflow.log_input(dataset, context=CONTEXTS.get(split, split))
        datasets.append(dataset)
    return datasets


def logged_profile(run, split: str) -> dict[str, Any]:
    """The profile of the dataset input a finished run logged for ``split`` (train, val, test or cv);
    empty when it logged none."""
    import json

    context = CONTEXTS.get(split, split)
    for entry in run.inputs.dataset_inputs:
        if any(tag.key == "mlflow.data.context" and tag.value == context for tag in entry.tags):
            return json.loads(entry.dataset.profile or "{}")
    return {}
