"""The settings, one dataclass per section of an experiment file, each setting's default and help side by side
(``setting(default, help)``), and the rules that validate them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from spinemri.data.schema import ANY_LEVEL, CONDITIONS, DEFAULT_SPLIT, HEADS, REFERRAL_POINTS, SERIES_TYPES, SEVERE_SPINAL
from spinemri.errors import ConfigError
from spinemri.models.catalog import CATALOG, FEATURE_POOLING, SEVERITY_HEADS, SLICE_POOLING, THESIS_ARCHS

OPTIMIZERS = ("adam", "adamw", "sgd")


STRATEGIES = ("default", "mirrored", "multiworker")


MIXED_PRECISION = ("auto", "on", "off")


CALIBRATIONS = ("temperature", "none")


def setting(default, help: str):
    """A dataclass field with its default and its help text (shown by the CLI and the docs)."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    data_dir: str = setting("", "dataset folder (RSNA layout) or flat CSV; empty: the built-in phantom, generated once and cached")
    phantom_studies: int = setting(40, "studies of the built-in phantom")
    phantom_seed: int = setting(0, "seed of the built-in phantom (same seed, same files)")
    workers: int = setting(2, "processes preprocessing the cache")

    def validate(self) -> None:
        check(self.phantom_studies >= 3, "data.phantom_studies", "must be >= 3", self.phantom_studies)
        check(self.workers >= 1, "data.workers", "must be >= 1", self.workers)


@dataclass
class SplitConfig:
    fractions: tuple[float, float, float] = setting(DEFAULT_SPLIT, "train, validation and test fractions of the studies")
    seed: int = setting(0, "seed of the study-level split")
    folds: int = setting(0, "K >= 2: K-fold cross-validation by study of the studies outside the test split (a "
                         "nested run per fold, out-of-fold predictions of every study); 0: one train/val/test split")

    def validate(self) -> None:
        check(isinstance(self.folds, int) and (self.folds == 0 or self.folds >= 2), "split.folds",
               "must be 0 (one split) or a whole number >= 2", self.folds)
        f = tuple(self.fractions)
        check(len(f) == 3 and all(isinstance(v, (int, float)) and v >= 0 for v in f) and abs(sum(f) - 1) < 1e-6,
               "split.fractions", "must be three non-negative numbers (train, val, test) summing to 1", f)
        if self.folds:  # cross-validation validates on each fold: only the locked test share is read
            check(f[2] < 1, "split.fractions", "leaves no study for the cross-validation (test must be < 1; 0 "
                   "cross-validates every study)", f)
        else:
            check(f[1] > 0 and f[2] > 0, "split.fractions", "needs val and test > 0 for one train/val/test "
                   "split (a cross-validation, split.folds >= 2, may set test to 0)", f)


@dataclass
class ModelConfig:
    arch: str = setting("densenet", "backbone: densenet, inception_v3, mobilenet_v2, tiny, ... (see docs/training.md)")
    weights: str = setting("none", "none (random initialisation), imagenet, or the path of a weights file")
    dense_units: int = setting(256, "units of the dense layer before the three heads")
    dropout: float = setting(0.3, "dropout before the heads")
    loss_weights: dict = field(default_factory=lambda: {"condition": 1.0, "level": 1.0, "severity": 1.0}, metadata={"help": "weight of each head's loss (condition, level, severity)"})
    severity_sample_weights: bool = setting(True, "weight severity samples 1/2/4 as the competition metric does")
    bn_momentum: float = setting(0.0, "> 0: every BatchNormalization's momentum (0.9 settles faster in short runs); 0 keeps the backbone's")
    slice_pooling: str = setting("channels", "how the slices of a 2.5D stack (preprocess.slices) meet: channels (one "
                                 "image, slices as channels), attention or lstm (a shared 2D backbone per slice, "
                                 "then attention weights or an LSTM across slices)")
    pooling: str = setting("average", "how the backbone's feature map meets the heads: average (its global average) "
                           "or grid (the averages of a 4 x 4 grid, side by side: keeps where in the image a feature "
                           "is, for whole slices where each site has its place)")
    severity_head: str = setting("auto", "single (one severity distribution per image, for a crop of one site), "
                                 "per_site (one per condition and level, read at the site a row names: for images "
                                 "that show several sites) or auto (per_site in slice mode, single in roi mode); "
                                 "either starts at the training split's weight-aware prior")
    calibration: str = setting("none", "temperature (scale each head's probabilities, severity per condition, "
                               "by temperatures fitted on validation or out-of-fold predictions at the labelled "
                               "sites) or none; see docs/training.md before using it for study-level grading")

    def validate(self) -> None:
        check(self.dense_units >= 1, "model.dense_units", "must be >= 1", self.dense_units)
        check(0 <= self.dropout < 1, "model.dropout", "must be within [0, 1)", self.dropout)
        check(self.slice_pooling in SLICE_POOLING, "model.slice_pooling", f"must be one of {', '.join(SLICE_POOLING)}",
               self.slice_pooling)
        check(self.pooling in FEATURE_POOLING, "model.pooling", f"must be one of {', '.join(FEATURE_POOLING)}",
               self.pooling)
        check(self.pooling == "average" or self.slice_pooling == "channels", "model.pooling",
               "grid pools one feature map: it needs model.slice_pooling channels", self.pooling)
        check(self.severity_head in SEVERITY_HEADS, "model.severity_head", f"must be one of {', '.join(SEVERITY_HEADS)}",
               self.severity_head)
        check(self.calibration in CALIBRATIONS, "model.calibration", f"must be one of {', '.join(CALIBRATIONS)}",
               self.calibration)
        check(0 <= self.bn_momentum < 1, "model.bn_momentum", "must be within [0, 1) (0 keeps the backbone's)",
               self.bn_momentum)
        check(set(self.loss_weights) == set(HEADS) and all(float(v) >= 0 for v in self.loss_weights.values()),
               "model.loss_weights", f"needs non-negative weights for exactly {', '.join(HEADS)}", self.loss_weights)
        if self.weights not in ("none", "imagenet"):
            check(Path(self.weights).is_file(), "weights",
                   "must be 'imagenet', 'none' or the path of an existing weights file", self.weights)


@dataclass
class AugmentConfig:
    rotation_deg: float = setting(8.0, "random rotation range in degrees")
    shift: float = setting(0.06, "random shift range, a fraction of the image side")
    zoom: float = setting(0.08, "random zoom range")
    brightness: float = setting(0.1, "random brightness range")
    contrast: float = setting(0.1, "random contrast range")
    flip: bool = setting(False, "random left-right flip (swaps left/right labels on axial images)")
    strength: float = setting(1.0, "multiplies every range above (0: no augmentation); tunable as one knob")

    def validate(self) -> None:
        for name in ("rotation_deg", "shift", "zoom", "brightness", "contrast", "strength"):
            value = getattr(self, name)
            check(value >= 0, f"train.augment.{name}", "must be >= 0", value)
        check(self.shift * self.strength < 1 and self.zoom * self.strength < 1, "train.augment",
               "shift and zoom (times strength) must be < 1", (self.shift, self.zoom, self.strength))


@dataclass
class TrainConfig:
    epochs: int = setting(4, "training epochs")
    batch_size: int = setting(16, "batch size (the global batch over all devices)")
    lr: float = setting(1e-3, "learning rate")
    optimizer: str = setting("adam", "adam, adamw or sgd")
    weight_decay: float = setting(0.0, "weight decay (adamw, sgd)")
    momentum: float = setting(0.9, "momentum (sgd only)")
    label_smoothing: float = setting(0.0, "label smoothing of the three losses")
    freeze_epochs: int = setting(0, "epochs with the backbone frozen before fine-tuning it")
    fine_tune_lr_factor: float = setting(0.1, "learning rate multiplier once the backbone is unfrozen")
    monitor: str = setting("val_loss", "validation metric that early stopping, the LR schedule and the best checkpoint watch")
    early_stopping_patience: int = setting(4, "epochs without improvement before stopping")
    reduce_lr_patience: int = setting(2, "epochs without improvement before halving the learning rate")
    seed: int = setting(0, "random seed of training")
    # Same seed, same results (TensorFlow's op determinism, for the whole process; slower on GPUs).
    deterministic: bool = setting(False, "same seed, same results (TensorFlow's op determinism, for the whole process; slower on GPUs)")
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={"help": "training augmentation"})
    site_jitter_mm: float = setting(0.0, "move each training crop in plane by a normal shift of this σ per axis, in mm "
                                    "(how far a localizer errs; 0: never)")
    site_jitter_slices: float = setting(0.0, "chance that a training crop's slice stack moves one slice up or down "
                                        "(how often a localizer misses the slice; 0: never)")
    site_jitter_from: str = setting("", "a registered localizer (models:/spinemri-localizer) or localizer runs "
                                    "(runs:/ID,runs:/ID; cross-validations give out-of-fold errors): jitter each "
                                    "series type as its localizer errs on held-out studies, instead of the two "
                                    "settings above")
    strategy: str = setting("default", "default (one device), mirrored (all visible GPUs) or multiworker (several "
                            "machines, from the TF_CONFIG variable); batch_size is the global batch")
    worker_timeout_s: float = setting(300.0, "multiworker: seconds a worker waits for the others, to join the cluster "
                                      "and at each training step, before the training stops as failed (a killed "
                                      "worker is noticed sooner, by its missing heartbeats)")
    mixed_precision: str = setting("auto", "auto (mixed_float16 iff a GPU is visible), on (needs a GPU) or off")

    def __post_init__(self) -> None:
        # YAML 1.1 reads a bare on/off as a boolean (and --set passes it through YAML): take it as meant.
        if isinstance(self.mixed_precision, bool) or str(self.mixed_precision) in ("True", "False"):
            self.mixed_precision = "on" if str(self.mixed_precision) == "True" else "off"

    def validate(self) -> None:
        check(self.strategy in STRATEGIES, "train.strategy", f"must be one of {', '.join(STRATEGIES)} "
               "(mirrored = all visible GPUs of this machine, multiworker = several machines)", self.strategy)
        check(isinstance(self.worker_timeout_s, (int, float)) and self.worker_timeout_s > 0, "train.worker_timeout_s",
               "must be a number of seconds > 0", self.worker_timeout_s)
        check(self.mixed_precision in MIXED_PRECISION, "train.mixed_precision",
               f"must be one of {', '.join(MIXED_PRECISION)} (auto = mixed_float16 when a GPU is visible)",
               self.mixed_precision)
        check(isinstance(self.deterministic, bool), "train.deterministic", "must be true or false", self.deterministic)
        check(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "must be an integer >= 1", self.epochs)
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size",
               "must be an integer >= 1", self.batch_size)
        check(0 < self.lr < 10, "lr", "must be > 0 (and < 10)", self.lr)
        check(self.optimizer in OPTIMIZERS, "train.optimizer", f"must be one of {', '.join(OPTIMIZERS)}", self.optimizer)
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        check(0 <= self.label_smoothing < 1, "train.label_smoothing", "must be within [0, 1)", self.label_smoothing)
        check(0 <= self.freeze_epochs <= self.epochs, "train.freeze_epochs", f"must be within [0, epochs={self.epochs}]",
               self.freeze_epochs)
        check(0 < self.fine_tune_lr_factor <= 1, "train.fine_tune_lr_factor", "must be within (0, 1]",
               self.fine_tune_lr_factor)
        check(self.monitor.startswith("val_"), "train.monitor", "must be a validation metric such as val_loss",
               self.monitor)
        check(self.early_stopping_patience >= 0 and self.reduce_lr_patience >= 0, "train.*_patience",
               "must be >= 0", (self.early_stopping_patience, self.reduce_lr_patience))
        check(self.site_jitter_mm >= 0, "train.site_jitter_mm", "must be >= 0 millimetres", self.site_jitter_mm)
        check(0 <= self.site_jitter_slices <= 1, "train.site_jitter_slices", "must be a probability within [0, 1]",
               self.site_jitter_slices)
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

    trials: int = setting(0, "N > 0: tune with an Optuna study of N finished trials first; 0: train once")
    pruner: str = setting("hyperband", "hyperband, median or none")
    n_startup_trials: int = setting(2, "median pruner: trials before it may prune")
    n_warmup_steps: int = setting(1, "median pruner: epochs before it may prune a trial")
    sampler_seed: int = setting(0, "seed of the TPE sampler")
    study_name: str = setting("", "Optuna study name; empty: <experiment>-<arch>")
    storage: str = setting("", "Optuna storage: a journal file path or postgresql://...; empty: optuna-journal.log next to the MLflow store")
    workers: int = setting(1, "processes working on the study at once")
    heartbeat_interval: int = setting(10, "database storages: seconds between a running trial's heartbeats")
    grace_period: int = setting(60, "database storages: a running trial without a heartbeat for this many seconds "
                                    "is failed and retried by another worker")
    search_space: dict = field(default_factory=dict, metadata={"help": "dotted config key -> distribution (type float|int|categorical, low, high, log, choices)"})

    def validate(self) -> None:
        check(isinstance(self.trials, int) and self.trials >= 0, "trials", "must be an integer >= 0", self.trials)
        check(self.pruner in PRUNERS, "tuning.pruner", f"must be one of {', '.join(PRUNERS)}", self.pruner)
        check(self.n_startup_trials >= 0 and self.n_warmup_steps >= 0, "tuning.n_startup_trials/n_warmup_steps",
               "must be >= 0", (self.n_startup_trials, self.n_warmup_steps))
        check(self.workers >= 1, "tuning.workers", "must be >= 1", self.workers)
        check(isinstance(self.heartbeat_interval, int) and self.heartbeat_interval >= 1, "tuning.heartbeat_interval",
               "must be a whole number of seconds >= 1", self.heartbeat_interval)
        check(isinstance(self.grace_period, int) and self.grace_period > self.heartbeat_interval,
               "tuning.grace_period", f"must be a whole number of seconds above tuning.heartbeat_interval "
               f"({self.heartbeat_interval}), e.g. {3 * self.heartbeat_interval}", self.grace_period)


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


@dataclass
class MlflowConfig:
    experiment: str = setting("spinemri-classify", "MLflow experiment of the runs")
    registered_model: str = setting("spinemri", "registered model each trained model becomes a version of")
    register: bool = setting(True, "register each trained model (the champion policy: docs/serving.md)")
    champion_metric: str = setting("test_severity_weighted_log_loss", "held-out metric that decides the champion alias")
    champion_policy: str = setting("paired", "how a new version must beat the champion: paired (the 95% interval of "
                                   "a paired bootstrap over studies excludes zero) or strict (any improvement)")
    allow_below_floor: bool = setting(False, "let a version that is not significantly better than its floor (the "
                                      "per-site prior of its training rows, on the same held-out studies) become "
                                      "champion; false: such a version becomes challenger and the decision says why")
    system_metrics_interval: float = setting(10.0, "seconds between samples of CPU, memory, disk and GPU use, "
                                             "logged as system/* metrics of training and tuning runs; 0: none")
    ui_url: str = setting("", "the MLflow UI's address for the links spinemri prints (empty: the tracking "
                          "server's, or http://127.0.0.1:5000 where `mlflow ui` serves a local store)")

    def validate(self) -> None:
        if self.system_metrics_interval < 0:
            raise ConfigError(f"mlflow.system_metrics_interval must be >= 0 seconds (0 turns system metrics off), "
                              f"got {self.system_metrics_interval}")
        if not self.registered_model.strip():
            raise ConfigError("mlflow.registered_model must not be empty")
        if self.champion_policy not in ("paired", "strict"):
            raise ConfigError(f"mlflow.champion_policy must be paired or strict, got {self.champion_policy!r}")
        if not isinstance(self.allow_below_floor, bool):
            raise ConfigError(f"mlflow.allow_below_floor must be true or false, got {self.allow_below_floor!r}")
        if not self.champion_metric.startswith("test_"):
            raise ConfigError(f"mlflow.champion_metric must be a held-out test metric (test_...), "
                              f"got {self.champion_metric!r}")


@dataclass
class ClinicalConfig:
    """Referral operating points (spinemri.metrics.operating): the sensitivity each threshold is chosen for."""

    sensitivity: dict = field(default_factory=lambda: {**{c: 0.90 for c in CONDITIONS}, SEVERE_SPINAL: 0.95,
                                                       ANY_LEVEL: 0.90},
                              metadata={"help": "target sensitivity per referral point (each condition, "
                                                f"{SEVERE_SPINAL}, {ANY_LEVEL}); its threshold is chosen on "
                                                "validation or out-of-fold rows, never test"})

    def validate(self) -> None:
        check(isinstance(self.sensitivity, dict), "clinical.sensitivity", "must map referral points to "
              "sensitivities", self.sensitivity)
        unknown = sorted(set(self.sensitivity) - set(REFERRAL_POINTS))
        check(not unknown, "clinical.sensitivity", f"knows the points {', '.join(REFERRAL_POINTS)}", unknown)
        for name, value in self.sensitivity.items():
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1,
                  f"clinical.sensitivity.{name}", "must be a sensitivity in (0, 1]", value)

    def targets(self) -> dict[str, float]:
        """Every point's target: the defaults, with those set here."""
        return {**ClinicalConfig().sensitivity, **{k: float(v) for k, v in self.sensitivity.items()}}


TASKS = ("classify", "localize")


@dataclass
class LocalizeConfig:
    """Stage 1 of study-level diagnosis (``task: localize``): find the sites on one series type.

    The localizer sees whole slices: preprocessing uses mode ``slice`` at ``img_size`` with
    ``channels``, and the preprocess section's windowing (p_low, p_high, equalize, dicom_window).
    """

    series: str = setting("sagittal_t2", "series type the localizer learns: sagittal_t2, sagittal_t1 or axial_t2")
    img_size: int = setting(128, "side of the localizer's input in pixels (whole slices)")
    channels: int = setting(1, "1, or 3: neighbouring slices as channels")
    slice_sigma: float = setting(1.0, "width, in slices, of the soft target around the labelled slice")
    point_slices: int = setting(1, "slices either side of the labelled one that also learn its points")
    point_loss_weight: float = setting(10.0, "weight of the point loss")
    slice_loss_weight: float = setting(1.0, "weight of the slice loss")

    def validate(self) -> None:
        check(self.series in SERIES_TYPES, "localize.series", f"must be one of {', '.join(SERIES_TYPES)}",
               self.series)
        check(isinstance(self.img_size, int) and 16 <= self.img_size <= 1024, "localize.img_size",
               "must be an integer from 16 to 1024", self.img_size)
        check(self.channels in (1, 3), "localize.channels", "must be 1 or 3", self.channels)
        check(self.slice_sigma > 0, "localize.slice_sigma", "must be > 0", self.slice_sigma)
        check(self.point_slices >= 0, "localize.point_slices", "must be >= 0", self.point_slices)
        check(self.point_loss_weight >= 0 and self.slice_loss_weight >= 0, "localize.*_loss_weight",
               "must be >= 0", (self.point_loss_weight, self.slice_loss_weight))


@dataclass
class CompareConfig:
    archs: tuple[str, ...] = setting(THESIS_ARCHS, "backbones trained and tabulated by spinemri compare")

    def validate(self) -> None:
        unknown = [a for a in self.archs if a not in CATALOG]
        if not self.archs or unknown:
            raise ConfigError(f"compare.archs must list backbones from {', '.join(sorted(CATALOG))}; "
                              f"got {', '.join(self.archs) or 'none'}")


def check(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule}; got {value!r}")


def plain(value):
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
