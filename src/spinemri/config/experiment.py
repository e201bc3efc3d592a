"""An experiment: every section together (:class:`ExperimentConfig`), the settings typed most as flags
(:data:`SHORTCUTS`), and the names a run logs its settings under.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from spinemri.config.sections import (TASKS, ClinicalConfig, CompareConfig, DataConfig, LocalizeConfig, MlflowConfig, ModelConfig,
    SplitConfig, TrainConfig, TuningConfig, check, plain, setting, validate_search_space)
from spinemri.data.preprocess import PreprocessConfig
from spinemri.errors import ConfigError
from spinemri.models.catalog import severity_head
from spinemri.redact import redact_values


@dataclass(frozen=True)
class ClassifierSettings:
    """What fitting a classifier reads of an experiment: how its inputs are made, the network, the training."""

    preprocess: PreprocessConfig
    model: ModelConfig
    train: TrainConfig

    @property
    def severity_head(self) -> str:
        """The classifier's severity output, ``single`` or ``per_site`` (model.severity_head, auto resolved)."""
        return severity_head(self.model.severity_head, self.preprocess.mode)


@dataclass
class ExperimentConfig:
    name: str = setting("default", "experiment name (the YAML file's)")
    task: str = setting("classify", "classify (the ROI classifier) or localize (a stage-1 localizer)")
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig, metadata={
        "help": "how a DICOM slice becomes a model input (the classifier's; the localizer's differs by localize.*)"})
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    clinical: ClinicalConfig = field(default_factory=ClinicalConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)

    @property
    def classifier(self) -> ClassifierSettings:
        """The sections a classifier's fit reads (spinemri.training.classifier)."""
        return ClassifierSettings(self.preprocess, self.model, self.train)

    @property
    def severity_head(self) -> str:
        return self.classifier.severity_head

    @property
    def localizer_preprocessing(self) -> PreprocessConfig:
        """The localizer's: whole slices at localize.img_size and localize.channels, the same windowing."""
        return dataclasses.replace(self.preprocess, mode="slice", img_size=self.localize.img_size,
                                   slices=self.localize.channels)

    def validate(self) -> "ExperimentConfig":
        self.data.validate()
        self.split.validate()
        self.model.validate()
        self.train.validate()
        self.tuning.validate()
        self.mlflow.validate()
        self.clinical.validate()
        self.compare.validate()
        self.localize.validate()
        check(self.task in TASKS, "task", f"must be one of {', '.join(TASKS)}", self.task)
        check(self.model.slice_pooling == "channels" or self.preprocess.slices > 1, "model.slice_pooling",
               f"{self.model.slice_pooling} pools across the slices of a 2.5D stack and needs preprocess.slices >= 3",
               f"{self.model.slice_pooling} with preprocess.slices={self.preprocess.slices}")
        if self.train.strategy == "multiworker":  # every other training is several runs, or a localizer's
            for key, value, alone in (("split.folds", self.split.folds, 0), ("tuning.trials", self.tuning.trials, 0),
                                      ("task", self.task, "classify")):
                check(value == alone, "train.strategy", f"multiworker trains one classifier in one run, not with "
                       f"{key}={value!r}; set {key}={alone!r} or use --strategy mirrored", self.train.strategy)
        validate_search_space(self.tuning.search_space, self.to_dict())
        return self

    def to_dict(self, *, redacted: bool = False) -> dict[str, Any]:
        """The config as plain data; ``redacted``: URL passwords masked (what a run logs, see spinemri.redact)."""
        raw = plain(dataclasses.asdict(self))
        return redact_values(raw) if redacted else raw

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.001, ...}`` for MLflow params (URL passwords masked)."""
        out: dict[str, Any] = {}

        def walk(prefix, value):
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value
        walk("", self.to_dict(redacted=True))
        return out


# Short names for the settings typed most: the flags of `spinemri train`/`tune` and the parameters of
# MLproject, each standing for one config key (help and default come from the key's field).
SHORTCUTS = {
    "arch": "model.arch", "weights": "model.weights", "data_dir": "data.data_dir",
    "img_size": "preprocess.img_size", "mode": "preprocess.mode", "epochs": "train.epochs",
    "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed", "trials": "tuning.trials",
    "storage": "tuning.storage", "study_name": "tuning.study_name", "pruner": "tuning.pruner",
    "workers": "tuning.workers", "task": "task", "series": "localize.series", "strategy": "train.strategy",
    "mixed_precision": "train.mixed_precision", "folds": "split.folds",
}


_SHORT_NAME = {key: short for short, key in SHORTCUTS.items() if short != "task"}


# The settings a run of each task reads, by section; the MLflow params of its runs (:func:`run_params`).
TASK_SECTIONS = {"classify": ("data", "preprocess", "split", "model", "train", "mlflow", "clinical"),
                 "localize": ("data", "preprocess", "split", "model", "train", "mlflow", "localize")}


# A localizer takes the classifier's windowing but its own size, mode and channels (localizer_preprocessing).
_NOT_READ = {"localize": ("preprocess.img_size", "preprocess.mode", "preprocess.roi_mm", "preprocess.slices",
                          "model.slice_pooling", "model.loss_weights", "model.severity_sample_weights", "model.severity_head",
                          "model.pooling",
                          "model.calibration", "train.site_jitter", "train.augment.")}


def param_name(key: str, task: str = "classify") -> str:
    """The MLflow param name of a setting: its shortcut where it has one (``arch`` for model.arch, the name
    ``mlflow run -P`` and the CLI flags use, so that a parameter given there and the value the run resolves
    are one param), ``experiment`` for the experiment's name, else the dotted key."""
    if key == "name":
        return "experiment"
    if task == "localize" and key in ("localize.img_size", "preprocess.img_size"):  # -P img_size sets the first
        return "img_size" if key == "localize.img_size" else key
    return _SHORT_NAME.get(key, key)


def run_params(config: "ExperimentConfig", *sections: str) -> dict[str, Any]:
    """One param per setting the run's task reads (``TASK_SECTIONS``, plus ``sections`` such as
    ``tuning``), with its resolved value, named by :func:`param_name`; the task itself is a tag."""
    read = TASK_SECTIONS[config.task] + sections
    skipped = _NOT_READ.get(config.task, ())
    return {param_name(key, config.task): value for key, value in config.flat().items()
            if (key == "name" or key.split(".")[0] in read) and not key.startswith("tuning.search_space.")
            and not key.startswith(skipped)}


# The flags of `spinemri data prepare`: the preprocessing and split of the cache it builds.
PREPARE_SHORTCUTS = {
    "img_size": "preprocess.img_size", "mode": "preprocess.mode", "roi_mm": "preprocess.roi_mm",
    "slices": "preprocess.slices", "equalize": "preprocess.equalize", "dicom_window": "preprocess.dicom_window",
    "workers": "data.workers", "split": "split.fractions", "split_seed": "split.seed",
}


def setting_field(key: str) -> dataclasses.Field:
    """The dataclass field of a dotted config key ('train.lr'); ConfigError names the valid keys."""
    cls, found = ExperimentConfig, None
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            raise ConfigError(f"{key} is not a setting; valid here: {', '.join(fields) or 'none'}")
        found = fields[part]
        default = found.default_factory() if found.default_factory is not dataclasses.MISSING else found.default
        cls = type(default)
    return found


def setting_help(key: str) -> str:
    """A setting's help text and built-in default: what the CLI flags and the docs show."""
    field_ = setting_field(key)
    default = field_.default_factory() if field_.default_factory is not dataclasses.MISSING else field_.default
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{field_.metadata.get('help', key)} ({key}; the experiment's value, built-in {shown!r})"
