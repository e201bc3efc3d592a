"""Tests that the packaging files agree: pyproject.toml, conda.yaml, MLproject, .ci/run and .gitignore."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest
import yaml

from spinemri import cli

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def conda_env() -> dict:
    return yaml.safe_load((ROOT / "conda.yaml").read_text())


def mlproject() -> dict:
    return yaml.safe_load((ROOT / "MLproject").read_text())


def normalise(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower()


def test_conda_pip_dependencies_equal_pyproject_dependencies():
    pip = [d["pip"] for d in conda_env()["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1
    declared = pyproject()["project"]["dependencies"]
    assert declared
    assert sorted(map(normalise, pip[0])) == sorted(map(normalise, declared))


def test_conda_python_satisfies_requires_python():
    pins = [d for d in conda_env()["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert len(pins) == 1
    conda_version = tuple(int(v) for v in re.fullmatch(r"python=(\d+)\.(\d+)", pins[0]).groups())
    minimum = tuple(int(v) for v in re.fullmatch(r">=(\d+)\.(\d+)", pyproject()["project"]["requires-python"]).groups())
    assert conda_version >= minimum


def test_mlproject_uses_conda_yaml():
    assert (ROOT / mlproject()["conda_env"]).is_file()


def test_mlproject_has_synth_and_prepare_entry_points():
    assert {"synth", "prepare"} <= set(mlproject()["entry_points"])


@pytest.mark.parametrize("name", ["synth", "prepare", "main", "tune", "localize", "ablation"])
def test_mlproject_placeholders_are_declared_parameters(name):
    entry = mlproject()["entry_points"][name]
    placeholders = set(re.findall(r"(?<!\$)\{(\w+)\}", entry["command"]))
    parameters = set(entry.get("parameters", {}))
    assert placeholders, entry["command"]
    assert placeholders <= parameters, placeholders - parameters
    assert parameters <= placeholders, f"declared but unused: {parameters - placeholders}"


@pytest.mark.parametrize("name", ["synth", "prepare"])
def test_mlproject_commands_use_existing_cli_options(name):
    command = mlproject()["entry_points"][name]["command"]
    assert f"-m spinemri data {name}" in command
    options = {opt for p in cli.main.commands["data"].commands[name].params
               if isinstance(p, click.Option) for opt in p.opts}
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", command))
    assert used
    assert used <= options, used - options


@pytest.mark.parametrize("name, command", [("main", "train"), ("tune", "tune"), ("localize", "train"),
                                           ("ablation", "ablation")])
def test_mlproject_step_commands_use_existing_cli_options(name, command):
    text = mlproject()["entry_points"][name]["command"]
    assert f"-m spinemri {command} " in text
    options = {opt for p in cli.main.commands[command].params if isinstance(p, click.Option) for opt in p.opts}
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
    assert used and used <= options, used - options


def test_console_script_points_at_the_cli():
    assert pyproject()["project"]["scripts"]["spinemri"] == "spinemri.cli:main"
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "spinemri"]
    assert script.load() is cli.main


def test_ci_run_is_executable_and_runs_make_test():
    run = ROOT / ".ci" / "run"
    assert run.is_file()
    assert os.access(run, os.X_OK)
    text = run.read_text()
    assert text.startswith("#!")
    commands = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in commands
    assert re.search(r"^test:", (ROOT / "Makefile").read_text(), re.MULTILINE)


@pytest.mark.parametrize("path, ignored", [
    ("mlflow.db", True),
    ("mlruns/0/meta.yaml", True),
    (".venv/bin/python", True),
    ("scan.dcm", True),
    ("some/folder/1.dcm", True),
    ("data/phantom/train.csv", True),
    ("request.json", True),
    ("spinemri.tflite", True),
    ("spinemri.onnx", True),
    ("tests/data/test_new.py", False),
    ("src/spinemri/cli.py", False),
    ("tests/test_packaging.py", False),
    ("MLproject", False),
])
def test_gitignore(path, ignored):
    done = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr
    assert (done.returncode == 0) is ignored
