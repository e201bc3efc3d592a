"""The MLflow UI, rendered by a real headless Chromium, shows what spinemri's training logged.

Two short training runs go to a private sqlite store; a real `mlflow server` serves it; the system
Chromium (``chromium --headless --dump-dom --screenshot``) renders the experiment's runs table and
the compare-runs page of :func:`spinemri.tracking.links.compare_runs_url`. The UI is a React app
that fetches its data after the first paint, so the browser is given virtual time
(``--virtual-time-budget``, which stands still while requests are pending) and a page that has not
shown the runs yet is rendered again with more.

Screenshots (1600x1000) land in each test's tmp folder and, when SPINEMRI_SCREENSHOTS names a
folder, there too. Without a Chromium on PATH (or SPINEMRI_CHROMIUM) the tests are skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterator

import mlflow
import pytest

from spinemri.config import load_experiment
from spinemri.tracking.links import compare_runs_url, experiment_runs_url
from spinemri.tracking.store import open_tracking_store
from tests.conftest import isolated_tracking

pytestmark = pytest.mark.xdist_group("ui")

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = (1600, 1000)
HEADLINE_METRICS = ("test_severity_weighted_log_loss", "test_rsna_score")
EXPERIMENT = "spinemri-classify"
SERVER_START_S = 180  # a cold `mlflow server` imports for 10-30 s on a busy 2-core machine
VIRTUAL_TIME_MS = (10_000, 30_000)  # the second render only when the first did not show the runs yet


def find_browser() -> str | None:
    """SPINEMRI_CHROMIUM if set, else the first Chromium or Chrome on PATH."""
    named = os.environ.get("SPINEMRI_CHROMIUM", "").strip()
    if named:
        return shutil.which(named) or (named if os.access(named, os.X_OK) else None)
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


@pytest.fixture(scope="module")
def browser() -> str:
    path = find_browser()
    if path is None:
        where = f"SPINEMRI_CHROMIUM={os.environ['SPINEMRI_CHROMIUM']} is not an executable" \
            if os.environ.get("SPINEMRI_CHROMIUM", "").strip() else f"none of {', '.join(BROWSERS)} is on PATH"
        pytest.skip(f"no headless browser for the MLflow UI check ({where}): `apt-get install chromium` "
                    "(make test does it when root on Debian), or set SPINEMRI_CHROMIUM to a Chrome binary")
    return path


# --- a real MLflow server over a private store ---------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(uri: str, workdir: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """Start `mlflow server` on ``uri`` in its own process group; yields its URL and a wait-until-up.

    Starting is not waiting, so the caller can log runs while the server imports. Job execution (a
    runner and seven huey consumers) is turned off: the UI pages checked here need none of it.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = open(workdir / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, lambda: wait_until_up(process, url, workdir / "server.log")
    finally:
        stop(process)
        log.close()


def wait_until_up(process: subprocess.Popen, url: str, log: Path, timeout: float = SERVER_START_S) -> None:
    """Return once ``url``/health answers; fail with the server's log if it exits or stays silent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer on {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """End the server and its uvicorn worker: SIGTERM to the group, SIGKILL after 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=15)


# --- two training runs -----------------------------------------------------------------------------

@dataclass
class UiStore:
    url: str
    experiment_id: str
    runs: list[mlflow.entities.Run]
    dataset_name: str


@pytest.fixture(scope="module")
def ui_store(browser, phantom_dir, tmp_path_factory) -> Iterator[UiStore]:
    """Two finished training runs (lr 1e-3 and 2e-3) in a private store, served by `mlflow server`."""
    from spinemri.training.train import train

    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    open_tracking_store(uri, reap=False)  # the tables exist before the server opens the store
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    with mlflow_server(uri, root) as (url, wait_until_up):
        with isolated_tracking(uri, root / "cache"):
            run_ids = [train(load_experiment("quick", {
                "arch": "tiny", "img_size": 32, "epochs": 1, "lr": lr, "data_dir": str(phantom_dir),
                "data.workers": 1, "mlflow.register": False,
                # two test studies: one alone may lack a foraminal label, and then there is no test_rsna_score
                "split.fractions": [0.6, 0.2, 0.2]}), log_model=False).run_id for lr in (1e-3, 2e-3)]
        runs = [client.get_run(run_id) for run_id in run_ids]
        for run in runs:
            assert run.info.status == "FINISHED" and set(HEADLINE_METRICS) <= set(run.data.metrics), \
                (run.info.status, sorted(run.data.metrics))
        wait_until_up()
        yield UiStore(url=url, experiment_id=experiment_id, runs=runs, dataset_name=phantom_dir.name)


# --- rendering ---------------------------------------------------------------------------------------

def render(browser: str, url: str, png: Path, ready: Callable[[str], bool]) -> str:
    """The DOM of ``url`` once ``ready(dom)`` (or after the last virtual-time budget), with a screenshot."""
    for budget in VIRTUAL_TIME_MS:
        dom = _render_once(browser, url, png, budget)
        if ready(dom):
            break
    for folder in filter(None, [os.environ.get("SPINEMRI_SCREENSHOTS", "").strip()]):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(folder) / png.name)
    return dom


def _render_once(browser: str, url: str, png: Path, budget_ms: int) -> str:
    """One headless load: the DOM after ``budget_ms`` of virtual time, and a PNG of the same moment."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
                   f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--virtual-time-budget={budget_ms}",
                   f"--screenshot={png}", "--dump-dom", url]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and png.is_file(), (done.returncode, done.stderr[-3000:])
    return done.stdout


class _Page(HTMLParser):
    """The text of a dumped DOM: all of it, per runs-table column header, and per (row, column) cell.

    The runs table is an ag-grid: a row is ``role=row`` with ``row-id`` = the run id, a cell
    ``role=gridcell`` with a ``col-id``, and a header ``role=columnheader`` with the same ``col-id``.
    """

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
    HIDDEN = {"script", "style", "noscript", "template"}

    def __init__(self, dom: str):
        super().__init__()
        self.stack: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.headers: dict[str, list[str]] = {}
        self.cells: dict[tuple[str, str], list[str]] = {}
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if any(tag in self.HIDDEN for tag, _ in self.stack) or not data.strip():
            return
        self.text.append(data.strip())
        row = next((a["row-id"] for _, a in reversed(self.stack) if a.get("role") == "row" and "row-id" in a), None)
        for _, attrs in reversed(self.stack):
            if "col-id" not in attrs:  # MLflow's own header parts also say role=columnheader
                continue
            if attrs.get("role") == "gridcell" and row is not None:
                self.cells.setdefault((row, attrs["col-id"]), []).append(data.strip())
                return
            if attrs.get("role") == "columnheader":
                self.headers.setdefault(attrs["col-id"], []).append(data.strip())
                return

    def all_text(self) -> str:
        return " ".join(self.text)

    def column(self, header: str) -> str:
        """The ``col-id`` of the column headed ``header``."""
        found = [col for col, words in self.headers.items() if " ".join(words) == header]
        assert found, f"no '{header}' column; the headers: {[' '.join(w) for w in self.headers.values()]}"
        return found[0]

    def cell(self, row_id: str, header: str) -> str:
        return " ".join(self.cells.get((row_id, self.column(header)), []))


def training_dataset(run: mlflow.entities.Run) -> str:
    """How the runs table shows the run's training dataset: ``name (digest)``; '' when none is logged."""
    for item in run.inputs.dataset_inputs if run.inputs else []:
        if any(t.key == "mlflow.data.context" and t.value == "training" for t in item.tags):
            return f"{item.dataset.name} ({item.dataset.digest})"
    return ""


# --- the checks ----------------------------------------------------------------------------------------

def test_the_runs_table_lists_both_runs_with_their_training_dataset(browser, ui_store, tmp_path):
    run_ids = [run.info.run_id for run in ui_store.runs]
    dom = render(browser, experiment_runs_url(ui_store.url, ui_store.experiment_id), tmp_path / "runs_table.png",
                 ready=lambda dom: all(f'row-id="{run_id}"' in dom for run_id in run_ids))
    page = _Page(dom)
    for run in ui_store.runs:
        # the cell also holds the run's colour ("#277c43 tiny-20261202-130501")
        assert run.info.run_name in page.cell(run.info.run_id, "Run Name").split(), page.all_text()[:3000]
    shown = {run.info.run_name: page.cell(run.info.run_id, "Dataset") for run in ui_store.runs}
    logged = {run.info.run_name: training_dataset(run) for run in ui_store.runs}
    expected = f"{ui_store.dataset_name} ("
    assert all(text.startswith(expected) and "training" in text.lower() and logged[name] in text
               for name, text in shown.items()), \
        f"the Dataset column should show the training dataset '{expected}<digest>)': shown {shown}, " \
        f"logged as training input (mlflow.log_input) {logged}"


def test_the_compare_page_shows_both_runs_and_the_headline_metrics(browser, ui_store, tmp_path):
    run_ids = [run.info.run_id for run in ui_store.runs]
    url = compare_runs_url(ui_store.url, run_ids, [ui_store.experiment_id])
    dom = render(browser, url, tmp_path / "compare_runs.png",
                 ready=lambda dom: all(run_id in _Page(dom).all_text() for run_id in run_ids))
    text = _Page(dom).all_text()
    expected = run_ids + [run.info.run_name for run in ui_store.runs] + list(HEADLINE_METRICS)
    missing = [word for word in expected if word not in text]
    assert not missing, f"the compare page ({url}) lacks {missing}:\n{text[:3000]}"
