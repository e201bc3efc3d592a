"""The MLflow UI, rendered by a real headless Chromium, shows what spinemri's training logged.

Two short training runs go to a private sqlite store, a real `mlflow server` serves it, and the
system Chromium opens the experiment's runs table and the compare-runs page of
:func:`spinemri.tracking.links.compare_runs_url`. Chromium is driven over the DevTools protocol on
a pipe (``--remote-debugging-pipe``: no port, no extra package): the UI is a React app that fetches
its data after the first paint, so each check waits, within a bound, until the page shows the runs,
and the compare page's metrics table is virtualized (about seven rows drawn at a time), so its
metric names are read by scrolling it.

Screenshots (1600x1000: runs_table.png, compare_runs.png and compare_runs_metrics.png, the latter
scrolled to the metrics table) land in each test's tmp folder and, when SPINEMRI_SCREENSHOTS names
a folder, there too. Without a Chromium on PATH (or SPINEMRI_CHROMIUM) the tests are skipped.
"""

from __future__ import annotations

import base64
import contextlib
from dataclasses import dataclass
import fcntl
import json
import os
from pathlib import Path
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator
import urllib.request

import mlflow
import pytest

from spinemri.config import load_experiment
from spinemri.tracking.links import compare_runs_url, experiment_runs_url, run_url
from tests.conftest import copy_store, isolated_tracking

pytestmark = pytest.mark.xdist_group("ui")

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = (1600, 1000)
HEADLINE_METRICS = ("test_severity_weighted_log_loss", "test_rsna_score")
EXPERIMENT = "spinemri-classify"
REGISTERED = "spinemri-ui"
SERVER_START_S = 180  # a cold `mlflow server` imports for 10-30 s on a busy 2-core machine
PAGE_LOAD_S = 60  # the UI's first paint and fetches: about 6 s on a busy 2-core machine


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
    log_path = workdir / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, lambda: wait_until_up(process, url, log_path)
    finally:
        stop(process)


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


def stop(process: subprocess.Popen, grace: float = 15) -> None:
    """End a process started in its own session and all it started: SIGTERM, then SIGKILL after ``grace`` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=grace)


# --- two training runs -----------------------------------------------------------------------------

@dataclass
class UiStore:
    url: str
    experiment_id: str
    runs: list[Any]  # mlflow.entities.Run
    dataset_name: str
    uri: str = ""  # the tracking store


@pytest.fixture(scope="module")
def ui_store(browser, phantom_dir, tmp_path_factory, store_template) -> Iterator[UiStore]:
    """Two finished training runs (lr 1e-3 and 2e-3) in a private store, served by `mlflow server`; the first
    one's model is registered, with its decision."""
    from spinemri.api.classifier import train

    root = tmp_path_factory.mktemp("ui")
    uri = copy_store(store_template, root / "mlflow.db")  # the tables exist before the server opens the store
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    with mlflow_server(uri, root) as (url, wait_until_up):
        with isolated_tracking(uri, root / "cache"):
            run_ids = [train(load_experiment("quick", {
                "arch": "tiny", "img_size": 32, "epochs": 1, "lr": lr, "data_dir": str(phantom_dir),
                "data.workers": 1, "mlflow.register": registered, "mlflow.registered_model": REGISTERED,
                # two test studies: one alone may lack a foraminal label, and then there is no test_rsna_score
                "split.fractions": [0.6, 0.2, 0.2]}), log_model=registered).run_id
                for lr, registered in ((1e-3, True), (2e-3, False))]
        runs = [client.get_run(run_id) for run_id in run_ids]
        for run in runs:
            assert run.info.status == "FINISHED" and set(HEADLINE_METRICS) <= set(run.data.metrics), \
                (run.info.status, sorted(run.data.metrics))
        wait_until_up()
        yield UiStore(url=url, experiment_id=experiment_id, runs=runs, dataset_name=phantom_dir.name, uri=uri)


# --- a headless Chromium over the DevTools protocol ------------------------------------------------

# Puts the pipe ends on fds 3 and 4, where --remote-debugging-pipe expects them, then becomes Chromium
# (a shell cannot do it portably: dash takes one-digit fds only; preexec_fn is unsafe with threads).
PIPE_LAUNCHER = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); " \
                "os.execv(sys.argv[3], sys.argv[3:])"


def _above_4(fd: int) -> int:
    """``fd`` moved to a number above 4, so that putting one pipe end on 3 or 4 cannot close the other."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 5)
    os.close(fd)
    return moved


class Chromium:
    """One headless Chromium with one page, driven over ``--remote-debugging-pipe``.

    Chromium reads protocol messages (JSON, each ended by a NUL byte) on its fd 3 and answers on fd 4;
    every call waits for its own answer, within a bound, and events in between are dropped.
    """

    def __init__(self, binary: str, workdir: Path, window: tuple[int, int] = WINDOW):
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True)
        command_read, self._command_write = os.pipe()
        self._reply_read, reply_write = os.pipe()
        command_read, reply_write = _above_4(command_read), _above_4(reply_write)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--hide-scrollbars", "--remote-debugging-pipe", f"--user-data-dir={self.profile.name}",
                f"--window-size={window[0]},{window[1]}", "about:blank"]
        with open(workdir / "chromium.log", "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", PIPE_LAUNCHER, str(command_read), str(reply_write), binary, *args],
                pass_fds=(command_read, reply_write), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(command_read)
        os.close(reply_write)
        self._last_id, self._buffer = 0, b""
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.page("Emulation.setDeviceMetricsOverride", width=window[0], height=window[1], deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params) -> dict:
        """Send one protocol command (to the browser, or to a page's ``session``) and return its result."""
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._command_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._last_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._reply_read], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer {method} within {timeout} s")
            chunk = os.read(self._reply_read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed its pipe during {method} (exit {self.process.poll()})")
            self._buffer += chunk

    def page(self, method: str, **params) -> dict:
        return self.call(method, session=self.session, **params)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:200]}: {result['exceptionDetails'].get('exception', result)}")
        return result["result"].get("value")

    def open(self, url: str, ready: str, timeout: float = PAGE_LOAD_S) -> None:
        """Navigate to ``url`` and wait until the JavaScript condition ``ready`` holds."""
        self.page("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"(() => {{ try {{ return Boolean({ready}); }} catch (e) {{ return false; }} }})()"):
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''") or ""
                pytest.fail(f"{url} did not show {ready} within {timeout:.0f} s; the page shows:\n{text[:3000]}")
            time.sleep(0.25)

    def screenshot(self, path: Path) -> None:
        """A PNG of the viewport, saved to ``path`` and copied into $SPINEMRI_SCREENSHOTS when set."""
        path.write_bytes(base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"]))
        folder = os.environ.get("SPINEMRI_SCREENSHOTS", "").strip()
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(folder) / path.name)

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.call("Browser.close", timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        stop(self.process, grace=5)
        os.close(self._command_write)
        os.close(self._reply_read)
        self.profile.cleanup()


@pytest.fixture(scope="module")
def chromium(browser, tmp_path_factory) -> Iterator[Chromium]:
    driver = Chromium(browser, tmp_path_factory.mktemp("chromium"))
    try:
        yield driver
    finally:
        driver.close()


def eventually(read: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 10) -> Any:
    """``read()`` until ``ok`` holds or ``timeout`` s pass; returns the last value read."""
    deadline = time.monotonic() + timeout
    while not ok(value := read()) and time.monotonic() < deadline:
        time.sleep(0.25)
    return value


# In the runs table (an ag-grid) a row is role=row with row-id = the run id, a cell role=gridcell and
# a column header role=columnheader with the same col-id; innerText is the text as drawn.
RUNS_TABLE_JS = """(() => {
  const headers = {};
  for (const h of document.querySelectorAll('[role=columnheader][col-id]')) headers[h.getAttribute('col-id')] = h.innerText.trim();
  const rows = {};
  for (const cell of document.querySelectorAll('[role=row][row-id] [role=gridcell][col-id]')) {
    const row = cell.closest('[role=row][row-id]').getAttribute('row-id');
    (rows[row] = rows[row] || {})[headers[cell.getAttribute('col-id')] || cell.getAttribute('col-id')] = cell.innerText.trim();
  }
  return rows;
})()"""

# The compare page's metrics table: two react-virtualized grids, names and values, that draw only the
# rows their 300 px show; the values grid scrolls and the names grid follows it. Scrolled through to
# read every metric name in order, then left at the row of `show`, in view.
METRIC_GRIDS = "document.querySelectorAll('.ReactVirtualized__Grid')"
METRICS_TABLE_JS = """(async (show) => {
  const grids = [...%s];
  if (grids.length !== 2) return null;
  const [names, values] = grids;
  const drawn = () => new Promise(done => requestAnimationFrame(() => setTimeout(done, 50)));
  const scroll = async (top) => { values.scrollTop = top; await drawn(); names.scrollTop = top; await drawn(); };
  const lines = () => names.innerText.split('\\n').map(line => line.trim()).filter(Boolean);
  const seen = [];
  for (let top = 0; ; top += names.clientHeight) {
    await scroll(top);
    for (const name of lines()) if (!seen.includes(name)) seen.push(name);
    if (top >= names.scrollHeight - names.clientHeight) break;
  }
  await scroll(Math.max(0, seen.indexOf(show)) * names.scrollHeight / seen.length);
  names.scrollIntoView({block: 'center'});
  await drawn();
  return {names: seen, drawn: lines()};
})""" % METRIC_GRIDS


def training_dataset(run) -> str:
    """How the runs table shows the run's training dataset, ``name (digest)``; '' when none is logged."""
    for item in run.inputs.dataset_inputs if run.inputs else []:
        if any(t.key == "mlflow.data.context" and t.value == "training" for t in item.tags):
            return f"{item.dataset.name} ({item.dataset.digest})"
    return ""


# --- the checks ----------------------------------------------------------------------------------------

def test_the_runs_table_lists_both_runs_with_their_training_dataset(ui_store, chromium, tmp_path):
    run_ids = [run.info.run_id for run in ui_store.runs]
    rows_shown = " && ".join(f"document.querySelector('[role=row][row-id=\"{run_id}\"]')" for run_id in run_ids)
    chromium.open(experiment_runs_url(ui_store.url, ui_store.experiment_id), ready=rows_shown)
    folder = ui_store.dataset_name
    table = eventually(lambda: chromium.evaluate(RUNS_TABLE_JS),
                       lambda rows: all(rows.get(r, {}).get("Dataset", "").startswith(folder) for r in run_ids),
                       timeout=5)
    chromium.screenshot(tmp_path / "runs_table.png")
    for run in ui_store.runs:
        assert run.info.run_name in table[run.info.run_id].get("Run Name", "").split(), table
    # name (digest) of each run's training input, as the column draws it: named after the data folder
    logged = {run.info.run_name: training_dataset(run) for run in ui_store.runs}
    shown = {run.info.run_name: table[run.info.run_id].get("Dataset", "") for run in ui_store.runs}
    assert all(logged[name].startswith(folder) and logged[name] in text and "training" in text.lower()
               for name, text in shown.items()), \
        f"the Dataset column should show each run's training input, named after the data folder " \
        f"'{folder}': shown {shown}, logged as training input (mlflow.log_input) {logged}"


def test_the_compare_page_shows_both_runs_and_the_headline_metrics(ui_store, chromium, tmp_path):
    run_ids = [run.info.run_id for run in ui_store.runs]
    url = compare_runs_url(ui_store.url, run_ids, [ui_store.experiment_id])
    ids_shown = " && ".join(f"document.body.innerText.includes('{run_id}')" for run_id in run_ids)
    chromium.open(url, ready=f"{ids_shown} && {METRIC_GRIDS}.length === 2")
    chromium.screenshot(tmp_path / "compare_runs.png")
    text = chromium.evaluate("document.body.innerText")
    missing = [word for word in run_ids + [run.info.run_name for run in ui_store.runs] if word not in text]
    assert not missing, f"the compare page ({url}) lacks {missing}:\n{text[:3000]}"

    table = chromium.evaluate(f"{METRICS_TABLE_JS}({json.dumps(HEADLINE_METRICS[1])})")
    assert table is not None, f"the compare page's metrics table is no longer two virtualized grids:\n{text[:3000]}"
    assert set(HEADLINE_METRICS) <= set(table["names"]), table["names"]
    assert set(table["names"]) == set(ui_store.runs[0].data.metrics) | set(ui_store.runs[1].data.metrics)
    assert HEADLINE_METRICS[1] in table["drawn"], table["drawn"]  # the second picture shows the score's row
    chromium.screenshot(tmp_path / "compare_runs_metrics.png")


def test_a_printed_run_link_opens_the_run_in_the_model_training_view(ui_store, chromium, tmp_path):
    run = ui_store.runs[0]
    url = run_url(ui_store.url, ui_store.experiment_id, run.info.run_id)
    chromium.open(url, ready=f"document.body.innerText.includes('{run.info.run_name}')")
    text = eventually(lambda: chromium.evaluate("document.body.innerText"), lambda s: "Model registry" in s, timeout=10)
    chromium.screenshot(tmp_path / "run_page.png")
    # the model-training view's navigation (Runs, Models, Model registry), not the GenAI one's
    assert "Model registry" in text and "Models" in text, text[:2000]
    assert "Observability" not in text and "Prompts & versions" not in text, text[:2000]
    assert "per-site prior" in text  # the run's description: its verdict
    experiment = mlflow.MlflowClient(ui_store.uri).get_experiment(ui_store.experiment_id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"


def test_the_run_page_opens_on_the_headline_charts(ui_store, chromium, tmp_path):
    run = ui_store.runs[0]
    headline = sorted(k.removeprefix("headline/") for k in run.data.metrics if k.startswith("headline/"))
    assert {"test_severity_weighted_log_loss", "test_floor_severity_weighted_log_loss", "test_vs_floor"} <= \
        set(headline), sorted(run.data.metrics)
    url = run_url(ui_store.url, ui_store.experiment_id, run.info.run_id).replace("?", "/model-metrics?", 1)
    chromium.open(url, ready="document.body.innerText.includes('Add chart')")
    lines = eventually(lambda: chromium.evaluate("document.body.innerText").splitlines(),
                       lambda shown: all(name in shown for name in headline), timeout=20)
    chromium.screenshot(tmp_path / "run_metrics.png")
    # The first group of charts is the headline (MLflow titles each chart without its group's prefix), and
    # its charts are the headline metrics, before any other group.
    groups = [i for i, line in enumerate(lines) if line == "Add chart"]
    assert len(groups) >= 2, lines[:80]
    first, second = groups[0], groups[1]
    assert lines[first - 2:first] == ["headline", f"({len(headline)})"], lines[:first + 1]
    charts = [line for line in lines[first + 1:second] if line in set(run.data.metrics) | set(headline)]
    assert sorted(charts) == headline, lines[first:second]
    assert lines[second - 2] == "Model metrics", lines[second - 3:second + 1]  # everything else, after it


def test_the_registry_shows_each_version_with_its_decision(ui_store, chromium, tmp_path):
    client = mlflow.MlflowClient(ui_store.uri)
    (found,) = client.search_model_versions(f"name = '{REGISTERED}'")
    version = client.get_model_version(REGISTERED, found.version)  # with its aliases, which a search leaves out
    decision = version.tags["decision"]
    alias = version.aliases[0]
    chromium.open(f"{ui_store.url}/#/models/{REGISTERED}?workflowType=machine_learning",
                  ready=f"document.body.innerText.includes('Version {version.version}')")
    text = eventually(lambda: chromium.evaluate("document.body.innerText"), lambda s: alias in s, timeout=10)
    chromium.screenshot(tmp_path / "registered_model.png")
    assert f"@\xa0{alias}" in text or f"@ {alias}" in text, text[:3000]  # the alias beside the version
    assert decision in text, text[:3000]  # the decision, whole, among its tags
    chromium.open(f"{ui_store.url}/#/models/{REGISTERED}/versions/{version.version}?workflowType=machine_learning",
                  ready="document.body.innerText.includes('Description')")
    text = eventually(lambda: chromium.evaluate("document.body.innerText"), lambda s: decision in s, timeout=10)
    chromium.screenshot(tmp_path / "model_version.png")
    # the version's description: how it compares with its floor, then the decision with the alias it got
    assert version.description.startswith(version.tags["verdict_sentence"]), version.description
    assert f"{alias}: {decision}" in text and version.tags["verdict_sentence"] in text, text[:3000]
