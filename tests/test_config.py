"""Experiment configuration: YAML files, overrides, validation messages naming the key."""

from __future__ import annotations

import pytest

from spinemri.config import load_experiment, parse_override
from spinemri.errors import ConfigError


def test_quick_experiment_loads_with_its_values():
    config = load_experiment("quick")
    assert config.name == "quick"
    assert config.model.arch == "densenet" and config.model.weights == "none"
    assert config.preprocess.img_size == 96 and config.train.epochs == 6
    assert config.data.data_dir == ""
    assert config.flat()["train.lr"] == pytest.approx(0.001)


def test_rsna_experiment_uses_the_native_size_and_thesis_protocol():
    config = load_experiment("rsna")
    assert config.preprocess.img_size == 299  # inception_v3
    assert (config.train.epochs, config.train.batch_size, config.train.optimizer) == (20, 8, "adam")
    assert config.model.weights == "imagenet"
    assert load_experiment("rsna", {"arch": "nasnet_large"}).preprocess.img_size == 331
    assert load_experiment("rsna", {"arch": "densenet"}).preprocess.img_size == 224


def test_overrides_from_the_command_line_are_typed():
    config = load_experiment("quick", {"arch": "tiny", "img_size": "64", "epochs": "2", "lr": "3e-4",
                                       "batch_size": "8", "mode": "slice", "seed": "5", "data_dir": ""})
    assert config.model.arch == "tiny"
    assert config.preprocess.img_size == 64 and config.preprocess.mode == "slice"
    assert (config.train.epochs, config.train.batch_size, config.train.seed) == (2, 8, 5)
    assert config.train.lr == pytest.approx(3e-4)
    assert config.data.data_dir == ""  # empty keeps the experiment's value
    key, value = parse_override("train.augment.flip=true")
    config = load_experiment("quick", {key: value, "model.loss_weights": {"level": 0}})
    assert config.train.augment.flip is True
    assert config.model.loss_weights == {"condition": 1.0, "level": 0, "severity": 1.0}


@pytest.mark.parametrize("overrides, message", [
    ({"epochs": "-1"}, "epochs must be an integer >= 1"),
    ({"epochs": "two"}, "epochs must be a whole number"),
    ({"batch_size": "0"}, "batch_size must be an integer >= 1"),
    ({"lr": "0"}, "lr must be > 0"),
    ({"mode": "cube"}, "mode must be one of roi, slice"),
    ({"img_size": "4"}, "img_size must be an integer from 8"),
    ({"train.optimizer": "rmsprop"}, "train.optimizer must be one of adam, adamw, sgd"),
    ({"train.freeze_epochs": "9"}, "train.freeze_epochs must be within"),
    ({"model.dropout": "1.5"}, "model.dropout must be within"),
    ({"train.monitor": "loss"}, "train.monitor must be a validation metric"),
    ({"weights": "/nowhere/w.h5"}, "weights must be 'imagenet', 'none' or the path"),
    ({"train.colour": "1"}, "unknown setting 'train.colour': section train has no setting 'colour'"),
    ({"preprocess.colour": "1"}, "unknown setting 'preprocess.colour': section preprocess has no setting 'colour'"),
    ({"split.fractions": [0.9, 0.1, 0.0]}, "split.fractions"),
    ({"tuning.heartbeat_interval": "0"}, "tuning.heartbeat_interval must be a whole number of seconds >= 1"),
    ({"tuning.heartbeat_interval": "5", "tuning.grace_period": "5"}, "tuning.grace_period must be a whole number of "
                                                                     "seconds above tuning.heartbeat_interval (5), e.g. 15"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_experiment("quick", overrides)
    assert message in str(info.value)


def test_unknown_experiment_lists_the_available_ones():
    with pytest.raises(ConfigError, match="experiment 'quik' not found.*quick.*rsna"):
        load_experiment("quik")


def test_experiment_from_a_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: {arch: tiny}\ntrain: {epochs: 1}\n")
    config = load_experiment(path)
    assert config.name == "mine" and config.model.arch == "tiny" and config.train.epochs == 1
    path.write_text("model: [not, a, mapping]\n")
    with pytest.raises(ConfigError, match="model must be a mapping"):
        load_experiment(path)
    path.write_text("model: {arch: tiny\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(path)


def test_parse_override_needs_an_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


@pytest.mark.parametrize("text, message", [
    ("train.lr=[1e-3", "--set train.lr: '[1e-3' is not valid YAML"),
    ("model.arch=!!python/object/apply:os.system ['echo owned']", "uses a YAML tag"),
])
def test_set_with_bad_yaml_is_a_clear_error(text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_override(text)
    from click.testing import CliRunner

    from spinemri.cli import main

    result = CliRunner().invoke(main, ["train", "--set", text])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_a_logged_config_masks_url_passwords():
    config = load_experiment("quick", {"storage": "postgresql://alice:s3cret@db.example:5432/optuna"})
    assert config.tuning.storage.endswith("s3cret@db.example:5432/optuna")  # the run itself uses it
    assert config.flat()["tuning.storage"] == "postgresql://alice:***@db.example:5432/optuna"
    assert "s3cret" not in str(config.to_dict(redacted=True))
