"""Experiment configuration: one YAML under experiments/, dataclasses with validation, overrides.

An experiment file has the sections of :class:`ExperimentConfig` (data, preprocess, split, model,
train, mlflow); anything it leaves out keeps the defaults below. Command-line parameters
(``arch``, ``epochs``, ...) and ``--set section.key=value`` override it. The resolved config is
logged with every run, so a run can be reproduced from its own record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from spinemri.data.preprocess import PreprocessConfig
from spinemri.redact import redact_values

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"
HEADS = ("condition", "level", "severity")
OPTIMIZERS = ("adam", "adamw", "sgd")
STRATEGIES = ("default", "mirrored")
MIXED_PRECISION = ("auto", "on", "off")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the valid range."""


@dataclass
class DataConfig:
    data_dir: str = ""  # empty: the built-in phantom, generated once and cached
    phantom_studies: int = 40
    phantom_seed: int = 0
    workers: int = 2  # preprocessing processes

    def validate(self) -> None:
        _check(self.phantom_studies >= 3, "data.phantom_studies", "must be >= 3", self.phantom_studies)
        _check(self.workers >= 1, "data.workers", "must be >= 1", self.workers)


@dataclass
class SplitConfig:
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0

    def validate(self) -> None:
        f = tuple(self.fractions)
        _check(len(f) == 3 and all(v >= 0 for v in f) and abs(sum(f) - 1) < 1e-6 and f[1] > 0 and f[2] > 0,
               "split.fractions", "must be three non-negative numbers summing to 1 with val and test > 0", f)


@dataclass
class ModelConfig:
    arch: str = "densenet"
    weights: str = "none"  # none | imagenet | path to a weights file
    dense_units: int = 256
    dropout: float = 0.3
    loss_weights: dict = field(default_factory=lambda: {"condition": 1.0, "level": 1.0, "severity": 1.0})
    severity_sample_weights: bool = True  # the competition's 1/2/4 for Normal/Mild, Moderate, Severe
    bn_momentum: float = 0.0  # > 0: set every BatchNormalization's momentum (0.9 settles faster in short runs)

    def validate(self) -> None:
        _check(self.dense_units >= 1, "model.dense_units", "must be >= 1", self.dense_units)
        _check(0 <= self.dropout < 1, "model.dropout", "must be within [0, 1)", self.dropout)
        _check(0 <= self.bn_momentum < 1, "model.bn_momentum", "must be within [0, 1) (0 keeps the backbone's)",
               self.bn_momentum)
        _check(set(self.loss_weights) == set(HEADS) and all(float(v) >= 0 for v in self.loss_weights.values()),
               "model.loss_weights", f"needs non-negative weights for exactly {', '.join(HEADS)}", self.loss_weights)
        if self.weights not in ("none", "imagenet"):
            _check(Path(self.weights).is_file(), "weights",
                   "must be 'imagenet', 'none' or the path of an existing weights file", self.weights)


@dataclass
class AugmentConfig:
    rotation_deg: float = 8.0
    shift: float = 0.06  # fraction of the image side
    zoom: float = 0.08
    brightness: float = 0.1
    contrast: float = 0.1
    flip: bool = False  # left-right flip; swaps left/right labels on axial images
    strength: float = 1.0  # multiplies every range above (0 = no augmentation); tunable as one knob

    def validate(self) -> None:
        for name in ("rotation_deg", "shift", "zoom", "brightness", "contrast", "strength"):
            value = getattr(self, name)
            _check(value >= 0, f"train.augment.{name}", "must be >= 0", value)
        _check(self.shift * self.strength < 1 and self.zoom * self.strength < 1, "train.augment",
               "shift and zoom (times strength) must be < 1", (self.shift, self.zoom, self.strength))


@dataclass
class TrainConfig:
    epochs: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    label_smoothing: float = 0.0
    freeze_epochs: int = 0  # epochs with the backbone frozen before fine-tuning it
    fine_tune_lr_factor: float = 0.1  # learning rate multiplier once the backbone is unfrozen
    monitor: str = "val_loss"  # early stopping, LR schedule and best checkpoint watch this
    early_stopping_patience: int = 4
    reduce_lr_patience: int = 2
    seed: int = 0
    # Same seed, same results (TensorFlow's op determinism, for the whole process; slower on GPUs).
    deterministic: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    strategy: str = "default"  # default: one device; mirrored: MirroredStrategy over all visible GPUs
    mixed_precision: str = "auto"  # auto: mixed_float16 iff a GPU is visible; on (needs a GPU) | off

    def __post_init__(self) -> None:
        # YAML 1.1 reads a bare on/off as a boolean (and --set passes it through YAML): take it as meant.
        if isinstance(self.mixed_precision, bool) or str(self.mixed_precision) in ("True", "False"):
            self.mixed_precision = "on" if str(self.mixed_precision) == "True" else "off"

    def validate(self) -> None:
        _check(self.strategy in STRATEGIES, "train.strategy", f"must be one of {', '.join(STRATEGIES)} "
               "(mirrored = all visible GPUs of this machine)", self.strategy)
        _check(self.mixed_precision in MIXED_PRECISION, "train.mixed_precision",
               f"must be one of {', '.join(MIXED_PRECISION)} (auto = mixed_float16 when a GPU is visible)",
               self.mixed_precision)
        _check(isinstance(self.deterministic, bool), "train.deterministic", "must be true or false", self.deterministic)
        _check(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "must be an integer >= 1", self.epochs)
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size",
               "must be an integer >= 1", self.batch_size)
        _check(0 < self.lr < 10, "lr", "must be > 0 (and < 10)", self.lr)
        _check(self.optimizer in OPTIMIZERS, "train.optimizer", f"must be one of {', '.join(OPTIMIZERS)}", self.optimizer)
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", "must be within [0, 1)", self.label_smoothing)
        _check(0 <= self.freeze_epochs <= self.epochs, "train.freeze_epochs", f"must be within [0, epochs={self.epochs}]",
               self.freeze_epochs)
        _check(0 < self.fine_tune_lr_factor <= 1, "train.fine_tune_lr_factor", "must be within (0, 1]",
               self.fine_tune_lr_factor)
        _check(self.monitor.startswith("val_"), "train.monitor", "must be a validation metric such as val_loss",
               self.monitor)
        _check(self.early_stopping_patience >= 0 and self.reduce_lr_patience >= 0, "train.*_patience",
               "must be >= 0", (self.early_stopping_patience, self.reduce_lr_patience))
        self.augment.validate()


DISTRIBUTIONS = ("float", "int", "categorical")
PRUNERS = ("median", "hyperband", "none")


@dataclass
class TuningConfig:
    """Optuna: how many trials, how to prune, where the study lives, and the search space.

    ``search_space`` maps a dotted config key to a distribution, e.g.
    ``train.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}`` or
    ``train.batch_size: {type: categorical, choices: [8, 16, 32]}``.
    """

    trials: int = 0  # 0: train once with the experiment's values
    pruner: str = "hyperband"  # measured in bench/tune.py: 48 % fewer epochs, best value kept; median lost it
    n_startup_trials: int = 2  # trials before the median pruner may prune
    n_warmup_steps: int = 1  # epochs before the median pruner may prune a trial
    sampler_seed: int = 0
    study_name: str = ""  # default: <experiment>-<arch>
    storage: str = ""  # default: a journal file next to the MLflow store
    workers: int = 1  # processes working on the study at once
    search_space: dict = field(default_factory=dict)

    def validate(self) -> None:
        _check(isinstance(self.trials, int) and self.trials >= 0, "trials", "must be an integer >= 0", self.trials)
        _check(self.pruner in PRUNERS, "tuning.pruner", f"must be one of {', '.join(PRUNERS)}", self.pruner)
        _check(self.n_startup_trials >= 0 and self.n_warmup_steps >= 0, "tuning.n_startup_trials/n_warmup_steps",
               "must be >= 0", (self.n_startup_trials, self.n_warmup_steps))
        _check(self.workers >= 1, "tuning.workers", "must be >= 1", self.workers)


def validate_search_space(space: Mapping[str, Any], config_dict: Mapping[str, Any]) -> None:
    """Refuse a malformed space before any training: each problem names its YAML key."""
    if not isinstance(space, Mapping):
        raise ConfigError(f"tuning.search_space must be a mapping of config keys to distributions, got {space!r}")
    for key, spec in space.items():
        where = f"tuning.search_space.{key}"
        node = config_dict
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ConfigError(f"{where}: {key} is not a config key (e.g. train.lr, model.dropout)")
            node = node[part]
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where} must be a mapping with a 'type', got {spec!r}")
        kind = spec.get("type")
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{where}.type must be one of {', '.join(DISTRIBUTIONS)}, got {kind!r}")
        allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} for type {kind}; valid: {', '.join(sorted(allowed))}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, (list, tuple)) or not choices:
                raise ConfigError(f"{where}.choices must be a non-empty list, got {choices!r}")
            continue
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise ConfigError(f"{where} needs numeric low and high, got low={low!r}, high={high!r}")
        if low > high:
            raise ConfigError(f"{where}: low ({low}) is greater than high ({high})")
        if spec.get("log") and low <= 0:
            raise ConfigError(f"{where}: a log scale needs low > 0, got {low}")
        if kind == "int" and (int(low) != low or int(high) != high):
            raise ConfigError(f"{where}: an int distribution needs whole-number low and high, got {low}, {high}")


def with_values(config: "ExperimentConfig", values: Mapping[str, Any]) -> "ExperimentConfig":
    """A copy of ``config`` with dotted keys replaced (a trial's suggestion), validated."""
    raw = config.to_dict()
    for key, value in values.items():
        _set_dotted(raw, key, value, "the search space")
    return from_dict(raw, source="trial").validate()


@dataclass
class MlflowConfig:
    experiment: str = "spinemri-classify"  # one experiment per task
    registered_model: str = "spinemri"
    register: bool = True  # register each trained model (alias policy: spinemri.registry)
    champion_metric: str = "test_severity_weighted_log_loss"  # held-out metric that decides `champion`

    def validate(self) -> None:
        if not self.registered_model.strip():
            raise ConfigError("mlflow.registered_model must not be empty")
        if not self.champion_metric.startswith("test_"):
            raise ConfigError(f"mlflow.champion_metric must be a held-out test metric (test_...), "
                              f"got {self.champion_metric!r}")


TASKS = ("classify", "localize")
LOCALIZE_SERIES = ("sagittal_t2", "sagittal_t1", "axial_t2")  # spinemri.localization.sites.SERIES_TASKS


@dataclass
class LocalizeConfig:
    """Stage 1 of study-level diagnosis (``task: localize``): find the sites on one series type.

    The localizer sees whole slices: preprocessing uses mode ``slice`` at ``img_size`` with
    ``channels``, and the preprocess section's windowing (p_low, p_high, equalize, dicom_window).
    """

    series: str = "sagittal_t2"  # sagittal_t2 | sagittal_t1 | axial_t2
    img_size: int = 128
    channels: int = 1
    slice_sigma: float = 1.0  # width, in slices, of the soft target around the labelled slice
    point_slices: int = 1  # slices either side of the labelled one that also learn its points
    point_loss_weight: float = 10.0
    slice_loss_weight: float = 1.0

    def validate(self) -> None:
        _check(self.series in LOCALIZE_SERIES, "localize.series", f"must be one of {', '.join(LOCALIZE_SERIES)}",
               self.series)
        _check(isinstance(self.img_size, int) and 16 <= self.img_size <= 1024, "localize.img_size",
               "must be an integer from 16 to 1024", self.img_size)
        _check(self.channels in (1, 3), "localize.channels", "must be 1 or 3", self.channels)
        _check(self.slice_sigma > 0, "localize.slice_sigma", "must be > 0", self.slice_sigma)
        _check(self.point_slices >= 0, "localize.point_slices", "must be >= 0", self.point_slices)
        _check(self.point_loss_weight >= 0 and self.slice_loss_weight >= 0, "localize.*_loss_weight",
               "must be >= 0", (self.point_loss_weight, self.slice_loss_weight))


# The thesis's seven backbones (its Table 3.1), the default set of `spinemri compare --train`.
THESIS_ARCHS = ("inception_v3", "xception", "vgg16", "nasnet_large", "resnet50", "mobilenet_v2", "densenet")


@dataclass
class CompareConfig:
    archs: tuple[str, ...] = THESIS_ARCHS  # backbones trained and tabulated by `spinemri compare`

    def validate(self) -> None:
        from spinemri.models.backbones import BACKBONES

        unknown = [a for a in self.archs if a not in BACKBONES]
        if not self.archs or unknown:
            raise ConfigError(f"compare.archs must list backbones from {', '.join(sorted(BACKBONES))}; "
                              f"got {', '.join(self.archs) or 'none'}")


@dataclass
class ExperimentConfig:
    name: str = "default"
    task: str = "classify"
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: dict = field(default_factory=lambda: PreprocessConfig().to_dict())
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)

    @property
    def preprocessing(self) -> PreprocessConfig:
        """The classifier's preprocessing; a localizer's is :attr:`localizer_preprocessing`."""
        return PreprocessConfig.from_dict(self.preprocess)

    @property
    def localizer_preprocessing(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict({**self.preprocess, "mode": "slice", "img_size": self.localize.img_size,
                                           "channels": self.localize.channels})

    def validate(self) -> "ExperimentConfig":
        try:
            self.preprocessing  # noqa: B018 - validates img_size, mode, ...
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.data.validate()
        self.split.validate()
        self.model.validate()
        self.train.validate()
        self.tuning.validate()
        self.mlflow.validate()
        self.compare.validate()
        self.localize.validate()
        _check(self.task in TASKS, "task", f"must be one of {', '.join(TASKS)}", self.task)
        validate_search_space(self.tuning.search_space, self.to_dict())
        return self

    def to_dict(self, *, redacted: bool = False) -> dict[str, Any]:
        """The config as plain data; ``redacted``: URL passwords masked (what a run logs, see spinemri.redact)."""
        raw = _plain(dataclasses.asdict(self))
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


# Short names accepted on the command line and in MLproject, mapped to their config keys.
SHORTCUTS = {
    "arch": "model.arch", "weights": "model.weights", "data_dir": "data.data_dir",
    "img_size": "preprocess.img_size", "mode": "preprocess.mode", "epochs": "train.epochs",
    "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed", "trials": "tuning.trials",
    "storage": "tuning.storage", "study_name": "tuning.study_name", "pruner": "tuning.pruner",
    "workers": "tuning.workers", "task": "task", "series": "localize.series", "strategy": "train.strategy",
    "mixed_precision": "train.mixed_precision",
}


def resolve_experiment(experiment: str | Path) -> Path:
    """A name ('quick') or a path to a YAML file; an unknown name lists the available ones."""
    path = Path(experiment)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    for folder in (Path.cwd() / "experiments", EXPERIMENTS_DIR):
        candidate = folder / f"{experiment}.yaml"
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    raise ConfigError(f"experiment {str(experiment)!r} not found: give a YAML path or one of {', '.join(available)}")


def load_experiment(experiment: str | Path = "quick", overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read an experiment YAML, apply overrides (short names or dotted keys) and validate."""
    path = resolve_experiment(experiment)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (data, preprocess, model, train, ...)")
    raw.setdefault("name", path.stem)
    for key, value in (overrides or {}).items():
        if value is None or value == "":
            continue
        _set_dotted(raw, SHORTCUTS.get(key, key), value, path)
    preprocess = raw.get("preprocess") or {}
    if isinstance(preprocess, dict) and str(preprocess.get("img_size", "")).strip() in ("0", "native"):
        from spinemri.models.backbones import get_backbone  # keras import only when needed

        arch = (raw.get("model") or {}).get("arch", ModelConfig.arch)
        try:
            preprocess["img_size"] = get_backbone(arch).native_size
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    config = from_dict(raw, source=str(path))
    return config.validate()


def from_dict(raw: Mapping[str, Any], source: str = "config") -> ExperimentConfig:
    return _build(ExperimentConfig, raw, source, "")


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value such as train.lr=3e-4, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        detail = str(exc).splitlines()[0]
        if "!!" in value or "tag" in detail:
            raise ConfigError(f"--set {key.strip()}: {value!r} uses a YAML tag ({detail}); give a plain value "
                              "such as a number, true/false, a string or a [list]") from None
        raise ConfigError(f"--set {key.strip()}: {value!r} is not valid YAML ({detail}); quote it, "
                          f"e.g. --set '{key.strip()}=\"{value}\"'") from None


# --- internals ---------------------------------------------------------------------------------

def _check(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule}; got {value!r}")


def _set_dotted(raw: dict, key: str, value, source) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section in {source}")
    node[parts[-1]] = value


def _build(cls, raw, source: str, prefix: str):
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {prefix or 'the file'} must be a mapping, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} in {where}; valid: {', '.join(known)}")
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING \
            else known[name].default
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value, source, key)
        elif name == "preprocess":
            defaults = PreprocessConfig().to_dict()
            if not isinstance(value or {}, Mapping):
                raise ConfigError(f"{source}: preprocess must be a mapping, got {value!r}")
            unknown = sorted(set(value or {}) - set(defaults))
            if unknown:
                raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} in section 'preprocess'; "
                                  f"valid: {', '.join(defaults)}")
            merged = {k: _coerce(v, defaults[k], f"preprocess.{k}") for k, v in {**defaults, **(value or {})}.items()}
            try:
                PreprocessConfig.from_dict(merged)
            except ValueError as exc:
                raise ConfigError(f"{source}: preprocess: {exc}") from None
            values[name] = merged
        elif name == "archs":  # a YAML list or "a,b,c" from the command line
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise ConfigError(f"{key} must be a list of backbone names; got {value!r}")
            values[name] = tuple(str(v).strip() for v in items if str(v).strip())
        elif name == "search_space":
            values[name] = dict(value or {})
        elif name == "loss_weights":
            values[name] = {**default, **(value or {})}
        else:
            values[name] = _coerce(value, default, key)
    return cls(**values)


def _coerce(value, default, key):
    """Values from YAML or the command line to the default's type, with a clear error."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return lowered in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, int):
            number = float(value)
            if number != int(number):
                raise ValueError
            return int(number)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            return tuple(float(v) for v in value)
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a {type(default).__name__}; got {value!r}") from None
    return value


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
