"""Links into the MLflow UI: where it is served for a tracking store, and its pages for runs.

The UI is a single-page app with hash routes (``http://host:port/#/experiments/1/runs/<id>``); the
URLs built here are the ones the UI itself navigates to, so that a command can print a link that
opens the same page as clicking through the UI.
"""

from __future__ import annotations

import json
from urllib.parse import quote

DEFAULT_UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` and `mlflow server` serve by default
# The UI opens in its GenAI view unless a page's query names the model-training one (it then stays there).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def ui_base_url(tracking_uri: str, ui_url: str = "") -> str:
    """The MLflow UI's base URL for a tracking store.

    An explicit ``ui_url`` wins; an http(s) tracking URI is a server that also serves the UI; any
    other store (sqlite, file, postgresql) is read by a local ``mlflow ui``, on its default address.
    """
    if ui_url.strip():
        return ui_url.strip().rstrip("/")
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return DEFAULT_UI_URL


def run_url(base_url: str, experiment_id: str, run_id: str) -> str:
    """The UI page of one run, in the model-training view."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def experiment_runs_url(base_url: str, experiment_id: str) -> str:
    """The UI's runs table of one experiment (its ``/runs`` tab; the bare experiment page may open elsewhere)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING_VIEW}"


def compare_runs_url(base_url: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The UI's compare-runs page for these runs of these experiments.

    The UI builds ``#/compare-runs?runs=["a","b"]&experiments=["1"]`` from ``JSON.stringify`` and
    the browser percent-encodes the quotes; the same is done here so that the link survives being
    printed, pasted or put in Markdown. Experiment ids are sorted, as the UI's "Compare" button does.
    """
    runs = _json_param(list(run_ids))
    experiments = _json_param(sorted({str(v) for v in experiment_ids}))
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}&{MODEL_TRAINING_VIEW}"


def _json_param(values: list[str]) -> str:
    """A list as the UI's JSON query value: compact like ``JSON.stringify``, quotes percent-encoded."""
    return quote(json.dumps([str(v) for v in values], separators=(",", ":")), safe="[],:")
