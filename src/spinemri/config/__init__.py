"""Experiment configuration, the one home of every setting: YAML under experiments/ -> validated dataclasses.

    sections     one dataclass per section (DataConfig, SplitConfig, ModelConfig, TrainConfig, ...), defaults and help
    experiment   ExperimentConfig (all sections; ClassifierSettings, the three a classifier's fit reads), SHORTCUTS (the flags), the names runs log settings under
    load         load_experiment / from_dict / parse_override / with_values: YAML and overrides to a validated config

An experiment file has the sections of :class:`ExperimentConfig` (data, preprocess, split, model,
train, tuning, mlflow, localize, compare); anything it leaves out keeps the defaults below, and each
setting's help text lives beside its default (``field(metadata={"help": ...})``). One override
mechanism changes them: dotted keys (``--set train.lr=3e-4``), of which :data:`SHORTCUTS` gives
the settings typed most a command-line flag (``--epochs``) and an MLproject parameter. The resolved
config is logged with every run, so a run can be reproduced from its own record.
"""

from spinemri.config.experiment import (PREPARE_SHORTCUTS, SHORTCUTS, TASK_SECTIONS, ClassifierSettings,
    ExperimentConfig, param_name, run_params, setting_field, setting_help)
from spinemri.config.load import (EXPERIMENTS_DIR, from_dict, load_experiment, parse_override, resolve_experiment,
    with_values)
from spinemri.config.sections import (CALIBRATIONS, DISTRIBUTIONS, MIXED_PRECISION, OPTIMIZERS, PRUNERS, STRATEGIES,
    TASKS, AugmentConfig, CompareConfig, DataConfig, LocalizeConfig, MlflowConfig, ModelConfig, SplitConfig,
    TrainConfig, TuningConfig)
from spinemri.data.preprocess import PreprocessConfig
from spinemri.data.schema import HEADS

__all__ = ["CALIBRATIONS", "DISTRIBUTIONS", "EXPERIMENTS_DIR", "HEADS", "MIXED_PRECISION", "OPTIMIZERS", "PREPARE_SHORTCUTS",
           "PRUNERS", "SHORTCUTS", "STRATEGIES", "TASKS", "TASK_SECTIONS", "AugmentConfig", "ClassifierSettings", "CompareConfig", "DataConfig",
           "ExperimentConfig", "LocalizeConfig", "MlflowConfig", "ModelConfig", "PreprocessConfig", "SplitConfig",
           "TrainConfig", "TuningConfig", "from_dict", "load_experiment", "param_name", "parse_override",
           "resolve_experiment", "run_params", "setting_field", "setting_help", "with_values"]
