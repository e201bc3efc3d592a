"""Passwords in URLs never reach what spinemri prints or logs."""

from __future__ import annotations


import pytest
from click.testing import CliRunner

from spinemri.cli import main
from spinemri.redact import redact


@pytest.mark.parametrize("text, expected", [
    ("postgresql://alice:s3cret@db:5432/optuna", "postgresql://alice:***@db:5432/optuna"),
    ("storage postgresql+psycopg2://u:p%40ss@h/db is unreachable", "storage postgresql+psycopg2://u:***@h/db is "
                                                                  "unreachable"),
    ("http://bob:hunter2@mlflow.internal:5000 and https://x.org", "http://bob:***@mlflow.internal:5000 and https://x.org"),
    ("postgresql://h/db?user=u&password=s3cret&sslmode=require", "postgresql://h/db?user=u&password=***&sslmode=require"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("postgresql://alice@db/optuna", "postgresql://alice@db/optuna"),
])
def test_redact_masks_passwords_only(text, expected):
    assert redact(text) == expected


def test_an_unreachable_storage_error_hides_the_password(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    result = CliRunner().invoke(main, ["tune", "--arch", "tiny", "--trials", "1",
                                       "--storage", "postgresql://alice:s3cret@127.0.0.1:1/optuna",
                                       "--set", "data.phantom_studies=3"])
    assert result.exit_code == 1, result.output
    assert "s3cret" not in result.output and "alice:***@127.0.0.1:1/optuna" in result.output
    assert "Traceback" not in result.output
