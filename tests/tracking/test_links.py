"""Links into the MLflow UI (spinemri.tracking.links); test_ui_browser.py opens them in a browser."""

from __future__ import annotations

import json
from urllib.parse import unquote

import pytest

from spinemri.tracking.links import DEFAULT_UI_URL, compare_runs_url, experiment_runs_url, run_url, ui_base_url


@pytest.mark.parametrize("uri", ["sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "./mlruns",
                                 "postgresql://user@db:5432/mlflow", ""])
def test_a_local_or_database_store_is_read_by_mlflow_ui_on_its_default_address(uri):
    assert ui_base_url(uri) == DEFAULT_UI_URL == "http://127.0.0.1:5000"


@pytest.mark.parametrize("uri", ["http://mlflow.internal:5000", "https://mlflow.example.org/", "http://h:1/prefix/"])
def test_a_tracking_server_serves_its_own_ui(uri):
    assert ui_base_url(uri) == uri.rstrip("/")


def test_an_explicit_ui_url_wins_without_its_trailing_slash():
    assert ui_base_url("sqlite:///m.db", "http://box:8080/") == "http://box:8080"
    assert ui_base_url("http://tracking:5000", " https://ui.example.org// ") == "https://ui.example.org"
    assert ui_base_url("http://tracking:5000", "  ") == "http://tracking:5000"


def test_run_and_runs_table_pages_are_hash_routes():
    # in the UI's model-training view (its GenAI view is the default)
    assert run_url("http://127.0.0.1:5000/", "3", "abc123") == \
        "http://127.0.0.1:5000/#/experiments/3/runs/abc123?workflowType=machine_learning"
    assert experiment_runs_url("http://127.0.0.1:5000", "3") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"


def test_compare_runs_url_is_the_route_the_ui_builds_with_quotes_encoded_as_the_browser_does():
    url = compare_runs_url("http://127.0.0.1:5000/", ["a1", "b2"], ["7", "12", "7"])
    # The UI: `/compare-runs?runs=${JSON.stringify(runs)}&experiments=${JSON.stringify(ids)}`; the
    # address bar then shows the quotes as %22 (the fragment's percent-encode set).
    assert url == ('http://127.0.0.1:5000/#/compare-runs?runs=[%22a1%22,%22b2%22]'
                   '&experiments=[%2212%22,%227%22]&workflowType=machine_learning')
    query = url.split("#/compare-runs?", 1)[1]
    params = dict(part.split("=", 1) for part in query.split("&"))
    assert json.loads(unquote(params["runs"])) == ["a1", "b2"]  # the page decodes, then JSON.parse-s
    assert json.loads(unquote(params["experiments"])) == ["12", "7"]
    assert " " not in url and '"' not in url


def test_compare_runs_url_keeps_the_runs_order_and_accepts_integer_experiment_ids():
    url = compare_runs_url("http://h", ["z", "a"], [1])
    assert "runs=[%22z%22,%22a%22]&experiments=[%221%22]&" in url
