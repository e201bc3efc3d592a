"""Tests of the `spinemri` command line: help, data synth, data check and data prepare."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import click
from click.testing import CliRunner
import pytest

from spinemri.cli import main as cli
from spinemri.data import readers, schema


def invoke(*args: str):
    """Run the CLI in-process; an unhandled exception (a traceback for the user) fails the test."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"unhandled {type(result.exception).__name__}: {result.exception}\n{result.output}")
    return result


def run_module(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m spinemri ARGS` as a user would."""
    return subprocess.run([sys.executable, "-m", "spinemri", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def assert_clean_error(output: str, *needles: str) -> None:
    assert "Traceback" not in output
    assert "Error" in output
    for needle in needles:
        assert needle in output, output


def command(*names: str) -> click.Command:
    group = cli
    for name in names:
        group = group.commands[name]
    return group


# --- help ------------------------------------------------------------------------------------------

def test_entry_point_help_runs_as_a_module():
    done = run_module("--help")
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout
    assert "data" in done.stdout


def test_data_group_help_lists_its_commands():
    result = invoke("data", "--help")
    assert result.exit_code == 0
    for name in ("synth", "check", "prepare"):
        assert re.search(rf"^\s+{name}\s+\S", result.output, re.MULTILINE), name


HEAVY = ("tensorflow", "keras", "mlflow", "pydicom", "optuna")  # what no --help may import


def command_paths(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group under ``group``, as the words that invoke it."""
    out = []
    for name, sub in group.commands.items():
        out.append((*prefix, name))
        if isinstance(sub, click.Group):
            out.extend(command_paths(sub, (*prefix, name)))
    return out


def test_no_help_imports_tensorflow_mlflow_or_pydicom():
    paths = [()] + command_paths()
    assert ("study", "predict") in paths and ("predict-study",) in paths and ("data", "synth") in paths
    code = ("import json, sys\nfrom click.testing import CliRunner\nfrom spinemri.cli import main\n"
            f"for words in {[list(p) for p in paths]!r}:\n"
            "    result = CliRunner().invoke(main, [*words, '--help'])\n"
            "    assert result.exit_code == 0 and 'Usage:' in result.output, (words, result.output)\n")
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "spinemri.cli" in imported  # the import log was read
    assert sorted(imported & set(HEAVY)) == []

@pytest.mark.parametrize("name", ["synth", "check", "prepare"])
def test_subcommand_help_describes_every_option(name):
    result = invoke("data", name, "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    options = [p for p in command("data", name).params if isinstance(p, click.Option)]
    assert options
    for option in options:
        assert option.help, f"{option.name} has no help text"
        assert option.opts[0] in text
        assert " ".join(option.help.split()[:4]) in text, option.name


# --- data synth ------------------------------------------------------------------------------------

def test_synth_writes_layout_refuses_to_overwrite_and_overwrites(tmp_path):
    out = tmp_path / "synth"
    result = invoke("data", "synth", "--out", out, "--studies", "2", "--seed", "1", "--workers", "1", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["studies"] == 2
    for name in (schema.TRAIN_CSV, schema.SERIES_CSV, schema.COORDINATES_CSV):
        assert (out / name).is_file()
    assert len(list((out / schema.IMAGES_DIR).iterdir())) == 2
    assert summary["images"] == len(list((out / schema.IMAGES_DIR).glob("*/*/*.dcm")))
    assert readers.check_dataset(out).ok

    again = run_module("data", "synth", "--out", out, "--studies", "2", "--seed", "1", "--workers", "1", "--json")
    assert again.returncode != 0
    assert_clean_error(again.stdout + again.stderr, "--overwrite", str(out))
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr

    replaced = invoke("data", "synth", "--out", out, "--studies", "2", "--seed", "1", "--workers", "1",
                      "--overwrite", "--json")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(replaced.stdout)["studies"] == 2


@pytest.mark.parametrize("args", [["--studies", "0"], ["--workers", "0"], ["--seed", "x"], ["--profile", "rsn"]])
def test_synth_bad_options_exit_non_zero(tmp_path, args):
    result = invoke("data", "synth", "--out", tmp_path / "x", *args)
    assert result.exit_code != 0
    assert_clean_error(result.output, args[0])
    assert not (tmp_path / "x").exists()


# --- data check ------------------------------------------------------------------------------------

def test_check_phantom_exits_0(phantom_dir):
    result = invoke("data", "check", phantom_dir)
    assert result.exit_code == 0, result.output
    assert "rsna layout" in result.stdout
    assert result.stdout.strip().endswith("OK")


def test_check_phantom_json_is_ok(phantom_dir):
    result = invoke("data", "check", phantom_dir, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["problems"] == []
    assert report["summary"]["studies"] == 8


def test_check_broken_dataset_exits_1_and_names_the_problem(phantom_copy):
    (phantom_copy / schema.SERIES_CSV).unlink()
    result = invoke("data", "check", phantom_copy)
    assert result.exit_code == 1
    assert f"{phantom_copy / schema.SERIES_CSV} is missing" in result.stderr
    assert "Traceback" not in result.output

    as_json = invoke("data", "check", phantom_copy, "--json")
    assert as_json.exit_code == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert any(schema.SERIES_CSV in p for p in report["problems"])


def test_check_nonexistent_path_exits_1(tmp_path):
    result = invoke("data", "check", tmp_path / "nowhere")
    assert result.exit_code == 1
    assert str(tmp_path / "nowhere") in result.output


# --- data prepare ----------------------------------------------------------------------------------

def test_prepare_reports_splits_and_reuses_the_cache(phantom_dir, cache_dir):
    args = ["data", "prepare", phantom_dir, "--img-size", "32", "--cache-dir", cache_dir, "--json"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout)
    n_samples = len(readers.load_samples(phantom_dir))
    assert result["reused"] is False
    assert result["samples"] == n_samples
    assert set(result["samples_per_split"]) == {"train", "val", "test"}
    assert sum(result["samples_per_split"].values()) == n_samples
    assert result["shape"] == [n_samples, 32, 32, 1]
    assert result["cache"].startswith(str(cache_dir))

    second = invoke(*args)
    assert second.exit_code == 0, second.output
    again = json.loads(second.stdout)
    assert again["reused"] is True
    assert again["cache"] == result["cache"]
    assert again["samples_per_split"] == result["samples_per_split"]


@pytest.mark.parametrize("args, needle", [
    (["--img-size", "4"], "--img-size 4"),
    (["--split", "0.5,0.5,0.5"], "--split"),
    (["--split", "a,b,c"], "--split"),
    (["--mode", "cube"], "cube"),
    (["--slices", "2"], "slices must be an odd number"),
])
def test_prepare_bad_options_exit_non_zero(phantom_dir, cache_dir, args, needle):
    result = invoke("data", "prepare", phantom_dir, "--cache-dir", cache_dir, *args)
    assert result.exit_code != 0
    assert_clean_error(result.output, needle)
    assert not cache_dir.exists() or not any(cache_dir.iterdir())


def test_prepare_nonexistent_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-data"
    done = run_module("data", "prepare", missing, "--cache-dir", tmp_path / "cache")
    assert done.returncode != 0
    assert_clean_error(done.stdout + done.stderr, str(missing))


def test_prepare_broken_dataset_names_the_problem(phantom_copy, cache_dir):
    (phantom_copy / schema.TRAIN_CSV).unlink()
    result = invoke("data", "prepare", phantom_copy, "--cache-dir", cache_dir)
    assert result.exit_code == 1
    assert_clean_error(result.output, f"{phantom_copy / schema.TRAIN_CSV} is missing")


def test_score_prints_the_competition_score_of_a_submission(phantom_dir, tmp_path):
    import pandas as pd

    from spinemri.metrics.competition import rsna_score

    labels = pd.read_csv(phantom_dir / "train.csv")
    rows = [(f"{study}_{column}", 0.6, 0.3, 0.1) for study in labels["study_id"][:4] for column in schema.LABEL_COLUMNS]
    submission = pd.DataFrame(rows, columns=["row_id", "normal_mild", "moderate", "severe"])
    path = tmp_path / "submission.csv"
    submission.to_csv(path, index=False)
    expected = rsna_score(labels[labels["study_id"].isin(labels["study_id"][:4])], submission)

    result = CliRunner().invoke(cli, ["score", "--labels", str(phantom_dir / "train.csv"), "--submission", str(path),
                                      "--json"])
    assert result.exit_code == 0, result.output
    parts = json.loads(result.output)
    assert parts["score"] == pytest.approx(expected)
    assert parts["rows"]["any_severe_spinal"] == 4
    text = CliRunner().invoke(cli, ["score", "--labels", str(phantom_dir / "train.csv"), "--submission", str(path)])
    assert f"score {expected:.4f}" in text.output and "foraminal:" in text.output

    missing = CliRunner().invoke(cli, ["score", "--labels", str(phantom_dir / "train.csv"),
                                       "--submission", str(tmp_path / "none.csv")])
    assert missing.exit_code == 1 and "none.csv" in missing.output and "Traceback" not in missing.output


BAD_SETTINGS = [
    ("SPINEMRI_SERIES_RULES", "{tmp}/missing.yaml", "missing.yaml: no such file"),
    ("SPINEMRI_SERIES_RULES", "{tmp}", "a folder, not a file"),
    ("SPINEMRI_SERIES_RULES", "{tmp}/binary.yaml", "is not a text file"),
    ("SPINEMRI_SERIES_RULES", "{tmp}/broken.yaml", "is not valid YAML"),
    ("SPINEMRI_SERIES_RULES", "{tmp}/mapping.yaml", "expected a list of rules"),
    ("SPINEMRI_SERIES_RULES", "{tmp}/regex.yaml", "rule 1"),
    ("SPINEMRI_SERIES_RULES", "{tmp}/result.yaml", "rule 1"),
    ("SPINEMRI_MAX_IMAGE_MB", "abc", "SPINEMRI_MAX_IMAGE_MB='abc' is not a number"),
    ("SPINEMRI_MAX_IMAGE_MB", "-1", "SPINEMRI_MAX_IMAGE_MB='-1' must be > 0"),
    ("SPINEMRI_MAX_IMAGE_PIXELS", "0", "SPINEMRI_MAX_IMAGE_PIXELS='0' must be > 0"),
    ("SPINEMRI_MAX_IMAGE_MB", "inf", "SPINEMRI_MAX_IMAGE_MB='inf' must be > 0 and finite"),
    ("SPINEMRI_MAX_STUDY_FILES", "1e400", "SPINEMRI_MAX_STUDY_FILES='1e400' must be > 0 and finite"),
    ("SPINEMRI_MAX_IMAGE_PIXELS", "0.5", "SPINEMRI_MAX_IMAGE_PIXELS='0.5' must be a whole number >= 1"),
    ("SPINEMRI_MAX_ANSWER_MB", "many", "SPINEMRI_MAX_ANSWER_MB='many' is not a number"),
    ("SPINEMRI_DICOM_READER", "nosuch", "SPINEMRI_DICOM_READER='nosuch' is not a reader"),
]


@pytest.fixture
def settings_files(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "broken.yaml").write_text("- name: [unclosed\n")
    (tmp_path / "mapping.yaml").write_text("name: x\nresult: skip\n")
    (tmp_path / "regex.yaml").write_text("- {name: bad, result: skip, description: '(['}\n")
    (tmp_path / "result.yaml").write_text("- {name: odd, result: Coronal PD, description: 'pd'}\n")
    return tmp_path


@pytest.mark.parametrize("variable, value, message", BAD_SETTINGS)
def test_every_command_that_reads_images_refuses_a_bad_setting_at_its_start(variable, value, message, phantom_dir,
                                                                            settings_files, monkeypatch):
    monkeypatch.setenv(variable, value.format(tmp=settings_files))
    for args in (["data", "check", str(phantom_dir)],
                 ["predict-study", "--data", str(settings_files / "no-such-folder")]):  # before it looks at data
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output, result.output
        assert "no-such-folder" not in result.output


@pytest.mark.parametrize("args, blamed, not_blamed", [
    (["--epochs", "1", "--set", "train.epochs=-1"], "(from --set train.epochs=-1)", "--epochs 1"),
    (["--img-size", "48", "--set", "preprocess.img_size=99999999"], "(from --set preprocess.img_size=99999999)",
     "--img-size 48"),
    (["--epochs", "2"], None, "(from"),  # the bad value is the experiment file's: no flag is blamed
    (["--set", "no.such.key=1"], "unknown setting 'no.such.key'", "quick.yaml"),
    (["--set", "train.nosuch=1"], "(from --set train.nosuch=1)", "quick.yaml"),
])
def test_a_refused_setting_names_the_source_that_gave_it(args, blamed, not_blamed, tmp_path):
    experiment = tmp_path / "broken.yaml"
    experiment.write_text("train:\n  epochs: 1\n  lr: [0.1,\n")  # not YAML
    command = ["train", *args, *(["--experiment", str(experiment)] if blamed is None else [])]
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    if blamed:
        assert blamed in result.output
    assert not_blamed not in result.output


def test_a_bad_value_in_the_experiment_file_names_the_file(tmp_path):
    experiment = tmp_path / "mine.yaml"
    experiment.write_text("train:\n  epochs: -1\n")
    result = CliRunner().invoke(cli, ["train", "--experiment", str(experiment)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "epochs must be an integer >= 1; got -1" in result.output and f"(in {experiment})" in result.output


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_infinite_and_undefined_numbers_are_refused_by_name(value):
    for key in ("train.epochs", "train.lr", "split.fractions"):
        shown = f"[{value}, 0.1, 0.1]" if key == "split.fractions" else value
        result = CliRunner().invoke(cli, ["train", "--set", f"{key}={shown}"])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert f"{key} must be a" in result.output and "finite" in result.output or "whole number" in result.output


def test_a_refused_setting_is_refused_before_tensorflow_is_imported():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom spinemri.cli import main\n"
            "result = CliRunner().invoke(main, ['train', '--set', 'no.such.key=1'])\n"
            "assert result.exit_code == 1 and 'unknown setting' in result.output, result.output\n"
            "print('tensorflow' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr[-2000:]
