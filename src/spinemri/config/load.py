"""An experiment file read: YAML under experiments/ (or a path), dotted overrides applied (``--set
train.lr=3e-4``), every value coerced to its setting's type and refused with the key, the rule and the value.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

import yaml

from spinemri.config.experiment import SHORTCUTS, ExperimentConfig
from spinemri.config.sections import ModelConfig
from spinemri.errors import ConfigError
from spinemri.models.catalog import get_spec

EXPERIMENTS_DIR = Path(__file__).resolve().parents[3] / "experiments"


def with_values(config: "ExperimentConfig", values: Mapping[str, Any]) -> "ExperimentConfig":
    """A copy of ``config`` with dotted keys replaced (a trial's suggestion), validated."""
    raw = config.to_dict()
    for key, value in values.items():
        _set_dotted(raw, key, value, "the search space")
    return from_dict(raw, source="trial").validate()


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
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None and v != ""}
    if (overrides.get("task") or raw.get("task")) == "localize" and "img_size" in overrides:
        overrides["localize.img_size"] = overrides.pop("img_size")  # a localizer's input is localize.img_size
    for key, value in overrides.items():
        check_setting(SHORTCUTS.get(key, key))
        _set_dotted(raw, SHORTCUTS.get(key, key), value, path)
    preprocess = raw.get("preprocess") or {}
    if isinstance(preprocess, dict) and str(preprocess.get("img_size", "")).strip() in ("0", "native"):
        preprocess["img_size"] = get_spec((raw.get("model") or {}).get("arch", ModelConfig.arch)).native_size
    config = from_dict(raw, source=str(path))
    return config.validate()


def check_setting(key: str) -> None:
    """An override's dotted key names a setting, or ConfigError naming the key (not the experiment file, which
    does not hold it) and the settings there are."""
    defaults = ExperimentConfig()
    section, _, name = key.partition(".")
    sections = [f.name for f in dataclasses.fields(ExperimentConfig)]
    if section not in sections:
        raise ConfigError(f"unknown setting {key!r}: there is no section or setting {section!r}; the sections and "
                          f"top-level settings are {', '.join(sections)}")
    value = getattr(defaults, section)
    if name and dataclasses.is_dataclass(value):
        head = name.split(".")[0]
        names = [f.name for f in dataclasses.fields(value)]
        if head not in names:
            raise ConfigError(f"unknown setting {key!r}: section {section} has no setting {head!r}; its settings are "
                              f"{', '.join(names)}")


def from_dict(raw: Mapping[str, Any], source: str = "config") -> ExperimentConfig:
    pre = raw.get("preprocess")
    if isinstance(pre, Mapping) and "channels" in pre and "slices" not in pre:  # the name before 2.5D stacks
        raw = {**raw, "preprocess": {("slices" if k == "channels" else k): v for k, v in pre.items()}}
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
            try:
                values[name] = _build(type(default), {} if value is None else value, source, key)
            except ConfigError as exc:
                message = str(exc)
                raise ConfigError(message if message.startswith(source) else f"{source}: {key}: {message}") from None
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
            number = _finite(value)
            if number != int(number):
                raise ValueError
            return int(number)
        if isinstance(default, float):
            return _finite(value)
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)) or len(value) != len(default):
                raise ValueError
            return tuple(_finite(v) for v in value)
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        kind = f"list of {len(default)} finite numbers" if isinstance(default, tuple) else \
            {"int": "whole number", "float": "finite number"}.get(type(default).__name__, type(default).__name__)
        raise ConfigError(f"{key} must be a {kind}; got {value!r}") from None
    return value


def _finite(value) -> float:
    """A number from YAML or the command line; ValueError for a boolean, infinity or NaN."""
    if isinstance(value, bool):
        raise ValueError
    number = float(value)
    if not math.isfinite(number):
        raise ValueError
    return number
